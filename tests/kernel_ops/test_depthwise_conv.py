"""DepthwiseConv and BlockSparseConvAdd: reference, ORT kernel (every ISA), function fallback,
the core's dense equivalent, validation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

from edgesparse import verify
from edgesparse.kernels.conv import block_sparse_conv_reference, make_block_sparse_conv, pack_block_sparse_conv, random_block_sparse_conv
from edgesparse.kernels.depthwise import depthwise_conv_reference, make_depthwise_conv
from edgesparse.plugins import registry

from .conftest import float_info, make_model, session

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def dw_model(x_shape, w, strides, pads, dil, bias=None, activation="none", opset=21, functions=True):
    node, inits = make_depthwise_conv("X", "Y", w, name="dw", strides=strides, pads=pads, dilations=dil, bias=bias,
                                      activation=activation)
    return make_model([node], inits, [float_info("X", list(x_shape))], [float_info("Y", None)], opset, functions)


def test_reference_is_a_grouped_conv():
    """The numpy reference against ORT's own Conv(group=C)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 9, 7)).astype(np.float32)
    w = rng.standard_normal((5, 1, 3, 3)).astype(np.float32)
    want = depthwise_conv_reference(x, w, strides=(2, 1), pads=(1, 0, 2, 1), dilations=(1, 2))
    node = helper.make_node("Conv", ["X", "W"], ["Y"], group=5, kernel_shape=[3, 3], strides=[2, 1],
                            pads=[1, 0, 2, 1], dilations=[1, 2])
    m = make_model([node], [numpy_helper.from_array(w, "W")], [float_info("X", list(x.shape))], [float_info("Y", None)],
                   functions=False)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@given(
    n=st.integers(1, 2), c=st.integers(1, 20), h=st.integers(1, 30), w=st.integers(1, 33),
    k=st.sampled_from([(3, 3), (1, 1), (5, 5), (3, 1), (2, 4)]), stride=st.sampled_from([1, 2, 3]),
    pad=st.sampled_from([(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 1, 3)]), dil=st.sampled_from([1, 2]),
    use_bias=st.booleans(), activation=st.sampled_from(["none", "relu", "relu6", "silu"]), seed=st.integers(0, 2**31),
)
@HYP
def test_kernel_matches_reference(kernel_lib, isa, n, c, h, w, k, stride, pad, dil, use_bias, activation, seed):
    if h + pad[0] + pad[2] < dil * (k[0] - 1) + 1 or w + pad[1] + pad[3] < dil * (k[1] - 1) + 1:
        return  # the kernel does not fit (covered by test_too_small_input)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c, h, w)) * 3).astype(np.float32)
    wt = rng.standard_normal((c, 1, *k)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32) if use_bias else None
    args = ((stride, stride), pad, (dil, dil))
    want = depthwise_conv_reference(x, wt, bias, *args, activation=activation)
    got = session(dw_model(x.shape, wt, *args, bias=bias, activation=activation), kernel_lib).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(k[0] * k[1]))


@pytest.mark.parametrize("c,hw,s,threads", [(128, 28, 1, 2), (256, 14, 2, 2), (512, 7, 1, 1)])
def test_mobilenet_shapes_and_threads(kernel_lib, c, hw, s, threads):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    wt = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    want = depthwise_conv_reference(x, wt, bias, (s, s), (1, 1, 1, 1), (1, 1), "relu6")
    m = dw_model(x.shape, wt, (s, s), (1, 1, 1, 1), (1, 1), bias=bias, activation="relu6")
    np.testing.assert_allclose(session(m, kernel_lib, threads=threads).run(None, {"X": x})[0], want, atol=1e-4)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("activation", ["none", "relu6", "silu"])
def test_function_fallback_without_library(opset, activation):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 6, 8, 9)).astype(np.float32)
    wt = rng.standard_normal((6, 1, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    want = depthwise_conv_reference(x, wt, bias, (2, 2), (1, 1, 1, 1), (1, 1), activation)
    got = session(dw_model(x.shape, wt, (2, 2), (1, 1, 1, 1), (1, 1), bias=bias, activation=activation, opset=opset)).run(
        None, {"X": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _conv_add_model(x, packed, o, residual_shape, bias, activation, opset=21, functions=True):
    node, inits = make_block_sparse_conv("X", "Y", packed, o, (3, 3), name="cadd", pads=(1, 1, 1, 1), bias=bias,
                                         activation=activation, residual="R")
    return make_model([node], inits, [float_info("X", list(x.shape)), float_info("R", list(residual_shape))],
                      [float_info("Y", None)], opset, functions)


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("activation", ["none", "relu6"])
def test_conv_add_kernel_fallback_and_dense_equivalent(kernel_lib, isa, use_bias, activation):
    """BlockSparseConvAdd = act(conv + bias) + residual: the kernel, the ONNX function without the
    library and the core's dense equivalent (what verification and `edgesparse bench` compare with)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 20, 9, 11)).astype(np.float32)
    w = random_block_sparse_conv(rng, 24, 20, 3, 3, 8, 0.5)
    packed = pack_block_sparse_conv(w, 8)
    bias = rng.standard_normal(24).astype(np.float32) if use_bias else None
    r = rng.standard_normal((2, 24, 9, 11)).astype(np.float32)
    want = block_sparse_conv_reference(x, packed, 24, (3, 3), bias, pads=(1, 1, 1, 1), activation=activation, residual=r)
    model = _conv_add_model(x, packed, 24, r.shape, bias, activation)
    feed = {"X": x, "R": r}
    np.testing.assert_allclose(session(model, kernel_lib).run(None, feed)[0], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(session(model).run(None, feed)[0], want, rtol=1e-4, atol=1e-4)
    libraries = [lib for lib in registry().kernels.values() if lib.domain == "com.edgesparse"]
    dense = verify.dense_equivalent(model, libraries)
    assert {n.op_type for n in dense.graph.node} >= {"Conv", "Add"} and all(n.domain == "" for n in dense.graph.node)
    got = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_depthwise_dense_equivalent_is_the_plain_conv():
    rng = np.random.default_rng(4)
    wt = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    model = dw_model((1, 8, 6, 6), wt, (1, 1), (1, 1, 1, 1), (1, 1), bias=np.ones(8, np.float32), activation="relu6")
    libraries = [lib for lib in registry().kernels.values() if lib.domain == "com.edgesparse"]
    dense = verify.dense_equivalent(model, libraries)
    convs = [n for n in dense.graph.node if n.op_type == "Conv"]
    assert len(convs) == 1 and helper.get_attribute_value(next(a for a in convs[0].attribute if a.name == "group")) == 8
    assert "Where" not in {n.op_type for n in dense.graph.node}  # no inlined function: ORT can fuse Conv + Clip
    x = rng.standard_normal((1, 8, 6, 6)).astype(np.float32)
    want = depthwise_conv_reference(x, wt, np.ones(8), (1, 1), (1, 1, 1, 1), (1, 1), "relu6")
    got = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_malformed_depthwise_rejected(kernel_lib):
    x = np.zeros((1, 4, 5, 5), np.float32)
    wt = np.ones((3, 1, 3, 3), np.float32)  # 3 filters for 4 channels
    m = dw_model(x.shape, wt, (1, 1), (1, 1, 1, 1), (1, 1))
    with pytest.raises(Exception, match="DepthwiseConv node 'dw'.*W must be \\[C, 1, kh, kw\\]"):
        session(m, kernel_lib).run(None, {"X": x})
    bad = dw_model(x.shape, np.ones((4, 1, 3, 3), np.float32), (1, 1), (1, 1, 1, 1), (1, 1))
    for a in bad.graph.node[0].attribute:
        if a.name == "strides":
            a.ints[:] = [0, 1]
    with pytest.raises(Exception, match="DepthwiseConv node 'dw'.*strides must be two ints >= 1"):
        session(bad, kernel_lib)


def test_residual_shape_mismatch_is_an_error(kernel_lib):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 8, 5, 5)).astype(np.float32)
    packed = pack_block_sparse_conv(random_block_sparse_conv(rng, 8, 8, 3, 3, 4, 0.5), 4)
    model = _conv_add_model(x, packed, 8, (1, 8, 1, 1), None, "none")  # broadcasting is not supported
    with pytest.raises(Exception, match="BlockSparseConvAdd node 'cadd'.*residual must be float \\[1, 8, 5, 5\\]"):
        session(model, kernel_lib).run(None, {"X": x, "R": np.zeros((1, 8, 1, 1), np.float32)})


def test_too_small_input(kernel_lib):
    m = dw_model((1, 2, 2, 2), np.ones((2, 1, 5, 5), np.float32), (1, 1), (0, 0, 0, 0), (1, 1))
    with pytest.raises(Exception, match="smaller than the dilated kernel"):
        session(m, kernel_lib).run(None, {"X": np.zeros((1, 2, 2, 2), np.float32)})
