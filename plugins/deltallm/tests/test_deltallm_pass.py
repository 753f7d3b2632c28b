"""The pass inside edgesparse's build: calibration, reports, warnings, the package."""
import json
import os
import shutil

import numpy as np
import onnx
import pytest

import tiny_llama
from edgesparse import EdgesparseError
from edgesparse.pipeline import BuildRequest, build


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "calibration.npz"
    np.savez(path, **tiny_llama.feeds(tiny_llama.tokens(tiny_llama.CONTEXT, 11)))
    return path


def _build(tiny_onnx, inputs, tmp_path, tolerance=1e-4, **options):
    request = BuildRequest(model=str(tiny_onnx), target="x86", output=tmp_path / "pkg",
                           passes=[("deltallm", options)], inputs=inputs, tolerance=tolerance, quiet=True)
    return build(request)


def test_build_reports_sparsity_per_layer_for_prefill_and_decode(tiny_onnx, inputs, tmp_path, library):
    manifest = _build(tiny_onnx, inputs, tmp_path, sparsity=0.5, window=16, decode_steps=8)  # default tolerance
    report = manifest["passes"][0]["report"]
    sparsity = report["attention_sparsity"]
    assert sparsity["prefill"] >= 0.5 - 0.03  # the calibration target, on the calibration input
    assert 0.0 < sparsity["decode"] < 1.0 and 0.0 < sparsity["overall"] < 1.0
    assert [row["layer"] for row in report["layers"]] == [0, 1]
    assert all(row["prefill"] is not None and row["decode"] is not None for row in report["layers"])
    assert report["setting"]["window"] == 16 and report["setting"]["exact"] is False
    assert report["calibration"]["error_kind"] == "relative perplexity increase"
    # verified against the op's reference implementation (the same approximation) at 1e-4 ...
    verification = manifest["verification"]
    assert verification["reference"] == "op reference" and verification["passed"]
    assert verification["sparse_nodes_on_kernel"] == 2
    # ... while the approximation's cost against the original model is in the quality section
    assert manifest["quality"]["outputs"]["logits"]["rel_l2"] > 1e-2   # measured: 1.5e-6 vs rel. L2 0.083
    # bench times it against exact attention, after checking it against the op reference
    from edgesparse import bench, runtime
    from edgesparse.plugins import registry

    batch = dict(np.load(tmp_path / "pkg" / "verification.npz"))
    batch = {k.split(":", 1)[1]: v for k, v in batch.items() if k.startswith("input:")}
    libraries = [lib for lib in registry().kernels.values() if lib.domain == "com.edgesparse.deltallm"]
    record, = bench.bench_package(runtime.load(tmp_path / "pkg", check_target=False), batch, libraries, rounds=2,
                                  budget_s=0.2)
    assert record["max_abs_error"] < 1e-4
    # the manifest's per-node record carries the calibrated sparsity
    assert {layer["op"] for layer in manifest["layers"]} == {"DeltaAttention"}
    assert all(0 < layer["sparsity"] < 1 for layer in manifest["layers"])


BUGS = {  # a plausible slip in the kernel: (source line, what it became)
    "value budget 4x the asked one": ("const float budget = thv * den_prev;", "const float budget = 4.f * thv * den_prev;"),
    "transmitted query stored wrong": ("          st(qh + d0, moved ? x : o);", "          st(qh + d0, moved ? (x + o) * 0.5f : o);"),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_a_wrong_kernel_fails_verification(tiny_onnx, inputs, tmp_path, library, monkeypatch, bug):
    """Verification compares with the op's reference implementation, not with exact attention:
    it passes the right approximation at the default tolerance (above) and must still catch a
    kernel that approximates differently from what the pass asked for."""
    from edgesparse_deltallm import build as kernel_build

    csrc = tmp_path / "csrc"
    shutil.copytree(kernel_build.CSRC, csrc)
    source = (csrc / "delta_kernel.cpp").read_text()
    old, new = BUGS[bug]
    assert source.count(old) == 1
    (csrc / "delta_kernel.cpp").write_text(source.replace(old, new))
    monkeypatch.setattr(kernel_build, "CSRC", csrc)
    monkeypatch.setattr(kernel_build, "VARIANTS", {"generic": kernel_build.VARIANTS["generic"]})  # one copy: quick
    monkeypatch.setenv("EDGESPARSE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EdgesparseError, match="verification failed") as failed:
        _build(tiny_onnx, inputs, tmp_path, window=8, theta_q=0.3, theta_v=0.01, decode_steps=0)
    # checked node by node on the same inputs, the kernel disagrees with its reference: named, no tolerance offered
    assert "differs from its reference on the same inputs" in str(failed.value) and "--tolerance" not in str(failed.value)


def test_the_node_check_runs_the_code_of_the_isa_the_package_is_for(tiny_onnx, inputs, tmp_path, library, monkeypatch):
    """A package for AVX2 built on an AVX-512 machine: the per-node check (reached here through a
    wrong kernel) runs the kernels' AVX2 code, as the package run before it did."""
    from edgesparse import verify
    from edgesparse.kernels import dispatch
    from edgesparse_deltallm import build as kernel_build

    if not dispatch.host_supports("avx2"):
        pytest.skip("this machine cannot run the AVX2 code")
    csrc = tmp_path / "csrc"
    shutil.copytree(kernel_build.CSRC, csrc)
    old, new = BUGS["transmitted query stored wrong"]
    (csrc / "delta_kernel.cpp").write_text((csrc / "delta_kernel.cpp").read_text().replace(old, new))
    monkeypatch.setattr(kernel_build, "CSRC", csrc)
    monkeypatch.setenv("EDGESPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGESPARSE_ISA", raising=False)
    seen, real = [], verify.node_agreement
    monkeypatch.setattr(verify, "node_agreement", lambda *a, **k: seen.append(os.environ.get("EDGESPARSE_ISA")) or real(*a, **k))
    request = BuildRequest(model=str(tiny_onnx), target="x86", target_options={"isa": "avx2"}, output=tmp_path / "pkg",
                           passes=[("deltallm", {"window": 8, "theta_q": 0.3, "theta_v": 0.01, "decode_steps": 0})],
                           inputs=inputs, quiet=True)
    with pytest.raises(EdgesparseError, match="differs from its reference on the same inputs"):
        build(request)
    assert seen == ["avx2"] and "EDGESPARSE_ISA" not in os.environ


def test_each_node_matches_its_reference_on_the_same_inputs(tiny_onnx, inputs, tmp_path, library):
    """verify.node_agreement (the check a build falls back to when thresholds flip end to end):
    every DeltaAttention kernel, fed the inputs the reference run gave it, reproduces the reference."""
    from edgesparse import verify
    from edgesparse.plugins import registry

    manifest = _build(tiny_onnx, inputs, tmp_path, sparsity=0.5, window=8, decode_steps=0)
    pkg = tmp_path / "pkg"
    model = onnx.load(str(pkg / manifest["runtime"]["model"]))
    libraries = list(registry().kernels.values())
    batch = dict(np.load(pkg / "verification.npz"))
    batch = {k.split(":", 1)[1]: v for k, v in batch.items() if k.startswith("input:")}
    rows = verify.node_agreement(model, libraries, batch, [str(pkg / f) for f in manifest["runtime"]["custom_op_libraries"]],
                                 1e-4)
    assert [r["op"] for r in rows] == ["DeltaAttention", "DeltaAttention"]
    assert all(r["agrees"] and r["max_abs_error"] <= 1e-4 * r["scale"] for r in rows), rows
    assert manifest["verification"]["criterion"] == "end to end"  # the tiny model needs no fallback


def test_package_runs_without_the_library_as_exact_attention(tiny_onnx, inputs, tmp_path, library):
    import onnxruntime as ort

    _build(tiny_onnx, inputs, tmp_path, sparsity=0.5, window=16, decode_steps=0)
    packaged = onnx.load(str(tmp_path / "pkg" / "model.onnx"))
    assert any(f.name == "DeltaAttention" for f in packaged.functions)
    feeds = tiny_llama.feeds(tiny_llama.tokens(50, 3))
    fallback = ort.InferenceSession(packaged.SerializeToString()).run(None, feeds)  # no custom-op library
    dense = ort.InferenceSession(str(tiny_onnx)).run(None, feeds)
    for a, b in zip(fallback, dense):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_window_larger_than_the_context_is_exact_and_says_so(tiny_onnx, inputs, tmp_path, library):
    manifest = _build(tiny_onnx, inputs, tmp_path, window=4096, decode_steps=4)  # default tolerance 1e-4
    report = manifest["passes"][0]["report"]
    assert report["setting"]["exact"] is True
    assert report["attention_sparsity"]["prefill"] == 0.0
    assert any("attention stays exact" in w for w in manifest["warnings"])
    assert manifest["verification"]["passed"] and manifest["verification"]["max_abs_error"] < 1e-4


def test_thresholds_that_skip_nothing_warn(tiny_onnx, inputs, tmp_path, library):
    manifest = _build(tiny_onnx, inputs, tmp_path, window=8, theta_q=0.0, theta_v=0.0, decode_steps=0)
    assert manifest["passes"][0]["report"]["attention_sparsity"]["prefill"] < 0.01
    assert any("skip nothing" in w for w in manifest["warnings"])
    assert not any("below the target" in w for w in manifest["warnings"])  # no target was pursued


def test_accuracy_budget_is_respected_on_the_calibration_input(tiny_onnx, inputs, tmp_path, library):
    manifest = _build(tiny_onnx, inputs, tmp_path, target="accuracy", budget=0.01, window=16,
                      decode_steps=0)
    calibration = manifest["passes"][0]["report"]["calibration"]
    assert calibration["error"] <= 0.01
    assert manifest["passes"][0]["report"]["attention_sparsity"]["prefill"] > 0.2


@pytest.mark.parametrize("per", ["auto", "dimension"])
def test_theta_q_per_dimension_or_head(tiny_onnx, inputs, tmp_path, library, per):
    """auto: the search tries theta_q scaled per query dimension and per head and keeps the better;
    a per-dimension choice reaches the package as one threshold per head and dimension."""
    manifest = _build(tiny_onnx, inputs, tmp_path, sparsity=0.5, window=16, decode_steps=0, theta_q_per=per)
    report = manifest["passes"][0]["report"]
    tried = {row["theta_q_per"] for row in report["calibration"]["evaluations"]}
    assert tried == ({"dimension", "head"} if per == "auto" else {"dimension"})
    chosen = report["setting"]["theta_q_per"]
    assert chosen in tried
    model = onnx.load(str(tmp_path / "pkg" / manifest["runtime"]["model"]))
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "DeltaAttention")
    theta_q = init[node.input[3]]
    assert theta_q.ndim == 2 and theta_q.shape[1] > 1  # [H, D]
    rows_differ = bool((theta_q != theta_q[:, :1]).any())
    assert rows_differ == (chosen == "dimension")  # per dimension: values vary along D; per head: constant rows
    assert manifest["verification"]["passed"]


def test_model_without_attention_fails_with_one_line(tmp_path, inputs):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    path = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    request = BuildRequest(model=str(path), target="x86", output=tmp_path / "pkg", passes=[("deltallm", {})],
                           quiet=True)
    with pytest.raises(EdgesparseError, match="deltallm: no attention block found"):
        build(request)
    assert not (tmp_path / "pkg").exists()


def test_options_are_checked_before_anything_runs(tmp_path):
    from edgesparse_deltallm import DeltaLLM

    with pytest.raises(EdgesparseError, match="target"):
        DeltaLLM(target="speed")
    with pytest.raises(EdgesparseError, match="sparsity"):
        DeltaLLM(sparsity=1.0)
    with pytest.raises(EdgesparseError, match="window"):
        DeltaLLM(window=-3)
