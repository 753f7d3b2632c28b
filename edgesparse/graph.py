"""Helpers for passes that rewrite the exported ONNX graph (an `onnx_ir.Model`): find the layers
that hold weights, read and add initializers, and swap a layer for a new node."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx_ir as ir


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The array behind an initializer or Constant, or None for a run-time value."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


@dataclass
class Layer:
    """A MatMul/Gemm (kind "matmul", weight [K, N] as in X @ W) or Conv (kind "conv", weight
    [O, I, kh, kw]) with a constant weight, plus the bias Add that follows it when there is one."""

    kind: str
    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    nodes: list[ir.Node]  # the nodes the layer spans (the op and its bias Add)
    input: ir.Value
    output: ir.Value

    @property
    def name(self) -> str:
        return self.node.name or self.output.name


def layers(model: ir.Model, kinds=("matmul", "conv")) -> Iterator[Layer]:
    """Layers with constant weights in graph order (a fresh list: safe to rewrite while iterating)."""
    found = []
    for node in model.graph:
        layer = _matmul(node) if "matmul" in kinds else None
        if layer is None and "conv" in kinds:
            layer = _conv(node)
        if layer is not None:
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
    if weight is None or weight.ndim != 2 or constant(x) is not None:
        return None
    bias = None
    nodes = [node]
    if node.op_type == "Gemm":
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        if attrs.get("transB", 0):
            weight = weight.T
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            bias = constant(node.inputs[2])
            if bias is None or bias.size != weight.shape[1]:
                return None
            bias = bias.reshape(-1)
    output = node.outputs[0]
    if bias is None:
        add, add_bias = _single_bias_add(node, weight.shape[1])
        if add is not None:
            bias, output = add_bias, add.outputs[0]
            nodes.append(add)
    return Layer("matmul", node, np.ascontiguousarray(weight), bias, nodes, x, output)


def _conv(node: ir.Node) -> Layer | None:
    """A 2-D Conv with explicit (or no) padding; `attributes(layer.node)` gives its geometry."""
    if node.domain not in ("", "ai.onnx") or node.op_type != "Conv":
        return None
    if attributes(node).get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return None
    weight = constant(node.inputs[1])
    if weight is None or weight.ndim != 4:
        return None
    bias = constant(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if len(node.inputs) > 2 and node.inputs[2] is not None and bias is None:
        return None
    return Layer("conv", node, weight, bias, [node], node.inputs[0], node.outputs[0])


def attributes(node: ir.Node) -> dict:
    return {k: a.value for k, a in node.attributes.items()}


def initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    """Add an initializer under a name not used yet in the graph."""
    taken = set(model.graph.initializers)
    unique, i = name, 1
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    value = ir.Value(name=unique, const_value=ir.tensor(np.ascontiguousarray(array), name=unique))
    model.graph.register_initializer(value)
    return value


def replace(model: ir.Model, layer: Layer, node: ir.Node) -> None:
    """Put `node` in the graph where `layer` was; its first output takes over the layer's output."""
    graph = model.graph
    new_out = node.outputs[0]
    new_out.shape, new_out.type = layer.output.shape, layer.output.type
    graph.insert_before(layer.node, node)
    name = layer.output.name
    layer.output.replace_all_uses_with(new_out, replace_graph_outputs=True)
    for old in reversed(layer.nodes):
        graph.remove(old, safe=True)
    new_out.name = name  # keep the public output name stable
    _drop_unused_initializers(model)


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
    inputs = [layer.input] + [initializer(model, f"{base}.{key}", packed[key]) for key in ("values", "k_index", "row_ptr")]
    if layer.bias is not None:
        inputs.append(initializer(model, f"{base}.bias", layer.bias.astype(np.float32)))
    node = ir.node(BLOCK_SPARSE_MATMUL, inputs, {"N": int(weight.shape[1])}, domain=kernels.DOMAIN,
                   name=node_name(model, f"{base}_sparse"))
    replace(model, layer, node)
    return node


BLOCK_SPARSE_CONV = "BlockSparseConv"


def replace_with_block_sparse_conv(model: ir.Model, layer: Layer, weight: np.ndarray, block: int) -> ir.Node:
    """Swap a (group = 1) Conv layer for edgesparse's block-sparse Conv holding `weight`
    ([O, C, kh, kw], whose zero groups of `block` output channels x 1 input channel x all taps
    are skipped), packed now, at build time."""
    from . import kernels

    attrs = attributes(layer.node)
    if attrs.get("group", 1) != 1:
        raise ValueError("block-sparse Conv needs group = 1")
    o, c, kh, kw = weight.shape
    packed = kernels.pack_block_sparse_conv(np.asarray(weight, np.float32), block)
    base = layer.name.replace("/", "_")
    inputs = [layer.input] + [initializer(model, f"{base}.{key}", packed[key]) for key in ("values", "c_index", "row_ptr")]
    if layer.bias is not None:
        inputs.append(initializer(model, f"{base}.bias", layer.bias.astype(np.float32)))
    geometry = {
        "out_channels": int(o),
        "in_channels": int(c),  # the packed groups cannot tell it when the last channels are all pruned
        "kernel_shape": [int(kh), int(kw)],
        "strides": list(attrs.get("strides", [1, 1])),
        "pads": list(attrs.get("pads", [0, 0, 0, 0])),
        "dilations": list(attrs.get("dilations", [1, 1])),
    }
    node = ir.node(BLOCK_SPARSE_CONV, inputs, geometry, domain=kernels.DOMAIN, name=node_name(model, f"{base}_sparse"))
    replace(model, layer, node)
    return node
