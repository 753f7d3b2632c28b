"""Helpers for passes that rewrite the exported ONNX graph (an `onnx_ir.Model`): find the layers
that hold weights, read and add initializers, and swap a layer for a new node."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir

from .kernels.blocksparse import MATMUL_ACTIVATIONS  # what BlockSparseMatMul's epilogue computes


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


def readers(value: ir.Value) -> list[ir.Node]:
    """The nodes that read `value`."""
    return [u.node if hasattr(u, "node") else u[0] for u in value.uses()]


def single_reader(value: ir.Value) -> ir.Node | None:
    """The one node that reads `value`, or None (no reader, several, or a graph output)."""
    if value.is_graph_output():
        return None
    found = readers(value)
    return found[0] if len(found) == 1 else None


def _std(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type == op


def _scalar(value: ir.Value | None) -> float | None:
    c = constant(value)
    return float(np.asarray(c).reshape(-1)[0]) if c is not None and np.asarray(c).size == 1 else None


def _other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a two-input node that reads `value` once."""
    ins = list(node.inputs)
    if len(ins) != 2 or sum(v is value for v in ins) != 1:
        return None
    return ins[1] if ins[0] is value else ins[0]


def _near(x: float | None, want: float) -> bool:
    return x is not None and abs(x - want) <= 1e-4 * abs(want)


def following_activation(value: ir.Value, allowed: tuple[str, ...]) -> tuple[str, list[ir.Node], ir.Value]:
    """(name, nodes, output) of an activation the sparse kernels can fuse that follows `value` and
    reads nothing else: Relu; Clip(0, 6) (relu6) and Clip(0) (relu); x * Sigmoid(x) (silu); GELU
    as the Gelu op (exact form) or spelled out with Erf, as exporters write it (x / sqrt 2 or
    x * (1 / sqrt 2), Erf, + 1, then times x and 0.5 in any order). ("none", [], value) otherwise."""
    none = ("none", [], value)
    if value.is_graph_output():
        return none
    uses = readers(value)
    if not uses or not all(n.domain in ("", "ai.onnx", "com.microsoft") for n in uses):
        return none
    if len(uses) == 1:
        n = uses[0]
        if _std(n, "Relu") and "relu" in allowed:
            return "relu", [n], n.outputs[0]
        if _std(n, "Clip"):
            lo = _scalar(n.inputs[1]) if len(n.inputs) > 1 and n.inputs[1] is not None else None
            hi = _scalar(n.inputs[2]) if len(n.inputs) > 2 and n.inputs[2] is not None else None
            if lo == 0.0 and hi == 6.0 and "relu6" in allowed:
                return "relu6", [n], n.outputs[0]
            if lo == 0.0 and (len(n.inputs) < 3 or n.inputs[2] is None) and "relu" in allowed:
                return "relu", [n], n.outputs[0]
        if n.op_type == "Gelu" and n.domain in ("", "ai.onnx", "com.microsoft") and "gelu" in allowed:
            approximate = attributes(n).get("approximate", "none")
            if approximate in ("none", b"none"):
                return "gelu", [n], n.outputs[0]
    if len(uses) == 2 and "silu" in allowed:
        sig = next((n for n in uses if _std(n, "Sigmoid")), None)
        mul = next((n for n in uses if _std(n, "Mul")), None)
        if sig is not None and mul is not None and single_reader(sig.outputs[0]) is mul \
                and _other_input(mul, value) is sig.outputs[0]:
            return "silu", [sig, mul], mul.outputs[0]
    if len(uses) == 2 and "gelu" in allowed:
        found = _erf_gelu(value, uses)
        if found is not None:
            return "gelu", found, found[-1].outputs[0]
    return none


def _erf_gelu(value: ir.Value, uses: list[ir.Node]) -> list[ir.Node] | None:
    """The nodes of 0.5 * x * (1 + erf(x / sqrt 2)) reading `value` (two readers: the scaling
    into Erf, and a Mul by x or by 0.5), in graph order, or None."""
    scale = next((n for n in uses if (_std(n, "Div") and n.inputs[0] is value and _near(_scalar(n.inputs[1]), 2 ** 0.5))
                  or (_std(n, "Mul") and _near(_scalar(_other_input(n, value)), 2 ** -0.5))), None)
    if scale is None:
        return None
    erf = single_reader(scale.outputs[0])
    plus = single_reader(erf.outputs[0]) if _std(erf, "Erf") else None
    if not _std(plus, "Add") or not _near(_scalar(_other_input(plus, erf.outputs[0])), 1.0):
        return None
    other = next(n for n in uses if n is not scale)
    if not _std(other, "Mul"):
        return None
    after_plus = single_reader(plus.outputs[0])
    if not _std(after_plus, "Mul"):
        return None
    if _other_input(other, value) is plus.outputs[0]:  # (x * (1 + erf)) * 0.5
        half = single_reader(other.outputs[0])
        if _std(half, "Mul") and _near(_scalar(_other_input(half, other.outputs[0])), 0.5):
            return [scale, erf, plus, other, half]
    elif _near(_scalar(_other_input(other, value)), 0.5):  # (0.5 * x) * (1 + erf)
        if after_plus is single_reader(other.outputs[0]) and _other_input(after_plus, plus.outputs[0]) is other.outputs[0]:
            return [scale, erf, plus, other, after_plus]
    elif _near(_scalar(_other_input(after_plus, plus.outputs[0])), 0.5):  # x * ((1 + erf) * 0.5)
        if single_reader(after_plus.outputs[0]) is other and _other_input(other, value) is after_plus.outputs[0]:
            return [scale, erf, plus, after_plus, other]
    return None


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


def replace_with_block_sparse_matmul(model: ir.Model, layer: Layer, weight: np.ndarray, block: int,
                                     fuse_activation: bool = True) -> ir.Node:
    """Swap a matmul layer for edgesparse's block-sparse MatMul holding `weight` ([K, N], whose
    zero blocks of `block` outputs x 1 input are skipped), packed now, at build time. An
    activation that follows the layer alone (see following_activation) goes into the kernel's
    epilogue: applied while the output is in registers, instead of ops that read and write it
    again (GELU spelled out with Erf is five of them)."""
    from . import kernels

    packed = kernels.pack_block_sparse(np.asarray(weight, np.float32), block)
    base = layer.name.replace("/", "_")
    constants = [initializer(model, f"{base}.{key}", packed[key]) for key in ("values", "k_index", "row_ptr")]
    if layer.bias is not None:
        constants.append(initializer(model, f"{base}.bias", layer.bias.astype(np.float32)))
    act, act_nodes, out = following_activation(layer.output, MATMUL_ACTIVATIONS) if fuse_activation else ("none", [], None)
    attrs = {"N": int(weight.shape[1])}
    if act != "none":
        attrs["activation"] = act
        layer = dataclasses.replace(layer, nodes=[*layer.nodes, *act_nodes], output=out)
    return _in_float32(model, layer, lambda x: ir.node(
        BLOCK_SPARSE_MATMUL, [x, *constants], attrs, domain=kernels.DOMAIN,
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
    # the node's current input: layer.input is stale when the layer before was replaced since the
    # layers were listed (its output, an activation fused into it, now comes from the new node)
    x0 = layer.node.inputs[0]
    before, after = [], []
    if compute != np.float32:
        before.append(ir.node("Cast", [x0], {"to": int(onnx.TensorProto.FLOAT)}, name=node_name(model, f"{base}_to_float32")))
    if layer.transposed_input:
        x = before[-1].outputs[0] if before else x0
        before.append(ir.node("Transpose", [x], {"perm": [1, 0]}, name=node_name(model, f"{base}_transpose_a")))
    if layer.kind == "conv1d":
        axes = initializer(model, f"{base}.height_axis", np.array([2], np.int64))
        x = before[-1].outputs[0] if before else x0
        before.append(ir.node("Unsqueeze", [x, axes], name=node_name(model, f"{base}_to_2d")))
        after.append(lambda y: ir.node("Squeeze", [y, axes], name=node_name(model, f"{base}_to_1d")))
    if compute != np.float32:
        after.append(lambda y: ir.node("Cast", [y], {"to": int(onnx.helper.np_dtype_to_tensor_dtype(compute))},
                                       name=node_name(model, f"{base}_from_float32")))
    node = make(before[-1].outputs[0] if before else x0)
    node.outputs[0].dtype = ir.DataType.FLOAT
    nodes = [*before, node]
    for wrap in after:
        nodes.append(wrap(nodes[-1].outputs[0]))
    if layer.stored_dtype != "float32":
        node.metadata_props[WEIGHT_DTYPE] = layer.stored_dtype
    replace(model, layer, nodes)
    return node
