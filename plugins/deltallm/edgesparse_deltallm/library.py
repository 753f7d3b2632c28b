"""The deltallm kernel library as edgesparse sees it: its domain and operator, the operator's
dense meaning as an ONNX function (exact causal grouped-query attention: what a runtime without
the library computes), the standard-op replacement used as the benchmark baseline, the op's
reference implementation (approximation included) that the build verifies the kernel against,
and the description recorded per node in the package manifest."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .rewrite import DOMAIN, OP

FUNCTION_ATTRIBUTES = ("scale", "window", "sinks", "carry")
OPTIONAL_ATTRIBUTES = {"softcap": 0.0, "span": 0}  # absent on a node: no soft-capping, no sliding window


def _attention_nodes(q: str, k: str, v: str, y: str, scale_value: str, prefix: str,
                     softcap_value: str, span_value: str) -> list[onnx.NodeProto]:
    """Exact causal attention with the key/value heads repeated for grouped queries, soft-capped
    logits when softcap > 0 and a sliding window of `span` keys when span > 0. `scale_value`,
    `softcap_value` (float) and `span_value` (int64) name scalar tensors. Shapes are read at run
    time."""
    n = lambda name: f"{prefix}{name}"  # noqa: E731

    def const(name, value):
        return helper.make_node("Constant", [], [n(name)], value=numpy_helper.from_array(np.asarray(value), n(name)))

    def op(kind, inputs, output, **attrs):
        outer = (q, k, v, scale_value, softcap_value, span_value)
        return helper.make_node(kind, [x if x in outer else n(x) for x in inputs], [output if output == y else n(output)], **attrs)

    nodes = [
        const("i0", np.array([0], np.int64)), const("i1", np.array([1], np.int64)),
        const("i2", np.array([2], np.int64)), const("i4", np.array([4], np.int64)),
        const("s0", np.array(0, np.int64)), const("s1", np.array(1, np.int64)), const("s2", np.array(2, np.int64)),
        const("neg", np.array(-np.inf, np.float32)), const("f0", np.array(0.0, np.float32)),
        const("tiny", np.array(1e-30, np.float32)),
        op("Shape", [q], "qs"), op("Shape", [k], "ks"),
        # [B, Hkv, N, D] -> [B, Hkv, H / Hkv, N, D] -> [B, H, N, D]
        op("Slice", ["qs", "i1", "i2"], "h"), op("Slice", ["ks", "i1", "i2"], "hkv"), op("Div", ["h", "hkv"], "g"),
        op("Slice", ["ks", "i0", "i2"], "b_hkv"), op("Slice", ["ks", "i2", "i4"], "n_d"),
        op("Concat", ["b_hkv", "g", "n_d"], "expand_shape", axis=0),
        op("Slice", ["qs", "i0", "i2"], "b_h"), op("Concat", ["b_h", "n_d"], "kv_shape", axis=0),
    ]
    for name, src in (("kx", k), ("vx", v)):
        nodes += [op("Unsqueeze", [src, "i2"], name + "_u"), op("Expand", [name + "_u", "expand_shape"], name + "_e"),
                  op("Reshape", [name + "_e", "kv_shape"], name)]
    nodes += [
        op("Transpose", ["kx"], "kt", perm=[0, 1, 3, 2]),
        op("MatMul", [q, "kt"], "raw"),
        op("Mul", ["raw", scale_value], "scaled"),
        # soft-capping: softcap * tanh(scaled / softcap) when softcap > 0
        op("Max", [softcap_value, "tiny"], "cap"), op("Div", ["scaled", "cap"], "over"), op("Tanh", ["over"], "th"),
        op("Mul", ["th", "cap"], "capped"), op("Greater", [softcap_value, "f0"], "has_cap"),
        op("Where", ["has_cap", "capped", "scaled"], "scores"),
        # causal: key j is visible to query row t when j <= N - T + t (and, with a sliding
        # window, j > N - T + t - span)
        op("Gather", ["qs", "s2"], "t"), op("Gather", ["ks", "s2"], "n"), op("Sub", ["n", "t"], "past"),
        op("Range", ["past", "n", "s1"], "rows"), op("Range", ["s0", "n", "s1"], "cols"),
        op("Unsqueeze", ["rows", "i1"], "rows2"), op("Greater", ["cols", "rows2"], "future"),
        op("Sub", ["rows2", span_value], "oldest"), op("LessOrEqual", ["cols", "oldest"], "old"),
        op("Greater", [span_value, "s0"], "has_span"), op("And", ["old", "has_span"], "outside"),
        op("Or", ["future", "outside"], "hidden"),
        op("Where", ["hidden", "neg", "scores"], "masked"),
        op("Softmax", ["masked"], "p", axis=-1),
        op("MatMul", ["p", "vx"], y),
    ]
    return nodes


def function_protos(opset_import) -> list[onnx.FunctionProto]:
    """DeltaAttention's dense meaning: exact attention (inputs q, k, v, theta_q, theta_v; output y)."""
    opset = next((o.version for o in opset_import if o.domain in ("", "ai.onnx")), 18)
    scale = _attribute_constant("_scale", "scale", onnx.AttributeProto.FLOAT, "value_float")
    softcap = _attribute_constant("_softcap", "softcap", onnx.AttributeProto.FLOAT, "value_float")
    span = _attribute_constant("_span", "span", onnx.AttributeProto.INT, "value_int")
    body = [scale, softcap, span] + _attention_nodes("q", "k", "v", "y", "_scale", "_", "_softcap", "_span")
    defaults = [helper.make_attribute(name, value) for name, value in OPTIONAL_ATTRIBUTES.items()]
    return [helper.make_function(DOMAIN, OP, ["q", "k", "v", "theta_q", "theta_v"], ["y"], body,
                                 [helper.make_opsetid("", max(int(opset), 18))], list(FUNCTION_ATTRIBUTES),
                                 attribute_protos=defaults)]


def _attribute_constant(output: str, name: str, kind, field: str) -> onnx.NodeProto:
    """Constant(field = the node's attribute `name`), the function body's view of it."""
    node = onnx.NodeProto()
    node.op_type = "Constant"
    node.output.append(output)
    attr = onnx.AttributeProto()
    attr.name = field
    attr.ref_attr_name = name
    attr.type = kind
    node.attribute.append(attr)
    return node


def densify(node, arrays: dict, shapes: dict):
    """Exact attention with standard ops: the model a user would deploy without the pass, and
    what `edgesparse bench` times the package against (the build verifies against `reference`)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    prefix = f"{node.name or node.output[0]}."
    scale = numpy_helper.from_array(np.asarray(attrs.get("scale", 1.0), np.float32), f"{prefix}scale")
    softcap = numpy_helper.from_array(np.asarray(attrs.get("softcap", 0.0), np.float32), f"{prefix}softcap")
    span = numpy_helper.from_array(np.asarray(attrs.get("span", 0), np.int64), f"{prefix}span")
    q, k, v = node.input[:3]
    return (_attention_nodes(q, k, v, node.output[0], scale.name, prefix, softcap.name, span.name),
            [scale, softcap, span])


def reference(node, inputs: list, arrays: dict) -> list:
    """What the kernel computes, approximation included, by the PyTorch reference
    (reference.delta_attention, written independently of the kernel): the build verifies the
    package against this, each call a fresh sequence as in a prefill. Only Y is computed (the
    state and MAC counters are the kernel's own bookkeeping)."""
    import torch

    from .reference import delta_attention

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    q, k, v, theta_q, theta_v = inputs[:5]
    if len(inputs) > 5 and inputs[5] is not None and np.asarray(inputs[5]).size:
        raise ValueError(f"DeltaAttention '{node.name}': the reference starts fresh sequences only (state given)")
    t = lambda a: torch.tensor(np.asarray(a, np.float32))  # noqa: E731  (a copy: the arrays may be read-only)
    # one thread: the reference is thousands of small ops per call, and OpenMP teams that meet at a
    # barrier after each one crawl on a busy machine (seen: a SmolLM2 build's verification)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            y, _, _ = delta_attention(t(q), t(k), t(v), scale=float(attrs.get("scale", 1.0)), window=int(attrs["window"]),
                                      sinks=int(attrs.get("sinks", 0)), theta_q=t(theta_q), theta_v=t(theta_v),
                                      softcap=float(attrs.get("softcap", 0.0)), span=int(attrs.get("span", 0)))
    finally:
        torch.set_num_threads(threads)
    return [y.numpy()] + [None] * (len(node.output) - 1)


def describe(node, arrays: dict, shapes: dict) -> dict:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    tq, tv = arrays.get(node.input[3]), arrays.get(node.input[4])
    out = {
        "window": int(attrs.get("window", 0)),
        "sinks": int(attrs.get("sinks", 0)),
        "softcap": float(attrs.get("softcap", 0.0)),
        "span": int(attrs.get("span", 0)),
        "theta_q_mean": float(np.mean(tq)) if tq is not None else None,
        "theta_v_mean": float(np.mean(tv)) if tv is not None else None,
        "sparsity": None,
        "note": "temporal sparsity: skipped attention MACs are decided per token at run time",
    }
    if node.doc_string:
        try:
            measured = json.loads(node.doc_string)
            out["sparsity"] = measured.get("calibration_sparsity")
            out["calibration"] = measured
        except ValueError:
            pass
    return out


def kernel_library():
    from edgesparse.backends import KernelLibrary

    from .build import build_library

    return KernelLibrary(name="deltallm", domain=DOMAIN, ops=(OP,), build=build_library,
                         functions=function_protos, describe=describe, densify=densify, reference=reference)
