"""The deltallm kernel library as edgesparse sees it: its domain and operator, the operator's
dense meaning as an ONNX function (exact causal grouped-query attention: what a runtime without
the library computes), the standard-op replacement used as the build's reference and benchmark
baseline, and the description recorded per node in the package manifest."""
from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .rewrite import DOMAIN, OP

FUNCTION_ATTRIBUTES = ("scale", "window", "sinks", "carry")


def _attention_nodes(q: str, k: str, v: str, y: str, scale_value: str, prefix: str) -> list[onnx.NodeProto]:
    """Exact causal attention with the key/value heads repeated for grouped queries. `scale_value`
    names a scalar float tensor. Shapes are read at run time."""
    n = lambda name: f"{prefix}{name}"  # noqa: E731

    def const(name, value):
        return helper.make_node("Constant", [], [n(name)], value=numpy_helper.from_array(np.asarray(value), n(name)))

    def op(kind, inputs, output, **attrs):
        return helper.make_node(kind, [x if x in (q, k, v, scale_value) else n(x) for x in inputs], [output if output == y else n(output)], **attrs)

    nodes = [
        const("i0", np.array([0], np.int64)), const("i1", np.array([1], np.int64)),
        const("i2", np.array([2], np.int64)), const("i4", np.array([4], np.int64)),
        const("s0", np.array(0, np.int64)), const("s1", np.array(1, np.int64)), const("s2", np.array(2, np.int64)),
        const("neg", np.array(-np.inf, np.float32)),
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
        op("Mul", ["raw", scale_value], "scores"),
        # causal: key j is visible to query row t when j <= N - T + t
        op("Gather", ["qs", "s2"], "t"), op("Gather", ["ks", "s2"], "n"), op("Sub", ["n", "t"], "past"),
        op("Range", ["past", "n", "s1"], "rows"), op("Range", ["s0", "n", "s1"], "cols"),
        op("Unsqueeze", ["rows", "i1"], "rows2"), op("Greater", ["cols", "rows2"], "future"),
        op("Where", ["future", "neg", "scores"], "masked"),
        op("Softmax", ["masked"], "p", axis=-1),
        op("MatMul", ["p", "vx"], y),
    ]
    return nodes


def function_protos(opset_import) -> list[onnx.FunctionProto]:
    """DeltaAttention's dense meaning: exact attention (inputs q, k, v, theta_q, theta_v; output y)."""
    opset = next((o.version for o in opset_import if o.domain in ("", "ai.onnx")), 18)
    scale = onnx.NodeProto()
    scale.op_type = "Constant"
    scale.output.append("_scale")
    attr = onnx.AttributeProto()
    attr.name = "value_float"
    attr.ref_attr_name = "scale"
    attr.type = onnx.AttributeProto.FLOAT
    scale.attribute.append(attr)
    body = [scale] + _attention_nodes("q", "k", "v", "y", "_scale", "_")
    return [helper.make_function(DOMAIN, OP, ["q", "k", "v", "theta_q", "theta_v"], ["y"], body,
                                 [helper.make_opsetid("", max(int(opset), 18))], list(FUNCTION_ATTRIBUTES))]


def densify(node, arrays: dict, shapes: dict):
    """Exact attention with standard ops: the model a user would deploy without the pass, and
    what the build compares the package with (the difference is the delta approximation)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    prefix = f"{node.name or node.output[0]}."
    scale = numpy_helper.from_array(np.asarray(attrs.get("scale", 1.0), np.float32), f"{prefix}scale")
    q, k, v = node.input[:3]
    return _attention_nodes(q, k, v, node.output[0], scale.name, prefix), [scale]


def describe(node, arrays: dict, shapes: dict) -> dict:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    tq, tv = arrays.get(node.input[3]), arrays.get(node.input[4])
    out = {
        "window": int(attrs.get("window", 0)),
        "sinks": int(attrs.get("sinks", 0)),
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
                         functions=function_protos, describe=describe, densify=densify)
