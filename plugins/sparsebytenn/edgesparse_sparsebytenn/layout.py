"""After the sparse rewrite: keep MobileNet-style blocks out of ORT's layout reorders.

ONNX Runtime runs dense convs in its blocked NCHWc layout, while edgesparse's operators take NCHW.
A dense depthwise conv between two sparse 1x1 convs therefore costs a ReorderInput before it and a
ReorderOutput after it, and a residual Add after a sparse conv is a node of its own (ORT fuses it
into dense convs only). Measured on the sample CNN at 70 %: 11 reorders (85 us) and 3 Adds (25 us)
of a 962 us model. Three rewrites remove them:

- a depthwise Conv (group = C, weight [C, 1, kh, kw]) whose input comes from, or whose output goes
  to, a sparse conv becomes a `DepthwiseConv` (edgesparse's NCHW kernel), with a following
  BatchNormalization, Relu, Clip(0, 6) or SiLU and a leading zero Pad folded in as for sparse convs;
- an Add of a sparse conv's output (read by nothing else) and another value of the same static
  shape becomes that conv's `BlockSparseConvAdd` (the residual added after the activation, as the
  Add was);
- NCHW16c: a tensor passed between two of these ops (a sparse 1x1 conv with 16 x 1 blocks, a
  DepthwiseConv), all of whose readers can take it, and whose channels are a multiple of 16, is kept
  in the blocked layout [N, C/16, H, W, 16] (attributes x_channel_block / y_channel_block): the
  depthwise kernel then works on full vectors of 16 channels, and the sparse 1x1 kernel reads and
  writes either layout, so a block costs no reorder at all. With it the depthwise rewrite takes
  only the depthwise convs that can be blocked (both neighbours such sparse convs). A global
  average pool (ReduceMean over H and W, GlobalAveragePool) also reads NCHW16c: the mean over
  axes 2 and 3 of [N, C/16, H, W, 16], reshaped to [N, C], is the NCHW result in channel order.

Each rewrite runs only where the target's dispatch rule asks for its op (targets without the kernels,
e.g. wasm and the TVM targets, keep the dense ops); the depthwise one also where dispatch=measure
times the whole model faster with it.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgesparse import graph, kernels

from .rewrite import _fold_batchnorm, _std, _zero_pad

SPARSE_CONVS = ("BlockSparseConv", "BlockSparseConvAdd")


def _is_sparse_conv(node) -> bool:
    return node is not None and node.domain == kernels.DOMAIN and node.op_type in SPARSE_CONVS


def _depthwise(layer) -> bool:
    w = layer.weight
    return (w.ndim == 4 and w.shape[1] == 1 and w.shape[0] > 1
            and graph.attributes(layer.node).get("group", 1) == w.shape[0])


def rewrite_layout(model: ir.Model, depthwise: bool = True, residual: bool = True, nchw16c: bool = False) -> dict:
    """The rewrites asked for, in place (NCHW16c only with the depthwise one). Returns
    {"depthwise": [...], "residual": [...], "nchw16c": [...]} of what changed."""
    done = {"residual": _residual_adds(model) if residual else []}
    done["depthwise"] = _depthwise_convs(model, blockable_only=nchw16c) if depthwise else []
    done["nchw16c"] = _to_nchw16c(model) if depthwise and nchw16c else []
    return done


def _attr(node, name, default=None):
    return graph.attributes(node).get(name, default)


def _blockable_conv(node) -> bool:
    """A sparse conv the NCHW16c kernel runs: 1x1, stride 1, no padding, 16 x 1 blocks."""
    if not _is_sparse_conv(node):
        return False
    values = node.inputs[1].const_value if node.inputs[1] is not None else None
    return (list(_attr(node, "kernel_shape", [])) == [1, 1] and list(_attr(node, "strides", [1, 1])) == [1, 1]
            and not any(_attr(node, "pads", [0, 0, 0, 0])) and values is not None and values.shape[-1] == 16)


def _depthwise_convs(model: ir.Model, blockable_only: bool = False) -> list[dict]:
    done = []
    for layer in list(graph.layers(model, kinds=("conv",))):
        if not _depthwise(layer):
            continue
        x = layer.node.inputs[0]  # current (layer.input is stale if its producer was replaced)
        pad_pads, pad_node = _zero_pad(x, layer.node)
        source = (pad_node.inputs[0] if pad_node is not None else x).producer()
        weight, bias, bn = _fold_batchnorm(layer, layer.weight.astype(np.float32), layer.bias)
        out = bn.outputs[0] if bn is not None else layer.output
        act, act_nodes, out = graph.following_activation(out, ("relu", "relu6", "silu"))
        consumer = graph.single_reader(out)
        if not (_is_sparse_conv(source) or _is_sparse_conv(consumer)):
            continue
        if blockable_only and not (weight.shape[0] % 16 == 0 and _blockable_conv(source) and _blockable_conv(consumer)):
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
            if graph.single_reader(conv_out) is not add or other is None or other is conv_out:
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


def _channels(node):
    """Output channels of a blockable node."""
    return _attr(node, "out_channels") if node.op_type != "DepthwiseConv" else _attr(node, "group")


def _blockable(node) -> bool:
    return node is not None and (_blockable_conv(node) or (
        node.domain == kernels.DOMAIN and node.op_type == "DepthwiseConv" and _attr(node, "group", 0) % 16 == 0))


def _global_mean(node) -> bool:
    """A standard global average pool over H and W of a 4-D tensor."""
    if node is None or not _std(node):
        return False
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    axes = _attr(node, "axes")
    if axes is None and len(node.inputs) > 1:
        axes = graph.constant(node.inputs[1])
    return axes is not None and sorted(int(a) % 4 for a in np.atleast_1d(axes)) == [2, 3]


def _blocked_mean(model: ir.Model, mean, x: ir.Value, channels: int) -> None:
    """Replace `mean` (see _global_mean) of the now NCHW16c `x` by the mean over axes 2 and 3 and
    a Reshape to its NCHW result."""
    keepdims = 1 if mean.op_type == "GlobalAveragePool" else int(_attr(mean, "keepdims", 1))
    base = (mean.name or "mean").replace("/", "_")
    if model.opset_imports.get("", 18) >= 18:
        axes = graph.initializer(model, f"{base}.axes", np.array([2, 3], np.int64))
        reduce = ir.node("ReduceMean", [x, axes], {"keepdims": keepdims}, name=graph.node_name(model, f"{base}_16c"))
    else:
        reduce = ir.node("ReduceMean", [x], {"axes": [2, 3], "keepdims": keepdims},
                         name=graph.node_name(model, f"{base}_16c"))
    model.graph.insert_before(mean, reduce)
    shape = graph.initializer(model, f"{base}.nchw", np.array([0, channels] + [1, 1] * keepdims, np.int64))
    reshape = ir.node("Reshape", [reduce.outputs[0], shape], name=graph.node_name(model, f"{base}_nchw"))
    graph.replace(model, graph.Layer("mean", mean, np.zeros(0), None, [mean], x, mean.outputs[0]), reshape)


def _to_nchw16c(model: ir.Model) -> list[dict]:
    """Blocks every tensor it can (see the module's docstring); returns [{"value", "channels"}]."""
    outputs = set(id(v) for v in model.graph.outputs)
    blocked = {}
    for node in model.graph:
        if not _blockable(node) or _channels(node) % 16:
            continue
        y = node.outputs[0]
        readers = [use[0] for use in y.uses()]
        if readers and id(y) not in outputs and all(_blockable(r) or _global_mean(r) for r in readers):
            blocked[id(y)] = y
    # A depthwise conv's X and Y, and a BlockSparseConvAdd's residual and Y, share one layout.
    changed = True
    while changed:
        changed = False
        for node in model.graph:
            pair = None
            if node.domain == kernels.DOMAIN and node.op_type == "DepthwiseConv":
                pair = (node.inputs[0], node.outputs[0])
            elif node.domain == kernels.DOMAIN and node.op_type == "BlockSparseConvAdd":
                pair = (node.inputs[5], node.outputs[0])
            if pair and (id(pair[0]) in blocked) != (id(pair[1]) in blocked):
                for v in pair:
                    blocked.pop(id(v), None)
                changed = True
    done = []
    for v in blocked.values():
        v.producer().attributes["y_channel_block"] = ir.AttrInt64("y_channel_block", 16)
        for reader, index in list(v.uses()):
            if _global_mean(reader):
                _blocked_mean(model, reader, v, int(_channels(v.producer())))
            elif index == 0:
                reader.attributes["x_channel_block"] = ir.AttrInt64("x_channel_block", 16)
        if v.shape is not None and len(v.shape) == 4:
            n, c, h, w = v.shape
            v.shape = ir.Shape([n, c // 16 if isinstance(c, int) else c, h, w, 16])
        done.append({"value": v.name, "channels": int(_channels(v.producer()))})
    return done
