"""After the sparse rewrite: keep MobileNet-style blocks in NCHW around the sparse convs.

ONNX Runtime runs dense convs in its blocked NCHWc layout, while edgesparse's operators take NCHW.
A dense depthwise conv between two sparse 1x1 convs therefore costs a ReorderInput before it and a
ReorderOutput after it, and a residual Add after a sparse conv is a node of its own (ORT fuses it
into dense convs only). Measured on the sample CNN at 70 %: 11 reorders (85 us) and 3 Adds (25 us)
of a 962 us model. Two rewrites remove them:

- a depthwise Conv (group = C, weight [C, 1, kh, kw]) whose input comes from, or whose output goes
  to, a sparse conv becomes a `DepthwiseConv` (edgesparse's NCHW kernel), with a following
  BatchNormalization, Relu, Clip(0, 6) or SiLU and a leading zero Pad folded in as for sparse convs;
- an Add of a sparse conv's output (read by nothing else) and another value of the same static
  shape becomes that conv's `BlockSparseConvAdd` (the residual added after the activation, as the
  Add was).

Each rewrite runs only where the target's dispatch rule asks for its op (targets without the kernels,
e.g. wasm and the TVM targets, keep the dense ops); the depthwise one also where dispatch=measure
times the whole model faster with it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgesparse import graph, kernels

from .rewrite import _activation, _fold_batchnorm, _single_consumer, _std, _zero_pad

SPARSE_CONVS = ("BlockSparseConv", "BlockSparseConvAdd")


def _is_sparse_conv(node) -> bool:
    return node is not None and node.domain == kernels.DOMAIN and node.op_type in SPARSE_CONVS


def _depthwise(layer) -> bool:
    w = layer.weight
    return (w.ndim == 4 and w.shape[1] == 1 and w.shape[0] > 1
            and graph.attributes(layer.node).get("group", 1) == w.shape[0])


def rewrite_layout(model: ir.Model, depthwise: bool = True, residual: bool = True) -> dict:
    """The rewrites asked for, in place. Returns {"depthwise": [...], "residual": [...]} of what changed."""
    return {"depthwise": _depthwise_convs(model) if depthwise else [],
            "residual": _residual_adds(model) if residual else []}


def _depthwise_convs(model: ir.Model) -> list[dict]:
    done = []
    for layer in list(graph.layers(model, kinds=("conv",))):
        if not _depthwise(layer):
            continue
        x = layer.node.inputs[0]  # current (layer.input is stale if its producer was replaced)
        pad_pads, pad_node = _zero_pad(x, layer.node)
        source = (pad_node.inputs[0] if pad_node is not None else x).producer()
        weight, bias, bn = _fold_batchnorm(layer, layer.weight.astype(np.float32), layer.bias)
        out = bn.outputs[0] if bn is not None else layer.output
        act, act_nodes, out = _activation(out, ("relu", "relu6", "silu"))
        consumer = _single_consumer(out)
        if not (_is_sparse_conv(source) or _is_sparse_conv(consumer)):
            continue
        attrs = graph.attributes(layer.node)
        pads = [int(p) for p in attrs.get("pads", [0, 0, 0, 0])]
        nodes = list(layer.nodes) + ([bn] if bn is not None else []) + act_nodes
        if pad_node is not None:
            pads = [a + b for a, b in zip(pads, pad_pads)]
            x = pad_node.inputs[0]
            nodes = [pad_node] + nodes
        base = layer.name.replace("/", "_").replace(".", "_")
        inputs = [x, graph.initializer(model, f"{base}.weight", weight)]
        if bias is not None:
            inputs.append(graph.initializer(model, f"{base}.bias", np.asarray(bias, np.float32).reshape(-1)))
        kh, kw = weight.shape[2:]
        node = ir.node("DepthwiseConv", inputs, {
            "group": int(weight.shape[0]), "kernel_shape": [int(kh), int(kw)],
            "strides": [int(s) for s in attrs.get("strides", [1, 1])], "pads": pads,
            "dilations": [int(d) for d in attrs.get("dilations", [1, 1])], "activation": act,
        }, domain=kernels.DOMAIN, name=graph.node_name(model, f"{base}_nchw"))
        graph.replace(model, graph.Layer("conv", layer.node, weight, bias, nodes, x, out), node)
        done.append({"onnx_node": layer.name, "channels": int(weight.shape[0]), "kernel": [int(kh), int(kw)],
                     "strides": [int(s) for s in attrs.get("strides", [1, 1])], "activation": act,
                     "folded": [n.op_type for n in nodes if n is not layer.node]})
    return done


def _static_shape(value: ir.Value):
    shape = value.shape
    if shape is None:
        return None
    dims = [d if isinstance(d, int) else str(d) for d in shape]
    return dims if dims else None


def _residual_adds(model: ir.Model) -> list[dict]:
    done = []
    for add in list(model.graph):
        if not _std(add) or add.op_type != "Add" or len(add.inputs) != 2:
            continue
        for conv_out, other in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
            conv = conv_out.producer() if conv_out is not None else None
            if conv is None or conv.op_type != "BlockSparseConv" or conv.domain != kernels.DOMAIN:
                continue
            if _single_consumer(conv_out) is not add or other is None or other is conv_out:
                continue
            shape = _static_shape(conv_out)
            if shape is None or shape != _static_shape(other) or shape != _static_shape(add.outputs[0]):
                continue  # the kernel adds same-shape tensors only (no broadcasting)
            inputs = list(conv.inputs) + [None] * (5 - len(conv.inputs)) + [other]
            attrs = {k: a.value for k, a in conv.attributes.items()}
            fused = ir.node("BlockSparseConvAdd", inputs, attrs, domain=kernels.DOMAIN,
                            name=graph.node_name(model, f"{conv.name}_add"))
            # inserted where the Add was: `other` may be computed after the conv
            layer = graph.Layer("conv", add, np.zeros(0), None, [conv, add], conv.inputs[0], add.outputs[0])
            graph.replace(model, layer, fused)
            done.append({"onnx_node": conv.name, "add": add.name})
            break
    return done
