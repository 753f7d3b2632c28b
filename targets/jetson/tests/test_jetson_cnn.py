"""A CNN through `edgesparse build --target jetson` with the magnitude pass: the pruned conv is a
BlockSparseConv lowered to the TIR conv kernel in the sm_87 CUDA module and in the CPU fallback,
which verifies against the reference; dense and depthwise convs stay TVM's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx

from edgesparse_tvm import cuda
from edgesparse_tvm.testing import cnn_model, require_tools


def test_cnn_builds_for_jetson_with_a_sparse_conv_kernel(tmp_path):
    require_tools("nvcc", "aarch64-linux-gnu-g++", "g++")
    onnx.save(cnn_model(), str(tmp_path / "cnn.onnx"))
    out = tmp_path / "pkg"
    result = subprocess.run([sys.executable, "-m", "edgesparse", "build", str(tmp_path / "cnn.onnx"), "--target", "jetson",
                             "--pass", "magnitude:sparsity=0.75,block=16", "-o", str(out)],
                            capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(l["op"], l["sparsity"]) for l in manifest["layers"]] == [("BlockSparseConv", 0.75)]
    kept = {k["layer"]: k["reason"] for k in manifest["passes"][0]["report"]["kept_dense"]}
    assert set(kept) == {"conv1", "depthwise"}
    v = manifest["verification"]
    assert v["passed"] and v["max_abs_error"] <= v["tolerance"] and v["by_op"]["BlockSparseConv"]["on_kernel"] == 1
    modules = {m["name"]: m for m in manifest["runtime"]["modules"]}
    assert modules["cuda_aarch64"]["sparse_kernel_calls"] == modules["cpu_x86_64"]["sparse_kernel_calls"] == 1
    assert set(cuda.cubins_in((out / modules["cuda_aarch64"]["file"]).read_bytes())) == {"sm_87"}
