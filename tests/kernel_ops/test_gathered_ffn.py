"""GatheredFFN: packer, reference, ORT kernel (every ISA), function fallback, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgesparse.kernels.gathered_ffn import gathered_ffn_reference, make_gathered_ffn, pack_gathered_ffn
from edgesparse.kernels.reference import apply_activation

from .conftest import float_info, make_model, session

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_ffn(rng, d, inter, d_out, s, gated, biases=True):
    scale = 1 / np.sqrt(d)
    kw = dict(
        w_gate=rng.standard_normal((inter, d)).astype(np.float32) * scale if gated else None,
        b_up=rng.standard_normal(inter).astype(np.float32) if biases else None,
        b_gate=rng.standard_normal(inter).astype(np.float32) if biases and gated else None,
        b_down=rng.standard_normal(d_out).astype(np.float32) if biases else None,
    )
    w_up = rng.standard_normal((inter, d)).astype(np.float32) * scale
    w_down = rng.standard_normal((d_out, inter)).astype(np.float32) / np.sqrt(inter)
    return (w_up, w_down, kw), pack_gathered_ffn(w_up, w_down, s, **kw)


def ffn_model(x_shape, packed, activation, opset=21, functions=True):
    node, inits = make_gathered_ffn("X", "E", "Y", packed, name="ffn", activation=activation)
    inputs = [float_info("X", list(x_shape)), helper.make_tensor_value_info("E", TensorProto.INT32, ["n"])]
    return make_model([node], inits, inputs, [float_info("Y", None)], opset, functions)


def test_pack_matches_dense_ffn():
    """All experts selected == the dense FFN written with the Linear-layout weights."""
    rng = np.random.default_rng(0)
    (w_up, w_down, kw), packed = random_ffn(rng, 12, 32, 8, 8, gated=True)
    x = rng.standard_normal((3, 12)).astype(np.float32)
    g = apply_activation(x @ kw["w_gate"].T + kw["b_gate"], "silu")
    want = (g * (x @ w_up.T + kw["b_up"])) @ w_down.T + kw["b_down"]
    got = gathered_ffn_reference(x, packed, np.arange(4), "silu")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@given(
    d=st.integers(1, 40),
    n_experts=st.integers(1, 6),
    s=st.sampled_from([4, 8, 12, 16, 20, 32]),
    d_out=st.sampled_from([4, 8, 12, 20, 36]),
    t=st.sampled_from([1, 2, 5, 8, 9, 17]),
    lead=st.sampled_from(["t", "bt"]),
    gated=st.booleans(),
    biases=st.booleans(),
    activation=st.sampled_from(["none", "relu", "gelu", "silu"]),
    n_active=st.integers(0, 6),
    seed=st.integers(0, 2**31),
)
@HYP
def test_kernel_matches_reference(kernel_lib, isa, d, n_experts, s, d_out, t, lead, gated, biases, activation,
                                  n_active, seed):
    rng = np.random.default_rng(seed)
    _, packed = random_ffn(rng, d, n_experts * s, d_out, s, gated, biases)
    experts = rng.choice(n_experts, min(n_active, n_experts), replace=False).astype(np.int32)
    shape = [t, d] if lead == "t" else [2, t, d]
    x = rng.standard_normal(shape).astype(np.float32)
    sess = session(ffn_model(shape, packed, activation), kernel_lib)
    (y,) = sess.run(None, {"X": x, "E": experts})
    want = gathered_ffn_reference(x, packed, experts, activation)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.sqrt(d + s * n_experts))


@pytest.mark.parametrize("t", [1, 8, 64])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_larger_and_threads(kernel_lib, isa, t, threads):
    rng = np.random.default_rng(t)
    _, packed = random_ffn(rng, 128, 512, 128, 32, gated=True)
    experts = np.array([3, 0, 15, 7, 9], np.int32)
    x = rng.standard_normal((t, 128)).astype(np.float32)
    sess = session(ffn_model([t, 128], packed, "silu"), kernel_lib, threads=threads)
    got = sess.run(None, {"X": x, "E": experts})[0]
    np.testing.assert_allclose(got, gathered_ffn_reference(x, packed, experts, "silu"), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
def test_function_fallback_without_library(opset, gated, activation):
    rng = np.random.default_rng(opset + gated)
    _, packed = random_ffn(rng, 16, 48, 12, 8, gated)
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    sess = session(ffn_model([2, 3, 16], packed, activation, opset), None)
    for experts in (np.array([4, 1], np.int32), np.arange(6, dtype=np.int32), np.zeros(0, np.int32)):
        got = sess.run(None, {"X": x, "E": experts})[0]
        np.testing.assert_allclose(got, gathered_ffn_reference(x, packed, experts, activation), rtol=1e-4, atol=1e-4)


def test_bad_selection_is_an_error_not_a_crash(kernel_lib):
    rng = np.random.default_rng(1)
    _, packed = random_ffn(rng, 16, 32, 8, 8, gated=False)
    sess = session(ffn_model([2, 16], packed, "relu"), kernel_lib)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    for bad in (np.array([4], np.int32), np.array([-1], np.int32)):
        with pytest.raises(Exception, match="ffn.*experts"):
            sess.run(None, {"X": x, "E": bad})


def test_malformed_weights_rejected_at_session_creation(kernel_lib):
    rng = np.random.default_rng(2)
    _, packed = random_ffn(rng, 16, 32, 8, 8, gated=True)
    bad = dict(packed, w_down=packed["w_down"][:, :6])  # S mismatch
    with pytest.raises(Exception, match="ffn.*w_down"):
        session(ffn_model([2, 16], bad, "relu"), kernel_lib)
    model = ffn_model([2, 16], packed, "relu")
    i = [t.name for t in model.graph.initializer].index("ffn.b_up")
    model.graph.initializer[i].CopyFrom(numpy_helper.from_array(packed["b_up"].astype(np.float64), "ffn.b_up"))
    with pytest.raises(Exception, match="ffn.*b_up"):
        session(model, kernel_lib)
    with pytest.raises(Exception, match="ffn.*features"):
        session(ffn_model([2, 12], packed, "relu"), kernel_lib)
