import pytest
import torch

from corematching_testing import tiny_llama, tokens
from edgesparse import EdgesparseError
from edgesparse_corematching.engine import Engine
from edgesparse_corematching.settings import Settings

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(layers=3)


def test_dense_engine_equals_transformers_with_a_ragged_batch(model):
    ids = torch.stack([tokens(40), tokens(40, 7)])
    lengths = torch.tensor([40, 25])
    engine = Engine(model, Settings(keep=1.0))
    state, last = engine.prefill(model.model.embed_tokens(ids), lengths=lengths)
    step = engine.decode(state, ids[:, :3])
    with torch.no_grad():
        for b, n in enumerate(lengths.tolist()):
            ref = model(input_ids=torch.cat([ids[b:b + 1, :n], ids[b:b + 1, :3]], 1)).logits[0]
            assert torch.allclose(last[b], ref[n - 1], atol=1e-4)
            assert torch.allclose(step[b], ref[n:], atol=1e-4)


def test_coreinfer_decode_equals_a_model_whose_ffn_keeps_only_the_core_neurons(model):
    ids = tokens(48)[None]
    engine = Engine(model, Settings(keep=0.25, neuron_layers=(1, 2)))
    state, _ = engine.prefill(model.model.embed_tokens(ids))
    assert state.neurons[0] is None and state.neurons[1].shape == (1, 32)
    out = engine.decode(state, tokens(4, 60)[None])
    # the same continuation through transformers with the non-core neurons' down columns zeroed
    import copy

    pruned = copy.deepcopy(model)
    for i in (1, 2):
        mask = torch.zeros(128)
        mask[state.neurons[i][0]] = 1
        pruned.model.layers[i].mlp.down_proj.weight.data *= mask
    # prefill runs the full FFN in both: the original model's prefill, then decode on the pruned one
    ref_state, _ = Engine(model, Settings(keep=1.0)).prefill(model.model.embed_tokens(ids))
    ref = Engine(pruned, Settings(keep=1.0)).decode(ref_state, tokens(4, 60)[None])
    assert torch.allclose(out, ref, atol=1e-4)
    report = engine.report(state, ref_state)
    assert report["layers"][0]["neurons_kept"] == 1.0 and report["layers"][1]["neurons_kept"] == 0.25
    assert report["flops_reduction"]["decode"] > 1.0 and report["flops_reduction"]["prefill"] == 1.0


def test_tokens_are_removed_from_the_following_layers_and_their_cache(model):
    ids = torch.stack([tokens(40), tokens(40, 11)])
    prunable = torch.zeros(2, 40, dtype=torch.bool)
    prunable[0, 5:35] = True              # sequence 0 declares 30 image tokens, sequence 1 none
    engine = Engine(model, Settings(keep=0.5, token_layers=(0, 0)))
    state, last = engine.prefill(model.model.embed_tokens(ids), prunable=prunable)
    n0 = state.caches[0].valid.sum(1)
    n1 = state.caches[1].valid.sum(1)
    assert n0.tolist() == [40, 40]
    assert n1[1] == 40 and n1[0] < 40                    # removed, not zeroed: fewer cache entries
    assert state.caches[1].keys.shape[2] == int(n1.max())
    kept = state.caches[1].positions[0][state.caches[1].valid[0]]
    assert set(range(5)) | set(range(35, 40)) <= set(kept.tolist())   # text tokens stay, positions intact
    # sequence 1 (nothing prunable) is computed exactly as alone
    alone, last1 = engine.prefill(model.model.embed_tokens(ids[1:]))
    assert torch.allclose(last[1], last1[0], atol=1e-4)
    step = engine.decode(state, ids[:, :2])
    assert step.shape == (2, 2, 256) and state.caches[2].valid.sum(1)[0] == n1[0] + 2
    dense_state, _ = Engine(model, Settings(keep=1.0)).prefill(model.model.embed_tokens(ids))
    Engine(model, Settings(keep=1.0)).decode(dense_state, ids[:, :2])
    report = engine.report(state, dense_state)
    assert report["layers"][1]["tokens_kept"] < 1.0 and report["flops_reduction"]["prefill"] > 1.0


def test_no_image_tokens_falls_back_to_neurons_only_and_says_so(model):
    engine = Engine(model, Settings(keep=0.5, token_layers=(0, 1)))
    state, _ = engine.prefill(model.model.embed_tokens(tokens(20)[None]))
    assert any("no image tokens" in n for n in state.notes)
    assert all(c.valid.all() for c in state.caches)


@pytest.mark.parametrize("settings, message", [
    (Settings(keep=0.0), "keep ratio of 0"),
    (Settings(token_layers=(1, 5)), "outside the model's layers 0-2"),
    (Settings(neuron_layers=(-1, 1)), "outside"),
    (Settings(rho=0.0), "rho"),
])
def test_bad_settings_are_one_line_errors(model, settings, message):
    with pytest.raises(EdgesparseError, match=message):
        Engine(model, settings)
