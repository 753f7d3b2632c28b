"""The block-sparse autograd functions against dense torch on the masked weights."""
import pytest
import torch
import torch.nn as nn

from edgesparse_sparcl import sparse

CONVS = [  # cin, cout, kernel, stride, padding, dilation, block, density, bias
    (8, 20, 3, 1, 1, 1, 4, 0.5, True),
    (16, 32, 3, 2, 1, 1, 8, 0.3, False),
    (5, 33, 1, 1, 0, 1, 16, 0.6, True),
    (7, 16, 3, 1, 2, 2, 16, 0.7, False),
    (6, 12, 5, 2, 2, 1, 4, 0.4, True),
    (4, 8, (3, 1), (2, 1), (1, 0), 1, 8, 1.0, False),
    (4, 16, 3, 1, 1, 1, 16, 0.0, False),
    (4, 8, 4, 1, "same", 1, 4, 0.5, True),
]


def _masked_layer(module, block, density, seed):
    g = torch.Generator().manual_seed(seed)
    layer = sparse.PrunableLayer("layer", module, "block", block)
    layer.set_mask(torch.rand(layer.unit_shape, generator=g) < density)
    layer.apply_mask()
    return layer


@pytest.mark.parametrize("cin,cout,k,s,p,d,block,density,bias", CONVS)
def test_conv_matches_dense_torch(cin, cout, k, s, p, d, block, density, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, d, bias=bias)
    layer = _masked_layer(conv, block, density, 1)
    x = torch.randn(3, cin, 11, 9, requires_grad=True)
    y = sparse.sparse_forward(layer, x)
    dy = torch.randn_like(y)
    y.backward(dy)
    got = (y.detach(), x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone() if bias else None)
    x.grad, conv.weight.grad = None, None
    if bias:
        conv.bias.grad = None
    ref = sparse.masked_dense_forward(layer, x)
    ref.backward(dy)
    mask = layer.weight_mask()
    torch.testing.assert_close(got[0], ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], conv.weight.grad * mask, atol=1e-4, rtol=1e-4)
    assert torch.all(got[2][~mask] == 0), "gradient leaked into pruned weights"
    if bias:
        torch.testing.assert_close(got[3], conv.bias.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k,n,block,density", [(33, 20, 4, 0.5), (64, 48, 16, 0.3), (10, 7, 8, 1.0)])
def test_linear_matches_dense_torch(k, n, block, density):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    layer = _masked_layer(lin, block, density, 2)
    x = torch.randn(2, 5, k, requires_grad=True)
    y = sparse.sparse_forward(layer, x)
    dy = torch.randn_like(y)
    y.backward(dy)
    got = (y.detach(), x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone())
    x.grad = lin.weight.grad = lin.bias.grad = None
    ref = sparse.masked_dense_forward(layer, x)
    ref.backward(dy)
    torch.testing.assert_close(got[0], ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], x.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], lin.weight.grad * layer.weight_mask(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[3], lin.bias.grad, atol=1e-4, rtol=1e-4)


def test_gradient_units_restrict_weight_gradient():
    """DGM: only the listed (block, lane) pairs get a weight gradient, and they get the exact one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, 1, 1, bias=False)
    layer = _masked_layer(conv, 8, 0.6, 3)
    x = torch.randn(2, 8, 7, 7)
    dy = torch.randn(2, 16, 7, 7)
    sparse.sparse_forward(layer, x).backward(dy)
    full = conv.weight.grad.clone()
    conv.weight.grad = None
    idx = layer.index()
    units = torch.arange(0, idx["nnzb"] * 8, 3, dtype=torch.int32)
    layer.grad_units = units
    sparse.sparse_forward(layer, x).backward(dy)
    part = conv.weight.grad
    keep = torch.zeros(16, 8, dtype=torch.bool)
    for u in units.tolist():
        p, b = divmod(u, 8)
        keep[int(idx["blk_row"][p]) * 8 + b, int(idx["c_index"][p])] = True
    keep = keep[:, :, None, None].expand_as(part)
    torch.testing.assert_close(part[keep], full[keep])
    assert torch.all(part[~keep] == 0)
    assert keep.sum() < layer.weight_mask().sum()


def test_block_mask_expands_to_weight_groups():
    conv = nn.Conv2d(3, 10, 3, bias=False)  # 10 outputs: the last group of 8 is partial
    layer = sparse.PrunableLayer("c", conv, "block", 8)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    layer.set_mask(mask)
    w = layer.weight_mask()
    assert w.shape == conv.weight.shape
    assert torch.all(w[:8, 0]) and not torch.any(w[:8, 1]) and torch.all(w[8:, 1])
    assert layer.density() == pytest.approx((8 * 2 + 2 * 1) * 9 / (10 * 3 * 9))


def test_unsupported_layers_are_named():
    assert "grouped" in sparse.kernel_supported(nn.Conv2d(4, 4, 3, groups=2))
    assert "padding mode" in sparse.kernel_supported(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert sparse.kernel_supported(nn.Conv2d(4, 4, 3, padding="same")) is None
