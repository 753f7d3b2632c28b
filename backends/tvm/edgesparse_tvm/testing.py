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


def sparse_ops_model(seed=0, batch=2, tokens=3, d=48, experts=6, expert_size=8, d_out=32, n_active="n_active"):
    """Every edgesparse operator in one graph, as the passes emit them, with real-valued random
    weights: image [batch, 8, 12, 10] -> BlockSparseConv 3x3 pad 1 relu -> BlockSparseConv 3x3
    stride 2 dilation 1, asymmetric pads, relu6, no bias -> BlockSparseConv 1x1 stride 2 silu ->
    "img_out"; tokens [batch, tokens, d] with experts int32 [n_active] -> GatheredFFN (gated,
    silu) -> GatheredFFN (plain, gelu) -> RoutedFFN (gated, relu; its ReLU router in standard ops,
    about a quarter of the routes nonzero, chunk 2) -> BlockSparseMatMul -> "tok_out". Returns (model,
    inputs) with a selection that repeats an expert."""
    import onnx
    from onnx import TensorProto, helper

    from edgesparse.kernels import (attach_functions, make_block_sparse_conv, make_block_sparse_matmul,
                                    make_gathered_ffn, make_routed_ffn, pack_block_sparse, pack_block_sparse_conv,
                                    pack_gathered_ffn)

    rng = np.random.default_rng(seed)

    def conv_weights(o, c, k, block):
        w = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
        keep = rng.random((-(-o // block), c)) < 0.4
        return w * np.repeat(keep, block, axis=0)[:o, :, None, None]

    nodes, inits = [], []
    for name, x, y, o, c, k, block, kw in (
            ("conv1", "img", "c1", 20, 8, 3, 8, dict(pads=(1, 1, 1, 1), activation="relu", bias=True)),
            ("conv2", "c1", "c2", 16, 20, 3, 16, dict(strides=(2, 2), pads=(0, 1, 2, 1), activation="relu6")),
            ("conv3", "c2", "img_out", 12, 16, 1, 4, dict(strides=(2, 2), activation="silu", bias=True))):
        bias = (0.1 * rng.standard_normal(o)).astype(np.float32) if kw.pop("bias", False) else None
        node, init = make_block_sparse_conv(x, y, pack_block_sparse_conv(conv_weights(o, c, k, block), block), o, (k, k),
                                            name=name, bias=bias, **kw)
        nodes.append(node)
        inits += init
    inter = experts * expert_size
    for name, x, y, gated, act in (("ffn1", "tok", "f1", True, "silu"), ("ffn2", "f1", "f2", False, "gelu")):
        w_up = (rng.standard_normal((inter, d)) / np.sqrt(d)).astype(np.float32)
        w_down = (rng.standard_normal((d, inter)) / np.sqrt(inter)).astype(np.float32)
        extra = dict(w_gate=(rng.standard_normal((inter, d)) / np.sqrt(d)).astype(np.float32),
                     b_gate=rng.standard_normal(inter).astype(np.float32)) if gated else {}
        packed = pack_gathered_ffn(w_up, w_down, expert_size, b_up=rng.standard_normal(inter).astype(np.float32),
                                   b_down=(0.1 * rng.standard_normal(d)).astype(np.float32), **extra)
        node, init = make_gathered_ffn(x, "experts", y, packed, name=name, activation=act)
        nodes.append(node)
        inits += init
    from onnx import numpy_helper

    w_router = (rng.standard_normal((d, experts)) / np.sqrt(d)).astype(np.float32)
    inits += [numpy_helper.from_array(w_router, "router.w"), numpy_helper.from_array(np.float32([0.7]), "router.shift")]
    nodes += [helper.make_node("MatMul", ["f2", "router.w"], ["r0"], name="router"),
              helper.make_node("Sub", ["r0", "router.shift"], ["r1"], name="router_shift"),
              helper.make_node("Relu", ["r1"], ["routes"], name="router_relu")]
    packed = pack_gathered_ffn((rng.standard_normal((inter, d)) / np.sqrt(d)).astype(np.float32),
                               (rng.standard_normal((d, inter)) / np.sqrt(inter)).astype(np.float32), expert_size,
                               w_gate=(rng.standard_normal((inter, d)) / np.sqrt(d)).astype(np.float32),
                               b_down=(0.5 * rng.standard_normal(d)).astype(np.float32))
    node, init = make_routed_ffn("f2", "routes", "f3", packed, name="ffn3", activation="relu", chunk=2)
    nodes.append(node)
    inits += init
    w = (rng.standard_normal((d, d_out)) / np.sqrt(d)).astype(np.float32)
    w *= np.repeat(rng.random((d, d_out // 16)) < 0.4, 16, axis=1)
    node, init = make_block_sparse_matmul("f3", "tok_out", pack_block_sparse(w, 16), d_out, name="fc", activation="relu")
    nodes.append(node)
    inits += init
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "sparse_ops",
        [helper.make_tensor_value_info("img", f, [batch, 8, 12, 10]), helper.make_tensor_value_info("tok", f, [batch, tokens, d]),
         helper.make_tensor_value_info("experts", TensorProto.INT32, [n_active])],
        [helper.make_tensor_value_info("img_out", f, [batch, 12, 3, 3]),
         helper.make_tensor_value_info("tok_out", f, [batch, tokens, d_out])], inits)
    # shapes of the intermediates (ONNX shape inference stops at custom ops; the core's dense
    # reference needs each conv's input channel count)
    graph.value_info.extend([helper.make_tensor_value_info("c1", f, [batch, 20, 12, 10]),
                             helper.make_tensor_value_info("c2", f, [batch, 16, 6, 5]),
                             helper.make_tensor_value_info("f1", f, [batch, tokens, d]),
                             helper.make_tensor_value_info("f2", f, [batch, tokens, d]),
                             helper.make_tensor_value_info("routes", f, [batch, tokens, experts]),
                             helper.make_tensor_value_info("f3", f, [batch, tokens, d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    attach_functions(model)
    onnx.checker.check_model(model)
    inputs = {"img": rng.standard_normal((batch, 8, 12, 10)).astype(np.float32),
              "tok": rng.standard_normal((batch, tokens, d)).astype(np.float32),
              "experts": np.array([4, 1, 4], np.int32)}
    return model, inputs


def ort_with_kernels(model, inputs: dict) -> list[np.ndarray]:
    """The model on ONNX Runtime with edgesparse's C++ kernels (one thread): the reference the TIR
    kernels are checked against."""
    import onnxruntime as ort

    from edgesparse.kernels import X86_64, build_library

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.register_custom_ops_library(str(build_library(X86_64)))
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def relax_run(mod):
    """Compile a Relax module for this CPU; returns run(list of numpy inputs) -> numpy outputs."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
        return [t.numpy() for t in (out if not hasattr(out, "numpy") else [out])]
    return run


def cnn_model(seed=0):
    """x[batch, 32, 16, 16] -> Conv 3x3 32->64 pad 1 + Relu -> Conv 3x3 64->128 pad 1 stride 2 +
    Relu -> depthwise Conv 3x3 (group 128, stays dense) -> y[batch, 128, 8, 8]. With the jetson
    target's conv rule (>= 64K weights) conv2 (74K) goes sparse and conv1 (18K) stays dense, so
    the CUDA module holds a TIR conv kernel next to dlight-scheduled dense convolutions."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)
    inits = [numpy_helper.from_array(w(64, 32, 3, 3), "k1"), numpy_helper.from_array(w(128, 64, 3, 3), "k2"),
             numpy_helper.from_array((0.1 * rng.standard_normal(128)).astype(np.float32), "b2"),
             numpy_helper.from_array(w(128, 1, 3, 3), "dw")]
    nodes = [helper.make_node("Conv", ["x", "k1"], ["a"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"], name="relu1"),
             helper.make_node("Conv", ["b", "k2", "b2"], ["c"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["d"], name="relu2"),
             helper.make_node("Conv", ["d", "dw"], ["y"], name="depthwise", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=128)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 128, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model
