"""Helpers for the tests of the tvm backend and of targets built on it."""
from __future__ import annotations

import shutil

import numpy as np

from edgesparse import EdgesparseError

CROSS_SETUP = "sh targets/jetson/setup_env.sh (apt-get install g++-aarch64-linux-gnu)"


def mlp_model(d_in=256, d_hidden=512, d_out=128, seed=0, activation="Relu"):
    """x[batch, d_in] -> MatMul+Add -> activation -> MatMul+Add -> y (random, real-valued)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    arrays = {
        "w1": (rng.standard_normal((d_in, d_hidden)) / np.sqrt(d_in)).astype(np.float32),
        "b1": (0.1 * rng.standard_normal(d_hidden)).astype(np.float32),
        "w2": (rng.standard_normal((d_hidden, d_out)) / np.sqrt(d_hidden)).astype(np.float32),
        "b2": (0.1 * rng.standard_normal(d_out)).astype(np.float32),
    }
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Add", ["h0", "b1"], ["h"], name="fc1_bias"),
             helper.make_node(activation, ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y0"], name="fc2"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d_out])],
                              [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    opset = 20 if activation == "Gelu" else 18  # Gelu is an ONNX op from opset 20
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def x86_tvm_target():
    """The x86 target compiled through TVM instead of ORT: the core's x86 target lists only the ort
    backend, so tests (and users, until it lists "tvm") use this subclass. Against TVM's untuned
    dense code the sparse TIR kernel wins at any sparsity the passes use, hence prefers_sparse."""
    from edgesparse_x86 import X86

    from . import run_package

    class X86Tvm(X86):
        name = "x86-tvm"
        summary = "x86-64 CPUs through the tvm backend"
        backends = ("tvm",)

        def prefers_sparse(self, op, shape, sparsity, block, threads=1):
            return op == "BlockSparseMatMul" and sparsity >= 0.3

        def run_package(self, package_dir, inputs, threads=1):
            return run_package(package_dir, inputs, threads)

    return X86Tvm()


def require_tools(*tools: str) -> None:
    """Fail (not skip) naming the install command when a build tool is missing."""
    from . import cuda

    for tool in tools:
        if tool == "nvcc":
            try:
                cuda.find_nvcc()
            except EdgesparseError as exc:
                raise AssertionError(f"{exc}; the tvm backend's GPU tests need the CUDA toolkit's nvcc") from None
        elif shutil.which(tool) is None:
            hint = CROSS_SETUP if "aarch64" in tool else f"apt-get install {tool}"
            raise AssertionError(f"{tool} is missing; install it with: {hint}")
