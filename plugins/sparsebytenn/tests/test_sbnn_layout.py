"""Layout rewrites after the sparse one: residual Adds fold into BlockSparseConvAdd, depthwise
convs next to sparse convs become DepthwiseConv, the tensors between them NCHW16c, each only where
the target's rule asks for it."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from sbnn_testing import StubTarget, make_ctx, ort_session, run_torch_stage


class Block(nn.Module):
    """Inverted residual (expand 1x1 -> depthwise 3x3 -> project 1x1, residual add), as in
    MobileNetV2 and the sample CNN, then a stride-2 one without a residual, then global average
    pooling."""

    def __init__(self):
        super().__init__()

        def cbr(cin, cout, k=1, s=1, g=1, act=True):
            layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
            return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))

        self.a = nn.Sequential(cbr(32, 64), cbr(64, 64, 3, 1, 64), cbr(64, 32, act=False))
        self.b = nn.Sequential(cbr(32, 64), cbr(64, 64, 3, 2, 64), cbr(64, 48, act=False))

    def forward(self, x):
        return self.b(x + self.a(x)).mean((2, 3))


@pytest.fixture(scope="module")
def pruned():
    """The torch stage and the export once (dispatch=off: every candidate pruned); each test runs
    the ONNX stage with its own target."""
    from edgesparse import TorchModel, export

    torch.manual_seed(0)
    model = Block().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
            m.running_mean.uniform_(-0.2, 0.2)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 32, 12, 12)).astype(np.float32)}]
    p, _, out = run_torch_stage(model, calib, sparsity=0.5, dispatch="off", min_channels=16)
    proto = export.export_torch(TorchModel(out, {"x": torch.zeros(1, 32, 12, 12)}, ["out"],
                                           {"x": {0: "batch"}, "out": {0: "batch"}}))
    x = rng.standard_normal((3, 32, 12, 12)).astype(np.float32)
    with torch.no_grad():
        want = out(torch.from_numpy(x)).numpy()
    return p, calib, proto, x, want


def _build(pruned, rule):
    import onnx_ir as ir

    from edgesparse import kernels

    p, calib, proto, x, want = pruned
    target = StubTarget(rule)
    ctx = make_ctx(calib, target)
    graph = ir.from_proto(proto)
    p.rewrite_graph(graph, ctx)
    sparse = ir.to_proto(graph)
    kernels.attach_functions(sparse)
    return sparse, ctx, x, want


def _attr(node, name, default=1):
    return next((a.i for a in node.attribute if a.name == name), default)


def test_residual_depthwise_and_nchw16c_rewrites_keep_the_function(pruned):
    sparse, ctx, x, want = _build(pruned, lambda op, *a: True)
    ops = [n.op_type for n in sparse.graph.node]
    assert ops.count("BlockSparseConvAdd") == 1 and ops.count("DepthwiseConv") == 2
    assert "Add" not in ops and "Clip" not in ops and ops.count("Conv") == 0
    report = ctx.reports["sparsebytenn"]["nchw_layout"]
    assert len(report["residual"]["applied"]) == 1
    assert [d["strides"] for d in report["depthwise"]["applied"]] == [[1, 1], [2, 2]]
    assert all(d["activation"] == "relu6" for d in report["depthwise"]["applied"])
    # both blocks stay in NCHW16c from the expand conv's output to the project conv's input; the
    # first block's output stays NCHW (its residual is the NCHW graph input); the second's goes
    # blocked into the mean, which becomes a mean over axes 2, 3 and a Reshape
    assert len(report["depthwise"]["nchw16c"]) == 5
    assert ops[-2:] == ["ReduceMean", "Reshape"]
    by_op = {}
    for n in sparse.graph.node:
        by_op.setdefault(n.op_type, []).append((_attr(n, "x_channel_block"), _attr(n, "y_channel_block")))
    assert by_op["DepthwiseConv"] == [(16, 16), (16, 16)]
    assert sorted(by_op["BlockSparseConv"] + by_op["BlockSparseConvAdd"]) == [(1, 16), (1, 16), (16, 1), (16, 16)]
    np.testing.assert_allclose(ort_session(sparse).run(None, {"x": x})[0], want, atol=1e-4, rtol=1e-4)
    # without the library ORT inlines the ops' functions: same result
    np.testing.assert_allclose(ort_session(sparse, library=False).run(None, {"x": x})[0], want, atol=1e-4, rtol=1e-4)


def test_nchw_depthwise_where_the_rule_does_not_ask_for_nchw16c(pruned):
    sparse, ctx, x, want = _build(pruned, lambda op, *a: op != "NCHW16c")
    dws = [n for n in sparse.graph.node if n.op_type == "DepthwiseConv"]
    assert len(dws) == 2 and all(_attr(n, "y_channel_block") == 1 for n in sparse.graph.node)
    assert "nchw16c" not in ctx.reports["sparsebytenn"]["nchw_layout"]["depthwise"]
    np.testing.assert_allclose(ort_session(sparse).run(None, {"x": x})[0], want, atol=1e-4, rtol=1e-4)


def test_targets_without_the_ops_keep_dense_adds_and_depthwise_convs(pruned):
    """A target whose rule asks for neither op (wasm, TVM targets): only the sparse convs change."""
    sparse, ctx, x, want = _build(pruned, lambda op, *a: op not in ("BlockSparseConvAdd", "DepthwiseConv"))
    ops = [n.op_type for n in sparse.graph.node]
    assert "BlockSparseConvAdd" not in ops and "DepthwiseConv" not in ops and "Add" in ops
    assert ops.count("BlockSparseConv") >= 1
    assert "nchw_layout" not in ctx.reports["sparsebytenn"]
    np.testing.assert_allclose(ort_session(sparse).run(None, {"x": x})[0], want, atol=1e-4, rtol=1e-4)


def test_x86_rule_folds_residuals_and_blocks_depthwise_convs():
    """The kernels' dispatch rule: NCHW16c depthwise convs where they were measured faster than
    ORT's depthwise conv with its reorders (AVX-512, AVX2), the residual fold on AVX-512 only;
    neither on other ISAs."""
    from edgesparse.kernels import dispatch

    assert dispatch.prefers_sparse("BlockSparseConvAdd", {}, 0.0, 16, isa="avx512")
    assert dispatch.prefers_sparse("DepthwiseConv", {}, 0.0, 16, isa="avx512")
    assert dispatch.prefers_sparse("NCHW16c", {}, 0.0, 16, isa="avx512")
    assert dispatch.prefers_sparse("NCHW16c", {}, 0.0, 16, isa="avx2")
    assert dispatch.prefers_sparse("DepthwiseConv", {}, 0.0, 16, isa="avx2")
    assert not dispatch.prefers_sparse("BlockSparseConvAdd", {}, 0.0, 16, isa="avx2")
    assert not dispatch.prefers_sparse("BlockSparseConvAdd", {}, 0.0, 16, isa="neon")
    assert not dispatch.prefers_sparse("BlockSparseConvAdd", {}, 0.0, 16, isa="generic")
