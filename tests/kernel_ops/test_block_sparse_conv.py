"""BlockSparseConv: packer, reference, ORT kernel (every ISA), function fallback, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgesparse.kernels.conv import (
    block_sparse_conv_reference,
    conv2d_reference,
    make_block_sparse_conv,
    pack_block_sparse_conv,
    random_block_sparse_conv,
    unpack_block_sparse_conv,
)

from .conftest import float_info, make_model, session

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def conv_model(x_shape, packed, o, ks, strides, pads, dil, bias=None, activation="none", opset=21, lib_fn=True):
    node, inits = make_block_sparse_conv("X", "Y", packed, o, ks, name="conv", strides=strides, pads=pads,
                                         dilations=dil, bias=bias, activation=activation)
    return make_model([node], inits, [float_info("X", list(x_shape))], [float_info("Y", None)], opset, lib_fn)


def assert_close(got, want, fan_in):
    tol = 2e-5 * max(1.0, np.sqrt(fan_in))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@given(
    o=st.integers(1, 40),
    c=st.integers(1, 12),
    k=st.sampled_from([(1, 1), (3, 3), (1, 3), (5, 5)]),
    block=st.sampled_from([4, 8, 16]),
    sparsity=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=40, deadline=None)
def test_pack_unpack_roundtrip(o, c, k, block, sparsity, seed):
    w = random_block_sparse_conv(np.random.default_rng(seed), o, c, k[0], k[1], block, sparsity)
    packed = pack_block_sparse_conv(w, block)
    assert packed["values"].shape[1:] == (k[0] * k[1], block)
    np.testing.assert_array_equal(unpack_block_sparse_conv(packed, o, c, k), w)


def test_reference_against_torch_style_loop():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 5, 6))
    w = rng.standard_normal((3, 2, 3, 3))
    y = conv2d_reference(x, w, strides=(2, 1), pads=(1, 0, 1, 2), dilations=(1, 2))
    # direct definition
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 2)))
    oh, ow = y.shape[2:]
    want = np.zeros_like(y, dtype=np.float64)
    for oy in range(oh):
        for ox in range(ow):
            patch = xp[0, :, oy * 2 : oy * 2 + 3, ox : ox + 5 : 2]
            want[0, :, oy, ox] = np.einsum("chw,ochw->o", patch, w)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@given(
    n=st.sampled_from([1, 2]),
    c=st.integers(1, 20),
    o=st.integers(1, 40),
    h=st.integers(1, 19),
    w=st.integers(1, 23),
    k=st.sampled_from([(1, 1), (3, 3), (1, 3), (5, 5), (3, 1)]),
    stride=st.sampled_from([(1, 1), (2, 2), (1, 2)]),
    pad=st.sampled_from(["same", "zero", "asym"]),
    dil=st.sampled_from([(1, 1), (2, 2)]),
    block=st.sampled_from([4, 8, 16]),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    use_bias=st.booleans(),
    activation=st.sampled_from(["none", "relu", "relu6", "silu"]),
    seed=st.integers(0, 2**31),
)
@HYP
def test_kernel_matches_reference(kernel_lib, isa, n, c, o, h, w, k, stride, pad, dil, block, sparsity, use_bias,
                                  activation, seed):
    kh, kw = k
    pads = {"same": (kh // 2 * dil[0], kw // 2 * dil[1]) * 2, "zero": (0, 0, 0, 0), "asym": (1, 0, 0, 2)}[pad]
    if h + pads[0] + pads[2] < dil[0] * (kh - 1) + 1 or w + pads[1] + pads[3] < dil[1] * (kw - 1) + 1:
        return  # no output
    rng = np.random.default_rng(seed)
    wt = random_block_sparse_conv(rng, o, c, kh, kw, block, sparsity)
    packed = pack_block_sparse_conv(wt, block)
    bias = rng.standard_normal(o).astype(np.float32) if use_bias else None
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    sess = session(conv_model(x.shape, packed, o, k, stride, pads, dil, bias, activation), kernel_lib)
    (y,) = sess.run(None, {"X": x})
    assert_close(y, conv2d_reference(x, wt, bias, stride, pads, dil, activation), c * kh * kw)


@pytest.mark.parametrize("c,o,hw,k,s", [(32, 64, 28, 1, 1), (16, 48, 15, 3, 1), (24, 40, 17, 3, 2), (64, 64, 7, 1, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_larger_shapes_and_threads(kernel_lib, isa, c, o, hw, k, s, threads):
    rng = np.random.default_rng(c + o + hw)
    wt = random_block_sparse_conv(rng, o, c, k, k, 16, 0.6)
    bias = rng.standard_normal(o).astype(np.float32)
    x = rng.standard_normal((2, c, hw, hw)).astype(np.float32)
    pads = (k // 2,) * 4
    sess = session(conv_model(x.shape, pack_block_sparse_conv(wt, 16), o, (k, k), (s, s), pads, (1, 1), bias, "relu"),
                   kernel_lib, threads=threads)  # fmt: skip
    assert_close(sess.run(None, {"X": x})[0], conv2d_reference(x, wt, bias, (s, s), pads, (1, 1), "relu"), c * k * k)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("activation", ["none", "relu", "relu6", "silu"])
def test_function_fallback_without_library(opset, activation):
    rng = np.random.default_rng(opset)
    wt = random_block_sparse_conv(rng, 20, 6, 3, 3, 8, 0.5)
    wt[8:16] = 0  # an empty block row
    packed = pack_block_sparse_conv(wt, 8)
    bias = rng.standard_normal(20).astype(np.float32)
    x = rng.standard_normal((2, 6, 9, 11)).astype(np.float32)
    for b in (bias, None):
        model = conv_model(x.shape, packed, 20, (3, 3), (2, 1), (1, 1, 0, 1), (1, 2), b, activation, opset)
        got = session(model, None).run(None, {"X": x})[0]
        assert_close(got, block_sparse_conv_reference(x, packed, 20, (3, 3), b, (2, 1), (1, 1, 0, 1), (1, 2),
                                                      activation), 54)  # fmt: skip


def _bad_model(packed, **attrs):
    inits = [numpy_helper.from_array(np.asarray(v), f"c.{k}") for k, v in packed.items()]
    kw = dict(out_channels=32, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    kw.update(attrs)
    node = helper.make_node("BlockSparseConv", ["X", "c.values", "c.c_index", "c.row_ptr"], ["Y"], name="conv_bad",
                            domain="com.edgesparse", **kw)  # fmt: skip
    return make_model([node], inits, [float_info("X", [1, 8, 10, 10])], [float_info("Y", None)])


def _good():
    w = random_block_sparse_conv(np.random.default_rng(9), 32, 8, 3, 3, 16, 0.5)
    return {k: v.copy() for k, v in pack_block_sparse_conv(w, 16).items()}


def test_malformed_rejected_at_session_creation(kernel_lib):
    cases = []
    p = _good()
    p["c_index"][0] = 8
    cases.append((p, {}, "c_index"))
    p = _good()
    p["row_ptr"][1] = 99
    cases.append((p, {}, "row_ptr"))
    p = _good()
    p["values"] = p["values"][:, :4]
    cases.append((p, {}, "values"))
    p = _good()
    p["c_index"] = p["c_index"].astype(np.int64)
    cases.append((p, {}, "int32"))
    cases.append((_good(), {"group": 2}, "group"))
    cases.append((_good(), {"kernel_shape": [3]}, "kernel_shape"))
    cases.append((_good(), {"activation": "gelu"}, "activation"))
    for packed, attrs, words in cases:
        with pytest.raises(Exception) as info:
            session(_bad_model(packed, **attrs), kernel_lib)
        assert "conv_bad" in str(info.value) and words in str(info.value), str(info.value)


def test_non_constant_weights_validated_at_run(kernel_lib):
    good = _good()
    node = helper.make_node("BlockSparseConv", ["X", "v", "ci", "rp"], ["Y"], name="dynconv", domain="com.edgesparse",
                            out_channels=32, kernel_shape=[3, 3], pads=[1, 1, 1, 1])  # fmt: skip
    inputs = [float_info("X", [1, 8, 10, 10]), float_info("v", None),
              helper.make_tensor_value_info("ci", TensorProto.INT32, None),
              helper.make_tensor_value_info("rp", TensorProto.INT32, None)]  # fmt: skip
    sess = session(make_model([node], [], inputs, [float_info("Y", None)]), kernel_lib)
    x = np.random.default_rng(1).standard_normal((1, 8, 10, 10)).astype(np.float32)
    feeds = {"X": x, "v": good["values"], "ci": good["c_index"], "rp": good["row_ptr"]}
    want = block_sparse_conv_reference(x, good, 32, (3, 3), pads=(1, 1, 1, 1))
    assert_close(sess.run(None, feeds)[0], want, 72)
    bad_rp = good["row_ptr"].copy()
    bad_rp[1] = bad_rp[-1] + 5
    with pytest.raises(Exception, match="dynconv.*row_ptr"):
        sess.run(None, dict(feeds, rp=bad_rp))


def test_bias_given_as_empty_name(kernel_lib):
    rng = np.random.default_rng(8)
    wt = random_block_sparse_conv(rng, 8, 3, 3, 3, 4, 0.5)
    packed = pack_block_sparse_conv(wt, 4)
    model = conv_model((1, 3, 6, 6), packed, 8, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    model.graph.node[0].input.append("")
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    for lib in (kernel_lib, None):
        got = session(model, lib).run(None, {"X": x})[0]
        assert_close(got, conv2d_reference(x, wt, None, (1, 1), (1, 1, 1, 1)), 27)


def test_in_channels_attribute_survives_pruned_last_channels():
    """Without shape information the packed groups cannot tell C when the last input channels are
    all pruned; the node's in_channels attribute does, for densify (the dense reference) and describe."""
    from onnx import numpy_helper

    from edgesparse import builtin

    w = np.random.default_rng(3).standard_normal((8, 6, 3, 3)).astype(np.float32)
    w[:, 4:] = 0.0
    node, inits = make_block_sparse_conv("X", "Y", pack_block_sparse_conv(w, 4), 8, (3, 3), name="c", in_channels=6)
    arrays = {t.name: numpy_helper.to_array(t) for t in inits}
    nodes, dense = builtin.densify(node, arrays, {})
    np.testing.assert_array_equal(numpy_helper.to_array(dense[0]), w)
    assert builtin.describe(node, arrays, {})["sparsity"] == pytest.approx(1 - 8 / 12)
