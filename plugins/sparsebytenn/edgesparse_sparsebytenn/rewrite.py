"""After export: swap the pruned layers of the ONNX graph for edgesparse's group-sparse operators,
with their weights packed at build time.

Which ONNX node is which pruned torch layer: the exporter keeps the torch parameter name as the
weight initializer's name (also after it folds a BatchNorm into the conv), so that is tried first;
otherwise the layer is recognised by its shape and by its weight's group-zero pattern, which must
cover the pruning mask recorded in the torch stage. A node whose weights do not carry the mask is
left dense and reported.

Fused into the sparse node when they directly follow the layer and nothing else reads the
intermediate value: a BatchNormalization (folded into weights and bias), Relu, Clip(0, 6) (relu6),
x * Sigmoid(x) (SiLU) for convs and Relu/SiLU/GELU for matmuls (edgesparse.graph.following_activation),
and a zero Pad in front of a conv
(folded into its pads: EfficientNet's TensorFlow-style "same" padding exports as one).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgesparse import graph, kernels

from .patterns import weight_group_mask

CONV_OP = "BlockSparseConv"
MATMUL_OP = "BlockSparseMatMul"


def _std(node) -> bool:
    return node is not None and node.domain in ("", "ai.onnx")


def _fold_batchnorm(layer, weight, bias):
    """Conv -> BatchNormalization with constant statistics: fold; returns (weight, bias, node)."""
    bn = graph.single_reader(layer.output)
    if not _std(bn) or bn.op_type != "BatchNormalization" or len(bn.outputs) != 1:
        return weight, bias, None
    params = [graph.constant(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return weight, bias, None
    scale, shift, mean, var = (p.astype(np.float64) for p in params)
    eps = graph.attributes(bn).get("epsilon", 1e-5)
    k = scale / np.sqrt(var + eps)
    weight = (weight * k.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
    b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    bias = ((b - mean) * k + shift).astype(np.float32)
    return weight, bias, bn


def _zero_pad(value: ir.Value, layer_node):
    """A constant-zero Pad on the two spatial axes feeding only this conv: (pads [t, l, b, r], node)."""
    pad = value.producer()
    if not _std(pad) or pad.op_type != "Pad" or graph.single_reader(value) is not layer_node:
        return None, None
    if graph.attributes(pad).get("mode", "constant") not in ("constant", b"constant"):
        return None, None
    pads = graph.constant(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if pads is None:
        return None, None
    if len(pad.inputs) > 2 and pad.inputs[2] is not None:
        cval = graph.constant(pad.inputs[2])
        if cval is None or float(np.asarray(cval).reshape(-1)[0]) != 0.0:
            return None, None
    pads = [int(p) for p in np.asarray(pads).reshape(-1)]
    axes = graph.constant(pad.inputs[3]) if len(pad.inputs) > 3 and pad.inputs[3] is not None else None
    rank = len(pads) // 2
    axes = [int(a) % 4 for a in np.asarray(axes).reshape(-1)] if axes is not None else list(range(4))
    if axes is not None and len(axes) != rank or any(p < 0 for p in pads):
        return None, None
    full = dict.fromkeys(range(4), (0, 0))
    for i, a in enumerate(axes):
        full[a] = (pads[i], pads[i + rank])
    if full[0] != (0, 0) or full[1] != (0, 0):
        return None, None
    return [full[2][0], full[3][0], full[2][1], full[3][1]], pad


def rewrite(model: ir.Model, plan: dict, ctx) -> dict:
    """Replace every planned layer. plan: {torch param name: record dict}. Returns a report."""
    pending = dict(plan)
    replaced, dense = [], []
    for layer in list(graph.layers(model, kinds=("conv", "matmul"))):
        name, rec = _match(layer, pending)
        if rec is None:
            continue
        del pending[name]
        reason = (_conv(model, layer, rec) if layer.kind == "conv" else _matmul(model, layer, rec))
        entry = {"layer": rec["module"], "onnx_node": layer.name, "kind": rec["kind"], "block": rec["block"]}
        if isinstance(reason, str):
            dense.append(entry | {"reason": reason})
        else:
            replaced.append(entry | reason)
    for name, rec in pending.items():
        dense.append({"layer": rec["module"], "reason": "no ONNX node carries this layer's weights"})
    return {"replaced": replaced, "not_replaced": dense}


def _torch_layout(layer) -> np.ndarray:
    return layer.weight.T if layer.kind == "matmul" else layer.weight


def _match(layer, pending: dict):
    w = _torch_layout(layer)
    wname = layer.node.inputs[1].name if len(layer.node.inputs) > 1 and layer.node.inputs[1] is not None else None
    if wname in pending:
        return wname, pending[wname]
    candidates = []
    for name, rec in pending.items():
        if tuple(rec["shape"]) != tuple(w.shape):
            continue
        if rec["kind"] == "linear" and layer.kind != "matmul" or rec["kind"] != "linear" and layer.kind != "conv":
            continue
        nonzero = weight_group_mask(w, rec["block"])
        if not np.any(nonzero & ~rec["mask"]) and (~nonzero).any():
            candidates.append(name)
    if len(candidates) == 1:
        return candidates[0], pending[candidates[0]]
    return None, None


def _check_mask(weight: np.ndarray, rec) -> str | None:
    nonzero = weight_group_mask(weight, rec["block"])
    if nonzero.shape != rec["mask"].shape:
        return f"weight shape {list(weight.shape)} differs from the pruned layer's"
    if np.any(nonzero & ~rec["mask"]):
        return "the exported weight has non-zeros in pruned groups (was the module changed after pruning?)"
    return None


def _conv(model, layer, rec):
    attrs = graph.attributes(layer.node)
    if attrs.get("group", 1) != 1:
        return "grouped conv in the ONNX graph"
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        return f"auto_pad={attrs['auto_pad']} (explicit pads needed)"
    weight, bias = layer.weight.astype(np.float32), layer.bias
    if weight.ndim != 4:
        return "not a 2-D convolution"
    problem = _check_mask(weight, rec)
    if problem:
        return problem
    weight, bias, bn = _fold_batchnorm(layer, weight, bias)
    nodes = list(layer.nodes) + ([bn] if bn is not None else [])
    out = bn.outputs[0] if bn is not None else layer.output
    act, act_nodes, out = graph.following_activation(out, ("relu", "relu6", "silu"))
    nodes += act_nodes
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    # the node's current input: layer.input is stale when the producer was replaced before (the
    # layers are listed up front), and a stale value has no producer in the graph
    x = layer.node.inputs[0]
    extra_pad, pad_node = _zero_pad(x, layer.node)
    if pad_node is not None:
        pads = [a + b for a, b in zip(pads, extra_pad)]
        x = pad_node.inputs[0]
        nodes = [pad_node] + nodes
    kh, kw = weight.shape[2:]
    packed = kernels.pack_block_sparse_conv(weight, rec["block"])
    base = layer.name.replace("/", "_").replace(".", "_")
    inputs = [x] + [graph.initializer(model, f"{base}.{k}", packed[k]) for k in ("values", "c_index", "row_ptr")]
    if bias is not None:
        inputs.append(graph.initializer(model, f"{base}.bias", np.asarray(bias, np.float32)))
    node = ir.node(CONV_OP, inputs, {
        "out_channels": int(weight.shape[0]), "kernel_shape": [int(kh), int(kw)],
        "strides": [int(s) for s in attrs.get("strides", [1, 1])], "pads": [int(p) for p in pads],
        "dilations": [int(d) for d in attrs.get("dilations", [1, 1])], "activation": act,
    }, domain=kernels.DOMAIN, name=graph.node_name(model, f"{base}_sparse"))
    graph.replace(model, dataclasses.replace(layer, nodes=nodes, output=out), node)
    kept = int(packed["c_index"].size)
    total = (len(packed["row_ptr"]) - 1) * weight.shape[1]
    return {"op": CONV_OP, "activation": act, "folded": [n.op_type for n in nodes[1:] if n is not layer.node],
            "group_sparsity": 1.0 - kept / total}


def _matmul(model, layer, rec):
    weight = layer.weight.astype(np.float32)  # [K, N]
    problem = _check_mask(weight.T, rec)
    if problem:
        return problem
    act, act_nodes, out = graph.following_activation(layer.output, graph.MATMUL_ACTIVATIONS)
    packed = kernels.pack_block_sparse(weight, rec["block"])
    base = layer.name.replace("/", "_").replace(".", "_")
    inputs = [layer.node.inputs[0]] + [graph.initializer(model, f"{base}.{k}", packed[k]) for k in ("values", "k_index", "row_ptr")]
    if layer.bias is not None:
        inputs.append(graph.initializer(model, f"{base}.bias", layer.bias.astype(np.float32)))
    node = ir.node(MATMUL_OP, inputs, {"N": int(weight.shape[1]), "activation": act}, domain=kernels.DOMAIN,
                   name=graph.node_name(model, f"{base}_sparse"))
    graph.replace(model, dataclasses.replace(layer, nodes=list(layer.nodes) + act_nodes, output=out), node)
    kept = int(packed["k_index"].size)
    total = (len(packed["row_ptr"]) - 1) * weight.shape[0]
    return {"op": MATMUL_OP, "activation": act, "group_sparsity": 1.0 - kept / total}
