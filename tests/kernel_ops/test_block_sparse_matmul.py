"""BlockSparseMatMul: packer, reference, ORT kernel (every ISA), function fallback, validation."""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgesparse.kernels import (
    block_sparse_matmul_reference,
    make_block_sparse_matmul,
    pack_block_sparse,
    unpack_block_sparse,
)

from .conftest import float_info, make_model, session

HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_block_sparse(rng, k, n, block, sparsity):
    """Dense [K, N] whose B x 1 blocks are zero with probability `sparsity`."""
    nb = -(-n // block)
    keep = rng.random((k, nb)) >= sparsity
    w = rng.standard_normal((k, nb * block)).astype(np.float32)
    w *= np.repeat(keep, block, axis=1)
    return np.ascontiguousarray(w[:, :n])


def matmul_model(x_shape, packed, n, bias=None, activation="none", opset=21, functions=True):
    node, inits = make_block_sparse_matmul("X", "Y", packed, n, name="fc", bias=bias, activation=activation)
    y_shape = list(x_shape[:-1]) + [n]
    return make_model([node], inits, [float_info("X", x_shape)], [float_info("Y", y_shape)], opset, functions)


def assert_close(got, want, k):
    tol = 1e-5 * max(1.0, np.sqrt(k)) * 4
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@given(
    k=st.integers(1, 40),
    n=st.integers(1, 40),
    block=st.sampled_from([4, 8, 16]),
    sparsity=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31),
)
@settings(max_examples=60, deadline=None)
def test_pack_unpack_roundtrip(k, n, block, sparsity, seed):
    rng = np.random.default_rng(seed)
    w = random_block_sparse(rng, k, n, block, sparsity)
    packed = pack_block_sparse(w, block)
    nb = -(-n // block)
    assert packed["values"].shape[1] == block and packed["values"].dtype == np.float32
    assert packed["k_index"].dtype == np.int32 and packed["row_ptr"].dtype == np.int32
    assert packed["row_ptr"].shape == (nb + 1,) and packed["row_ptr"][-1] == len(packed["k_index"])
    for j in range(nb):
        ks = packed["k_index"][packed["row_ptr"][j] : packed["row_ptr"][j + 1]]
        assert np.all(np.diff(ks) > 0)
    np.testing.assert_array_equal(unpack_block_sparse(packed, n, k), w)


def test_pack_rejects_bad_block():
    with pytest.raises(ValueError):
        pack_block_sparse(np.ones((4, 4), np.float32), 5)


def test_reference_matches_numpy():
    rng = np.random.default_rng(0)
    w = random_block_sparse(rng, 33, 21, 8, 0.5)
    x = rng.standard_normal((3, 33)).astype(np.float32)
    b = rng.standard_normal(21).astype(np.float32)
    got = block_sparse_matmul_reference(x, pack_block_sparse(w, 8), 21, b, "relu")
    np.testing.assert_allclose(got, np.maximum(x @ w + b, 0), rtol=1e-5, atol=1e-5)


shapes = st.sampled_from(["mk", "bsk", "k"])


@given(
    k=st.integers(1, 70),
    n=st.integers(1, 70),
    m=st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 17]),
    layout=shapes,
    block=st.sampled_from([4, 8, 16]),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    use_bias=st.booleans(),
    activation=st.sampled_from(["none", "relu", "gelu", "silu"]),
    seed=st.integers(0, 2**31),
)
@HYP
def test_kernel_matches_reference(kernel_lib, isa, k, n, m, layout, block, sparsity, use_bias, activation, seed):
    rng = np.random.default_rng(seed)
    w = random_block_sparse(rng, k, n, block, sparsity)
    packed = pack_block_sparse(w, block)
    bias = rng.standard_normal(n).astype(np.float32) if use_bias else None
    x_shape = {"mk": [m, k], "bsk": [2, m, k], "k": [k]}[layout]
    x = rng.standard_normal(x_shape).astype(np.float32)
    sess = session(matmul_model(x_shape, packed, n, bias, activation), kernel_lib)
    (y,) = sess.run(None, {"X": x})
    assert y.shape == tuple(x_shape[:-1]) + (n,)
    assert_close(y, block_sparse_matmul_reference(x, packed, n, bias, activation), k)


@pytest.mark.parametrize("m,k,n,block", [(64, 256, 200, 16), (37, 96, 130, 8), (1, 300, 64, 4), (130, 64, 48, 16), (70, 200, 36, 4), (21, 50, 70, 8)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_larger_shapes_and_threads(kernel_lib, isa, m, k, n, block, threads):
    rng = np.random.default_rng(m + k + n)
    w = random_block_sparse(rng, k, n, block, 0.7)
    packed = pack_block_sparse(w, block)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    sess = session(matmul_model([m, k], packed, n, bias, "gelu"), kernel_lib, threads=threads)
    assert_close(sess.run(None, {"X": x})[0], block_sparse_matmul_reference(x, packed, n, bias, "gelu"), k)


# The token-vectorised tile for 16 x 1 blocks (AVX-512, M >= 32; bsmm_kernel.h
# "bsmm_rows_wide"): 48-token tiles, a partial last tile (M not a multiple of
# 48, or of 16: a partial token vector), outputs 8 at a time (n % 16 != 0: a
# partial last block row, also n < 8), empty block rows, bias and every
# activation; 2 threads split token tiles and block rows.
@pytest.mark.parametrize("m", [32, 33, 47, 48, 49, 64, 97, 150])
@pytest.mark.parametrize("n", [16, 45, 56, 5])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
def test_wide_token_tile(kernel_lib, isa, m, n, activation):
    rng = np.random.default_rng(m * 100 + n)
    k = 70
    w = random_block_sparse(rng, k, n, 16, 0.5)
    if n > 16:
        w[:, 16:32] = 0  # an empty block row: act(bias) only
    packed = pack_block_sparse(w, 16)
    bias = rng.standard_normal(n).astype(np.float32) if m % 2 else None
    x = rng.standard_normal((m, k)).astype(np.float32)
    threads = 2 if m == 150 else 1
    sess = session(matmul_model([m, k], packed, n, bias, activation), kernel_lib, threads=threads)
    assert_close(sess.run(None, {"X": x})[0], block_sparse_matmul_reference(x, packed, n, bias, activation), k)


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
def test_wide_token_tile_dense_empty_and_batched(kernel_lib, isa, sparsity):
    """All blocks kept or none (every block row empty: act(bias)); a [2, M, K] input."""
    rng = np.random.default_rng(7)
    k, n = 33, 40
    w = random_block_sparse(rng, k, n, 16, sparsity)
    packed = pack_block_sparse(w, 16)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((2, 40, k)).astype(np.float32)
    sess = session(matmul_model([2, 40, k], packed, n, bias, "relu"), kernel_lib)
    assert_close(sess.run(None, {"X": x})[0], block_sparse_matmul_reference(x, packed, n, bias, "relu"), k)


def test_all_zero_and_fully_dense(kernel_lib):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 24)).astype(np.float32)
    for w in (np.zeros((24, 20), np.float32), rng.standard_normal((24, 20)).astype(np.float32)):
        packed = pack_block_sparse(w, 8)
        sess = session(matmul_model([5, 24], packed, 20, None), kernel_lib)
        assert_close(sess.run(None, {"X": x})[0], x @ w, 24)


def test_empty_tokens_and_empty_features(kernel_lib):
    """M = 0 gives an empty output; K = 0 gives act(bias) (the empty sum is zero)."""
    packed = pack_block_sparse(np.zeros((0, 6), np.float32), 4)
    bias = np.arange(6, dtype=np.float32) - 2
    sess = session(matmul_model([3, 0], packed, 6, bias, "relu"), kernel_lib)
    np.testing.assert_array_equal(sess.run(None, {"X": np.zeros((3, 0), np.float32)})[0],
                                  np.tile(np.maximum(bias, 0), (3, 1)))
    packed = pack_block_sparse(np.ones((5, 6), np.float32), 4)
    sess = session(matmul_model(["m", 5], packed, 6), kernel_lib)
    assert sess.run(None, {"X": np.zeros((0, 5), np.float32)})[0].shape == (0, 6)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
def test_function_fallback_without_library(opset, activation):
    """No library registered: ORT inlines the ONNX function and gets the same answer."""
    rng = np.random.default_rng(opset)
    k, n = 45, 37
    w = random_block_sparse(rng, k, n, 8, 0.6)
    w[:, 8:16] = 0  # an empty block row
    packed = pack_block_sparse(w, 8)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    for b in (bias, None):
        sess = session(matmul_model([2, 3, k], packed, n, b, activation, opset=opset), None)
        assert_close(sess.run(None, {"X": x})[0], block_sparse_matmul_reference(x, packed, n, b, activation), k)


def test_function_fallback_edge_cases():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    for w, block in ((np.zeros((10, 5), np.float32), 16), (rng.standard_normal((10, 3)).astype(np.float32), 4)):
        packed = pack_block_sparse(w, block)
        sess = session(matmul_model([4, 10], packed, w.shape[1]), None)
        assert_close(sess.run(None, {"X": x})[0], x @ w, 10)


def test_registered_library_runs_the_kernel(kernel_lib, tmp_path):
    """With the library the node runs as one custom kernel, not the inlined body."""
    rng = np.random.default_rng(2)
    packed = pack_block_sparse(random_block_sparse(rng, 32, 32, 16, 0.5), 16)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(kernel_lib))
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    sess = ort.InferenceSession(matmul_model([1, 32], packed, 32).SerializeToString(), so)
    sess.run(None, {"X": np.ones((1, 32), np.float32)})
    events = json.load(open(sess.end_profiling()))
    ops = {e["args"].get("op_name") for e in events if e.get("cat") == "Node"}
    assert "BlockSparseMatMul" in ops and "ScatterND" not in ops


def test_default_activation_attribute_can_be_omitted(kernel_lib):
    rng = np.random.default_rng(4)
    w = random_block_sparse(rng, 16, 16, 4, 0.5)
    packed = pack_block_sparse(w, 4)
    model = matmul_model([2, 16], packed, 16)
    node = model.graph.node[0]
    del node.attribute[[a.name for a in node.attribute].index("activation")]
    x = rng.standard_normal((2, 16)).astype(np.float32)
    for lib in (kernel_lib, None):
        assert_close(session(model, lib).run(None, {"X": x})[0], x @ w, 16)


# --- malformed sparse tensors are rejected at session creation, naming the node ---


def _model_with(packed, n=32, k=32, x_type=TensorProto.FLOAT):
    inits = [numpy_helper.from_array(np.asarray(v), f"fc.{name}") for name, v in packed.items()]
    node = helper.make_node(
        "BlockSparseMatMul", ["X", "fc.values", "fc.k_index", "fc.row_ptr"], ["Y"],
        name="fc_bad", domain="com.edgesparse", N=n,
    )  # fmt: skip
    x = helper.make_tensor_value_info("X", x_type, [2, k])
    return make_model([node], inits, [x], [float_info("Y", [2, n])])


def _good():
    w = random_block_sparse(np.random.default_rng(5), 32, 32, 16, 0.5)
    return {k: v.copy() for k, v in pack_block_sparse(w, 16).items()}


def _bad_cases():
    cases = {}
    p = _good()
    p["k_index"][0] = 40
    cases["k_index out of range"] = (p, "k_index")
    p = _good()
    p["k_index"][0] = -1
    cases["negative k_index"] = (p, "negative")
    p = _good()
    p["row_ptr"][1] = p["row_ptr"][2] + 1
    cases["row_ptr not monotonic"] = (p, "row_ptr")
    p = _good()
    p["row_ptr"][-1] -= 1
    cases["row_ptr end"] = (p, "row_ptr")
    p = _good()
    p["k_index"] = p["k_index"].astype(np.int64)
    cases["int64 indices"] = (p, "int32")
    p = _good()
    p["values"] = p["values"].astype(np.float64)
    cases["double values"] = (p, "float")
    p = _good()
    p["values"] = np.zeros((len(p["k_index"]), 5), np.float32)
    cases["block 5"] = (p, "B in {4, 8, 16}")
    p = _good()
    p["row_ptr"] = p["row_ptr"][:-1]
    cases["row_ptr length"] = (p, "row_ptr")
    p = _good()
    p["k_index"] = p["k_index"][:-1]
    cases["k_index length"] = (p, "k_index")
    p = _good()
    j = 0
    while p["row_ptr"][j + 1] - p["row_ptr"][j] < 2:
        j += 1
    a = p["row_ptr"][j]
    p["k_index"][a], p["k_index"][a + 1] = p["k_index"][a + 1], p["k_index"][a]
    cases["unsorted k_index"] = (p, "ascending")
    return cases


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_malformed_rejected_at_session_creation(kernel_lib, case):
    packed, words = _bad_cases()[case]
    with pytest.raises(Exception) as info:
        session(_model_with(packed), kernel_lib)
    msg = str(info.value)
    assert "fc_bad" in msg and words in msg, msg


def test_malformed_x_dtype_and_missing_attribute(kernel_lib):
    with pytest.raises(Exception, match="fc_bad.*X .*float"):
        session(_model_with(_good(), x_type=TensorProto.DOUBLE), kernel_lib)
    model = _model_with(_good())
    del model.graph.node[0].attribute[:]
    with pytest.raises(Exception, match="fc_bad.*attribute N"):
        session(model, kernel_lib)


def test_non_constant_weights_validated_at_run(kernel_lib):
    """Weights fed as graph inputs are checked on every run: error, not crash."""
    good = _good()
    node = helper.make_node(
        "BlockSparseMatMul", ["X", "v", "ki", "rp"], ["Y"], name="dyn", domain="com.edgesparse", N=32
    )
    inputs = [
        float_info("X", [2, "k"]),
        float_info("v", None),
        helper.make_tensor_value_info("ki", TensorProto.INT32, None),
        helper.make_tensor_value_info("rp", TensorProto.INT32, None),
    ]
    sess = session(make_model([node], [], inputs, [float_info("Y", None)]), kernel_lib)
    x = np.random.default_rng(6).standard_normal((2, 32)).astype(np.float32)
    feeds = {"X": x, "v": good["values"], "ki": good["k_index"], "rp": good["row_ptr"]}
    assert_close(sess.run(None, feeds)[0], block_sparse_matmul_reference(x, good, 32), 32)
    bad = dict(feeds, ki=np.where(good["k_index"] == good["k_index"][0], 999, good["k_index"]).astype(np.int32))
    with pytest.raises(Exception, match="dyn.*k_index"):
        sess.run(None, bad)
    x_small = x[:, :8]
    with pytest.raises(Exception, match="dyn"):
        sess.run(None, dict(feeds, X=np.ascontiguousarray(x_small)))


def test_bias_given_as_empty_name(kernel_lib):
    """An optional input may also be spelled as an empty name."""
    rng = np.random.default_rng(8)
    w = random_block_sparse(rng, 20, 12, 4, 0.5)
    packed = pack_block_sparse(w, 4)
    model = matmul_model([3, 20], packed, 12)
    model.graph.node[0].input.append("")
    x = rng.standard_normal((3, 20)).astype(np.float32)
    for lib in (kernel_lib, None):
        assert_close(session(model, lib).run(None, {"X": x})[0], x @ w, 20)
