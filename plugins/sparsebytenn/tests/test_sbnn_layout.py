"""NCHW layout rewrite after the sparse one: residual Adds fold into BlockSparseConvAdd, depthwise
convs next to sparse convs become DepthwiseConv, each only where the target's rule asks for it."""
import numpy as np
import torch
import torch.nn as nn

from sbnn_testing import StubTarget, export_and_rewrite, ort_session, run_torch_stage


class Block(nn.Module):
    """Inverted residual (expand 1x1 -> depthwise 3x3 -> project 1x1, residual add), as in
    MobileNetV2 and the sample CNN, then a stride-2 one without a residual."""

    def __init__(self):
        super().__init__()

        def cbr(cin, cout, k=1, s=1, g=1, act=True):
            layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
            return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))

        self.a = nn.Sequential(cbr(32, 64), cbr(64, 64, 3, 1, 64), cbr(64, 32, act=False))
        self.b = nn.Sequential(cbr(32, 64), cbr(64, 64, 3, 2, 64), cbr(64, 48, act=False))

    def forward(self, x):
        return self.b(x + self.a(x))


def _build(rule):
    torch.manual_seed(0)
    model = Block().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
            m.running_mean.uniform_(-0.2, 0.2)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 32, 12, 12)).astype(np.float32)}]
    target = StubTarget(rule)
    target.name = "stub"
    p, ctx, out = run_torch_stage(model, calib, target=target, sparsity=0.5, dispatch="off", min_channels=16)
    _, sparse = export_and_rewrite(p, ctx, out, {"x": torch.zeros(1, 32, 12, 12)})
    x = rng.standard_normal((3, 32, 12, 12)).astype(np.float32)
    with torch.no_grad():
        want = out(torch.from_numpy(x)).numpy()
    return sparse, ctx, x, want


def test_residual_and_depthwise_rewrites_keep_the_function():
    sparse, ctx, x, want = _build(lambda op, *a: True)
    ops = [n.op_type for n in sparse.graph.node]
    assert ops.count("BlockSparseConvAdd") == 1 and ops.count("DepthwiseConv") == 2
    assert "Add" not in ops and "Clip" not in ops and ops.count("Conv") == 0
    report = ctx.reports["sparsebytenn"]["nchw_layout"]
    assert len(report["residual"]["applied"]) == 1
    assert [d["strides"] for d in report["depthwise"]["applied"]] == [[1, 1], [2, 2]]
    assert all(d["activation"] == "relu6" for d in report["depthwise"]["applied"])
    np.testing.assert_allclose(ort_session(sparse).run(None, {"x": x})[0], want, atol=1e-4, rtol=1e-4)
    # without the library ORT inlines the ops' functions: same result
    np.testing.assert_allclose(ort_session(sparse, library=False).run(None, {"x": x})[0], want, atol=1e-4, rtol=1e-4)


def test_targets_without_the_ops_keep_dense_adds_and_depthwise_convs():
    """A target whose rule asks for neither op (wasm, TVM targets): only the sparse convs change."""
    sparse, ctx, x, want = _build(lambda op, *a: op in ("BlockSparseConv", "conv", "pointwise"))
    ops = [n.op_type for n in sparse.graph.node]
    assert "BlockSparseConvAdd" not in ops and "DepthwiseConv" not in ops and "Add" in ops
    assert ops.count("BlockSparseConv") >= 1
    assert "nchw_layout" not in ctx.reports["sparsebytenn"]
    np.testing.assert_allclose(ort_session(sparse).run(None, {"x": x})[0], want, atol=1e-4, rtol=1e-4)


def test_x86_rule_folds_residuals_but_keeps_ort_depthwise():
    """The kernels' dispatch rule: residual fold on AVX-512; DepthwiseConv asked for nowhere yet
    (measured slower than ORT's NCHWc depthwise plus its reorders); neither on other ISAs."""
    from edgesparse.kernels import dispatch

    assert dispatch.prefers_sparse("BlockSparseConvAdd", {}, 0.0, 16, isa="avx512")
    assert not dispatch.prefers_sparse("DepthwiseConv", {}, 0.0, 16, isa="avx512")
    assert not dispatch.prefers_sparse("BlockSparseConvAdd", {}, 0.0, 16, isa="neon")
    assert not dispatch.prefers_sparse("BlockSparseConvAdd", {}, 0.0, 16, isa="generic")
