"""What the core distribution itself registers: the ONNX Runtime backend and edgesparse's kernel
library. Registered through the same entry point group as every other plugin."""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from .errors import EdgesparseError
from .hookspecs import hookimpl


@hookimpl
def register_backends(register):
    from .ort_backend import OrtBackend

    register(OrtBackend())


@hookimpl
def register_kernels(register):
    from . import kernels
    from .backends import KernelLibrary

    register(KernelLibrary(
        name="edgesparse",
        domain=kernels.DOMAIN,
        ops=("BlockSparseMatMul", "BlockSparseConv", "BlockSparseConvAdd", "DepthwiseConv", "GatheredFFN", "RoutedFFN"),
        build=kernels.build_library,
        functions=kernels.function_protos,
        describe=describe,
        densify=densify,
    ))


def describe(node, arrays: dict, shapes: dict) -> dict:
    """Sparsity present in a node's packed weights: the fraction of weight blocks skipped."""
    inputs = list(node.input)
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "BlockSparseMatMul":
        values, k_index, row_ptr = (arrays.get(n) for n in inputs[1:4])
        if values is None:
            return {"sparsity": None, "note": "weights are not constant"}
        n = attrs["N"].i
        block = values.shape[1]
        x_shape = shapes.get(inputs[0]) or []
        k = x_shape[-1] if x_shape and isinstance(x_shape[-1], int) else int(k_index.max(initial=-1)) + 1
        total_blocks = (len(row_ptr) - 1) * k
        return {"shape": [k, n], "block": block, "kept_blocks": int(len(k_index)),
                "sparsity": 1.0 - len(k_index) / total_blocks if total_blocks else 0.0}
    if node.op_type == "DepthwiseConv":
        return {"sparsity": 0.0, "note": "dense depthwise conv kept in the sparse convs' layout (no ORT reorders)"}
    if node.op_type in ("BlockSparseConv", "BlockSparseConvAdd"):
        values, c_index, row_ptr = (arrays.get(n) for n in inputs[1:4])
        if values is None:
            return {"sparsity": None, "note": "weights are not constant"}
        cin = _conv_in_channels(attrs, shapes.get(inputs[0]), c_index)
        total_blocks = (len(row_ptr) - 1) * cin
        return {"block": int(values.shape[-1]), "kept_blocks": int(len(c_index)),
                "sparsity": 1.0 - len(c_index) / total_blocks if total_blocks else 0.0}
    # GatheredFFN / RoutedFFN: sparsity is chosen per chunk at run time; the weights are dense
    note = "activation sparsity: chosen at run time per chunk"
    if node.op_type == "RoutedFFN":
        chunk = attrs["chunk"].i if "chunk" in attrs else 0
        return {"sparsity": 0.0, "chunk": chunk, "note": note + " from the router's nonzero outputs"}
    return {"sparsity": 0.0, "note": note}


def densify(node, arrays: dict, shapes: dict):
    """Standard-op replacement of one edgesparse node on dense weights, or None where the op's
    dense meaning depends on run-time inputs (GatheredFFN's expert selection, RoutedFFN's routes) or its weights are
    not constant: the caller then inlines the op's ONNX function."""
    from . import kernels

    inputs, out, name = list(node.input), node.output[0], node.name or node.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    activation = attrs.get("activation", b"none")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    # Layout attributes (x/y_channel_block) are ignored: NCHW16c tensors only ever pass between
    # edgesparse nodes, which are all replaced here, so the dense equivalent is NCHW throughout.
    x_shape = shapes.get(inputs[0]) or []
    if node.op_type == "DepthwiseConv":  # dense already: the standard Conv it stands for
        conv_attrs = {k: attrs[k] for k in ("group", "kernel_shape", "strides", "pads", "dilations") if k in attrs}
        nodes = [helper.make_node("Conv", inputs[:3], [f"{name}.conv"], name=f"{name}.Conv", **conv_attrs)]
        return nodes + _activation(activation, nodes[-1].output[0], out, name), []
    weights = [arrays.get(n) for n in inputs[1:4]]
    if node.op_type not in ("BlockSparseMatMul", "BlockSparseConv", "BlockSparseConvAdd") or any(w is None for w in weights):
        return None
    if node.op_type == "BlockSparseMatMul":
        packed = dict(zip(("values", "k_index", "row_ptr"), weights))
        k = x_shape[-1] if x_shape and isinstance(x_shape[-1], int) else None
        weight = kernels.unpack_block_sparse(packed, attrs["N"], k=k)
        inits = [numpy_helper.from_array(weight, f"{name}.dense_weight")]
        nodes = [helper.make_node("MatMul", [inputs[0], inits[0].name], [f"{name}.mm"], name=f"{name}.MatMul")]
        if len(inputs) > 4 and inputs[4]:
            nodes.append(helper.make_node("Add", [nodes[-1].output[0], inputs[4]], [f"{name}.biased"], name=f"{name}.Add"))
    else:
        packed = dict(zip(("values", "c_index", "row_ptr"), weights))
        kh, kw = attrs["kernel_shape"]
        cin = _conv_in_channels(attrs, x_shape, packed["c_index"])
        weight = kernels.unpack_block_sparse_conv(packed, attrs["out_channels"], cin, (kh, kw))
        inits = [numpy_helper.from_array(weight, f"{name}.dense_weight")]
        conv_inputs = [inputs[0], inits[0].name] + ([inputs[4]] if len(inputs) > 4 and inputs[4] else [])
        conv_attrs = {k: attrs[k] for k in ("kernel_shape", "strides", "pads", "dilations") if k in attrs}
        nodes = [helper.make_node("Conv", conv_inputs, [f"{name}.conv"], name=f"{name}.Conv", **conv_attrs)]
    if node.op_type == "BlockSparseConvAdd":  # the residual Add after the activation
        nodes += _activation(activation, nodes[-1].output[0], f"{name}.act", name)
        nodes.append(helper.make_node("Add", [f"{name}.act", inputs[5]], [out], name=f"{name}.Add"))
        return nodes, inits
    nodes += _activation(activation, nodes[-1].output[0], out, name)
    return nodes, inits


def _conv_in_channels(attrs: dict, x_shape, c_index) -> int:
    """C of a BlockSparseConv: its in_channels attribute, else the input's static shape, else (older
    nodes without shape information) one past the highest kept channel, a lower bound."""
    if "in_channels" in attrs:
        value = attrs["in_channels"]
        return int(value.i if hasattr(value, "i") else value)
    if x_shape and len(x_shape) == 5 and isinstance(x_shape[1], int):  # NCHW16c
        return x_shape[1] * 16
    if x_shape and len(x_shape) > 1 and isinstance(x_shape[1], int):
        return x_shape[1]
    return int(c_index.max(initial=-1)) + 1


def _activation(kind: str, x: str, out: str, name: str) -> list:
    if kind == "none":
        return [helper.make_node("Identity", [x], [out], name=f"{name}.Identity")]
    if kind == "relu":
        return [helper.make_node("Relu", [x], [out], name=f"{name}.Relu")]
    if kind == "relu6":
        c = lambda v, n: helper.make_node("Constant", [], [f"{name}.{n}"], value=numpy_helper.from_array(np.array(v, np.float32)))
        return [c(0.0, "lo"), c(6.0, "hi"), helper.make_node("Clip", [x, f"{name}.lo", f"{name}.hi"], [out], name=f"{name}.Clip")]
    if kind == "silu":
        return [helper.make_node("Sigmoid", [x], [f"{name}.sig"], name=f"{name}.Sigmoid"),
                helper.make_node("Mul", [x, f"{name}.sig"], [out], name=f"{name}.Mul")]
    if kind == "gelu":  # erf form, 0.5 x (1 + erf(x / sqrt 2)), which ORT fuses into its Gelu
        c = lambda v, n: helper.make_node("Constant", [], [f"{name}.{n}"], value=numpy_helper.from_array(np.array(v, np.float32)))
        return [c(np.sqrt(2.0), "sqrt2"), c(1.0, "one"), c(0.5, "half"),
                helper.make_node("Div", [x, f"{name}.sqrt2"], [f"{name}.d"]),
                helper.make_node("Erf", [f"{name}.d"], [f"{name}.e"]),
                helper.make_node("Add", [f"{name}.e", f"{name}.one"], [f"{name}.a"]),
                helper.make_node("Mul", [x, f"{name}.a"], [f"{name}.m"]),
                helper.make_node("Mul", [f"{name}.m", f"{name}.half"], [out])]
    raise EdgesparseError(f"unknown activation '{kind}'")
