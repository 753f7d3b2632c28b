"""The pass inside edgesparse's build: calibration, reports, warnings, the package."""
import json

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
    manifest = _build(tiny_onnx, inputs, tmp_path, tolerance=2.0, sparsity=0.5, window=16, decode_steps=8)
    report = manifest["passes"][0]["report"]
    sparsity = report["attention_sparsity"]
    assert sparsity["prefill"] >= 0.5 - 0.03  # the calibration target, on the calibration input
    assert 0.0 < sparsity["decode"] < 1.0 and 0.0 < sparsity["overall"] < 1.0
    assert [row["layer"] for row in report["layers"]] == [0, 1]
    assert all(row["prefill"] is not None and row["decode"] is not None for row in report["layers"])
    assert report["setting"]["window"] == 16 and report["setting"]["exact"] is False
    assert report["calibration"]["error_kind"] == "relative perplexity increase"
    assert any("--tolerance" in w for w in manifest["warnings"])  # delta attention is not exact
    assert manifest["verification"]["passed"] and manifest["verification"]["sparse_nodes_on_kernel"] == 2
    # the manifest's per-node record carries the calibrated sparsity
    assert {layer["op"] for layer in manifest["layers"]} == {"DeltaAttention"}
    assert all(0 < layer["sparsity"] < 1 for layer in manifest["layers"])


def test_package_runs_without_the_library_as_exact_attention(tiny_onnx, inputs, tmp_path, library):
    import onnxruntime as ort

    _build(tiny_onnx, inputs, tmp_path, tolerance=2.0, sparsity=0.5, window=16, decode_steps=0)
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
    manifest = _build(tiny_onnx, inputs, tmp_path, tolerance=1.0, window=8, theta_q=0.0, theta_v=0.0, decode_steps=0)
    assert manifest["passes"][0]["report"]["attention_sparsity"]["prefill"] < 0.01
    assert any("skip nothing" in w for w in manifest["warnings"])
    assert not any("below the target" in w for w in manifest["warnings"])  # no target was pursued


def test_accuracy_budget_is_respected_on_the_calibration_input(tiny_onnx, inputs, tmp_path, library):
    manifest = _build(tiny_onnx, inputs, tmp_path, tolerance=2.0, target="accuracy", budget=0.01, window=16,
                      decode_steps=0)
    calibration = manifest["passes"][0]["report"]["calibration"]
    assert calibration["error"] <= 0.01
    assert manifest["passes"][0]["report"]["attention_sparsity"]["prefill"] > 0.2


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
