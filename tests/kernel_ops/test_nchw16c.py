"""The NCHW16c layout of BlockSparseConv(Add) and DepthwiseConv: every combination of X / Y layout
against the numpy reference on every ISA, a MobileNet block chained in NCHW16c, the function
fallback without the library (opsets 17, 21), and the contract errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesparse import verify
from edgesparse.kernels.conv import block_sparse_conv_reference, make_block_sparse_conv, pack_block_sparse_conv, random_block_sparse_conv
from edgesparse.kernels.depthwise import depthwise_conv_reference, make_depthwise_conv
from edgesparse.kernels.nchw16c import to_nchw, to_nchw16c
from edgesparse.plugins import registry

from .conftest import float_info, make_model, session

HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_layout_helpers_round_trip():
    x = np.arange(2 * 32 * 3 * 5, dtype=np.float32).reshape(2, 32, 3, 5)
    b = to_nchw16c(x)
    assert b.shape == (2, 2, 3, 5, 16) and b[1, 1, 2, 4, 3] == x[1, 19, 2, 4]
    np.testing.assert_array_equal(to_nchw(b), x)
    with pytest.raises(ValueError, match="multiple of 16"):
        to_nchw16c(np.zeros((1, 20, 2, 2), np.float32))


def _conv_model(x, packed, o, y_block, bias, activation, residual=None, opset=21, functions=True):
    node, inits = make_block_sparse_conv("X", "Y", packed, o, (1, 1), name="pw", bias=bias, activation=activation,
                                         residual=None if residual is None else "R", y_channel_block=y_block,
                                         x_channel_block=16 if x.ndim == 5 else 1)
    inputs = [float_info("X", list(x.shape))] + ([] if residual is None else [float_info("R", list(residual.shape))])
    return make_model([node], inits, inputs, [float_info("Y", None)], opset, functions)


@given(
    n=st.integers(1, 2), c=st.sampled_from([16, 32, 48]), o=st.sampled_from([16, 32, 64]), hw=st.integers(1, 60),
    x_blocked=st.booleans(), y_block=st.sampled_from([1, 16]), add=st.booleans(), use_bias=st.booleans(),
    activation=st.sampled_from(["none", "relu", "relu6", "silu"]), sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    seed=st.integers(0, 2**31),
)
@HYP
def test_pointwise_matches_reference(kernel_lib, isa, n, c, o, hw, x_blocked, y_block, add, use_bias, activation,
                                     sparsity, seed):
    rng = np.random.default_rng(seed)
    h = max(1, hw // 7)
    w = max(1, hw // h)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = random_block_sparse_conv(rng, o, c, 1, 1, 16, sparsity)
    packed = pack_block_sparse_conv(wt, 16)
    bias = rng.standard_normal(o).astype(np.float32) if use_bias else None
    r = rng.standard_normal((n, o, h, w)).astype(np.float32) if add else None
    xin = to_nchw16c(x) if x_blocked else x
    rin = None if r is None else (to_nchw16c(r) if y_block == 16 else r)
    want = block_sparse_conv_reference(xin, packed, o, (1, 1), bias, activation=activation, residual=rin,
                                       y_channel_block=y_block)
    model = _conv_model(xin, packed, o, y_block, bias, activation, rin)
    feed = {"X": xin} if r is None else {"X": xin, "R": rin}
    got = session(model, kernel_lib).run(None, feed)[0]
    assert got.shape == want.shape == ((n, o // 16, h, w, 16) if y_block == 16 else (n, o, h, w))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(c))


@given(
    n=st.integers(1, 2), c=st.sampled_from([16, 32]), h=st.integers(1, 30), w=st.integers(1, 33),
    k=st.sampled_from([(3, 3), (1, 1), (5, 5), (3, 1)]), stride=st.sampled_from([1, 2]),
    pad=st.sampled_from([(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 1, 3)]), dil=st.sampled_from([1, 2]),
    use_bias=st.booleans(), activation=st.sampled_from(["none", "relu6", "silu"]), seed=st.integers(0, 2**31),
)
@HYP
def test_depthwise_matches_reference(kernel_lib, isa, n, c, h, w, k, stride, pad, dil, use_bias, activation, seed):
    if h + pad[0] + pad[2] < dil * (k[0] - 1) + 1 or w + pad[1] + pad[3] < dil * (k[1] - 1) + 1:
        return
    rng = np.random.default_rng(seed)
    x = to_nchw16c((rng.standard_normal((n, c, h, w)) * 3).astype(np.float32))
    wt = rng.standard_normal((c, 1, *k)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32) if use_bias else None
    args = ((stride, stride), pad, (dil, dil))
    want = depthwise_conv_reference(x, wt, bias, *args, activation=activation, y_channel_block=16)
    node, inits = make_depthwise_conv("X", "Y", wt, name="dw", strides=args[0], pads=pad, dilations=args[2], bias=bias,
                                      activation=activation, y_channel_block=16)
    model = make_model([node], inits, [float_info("X", list(x.shape))], [float_info("Y", None)])
    got = session(model, kernel_lib).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k[0] * k[1]))


def _mobilenet_block(rng, c=32, hidden=64, hw=14):
    """NCHW X -> sparse expand (Y NCHW16c) -> depthwise (NCHW16c) -> sparse project + residual (Y NCHW)."""
    e = random_block_sparse_conv(rng, hidden, c, 1, 1, 16, 0.7)
    p = random_block_sparse_conv(rng, c, hidden, 1, 1, 16, 0.7)
    dw = rng.standard_normal((hidden, 1, 3, 3)).astype(np.float32)
    eb, db, pb = (rng.standard_normal(k).astype(np.float32) for k in (hidden, hidden, c))
    n1, i1 = make_block_sparse_conv("X", "e", pack_block_sparse_conv(e, 16), hidden, (1, 1), name="expand", bias=eb,
                                    activation="relu6", y_channel_block=16)
    n2, i2 = make_depthwise_conv("e", "d", dw, name="dw", pads=(1, 1, 1, 1), bias=db, activation="relu6",
                                 y_channel_block=16)
    n3, i3 = make_block_sparse_conv("d", "Y", pack_block_sparse_conv(p, 16), c, (1, 1), name="project", bias=pb,
                                    residual="X", x_channel_block=16)
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    y = block_sparse_conv_reference(x, pack_block_sparse_conv(e, 16), hidden, (1, 1), eb, activation="relu6")
    y = depthwise_conv_reference(y, dw, db, pads=(1, 1, 1, 1), activation="relu6")
    want = block_sparse_conv_reference(y, pack_block_sparse_conv(p, 16), c, (1, 1), pb, residual=x)
    return [n1, n2, n3], i1 + i2 + i3, x, want


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("threads", [1, 2])
def test_block_in_nchw16c_kernel_fallback_and_dense_equivalent(kernel_lib, opset, threads):
    rng = np.random.default_rng(5)
    nodes, inits, x, want = _mobilenet_block(rng)
    model = make_model(nodes, inits, [float_info("X", list(x.shape))], [float_info("Y", None)], opset)
    np.testing.assert_allclose(session(model, kernel_lib, threads=threads).run(None, {"X": x})[0], want, atol=1e-4)
    np.testing.assert_allclose(session(model).run(None, {"X": x})[0], want, atol=1e-4)  # functions, no library
    libraries = [lib for lib in registry().kernels.values() if lib.domain == "com.edgesparse"]
    dense = verify.dense_equivalent(model, libraries)
    assert all(n.domain == "" for n in dense.graph.node)
    np.testing.assert_allclose(session(dense).run(None, {"X": x})[0], want, atol=1e-4)


def test_contract_errors_name_the_problem(kernel_lib):
    rng = np.random.default_rng(6)
    x = to_nchw16c(rng.standard_normal((1, 16, 5, 5)).astype(np.float32))
    w8 = pack_block_sparse_conv(random_block_sparse_conv(rng, 16, 16, 1, 1, 8, 0.5), 8)
    with pytest.raises(Exception, match="NCHW16c layout needs a 1x1 kernel, stride 1, no padding and 16 x 1 blocks"):
        session(_conv_model(x, w8, 16, 1, None, "none"), kernel_lib).run(None, {"X": x})
    w16 = pack_block_sparse_conv(random_block_sparse_conv(rng, 20, 16, 1, 1, 16, 0.5), 16)
    with pytest.raises(Exception, match="y_channel_block 16 needs out_channels a multiple of 16"):
        session(_conv_model(x, w16, 20, 16, None, "none"), kernel_lib)
    with pytest.raises(Exception, match="y_channel_block must be 1"):
        session(_conv_model(x, pack_block_sparse_conv(random_block_sparse_conv(rng, 16, 16, 1, 1, 16, .5), 16), 16, 8,
                            None, "none"), kernel_lib)
    node, inits = make_depthwise_conv("X", "Y", np.ones((16, 1, 3, 3), np.float32), name="dw", pads=(1, 1, 1, 1))
    model = make_model([node], inits, [float_info("X", list(x.shape))], [float_info("Y", None)])
    with pytest.raises(Exception, match="is not in the layout of x_channel_block 1"):
        session(model, kernel_lib).run(None, {"X": x})
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("y_channel_block", 16))
    with pytest.raises(Exception, match="x_channel_block and y_channel_block must be equal"):
        session(model, kernel_lib)
    del model.graph.node[0].attribute[-1]
    model.graph.input[0].type.tensor_type.ClearField("shape")
    bad = np.zeros((1, 1, 5, 5, 8), np.float32)
    with pytest.raises(Exception, match="4-D NCHW or 5-D NCHW16c"):
        session(model, kernel_lib).run(None, {"X": bad})
