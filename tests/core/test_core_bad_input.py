"""Bad input gets a one-line error naming the problem and leaves no half-written output."""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgesparse_testing import fails, no_leftovers, run


def test_missing_model(tmp_path):
    fails("build", tmp_path / "nope.onnx", "-t", "x86", "-o", tmp_path / "out", expect="model file not found")
    assert not (tmp_path / "out").exists()


def test_corrupt_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not an onnx file at all" * 10)
    fails("build", bad, "-t", "x86", "-o", tmp_path / "out", expect="cannot read ONNX model")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_unknown_pass_target_option(mlp_onnx, tmp_path):
    out = tmp_path / "out"
    fails("build", mlp_onnx, "-t", "x86", "-p", "nosuchpass", "-o", out, expect="unknown pass 'nosuchpass'")
    fails("build", mlp_onnx, "-t", "vax", "-o", out, expect="unknown target 'vax'")
    fails("build", mlp_onnx, "-t", "x86", "-p", "magnitude:colour=red", "-o", out, expect="has no option 'colour'")
    fails("build", mlp_onnx, "-t", "x86", "-p", "magnitude:sparsity=lots", "-o", out, expect="expects float")
    fails("build", mlp_onnx, "-t", "x86", "-p", "magnitude:sparsity=1.5", "-o", out, expect="must be in [0.0, 1.0)")
    fails("build", mlp_onnx, "-t", "x86", "-p", "magnitude:block=5", "-o", out, expect="is not one of")
    assert not out.exists()


def test_pass_that_cannot_apply(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "relu.onnx"))
    fails("build", tmp_path / "relu.onnx", "-t", "x86", "-p", "magnitude", "-o", tmp_path / "out",
          expect="no MatMul/Gemm/Conv with a constant weight")
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


def test_output_exists(mlp_onnx, tmp_path):
    (tmp_path / "out").mkdir()
    fails("build", mlp_onnx, "-t", "x86", "-o", tmp_path / "out", expect="output folder already exists")


def test_torch_pass_needs_torch_model(mlp_onnx, tmp_path):
    # a pass with a torch stage given an ONNX file is refused before any work
    from edgesparse import Pass
    from edgesparse.errors import EdgesparseError
    from edgesparse.pipeline import BuildRequest, build
    from edgesparse.plugins import load_registry
    import types

    class Surgery(Pass):
        name = "surgery"

        def transform_module(self, module, ctx):
            return module

    plugin = types.ModuleType("surgery_plugin")
    from edgesparse import hookimpl

    plugin.register_passes = hookimpl(lambda register: register(Surgery))
    registry = load_registry(extra_modules=[plugin])
    with pytest.raises(EdgesparseError, match="works on PyTorch models"):
        build(BuildRequest(str(mlp_onnx), "x86", tmp_path / "o", passes=[("surgery", {})], quiet=True), registry)


@pytest.fixture
def package_copy(built_mlp, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(built_mlp, copy)
    return copy


def test_truncated_package(package_copy):
    model = package_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    fails("verify", package_copy, expect="checksum mismatch for model.onnx")
    fails("inspect", package_copy, expect="checksum mismatch")


def test_missing_package_file(package_copy):
    lib = next((package_copy / "lib").iterdir())
    lib.unlink()
    fails("verify", package_copy, expect="package file missing: lib/")


def test_hand_edited_manifest(package_copy):
    path = package_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    fails("verify", package_copy, expect="format version 99 is not supported")
    path.write_text("{ not json")
    fails("inspect", package_copy, expect="not valid JSON")


def test_package_for_another_machine(package_copy):
    path = package_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["target"]["machine"] = "aarch64"
    path.write_text(json.dumps(manifest))
    fails("bench", package_copy, expect="built for target 'x86' (aarch64)")


def test_not_a_package(tmp_path):
    fails("inspect", tmp_path, expect="manifest.json is missing")


def test_debug_shows_traceback(tmp_path):
    result = run("--debug", "build", tmp_path / "nope.onnx", "-t", "x86", "-o", tmp_path / "o", check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_failed_verification_leaves_nothing(mlp_onnx, tmp_path):
    out = tmp_path / "out"
    # a tolerance no float computation can meet makes verification fail after the package was staged
    result = run("build", mlp_onnx, "-t", "x86", "-p", "magnitude:dispatch=off", "-o", out, "--tolerance", "0", check=False)
    if result.returncode == 0:  # bit-exact kernels would pass even this; then nothing to check
        pytest.skip("kernel output is bit-identical to the reference")
    assert "verification failed" in result.stderr
    assert not out.exists() and not (tmp_path / "out.zip").exists() and no_leftovers(tmp_path) == []
