"""BlockSparseConv, GatheredFFN and RoutedFFN on the tvm backend: the TIR kernels against ONNX Runtime running
edgesparse's C++ kernels (max abs error), edge cases of each kernel against numpy, the CUDA
lowering of a graph with every operator compiled by nvcc into sm_87 and sm_90 cubins, what the
importer refuses, and that loading the plugins does not import TVM."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from onnx import helper

import tvm
from edgesparse import EdgesparseError
from edgesparse.kernels import pack_block_sparse_conv
from edgesparse.kernels.conv import block_sparse_conv_reference
from edgesparse.kernels.gathered_ffn import gathered_ffn_reference, pack_gathered_ffn, routed_ffn_reference
from edgesparse_tvm import ModuleSpec, compile_module, cuda, frontend, kernels_conv, kernels_ffn
from edgesparse_tvm.testing import ort_with_kernels, relax_run, require_tools, sparse_ops_model

CPU = {"kind": "llvm"}


@pytest.fixture(scope="module")
def ops_model():
    return sparse_ops_model()


@pytest.fixture(scope="module")
def cpu_module(ops_model):
    model, _ = ops_model
    mod, calls = frontend.import_model(model, "cpu")
    return mod, calls, relax_run(mod)


@pytest.mark.parametrize("experts", [[4, 1, 4], []], ids=["repeat", "none"])
def test_every_operator_matches_ort_with_cpp_kernels(ops_model, cpu_module, experts):
    model, inputs = ops_model
    mod, calls, run = cpu_module
    assert calls == 7  # 3 convs, 2 gathered FFNs, 1 routed FFN, 1 matmul: all on TIR kernels
    ops = {f.attrs["edgesparse.op"] for f in mod.functions.values() if f.attrs and "edgesparse.op" in f.attrs}
    assert ops == {"BlockSparseConv", "GatheredFFN", "RoutedFFN", "BlockSparseMatMul"}
    feeds = {**inputs, "experts": np.array(experts, np.int32)}
    want = ort_with_kernels(model, feeds)
    got = run([feeds[k] for k in ("img", "tok", "experts")])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert np.abs(w).max() > 0.05  # a real signal, not zeros
        assert np.abs(g - w).max() <= 1e-5 * max(1.0, np.abs(w).max())


def _run(func, args, out_shape):
    fn = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=tvm.target.Target(CPU))["k"]
    y = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    fn(*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


@pytest.mark.parametrize("n, c, h, w, o, k, stride, dilation, block, act, keep", [
    (None, 5, 9, 11, 20, (3, 3), (1, 1), (1, 1), 8, "relu6", 0.5),   # symbolic batch, O not a multiple of B
    (1, 7, 10, 10, 16, (1, 1), (2, 2), (1, 1), 16, "silu", 0.5),     # strided 1x1
    (1, 3, 12, 12, 12, (3, 1), (2, 1), (2, 1), 4, "none", 0.6),      # 3x1, dilation 2, mixed strides
    (2, 4, 5, 6, 8, (5, 5), (1, 1), (1, 1), 8, "relu", 0.0),         # every group pruned: bias only
])
def test_conv_kernel_edge_cases(n, c, h, w, o, k, stride, dilation, block, act, keep):
    rng = np.random.default_rng(c + o)
    weight = rng.standard_normal((o, c, *k)).astype(np.float32) * (rng.random((o, c, 1, 1)) < keep)
    packed = pack_block_sparse_conv(weight, block)
    bias = rng.standard_normal(o).astype(np.float32)
    for batch in ([n] if n else [1, 3]):
        x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
        want = block_sparse_conv_reference(x, packed, o, k, bias, stride, (0, 0, 0, 0), dilation, act)
        func = kernels_conv.conv_cpu_kernel(n, c, h, w, o, k, block, stride, dilation, act)
        got = _run(func, (x, packed["values"], packed["c_index"], packed["row_ptr"], bias), want.shape)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m, e, d, s, d_out, gated, act, selection", [
    (1, 4, 33, 16, 8, False, "gelu", [3, 0]),          # decode: D split over 4 accumulators, odd D
    (9, 3, 24, 12, 20, True, "silu", [2, 2, 0]),       # token tiles + a partial one, S and D_out chunks of 4
    (None, 5, 16, 8, 12, True, "relu", [4, 1]),        # symbolic tokens
])
def test_ffn_kernel_edge_cases(m, e, d, s, d_out, gated, act, selection):
    rng = np.random.default_rng(d)
    inter = e * s
    packed = pack_gathered_ffn(rng.standard_normal((inter, d)), rng.standard_normal((d_out, inter)), s,
                               w_gate=rng.standard_normal((inter, d)) if gated else None,
                               b_up=rng.standard_normal(inter), b_gate=rng.standard_normal(inter) if gated else None,
                               b_down=rng.standard_normal(d_out))
    gate, b_gate = packed.get("w_gate", packed["w_up"]), packed.get("b_gate", packed["b_up"])
    up = kernels_ffn.ffn_up_cpu(m, e, d, s, gated, act)
    down = kernels_ffn.ffn_down_cpu(m, e, s, d_out)
    selection = np.array(selection, np.int32)
    for tokens in ([m] if m else [1, 6]):
        x = rng.standard_normal((tokens, d)).astype(np.float32)
        h = _run(up, (x, selection, packed["w_up"], gate, packed["b_up"], b_gate), (tokens, len(selection) * s))
        y = _run(down, (h, selection, packed["w_down"], packed["b_down"]), (tokens, d_out))
        want = gathered_ffn_reference(x, packed, selection, act)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("m, gated, act", [(9, True, "silu"), (None, False, "gelu")])
def test_routed_ffn_kernels_skip_silent_experts_exactly(m, gated, act):
    """RoutedFFN: h scaled by the routes; an expert whose routes are zero for a whole token tile
    (or for every token) is skipped, and the result is still the full routed FFN."""
    rng = np.random.default_rng(5)
    e, d, s, d_out = 6, 40, 12, 20
    packed = pack_gathered_ffn(rng.standard_normal((e * s, d)), rng.standard_normal((d_out, e * s)), s,
                               w_gate=rng.standard_normal((e * s, d)) if gated else None, b_up=rng.standard_normal(e * s),
                               b_gate=rng.standard_normal(e * s) if gated else None, b_down=rng.standard_normal(d_out))
    gate, b_gate = packed.get("w_gate", packed["w_up"]), packed.get("b_gate", packed["b_up"])
    up = kernels_ffn.ffn_up_cpu(m, e, d, s, gated, act, routed=True)
    down = kernels_ffn.ffn_down_cpu(m, e, s, d_out, routed=True)
    tokens = m or 7
    x = rng.standard_normal((tokens, d)).astype(np.float32)
    routes = np.maximum(rng.standard_normal((tokens, e)), 0).astype(np.float32)
    routes[:4, 2] = 0   # silent for the first token tile
    routes[:, 0] = 0    # silent everywhere
    h = _run(up, (x, routes, packed["w_up"], gate, packed["b_up"], b_gate), (tokens, e * s))
    assert not h[:, :s].any() and not h[:4, 2 * s:3 * s].any()
    y = _run(down, (h, routes, packed["w_down"], packed["b_down"]), (tokens, d_out))
    want = routed_ffn_reference(x, packed, routes, act)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_ffn_expert_out_of_range_is_an_error_on_cpu():
    up = kernels_ffn.ffn_up_cpu(1, 2, 8, 4, False)
    zeros = lambda *shape: np.zeros(shape, np.float32)
    with pytest.raises(RuntimeError, match="expert index out of range"):
        _run(up, (zeros(1, 8), np.array([2], np.int32), zeros(2, 8, 4), zeros(2, 8, 4), zeros(2, 4), zeros(2, 4)), (1, 4))


def test_cuda_lowering_of_every_operator_has_sm87_and_sm90_cubins(ops_model, tmp_path):
    """The whole graph through the CUDA pipeline (the conv's padding is a dlight-scheduled Relax
    pad), nvcc fatbin with a cubin per architecture, as the jetson target builds it."""
    require_tools("nvcc")
    model, _ = ops_model
    spec = ModuleSpec("cuda_x86_64", "cuda", "x86_64", mcpu="x86-64-v3", arches=("sm_87", "sm_90"))
    entry = compile_module(model, spec, tmp_path)
    assert entry["sparse_kernel_calls"] == 7
    assert set(cuda.cubins_in((tmp_path / entry["file"]).read_bytes())) == {"sm_87", "sm_90"}
    assert entry["cuda"]["cubins"]["sm_87"] > 10_000


def _with_node(change):
    model, _ = sparse_ops_model()
    node = next(n for n in model.graph.node if n.op_type == change[0])
    change[1](node)
    return model


@pytest.mark.parametrize("change, needle", [
    (("GatheredFFN", lambda n: n.attribute.append(helper.make_attribute("mode", "topk"))),
     "GatheredFFN 'ffn1': attribute 'mode' is not supported by the tvm backend's kernels; build with --backend ort"),
    (("GatheredFFN", lambda n: n.input.append("tok")),
     "GatheredFFN 'ffn1': input 8 and later are not supported"),
    (("BlockSparseConv", lambda n: n.attribute.append(helper.make_attribute("group", 2))),
     "BlockSparseConv 'conv1': group=2 is not supported"),
])
def test_contract_additions_without_a_tir_kernel_are_named(change, needle):
    """Other passes may extend GatheredFFN; until a TIR kernel follows, the build says so."""
    with pytest.raises(EdgesparseError) as info:
        frontend.import_model(_with_node(change), "cpu")
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_loading_the_plugins_does_not_import_tvm():
    """TVM takes seconds to import: plugin discovery (every CLI command) must not pay for it."""
    code = ("import sys, json, importlib.metadata as md\n"
            "from edgesparse.plugins import load_registry\n"
            "eps = [e for e in md.entry_points(group='edgesparse') if e.name in ('tvm', 'jetson')]\n"
            "[e.load() for e in eps]\n"
            "reg = load_registry()\n"
            "print(json.dumps({'eps': sorted(e.name for e in eps), 'backends': sorted(reg.backends), 'targets': sorted(reg.targets),\n"
            "                  'tvm': sorted(m for m in sys.modules if m == 'tvm' or m.startswith('tvm.'))}))\n")
    env = {**os.environ, "EDGESPARSE_PLUGINS": "tvm,jetson"}  # the two plugins of this backend, fast
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["eps"] == ["jetson", "tvm"] and "tvm" in out["backends"] and "jetson" in out["targets"]
    assert out["tvm"] == []
