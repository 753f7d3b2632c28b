"""Helpers shared by the core tests: small real ONNX models and the CLI run as a user runs it."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
EDGESPARSE = [sys.executable, "-m", "edgesparse"]


def mlp_model(d_in=256, d_hidden=1024, d_out=256, seed=0, gemm=False) -> onnx.ModelProto:
    """X[batch, d_in] -> Linear -> Relu -> Linear -> Y, with real-valued random weights."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((d_in, d_hidden)) / np.sqrt(d_in)).astype(np.float32)
    w2 = (rng.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)).astype(np.float32)
    b1 = rng.standard_normal(d_hidden).astype(np.float32) * 0.1
    b2 = rng.standard_normal(d_out).astype(np.float32) * 0.1
    if gemm:  # torch.nn.Linear as exported by older exporters: Gemm with transB
        nodes = [helper.make_node("Gemm", ["x", "w1t", "b1"], ["h"], name="fc1", transB=1)]
        inits = [numpy_helper.from_array(w1.T.copy(), "w1t"), numpy_helper.from_array(b1, "b1")]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
                 helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_bias")]
        inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1")]
    nodes += [helper.make_node("Relu", ["h"], ["r"], name="act"),
              helper.make_node("MatMul", ["r", "w2"], ["y0"], name="fc2"),
              helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias")]
    inits += [numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def conv_model(seed=0) -> onnx.ModelProto:
    """A MobileNet-style block: 1x1 conv (64->128) + Relu, 3x3 conv (128->128, pad 1, stride 2),
    3x3 depthwise conv (stays dense), on NCHW input [batch, 64, 16, 16]."""
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)
    inits = [numpy_helper.from_array(w(128, 64, 1, 1), "pw"), numpy_helper.from_array(rng.standard_normal(128).astype(np.float32) * 0.1, "pw_b"),
             numpy_helper.from_array(w(128, 128, 3, 3), "k3"), numpy_helper.from_array(w(128, 1, 3, 3), "dw")]
    nodes = [helper.make_node("Conv", ["x", "pw", "pw_b"], ["a"], name="pointwise"),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Conv", ["b", "k3"], ["c"], name="conv3x3", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["c", "dw"], ["y"], name="depthwise", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=128)]
    graph = helper.make_graph(nodes, "convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 128, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def run(*args, check=True, env=None, cwd=None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, as a user runs it."""
    result = subprocess.run([*EDGESPARSE, *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"edgesparse {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def run_json(*args, **kw):
    return json.loads(run(*args, "--json", **kw).stdout)


def fails(*args, expect: str, **kw) -> str:
    """The CLI fails with exactly one `error:` line containing `expect`, and no traceback."""
    result = run(*args, check=False, **kw)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"not one error line:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert expect in errors[0], errors[0]
    return errors[0]


def no_leftovers(folder):
    """Hidden staging folders a failed build left behind (there should be none)."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]
