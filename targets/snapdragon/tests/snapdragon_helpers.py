"""Helpers shared by the snapdragon tests (a uniquely named module: several test folders have a
conftest.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[3]
EDGESPARSE = [sys.executable, "-m", "edgesparse"]


def mlp(d_in=256, d_hidden=1024, d_out=256, seed=0) -> onnx.ModelProto:
    """x[batch, d_in] -> MatMul+Add -> Relu -> MatMul+Add -> y, random real-valued weights."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((d_in, d_hidden)) / np.sqrt(d_in)).astype(np.float32)
    w2 = (rng.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)).astype(np.float32)
    b1 = (rng.standard_normal(d_hidden) * 0.1).astype(np.float32)
    b2 = (rng.standard_normal(d_out) * 0.1).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_bias"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias")]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def cli(*args, check=True, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([*EDGESPARSE, *map(str, args)], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"edgesparse {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def manifest(package: Path) -> dict:
    return json.loads((package / "manifest.json").read_text())
