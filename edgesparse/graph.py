"""Helpers for passes that rewrite the exported ONNX graph (an `onnx_ir.Model`): find the layers
that hold weights, read and add initializers, and swap a layer for a new node."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The array behind an initializer or Constant, or None for a run-time value. Exporters put
    weights behind Identity, Cast (fp16 storage) and Transpose nodes: those are looked through."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    attrs = producer.attributes
    if producer.op_type == "Constant":
        if "value" in attrs:
            return attrs["value"].as_tensor().numpy()
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                           ("value_ints", np.int64)):
            if key in attrs:
                return np.asarray(attrs[key].value, dtype)
        return None
    if producer.op_type not in _LOOKED_THROUGH or not producer.inputs:
        return None
    source = constant(producer.inputs[0])
    if source is None:
        return None
    if producer.op_type == "Identity":
        return source
    if producer.op_type == "Transpose":
        perm = attrs["perm"].value if "perm" in attrs else None
        return np.transpose(source, perm)
    try:  # Cast
        return source.astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"].value))
    except (KeyError, TypeError, ValueError):
        return None


_LOOKED_THROUGH = ("Identity", "Cast", "Transpose")


def source_dtype(value: ir.Value) -> str:
    """The dtype a weight is stored in (before any Cast the graph applies to it)."""
    while value.const_value is None and value.producer() is not None and value.producer().op_type in _LOOKED_THROUGH:
        value = value.producer().inputs[0]
    array = constant(value)
    return str(array.dtype) if array is not None else "unknown"


@dataclass
class Layer:
    """A MatMul/Gemm (kind "matmul", weight [K, N] as in X @ W), Conv (kind "conv", weight
    [O, I, kh, kw]) or 1-D Conv (kind "conv1d", weight shown as [O, I, 1, k]) with a constant
    weight, plus the bias Add that follows it when there is one."""

    kind: str
    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    nodes: list[ir.Node]  # the nodes the layer spans (the op and its bias Add)
    input: ir.Value
    output: ir.Value
    # Why no sparse operator can take this layer (a Gemm with transA, batched weights...): such
    # layers come from layers(..., unsupported=True) only, for passes to report them.
    unsupported: str | None = None
    stored_dtype: str = "float32"  # the weight's dtype in the source model (fp16 storage, say)
    transposed_input: bool = False  # a Gemm with transA=1: X arrives as [K, M]

    @property
    def name(self) -> str:
        return self.node.name or self.output.name


def layers(model: ir.Model, kinds=("matmul", "conv"), unsupported: bool = False) -> Iterator[Layer]:
    """Layers with constant weights in graph order (a fresh list: safe to rewrite while iterating).
    kinds: "matmul", "conv" (2-D), "conv1d" (a 1-D Conv, its weight shown as [O, C, 1, k]; the
    sparse Conv runs it on an Unsqueezed input). `unsupported=True` adds the layers no sparse
    operator can take, with the reason in `unsupported`. Weights arrive as the op sees them
    (folded Gemm alpha, Cast applied): float16 when the layer computes in float16."""
    found = []
    for node in model.graph:
        layer = _matmul(node) if "matmul" in kinds else None
        if layer is None and ("conv" in kinds or "conv1d" in kinds):
            layer = _conv(node)
            if layer is not None and layer.kind not in kinds:
                layer.unsupported = layer.unsupported or f"{layer.kind} layers were not asked for"
        if layer is not None and (unsupported or layer.unsupported is None):
            layer.stored_dtype = source_dtype(node.inputs[1])
            found.append(layer)
    return iter(found)


def _single_bias_add(node: ir.Node, n: int):
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None, None
    consumer = uses[0].node if hasattr(uses[0], "node") else uses[0][0]
    if consumer.op_type != "Add" or consumer.domain not in ("", "ai.onnx"):
        return None, None
    other = consumer.inputs[1] if consumer.inputs[0] is out else consumer.inputs[0]
    bias = constant(other)
    if bias is None or bias.size != n or bias.ndim > 1 and any(d != 1 for d in bias.shape[:-1]):
        return None, None
    return consumer, bias.reshape(n)


def _matmul(node: ir.Node) -> Layer | None:
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
        return None
    x, w = node.inputs[0], node.inputs[1]
    weight = constant(w)
    if weight is None or weight.ndim < 2 or constant(x) is not None or weight.dtype.kind != "f":
        return None
    if weight.ndim > 2:
        return Layer("matmul", node, weight, None, [node], x, node.outputs[0],
                     unsupported=f"batched ({weight.ndim}-D) weights: the sparse MatMul takes one [K, N] matrix")
    bias = None
    nodes = [node]
    if node.op_type == "Gemm":
        attrs = attributes(node)
        if attrs.get("transB", 0):
            weight = weight.T
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        if alpha != 1.0:  # Y = alpha * X @ W + beta * C: fold the scalars into the constants
            weight = (weight * np.asarray(alpha, weight.dtype)).astype(weight.dtype)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant(node.inputs[2])
            if bias is None or bias.size not in (1, weight.shape[1]) or bias.ndim == 2 and bias.shape[0] != 1:
                return None
            bias = np.broadcast_to(bias.reshape(-1) * np.asarray(beta, bias.dtype), (weight.shape[1],)).astype(bias.dtype)
    output = node.outputs[0]
    if bias is None:
        add, add_bias = _single_bias_add(node, weight.shape[1])
        if add is not None:
            bias, output = add_bias, add.outputs[0]
            nodes.append(add)
    return Layer("matmul", node, np.ascontiguousarray(weight), bias, nodes, x, output,
                 transposed_input=node.op_type == "Gemm" and bool(attributes(node).get("transA", 0)))


def _conv(node: ir.Node) -> Layer | None:
    """A 2-D or 1-D Conv; `conv_geometry(layer)` gives its geometry (auto_pad made explicit)."""
    if node.domain not in ("", "ai.onnx") or node.op_type != "Conv":
        return None
    weight = constant(node.inputs[1])
    if weight is None or weight.ndim < 3 or weight.dtype.kind != "f":
        return None
    bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 2 and node.inputs[2] is not None and bias is None:
        return None
    if weight.ndim == 3:
        layer = Layer("conv1d", node, weight[:, :, None, :], bias, [node], node.inputs[0], node.outputs[0])
    else:
        layer = Layer("conv", node, weight, bias, [node], node.inputs[0], node.outputs[0])
    if weight.ndim > 4:
        layer.unsupported = f"{weight.ndim - 2}-D Conv: the sparse Conv is 2-D"
    elif _pads(node, list(weight.shape[2:])) is None:
        layer.unsupported = "Conv with auto_pad SAME on an input of dynamic size: give --input-shape"
    return layer


def _pads(node: ir.Node, kernel: list[int]) -> list[int] | None:
    """Explicit pads [begin..., end...] of a Conv, auto_pad included (as older TF exports write
    it); None where SAME padding depends on an input size the graph leaves dynamic."""
    attrs = attributes(node)
    mode = attrs.get("auto_pad", "NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    rank = len(kernel)
    if mode == "NOTSET":
        return list(attrs.get("pads", [0] * 2 * rank))
    if mode == "VALID":
        return [0] * 2 * rank
    shape = node.inputs[0].shape
    sizes = [shape[i] for i in range(2, 2 + rank)] if shape is not None and len(shape) == 2 + rank else []
    if len(sizes) != rank or not all(isinstance(d, int) for d in sizes):
        return None
    strides, dilations = attrs.get("strides", [1] * rank), attrs.get("dilations", [1] * rank)
    begin, end = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2  # SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning
        begin.append(small if mode == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def attributes(node: ir.Node) -> dict:
    return {k: a.value for k, a in node.attributes.items()}


def conv_geometry(layer: Layer) -> dict:
    """A conv layer's strides, pads, dilations and group as a 2-D Conv has them (a 1-D Conv is a
    2-D one over a height of 1)."""
    attrs = attributes(layer.node)
    if layer.kind == "conv1d":
        (s,), (d,) = attrs.get("strides", [1]), attrs.get("dilations", [1])
        begin, end = _pads(layer.node, [layer.weight.shape[3]])
        return {"strides": [1, s], "pads": [0, begin, 0, end], "dilations": [1, d], "group": attrs.get("group", 1)}
    return {"strides": list(attrs.get("strides", [1, 1])), "pads": _pads(layer.node, list(layer.weight.shape[2:])),
            "dilations": list(attrs.get("dilations", [1, 1])), "group": attrs.get("group", 1)}


def initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    """Add an initializer under a name not used yet in the graph."""
    taken = set(model.graph.initializers)
    unique, i = name, 1
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    value = ir.Value(name=unique, const_value=ir.tensor(np.ascontiguousarray(array), name=unique))
    model.graph.register_initializer(value)
    return value


def replace(model: ir.Model, layer: Layer, node: ir.Node | list[ir.Node]) -> None:
    """Put `node` (or nodes, in order) in the graph where `layer` was; the last one's first output
    takes over the layer's output."""
    nodes = node if isinstance(node, list) else [node]
    graph = model.graph
    new_out = nodes[-1].outputs[0]
    new_out.shape, new_out.type = layer.output.shape, layer.output.type
    for n in nodes:
        graph.insert_before(layer.node, n)
    name = layer.output.name
    layer.output.replace_all_uses_with(new_out, replace_graph_outputs=True)
    for old in reversed(layer.nodes):
        graph.remove(old, safe=True)
    new_out.name = name  # keep the public output name stable
    _drop_dead_weight_nodes(model)
    _drop_unused_initializers(model)


def _drop_dead_weight_nodes(model: ir.Model) -> None:
    """The Constant/Identity/Cast/Transpose nodes that fed a replaced layer's weight."""
    graph = model.graph
    changed = True
    while changed:
        changed = False
        for n in reversed(list(graph)):
            if n.op_type in ("Constant", *_LOOKED_THROUGH) and n.domain in ("", "ai.onnx") and all(
                    not list(o.uses()) and not o.is_graph_output() for o in n.outputs):
                graph.remove(n, safe=True)
                changed = True


def _drop_unused_initializers(model: ir.Model) -> None:
    graph = model.graph
    for name, value in list(graph.initializers.items()):
        if not list(value.uses()) and not value.is_graph_output() and not value.is_graph_input():
            del graph.initializers[name]


def node_name(model: ir.Model, base: str) -> str:
    taken = {n.name for n in model.graph}
    unique, i = base, 1
    while unique in taken:
        unique, i = f"{base}_{i}", i + 1
    return unique


BLOCK_SPARSE_MATMUL = "BlockSparseMatMul"


def replace_with_block_sparse_matmul(model: ir.Model, layer: Layer, weight: np.ndarray, block: int) -> ir.Node:
    """Swap a matmul layer for edgesparse's block-sparse MatMul holding `weight` ([K, N], whose
    zero blocks of `block` outputs x 1 input are skipped), packed now, at build time."""
    from . import kernels

    packed = kernels.pack_block_sparse(np.asarray(weight, np.float32), block)
    base = layer.name.replace("/", "_")
    constants = [initializer(model, f"{base}.{key}", packed[key]) for key in ("values", "k_index", "row_ptr")]
    if layer.bias is not None:
        constants.append(initializer(model, f"{base}.bias", layer.bias.astype(np.float32)))
    return _in_float32(model, layer, lambda x: ir.node(
        BLOCK_SPARSE_MATMUL, [x, *constants], {"N": int(weight.shape[1])}, domain=kernels.DOMAIN,
        name=node_name(model, f"{base}_sparse")))


BLOCK_SPARSE_CONV = "BlockSparseConv"


def replace_with_block_sparse_conv(model: ir.Model, layer: Layer, weight: np.ndarray, block: int) -> ir.Node:
    """Swap a (group = 1) Conv layer for edgesparse's block-sparse Conv holding `weight`
    ([O, C, kh, kw], whose zero groups of `block` output channels x 1 input channel x all taps
    are skipped), packed now, at build time."""
    from . import kernels

    attrs = conv_geometry(layer)
    if attrs["group"] != 1:
        raise ValueError("block-sparse Conv needs group = 1")
    o, c, kh, kw = weight.shape
    packed = kernels.pack_block_sparse_conv(np.asarray(weight, np.float32), block)
    base = layer.name.replace("/", "_")
    constants = [initializer(model, f"{base}.{key}", packed[key]) for key in ("values", "c_index", "row_ptr")]
    if layer.bias is not None:
        constants.append(initializer(model, f"{base}.bias", layer.bias.astype(np.float32)))
    geometry = {
        "out_channels": int(o),
        "in_channels": int(c),  # the packed groups cannot tell it when the last channels are all pruned
        "kernel_shape": [int(kh), int(kw)],
        "strides": attrs["strides"],
        "pads": attrs["pads"],
        "dilations": attrs["dilations"],
    }
    return _in_float32(model, layer, lambda x: ir.node(
        BLOCK_SPARSE_CONV, [x, *constants], geometry, domain=kernels.DOMAIN, name=node_name(model, f"{base}_sparse")))


WEIGHT_DTYPE = "edgesparse.weight_dtype"  # node metadata: the source model's weight dtype, when not float32


def _in_float32(model: ir.Model, layer: Layer, make) -> ir.Node:
    """Replace `layer` by the sparse node `make(x)` builds, with what it needs around it: the
    kernels take float32, so a layer computing in float16 gets Casts; a Gemm with transA=1 gets
    its X transposed; a 1-D Conv runs as a 2-D one on an input Unsqueezed to height 1. A weight
    stored in another dtype is recorded on the node (the manifest's layer entry reports it)."""
    base = layer.name.replace("/", "_")
    compute = layer.weight.dtype
    before, after = [], []
    if compute != np.float32:
        before.append(ir.node("Cast", [layer.input], {"to": int(onnx.TensorProto.FLOAT)}, name=node_name(model, f"{base}_to_float32")))
    if layer.transposed_input:
        x = before[-1].outputs[0] if before else layer.input
        before.append(ir.node("Transpose", [x], {"perm": [1, 0]}, name=node_name(model, f"{base}_transpose_a")))
    if layer.kind == "conv1d":
        axes = initializer(model, f"{base}.height_axis", np.array([2], np.int64))
        x = before[-1].outputs[0] if before else layer.input
        before.append(ir.node("Unsqueeze", [x, axes], name=node_name(model, f"{base}_to_2d")))
        after.append(lambda y: ir.node("Squeeze", [y, axes], name=node_name(model, f"{base}_to_1d")))
    if compute != np.float32:
        after.append(lambda y: ir.node("Cast", [y], {"to": int(onnx.helper.np_dtype_to_tensor_dtype(compute))},
                                       name=node_name(model, f"{base}_from_float32")))
    node = make(before[-1].outputs[0] if before else layer.input)
    node.outputs[0].dtype = ir.DataType.FLOAT
    nodes = [*before, node]
    for wrap in after:
        nodes.append(wrap(nodes[-1].outputs[0]))
    if layer.stored_dtype != "float32":
        node.metadata_props[WEIGHT_DTYPE] = layer.stored_dtype
    replace(model, layer, nodes)
    return node
