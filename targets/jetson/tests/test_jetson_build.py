"""The jetson target through the real CLI, as a user runs it on an x86 build machine: the package
carries aarch64 host code with cubins for the declared GPU architectures, the same graph runs on
this machine's CPU against the reference, and bad input fails with one line and no package."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgesparse import EdgesparseError
from edgesparse_tvm import cuda
from edgesparse_tvm.testing import mlp_model, require_tools

EM_AARCH64 = 183


def edgesparse(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgesparse", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    require_tools("nvcc", "aarch64-linux-gnu-g++", "g++")
    path = tmp_path_factory.mktemp("jetson") / "mlp.onnx"
    onnx.save(mlp_model(d_in=512, d_hidden=1024, d_out=512, activation="Gelu"), str(path))
    return path


def build(mlp: Path, out: Path, arches: str | None = None, nvcc: str | None = None, model: Path | None = None):
    env = {"EDGESPARSE_JETSON_ARCHES": arches} if arches else {}
    env = {**env, "EDGESPARSE_NVCC": nvcc} if nvcc else env
    return edgesparse("build", model or mlp, "--target", "jetson", "--pass", "magnitude:sparsity=0.75,block=16",
                      "-o", out, env=env)


@pytest.fixture(scope="module")
def package(mlp) -> Path:
    out = mlp.parent / "pkg"
    result = build(mlp, out)
    assert result.returncode == 0, result.stderr
    return out


def test_jetson_package_has_sm87_cubins_and_verifies_on_cpu_fallback(package):
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["target"]["name"] == "jetson" and manifest["target"]["machine"] == "aarch64"
    assert manifest["target"]["gpu_arches"] == ["sm_87"]
    v = manifest["verification"]
    assert v["passed"] and v["max_abs_error"] <= v["tolerance"] and v["fraction_on_sparse_kernels"] == 1.0
    modules = {m["name"]: m for m in manifest["runtime"]["modules"]}
    deploy, check = modules["cuda_aarch64"], modules["cpu_x86_64"]
    assert deploy["role"] == "deploy" and check["role"] == "verify"
    assert deploy["sparse_kernel_calls"] == check["sparse_kernel_calls"] == 2
    library = (package / deploy["file"]).read_bytes()
    assert library[:4] == b"\x7fELF" and int.from_bytes(library[18:20], "little") == EM_AARCH64
    assert set(cuda.cubins_in(library)) == {"sm_87"}          # read from the shipped file itself
    assert deploy["cuda"]["arches"] == ["sm_87"] and deploy["cuda"]["nvcc"]
    assert manifest["runtime"]["deploy_files"] == ["tvm/cuda_aarch64.so", "tvm/run.py"]
    result = edgesparse("verify", package)                     # reruns the CPU fallback here
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout


def test_extra_arches_add_cubins(tmp_path):
    """EDGESPARSE_JETSON_ARCHES / arches= adds GPUs: each gets its cubin in the deployable module."""
    require_tools("nvcc", "aarch64-linux-gnu-g++")
    from edgesparse.kernels import make_block_sparse_matmul, pack_block_sparse
    from edgesparse_jetson import Jetson
    from edgesparse_tvm import compile_module
    from onnx import TensorProto, helper

    w = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32)
    w[:, 128:] = 0
    node, inits = make_block_sparse_matmul("x", "y", pack_block_sparse(w, 16), 512, name="fc", activation="silu")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.edgesparse", 1)])
    target = Jetson(arches=("sm_87", "sm_90"))
    spec = target.tvm_modules()[0]
    assert spec.role == "deploy" and spec.machine == "aarch64" and spec.arches == ("sm_87", "sm_90")
    entry = compile_module(model, spec, tmp_path)
    assert set(cuda.cubins_in((tmp_path / entry["file"]).read_bytes())) == {"sm_87", "sm_90"}
    assert entry["cuda"]["arches"] == ["sm_87", "sm_90"] and entry["sparse_kernel_calls"] == 1
    assert target.describe()["gpus"]["sm_90"].startswith("not a Jetson GPU")


def _assert_clean_failure(result, out: Path, *needles):
    assert result.returncode != 0
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]  # progress lines go to stderr too
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists() and not out.with_suffix(".zip").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no staging left


def test_unknown_architecture_is_one_line_and_writes_nothing(mlp, tmp_path):
    out = tmp_path / "pkg"
    _assert_clean_failure(build(mlp, out, arches="sm_99"), out, "unknown GPU architecture 'sm_99'", "sm_87")


@pytest.mark.parametrize("arches, message", [
    (("sm_72",), "GPU architecture 'sm_72' (Jetson AGX Xavier / Xavier NX) is not supported"),
    (("volta",), "unknown GPU architecture 'volta': expected the form sm_87"),
    ((), None),
])
def test_architecture_checks(arches, message):
    from edgesparse import EdgesparseError
    from edgesparse_jetson import Jetson

    require_tools("nvcc")
    if message is None:
        assert Jetson(arches=arches).arches == ("sm_87",)  # the default: Orin
        return
    with pytest.raises(EdgesparseError) as info:
        Jetson(arches=arches).check_environment()
    assert str(info.value) == message or str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_missing_nvcc_is_one_line_and_writes_nothing(mlp, tmp_path):
    out = tmp_path / "pkg"
    _assert_clean_failure(build(mlp, out, nvcc=str(tmp_path / "no-such-nvcc")), out, "nvcc not found")


def test_operator_tvm_cannot_import_suggests_ort(mlp, tmp_path):
    model = tmp_path / "celu.onnx"
    onnx.save(mlp_model(activation="Celu"), str(model))
    out = tmp_path / "pkg"
    # jetson has no ORT backend, so the way out names a target that has one
    _assert_clean_failure(build(mlp, out, model=model), out, "'Celu'",
                          "target 'jetson' compiles through tvm only: build this model for a target with the ORT backend")


def test_target_options_select_architectures_and_refuse_bad_ones():
    from edgesparse_jetson import Jetson

    assert Jetson().configure({"arches": "sm_87;sm_90"}).arches == ("sm_87", "sm_90")
    with pytest.raises(EdgesparseError, match="sm_72"):
        Jetson().configure({"arches": "sm_72"}).arches
    with pytest.raises(EdgesparseError, match="nvcc not found"):
        Jetson().configure({"nvcc": "/nonexistent/nvcc"}).nvcc
