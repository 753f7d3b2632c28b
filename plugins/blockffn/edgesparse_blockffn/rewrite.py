"""ONNX rewrite: each converted FFN of the exported graph (router MatMul ... down MatMul + bias)
becomes the router in standard ops feeding one com.edgesparse::RoutedFFN node.

The FFNs are found by their weights: the pass converted them itself before export, so the
router's and the down projection's weights identify the FFN's input (the router's input) and
its output (the down projection's, after its bias Add). Everything in between is left without
consumers and removed.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from edgesparse import EdgesparseError, graph
from edgesparse.kernels import DOMAIN, pack_gathered_ffn

from .block import EPS

OP = "RoutedFFN"


def _find(layers: list, weight: np.ndarray, what: str, name: str):
    hits = [l for l in layers if l.weight.shape == weight.shape and np.array_equal(l.weight, weight)]
    if len(hits) != 1:
        raise EdgesparseError(f"blockffn: {'no' if not hits else 'more than one'} MatMul in the exported graph holds "
                              f"the {what} weights of {name or 'the FFN'}")
    return hits[0]


def _router_nodes(model: ir.Model, x: ir.Value, router, base: str) -> tuple[list[ir.Node], ir.Value]:
    """routes = norm(ReLU(x W_r^T + b)): norm "rms" (x / sqrt(mean(x^2) + eps) * g, the converted
    routers and the paper's), "sum" (x / (sum(x) * norm_scale + 1e-5)) or "none" (trained
    checkpoints may use either); b is absent in checkpoints."""
    norm, eps_value = getattr(router, "norm", "rms"), getattr(router, "eps", EPS)
    init = lambda name, value: graph.initializer(model, f"{base}.router_{name}", np.asarray(value, np.float32))
    w = init("weight", router.weight.detach().numpy().T)
    axes = graph.initializer(model, f"{base}.router_axes", np.array([-1], np.int64))
    nodes = [ir.node("MatMul", [x, w], name=f"{base}/router/MatMul")]
    if router.bias is not None:
        nodes.append(ir.node("Add", [nodes[-1].outputs[0], init("bias", router.bias.detach().numpy())],
                             name=f"{base}/router/Bias"))
    a = ir.node("Relu", [nodes[-1].outputs[0]], name=f"{base}/router/Relu")
    nodes.append(a)
    if norm == "rms":
        # Pow/ReduceMean/Add/Sqrt/Div/Mul is the pattern ORT fuses into SimplifiedLayerNormalization
        sq = ir.node("Pow", [a.outputs[0], init("two", 2.0)], name=f"{base}/router/Square")
        ms = ir.node("ReduceMean", [sq.outputs[0], axes], {"keepdims": 1}, name=f"{base}/router/ReduceMean")
        add = ir.node("Add", [ms.outputs[0], init("eps", eps_value)], name=f"{base}/router/AddEps")
        rms = ir.node("Sqrt", [add.outputs[0]], name=f"{base}/router/Sqrt")
        div = ir.node("Div", [a.outputs[0], rms.outputs[0]], name=f"{base}/router/Div")
        gain = ir.node("Mul", [div.outputs[0], init("gain", router.gain.detach().numpy())], name=f"{base}/router/Gain")
        nodes += [sq, ms, add, rms, div, gain]
    elif norm == "sum":
        total = ir.node("ReduceSum", [a.outputs[0], axes], {"keepdims": 1}, name=f"{base}/router/ReduceSum")
        scaled = ir.node("Mul", [total.outputs[0], init("norm_scale", router.norm_scale)], name=f"{base}/router/Scale")
        add = ir.node("Add", [scaled.outputs[0], init("eps", 1e-5)], name=f"{base}/router/AddEps")
        div = ir.node("Div", [a.outputs[0], add.outputs[0]], name=f"{base}/router/Div")
        nodes += [total, scaled, add, div]
    return nodes, nodes[-1].outputs[0]


def apply(model: ir.Model, layers: list, chunk: int) -> list[str]:
    """Replace every converted FFN (`convert.Layer`s) by router + RoutedFFN; returns node names."""
    opset = model.opset_imports.get("", 0)
    if opset < 18:
        raise EdgesparseError(f"blockffn: the exported graph has opset {opset}; the router needs opset >= 18")
    found = list(graph.layers(model, kinds=("matmul",)))
    names = []
    for i, layer in enumerate(layers):
        site, router = layer.site, layer.router
        r = _find(found, router.weight.detach().numpy().T, "router", site.name)
        down = _find(found, site.down.weight.detach().numpy().T, "down projection", site.name)
        bias = lambda lin: None if lin.bias is None else lin.bias.detach().numpy()
        down_bias = down.bias if down.bias is not None else bias(site.down)
        packed = pack_gathered_ffn(site.up.weight.detach().numpy(), site.down.weight.detach().numpy(),
                                   site.hidden // router.weight.shape[0],
                                   w_gate=None if site.gate is None else site.gate.weight.detach().numpy(),
                                   b_up=bias(site.up), b_gate=None if site.gate is None else bias(site.gate),
                                   b_down=down_bias)
        base = f"blockffn{i}"
        nodes, routes = _router_nodes(model, r.input, router, base)
        keys = ["w_up", "w_gate" if site.gated else "w_up", "w_down", "b_up", "b_gate" if site.gated else "b_up",
                "b_down"]
        values = {k: graph.initializer(model, f"{base}.{k}", packed[k]) for k in set(keys)}
        name = graph.node_name(model, f"{base}/{OP}")
        ffn = ir.node(OP, [r.input, routes] + [values[k] for k in keys],
                      {"gated": int(site.gated), "activation": site.activation, "chunk": int(chunk)},
                      domain=DOMAIN, name=name)
        out = ffn.outputs[0]
        out.shape, out.type = down.output.shape, down.output.type
        model.graph.insert_before(down.node, nodes + [ffn])
        down.output.replace_all_uses_with(out, replace_graph_outputs=True)
        names.append(name)
    RemoveUnusedNodesPass()(model)
    if DOMAIN not in model.opset_imports:
        model.opset_imports[DOMAIN] = 1
    return names
