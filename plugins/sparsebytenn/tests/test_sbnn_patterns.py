"""Group patterns, scores, masks, remainders."""
import numpy as np
import pytest
import torch.nn as nn

from edgesparse_sparsebytenn import patterns


def test_classify_per_operator_type():
    assert patterns.classify(nn.Conv2d(64, 64, 1)) == "pointwise"
    assert patterns.classify(nn.Conv2d(64, 64, 3)) == "conv"
    assert patterns.classify(nn.Conv2d(64, 64, 3, groups=64)) == "depthwise"
    assert patterns.classify(nn.Conv2d(64, 64, 3, groups=4)) == "grouped"
    assert patterns.classify(nn.Linear(64, 32)) == "linear"
    assert patterns.classify(nn.BatchNorm2d(8)) is None


def test_group_is_block_outputs_by_one_input_by_all_taps():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8, 3, 3)).astype(np.float32)
    scores = patterns.group_scores(w, 8, "l2")
    assert scores.shape == (4, 8)
    np.testing.assert_allclose(scores[1, 5], np.sqrt((w[8:16, 5] ** 2).sum()), rtol=1e-6)
    l1 = patterns.group_scores(w, 8, "l1")
    np.testing.assert_allclose(l1[2, 3], np.abs(w[16:24, 3]).sum(), rtol=1e-6)


def test_mask_drops_exactly_the_lowest_fraction():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    scores = patterns.group_scores(w, 16, "l2")
    mask = patterns.group_mask(scores, 0.3)
    assert (~mask).sum() == round(0.3 * scores.size)
    assert scores[~mask].max() <= scores[mask].min()
    full = patterns.expand_mask(mask, 16, w.shape)
    pruned = w * full
    assert np.array_equal(patterns.weight_group_mask(pruned, 16), mask)


def test_activation_weighted_scores_prefer_loud_inputs():
    w = np.ones((16, 4), np.float32)
    scores = patterns.group_scores(w, 16, "l2", input_scale=np.array([1.0, 0.01, 5.0, 1.0]))
    mask = patterns.group_mask(scores, 0.25)
    assert not mask[0, 1] and mask[0, 2]


@pytest.mark.parametrize("remainder", ["pad", "dense"])
def test_block_that_does_not_divide_the_channels(remainder):
    """O = 40 with B = 16: the last block row holds 8 channels. 'pad' prunes it like the others
    (its score scaled to a full group); 'dense' never prunes it."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 24, 1, 1)).astype(np.float32)
    w[32:] *= 0.01  # the remainder channels are the weakest
    scores = patterns.group_scores(w, 16, "l2", remainder)
    assert scores.shape == (3, 24)
    mask = patterns.group_mask(scores, 0.5)
    if remainder == "dense":
        assert mask[-1].all()
        assert (~mask).sum() == round(0.5 * 2 * 24)
    else:
        assert (~mask[-1]).sum() > 0
        assert (~mask).sum() == round(0.5 * 3 * 24)
    pruned = w * patterns.expand_mask(mask, 16, w.shape)
    from edgesparse import kernels

    packed = kernels.pack_block_sparse_conv(pruned, 16)
    back = kernels.unpack_block_sparse_conv(packed, 40, 24, (1, 1))
    np.testing.assert_array_equal(back, pruned)


def test_find_layers_uses_per_kind_blocks():
    m = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3, groups=64), nn.Conv2d(64, 128, 1),
                      nn.Flatten(), nn.Linear(128, 10))
    layers = patterns.find_layers(m, {"pointwise": 16, "conv": 8, "linear": 4})
    assert [(l.kind, l.block) for l in layers] == [("conv", 8), ("depthwise", None), ("pointwise", 16), ("linear", 4)]
