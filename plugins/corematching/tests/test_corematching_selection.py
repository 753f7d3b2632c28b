import math

import torch

from edgesparse_corematching import selection


def test_token_core_neurons_takes_top_rho_of_the_positive_ones():
    act = torch.tensor([[[5.0, 4.0, 3.0, 2.0, 1.0, -1.0, -2.0, 0.0, 0.5, 6.0]]])   # 7 positive
    core = selection.token_core_neurons(act, 0.3)                                   # ceil(2.1) = 3
    assert core[0, 0].nonzero().flatten().tolist() == [0, 1, 9]
    assert not selection.token_core_neurons(-act.abs() - 1, 0.3).any()             # nothing positive



def test_token_core_neurons_match_a_per_token_sort():
    """The partial top-k gives the same core sets as sorting each token's activations, including
    tokens whose activations are all positive (keep at its largest) and ties."""
    torch.manual_seed(0)
    act = torch.randn(3, 17, 96)
    act[0, 0] = act[0, 0].abs() + 0.1                    # all positive
    act[1, 2] = torch.tensor([1.0, 2.0] * 48)            # ties
    for rho in (0.05, 0.2, 0.37, 1.0):
        core = selection.token_core_neurons(act, rho)
        for b in range(act.shape[0]):
            for t in range(act.shape[1]):
                row = act[b, t]
                positive = row[row > 0]
                keep = max(1, math.ceil(len(positive) * rho))
                threshold = positive.sort(descending=True).values[keep - 1]
                assert core[b, t].tolist() == ((row > 0) & (row >= threshold)).tolist()

def test_sentence_core_neurons_count_only_valid_tokens():
    core = torch.zeros(1, 3, 6, dtype=torch.bool)
    core[0, 0, [1, 2]] = True
    core[0, 1, [2, 3]] = True
    core[0, 2, [4, 5]] = True      # padding: must not count
    act = core.float()
    valid = torch.tensor([[True, True, False]])
    idx = selection.sentence_core_neurons(core, act, valid, 3)
    assert idx[0].tolist()[:1] == [1] or 2 in idx[0].tolist()
    assert 2 in idx[0].tolist() and 4 not in idx[0].tolist() and 5 not in idx[0].tolist()


def test_elbow_keeps_the_head_of_a_sharp_curve_and_never_drops_text():
    scores = torch.tensor([[0.0, 10.0, 9.5, 9.0, 2.0, 1.5, 1.0, 0.5, 0.2, 99.0]])
    candidates = torch.tensor([[False] + [True] * 8 + [False]])
    keep = selection.elbow_keep(scores, candidates)
    # the elbow (farthest from the chord) is the 2.0: kept, everything below it dropped
    assert keep[0].tolist() == [True, True, True, True, True, False, False, False, False, True]


def test_elbow_is_per_sequence_and_keeps_flat_or_tiny_sets():
    scores = torch.tensor([[9.0, 8.0, 1.0, 0.5, 0.1], [3.0, 3.0, 3.0, 3.0, 3.0]])
    cand = torch.ones(2, 5, dtype=torch.bool)
    keep = selection.elbow_keep(scores, cand)
    assert keep[0].tolist() == [True, True, True, False, False]
    assert keep[1].all()                                     # flat scores: no elbow
    two = torch.tensor([[True, True, False, False, False]] * 2)
    assert selection.elbow_keep(scores, two).all()           # fewer than 3 candidates
    # the same sequence alone or next to another one: the same decision
    alone = selection.elbow_keep(scores[:1], cand[:1])
    assert torch.equal(alone[0], keep[0])
