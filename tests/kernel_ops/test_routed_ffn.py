"""RoutedFFN (BlockFFN routers): reference, ORT kernel (every ISA, chunks), function fallback,
profile, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesparse.kernels.gathered_ffn import (
    active_experts_per_chunk,
    gathered_ffn_reference,
    make_routed_ffn,
    routed_ffn_reference,
)

from .conftest import float_info, make_model, session
from .test_gathered_ffn import random_ffn

HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def routed_model(x_shape, n_experts, packed, activation, chunk, opset=21, functions=True, routes_shape=()):
    node, inits = make_routed_ffn("X", "R", "Y", packed, name="ffn", activation=activation, chunk=chunk)
    r_shape = list(x_shape[:-1]) + [n_experts] if routes_shape == () else routes_shape
    inputs = [float_info("X", list(x_shape)), float_info("R", r_shape)]
    return make_model([node], inits, inputs, [float_info("Y", None)], opset, functions)


def sparse_routes(rng, shape, density):
    r = np.abs(rng.standard_normal(shape)).astype(np.float32)
    return r * (rng.random(shape) < density)


def test_reference_is_gathered_ffn_with_scales():
    """Routes of all ones == GatheredFFN over every expert; zero routes drop an expert."""
    rng = np.random.default_rng(0)
    _, packed = random_ffn(rng, 12, 32, 8, 8, gated=True)
    x = rng.standard_normal((3, 12)).astype(np.float32)
    ones = np.ones((3, 4), np.float32)
    np.testing.assert_allclose(routed_ffn_reference(x, packed, ones, "silu"),
                               gathered_ffn_reference(x, packed, np.arange(4), "silu"), rtol=1e-5, atol=1e-5)
    r = ones.copy()
    r[:, 2] = 0
    np.testing.assert_allclose(routed_ffn_reference(x, packed, r, "silu"),
                               gathered_ffn_reference(x, packed, [0, 1, 3], "silu"), rtol=1e-5, atol=1e-5)


def test_active_experts_per_chunk():
    r = np.zeros((5, 3), np.float32)
    r[0, 0] = r[3, 2] = r[4, 1] = 1
    np.testing.assert_array_equal(active_experts_per_chunk(r, 2), [[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(active_experts_per_chunk(r, 0), [[1, 1, 1]])


@given(
    d=st.integers(1, 40),
    n_experts=st.integers(1, 6),
    s=st.sampled_from([4, 8, 12, 16, 32]),
    d_out=st.sampled_from([4, 8, 20, 36]),
    t=st.sampled_from([1, 2, 5, 8, 9, 17]),
    lead=st.sampled_from(["t", "bt"]),
    gated=st.booleans(),
    biases=st.booleans(),
    activation=st.sampled_from(["none", "relu", "gelu", "silu"]),
    density=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    chunk=st.sampled_from([0, 1, 3, 8]),
    seed=st.integers(0, 2**31),
)
@HYP
def test_kernel_matches_reference(kernel_lib, isa, d, n_experts, s, d_out, t, lead, gated, biases, activation,
                                  density, chunk, seed):
    rng = np.random.default_rng(seed)
    _, packed = random_ffn(rng, d, n_experts * s, d_out, s, gated, biases)
    shape = [t, d] if lead == "t" else [2, t, d]
    x = rng.standard_normal(shape).astype(np.float32)
    r = sparse_routes(rng, shape[:-1] + [n_experts], density)
    sess = session(routed_model(shape, n_experts, packed, activation, chunk), kernel_lib)
    (y,) = sess.run(None, {"X": x, "R": r})
    want = routed_ffn_reference(x, packed, r, activation)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.sqrt(d + s * n_experts))


@pytest.mark.parametrize("t,chunk", [(1, 1), (64, 8), (64, 32), (37, 8)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_larger_and_threads(kernel_lib, t, chunk, threads):
    rng = np.random.default_rng(t + chunk)
    _, packed = random_ffn(rng, 128, 512, 128, 32, gated=True)
    x = rng.standard_normal((t, 128)).astype(np.float32)
    r = sparse_routes(rng, (t, 16), 0.1)
    sess = session(routed_model([t, 128], 16, packed, "silu", chunk), kernel_lib, threads=threads)
    got = sess.run(None, {"X": x, "R": r})[0]
    np.testing.assert_allclose(got, routed_ffn_reference(x, packed, r, "silu"), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("s", [32, 56])
@pytest.mark.parametrize("gated", [False, True])
def test_kernel_one_token_panels(kernel_lib, isa, s, gated):
    """One token (a decode step) takes wide output panels (256 columns on AVX-512, 64 on AVX2) and
    32-neuron expert panels; D_out = 300 and S = 56 leave every narrower tail after them."""
    rng = np.random.default_rng(s + gated)
    _, packed = random_ffn(rng, 64, 6 * s, 300, s, gated)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    r = sparse_routes(rng, (1, 6), 0.5)
    r[0, 1] = 1.5  # at least one expert on
    sess = session(routed_model([1, 64], 6, packed, "relu", 1), kernel_lib)
    got = sess.run(None, {"X": x, "R": r})[0]
    np.testing.assert_allclose(got, routed_ffn_reference(x, packed, r, "relu"), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("opset", [17, 21])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("activation", ["none", "gelu", "silu"])
def test_function_fallback_without_library(opset, gated, activation):
    rng = np.random.default_rng(opset + gated)
    _, packed = random_ffn(rng, 16, 48, 12, 8, gated)
    x = rng.standard_normal((2, 3, 16)).astype(np.float32)
    sess = session(routed_model([2, 3, 16], 6, packed, activation, 2, opset), None)
    for density in (0.0, 0.3, 1.0):
        r = sparse_routes(rng, (2, 3, 6), density)
        got = sess.run(None, {"X": x, "R": r})[0]
        np.testing.assert_allclose(got, routed_ffn_reference(x, packed, r, activation), rtol=1e-4, atol=1e-4)


def test_profile_shows_the_kernel(kernel_lib, tmp_path):
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    _, packed = random_ffn(rng, 16, 32, 8, 8, gated=True)
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(kernel_lib))
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "p")
    sess = ort.InferenceSession(routed_model([4, 16], 4, packed, "silu", 2).SerializeToString(), so)
    sess.run(None, {"X": rng.standard_normal((4, 16)).astype(np.float32), "R": np.ones((4, 4), np.float32)})
    events = json.load(open(sess.end_profiling()))
    ops = {e.get("args", {}).get("op_name") for e in events if e.get("cat") == "Node"}
    assert "RoutedFFN" in ops and "Gemm" not in ops


def test_bad_routes_are_an_error_not_a_crash(kernel_lib):
    rng = np.random.default_rng(1)
    _, packed = random_ffn(rng, 16, 32, 8, 8, gated=False)
    sess = session(routed_model([2, 16], 4, packed, "relu", 1, routes_shape=None), kernel_lib)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    with pytest.raises(Exception, match="ffn.*routes"):
        sess.run(None, {"X": x, "R": np.ones((2, 3), np.float32)})
    with pytest.raises(Exception, match="ffn.*routes"):
        sess.run(None, {"X": x, "R": np.ones((3, 4), np.float32)})
    with pytest.raises(ValueError, match="chunk"):
        make_routed_ffn("X", "R", "Y", packed, name="ffn", chunk=-1)
