"""Dense meaning of every edgesparse operator as model-local ONNX functions.

With the kernel library registered ONNX Runtime runs the custom kernel; without
it (onnxruntime-web, a runtime without the library) it inlines the function
body below and computes the same result with standard operators (slower: the
dense weights are rebuilt by ScatterND, which ORT's constant folding usually
does once at session creation).

Bodies are emitted for the model's default-domain opset (>= 16). String
attributes (``activation``) are compared with Equal at opset >= 19 and with a
StringNormalizer stop-word test below that; every supported activation is
computed and the selected one kept with Where (fallback only, so the extra
element-wise work is accepted).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgesparse.kernels.blocksparse import DOMAIN

MIN_OPSET = 16
DOMAIN_VERSION = 1


class _Body:
    """Accumulates function-body nodes with unique value names."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, **attrs) -> str | list[str]:
        self._n += 1
        outs = [f"_{op_type.lower()}{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        return self.op("Constant", [], value=numpy_helper.from_array(arr, f"c{self._n + 1}"))

    def attr_const(self, attr_type: str, ref: str) -> str:
        """Constant node whose value comes from the calling node's attribute ``ref``."""
        self._n += 1
        out = f"_attr_{ref}{self._n}"
        a = onnx.AttributeProto()
        a.name = attr_type  # e.g. value_int, value_ints, value_string
        a.ref_attr_name = ref
        a.type = {
            "value_int": onnx.AttributeProto.INT,
            "value_ints": onnx.AttributeProto.INTS,
            "value_string": onnx.AttributeProto.STRING,
        }[attr_type]
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(a)
        self.nodes.append(node)
        return out

    def shape(self, x: str, start: int | None = None, end: int | None = None) -> str:
        attrs = {}
        if start is not None:
            attrs["start"] = start
        if end is not None:
            attrs["end"] = end
        return self.op("Shape", [x], **attrs)

    def is_string(self, s: str, value: str) -> str:
        """Boolean scalar: string tensor s (scalar) == value."""
        if self.opset >= 19:
            return self.op("Equal", [s, self.const(np.array(value, dtype=object))])
        # Stop-word test: [s, "#"] loses s exactly when s == value.
        pair = self.op("Concat", [self.op("Reshape", [s, self.const([1], np.int64)]),
                                  self.const(np.array(["#"], dtype=object))], axis=0)
        kept = self.op("StringNormalizer", [pair], stopwords=[value], is_case_sensitive=1)
        return self.op("Equal", [self.op("Size", [kept]), self.const(1, np.int64)])

    def activation(self, z: str, allowed: Iterable[str], out: str) -> None:
        """out = activation named by the calling node's ``activation`` attribute applied to z."""
        act = self.attr_const("value_string", "activation")
        result = z
        for name in allowed:
            if name == "none":
                continue
            if name == "relu":
                y = self.op("Relu", [z])
            elif name == "relu6":
                y = self.op("Clip", [z, self.const(0.0, np.float32), self.const(6.0, np.float32)])
            elif name == "silu":
                y = self.op("Mul", [z, self.op("Sigmoid", [z])])
            elif name == "gelu":
                e = self.op("Erf", [self.op("Mul", [z, self.const(np.sqrt(0.5), np.float32)])])
                y = self.op("Mul", [self.op("Mul", [z, self.const(0.5, np.float32)]),
                                    self.op("Add", [e, self.const(1.0, np.float32)])])
            else:
                raise ValueError(name)
            result = self.op("Where", [self.is_string(act, name), y, result])
        self.nodes.append(helper.make_node("Identity", [result], [out]))


def _opset_version(opset_import) -> int:
    if isinstance(opset_import, int):
        return opset_import
    for imp in opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ValueError("opset_import has no default-domain (ai.onnx) entry")


def _string_default(name: str, value: str) -> onnx.AttributeProto:
    return helper.make_attribute(name, value)


def _block_sparse_matmul(opset: int) -> onnx.FunctionProto:
    b = _Body(opset)
    one = b.const([1], np.int64)
    nnzb = b.shape("values", end=1)
    block = b.shape("values", start=1)
    k = b.shape("X", start=-1)
    nb = b.op("Sub", [b.shape("row_ptr"), one])
    row_of = _row_of_blocks(b, "row_ptr", nnzb)
    idx = b.op("Concat", [b.op("Unsqueeze", [b.op("Cast", ["k_index"], to=TensorProto.INT64), one]),
                          b.op("Unsqueeze", [row_of, one])], axis=1)
    zeros = b.op("ConstantOfShape", [b.op("Concat", [k, nb, block], axis=0)],
                 value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
    w3 = b.op("ScatterND", [zeros, idx, "values"])  # [K, NB, B]
    n1 = b.op("Reshape", [b.attr_const("value_int", "N"), one])
    w = b.op("Slice", [b.op("Reshape", [w3, b.op("Concat", [k, b.const([-1], np.int64)], axis=0)]),
                       b.const([0], np.int64), n1, one])  # [K, N]
    x2 = b.op("Reshape", ["X", b.op("Concat", [b.const([-1], np.int64), k], axis=0)])
    z2 = b.op("Gemm", [x2, w, "bias"])  # bias is optional in Gemm as in our op
    z = b.op("Reshape", [z2, b.op("Concat", [b.shape("X", end=-1), n1], axis=0)])
    b.activation(z, ("relu", "gelu", "silu"), "Y")
    return helper.make_function(
        DOMAIN, "BlockSparseMatMul", ["X", "values", "k_index", "row_ptr", "bias"], ["Y"], b.nodes,
        [helper.make_opsetid("", opset)], attributes=["N"],
        attribute_protos=[_string_default("activation", "none")],
    )


def _row_of_blocks(b: _Body, row_ptr: str, nnzb: str) -> str:
    """int64 [nnzb]: the block row of every block (counts the row starts at or before it)."""
    one = b.const([1], np.int64)
    rp = b.op("Cast", [row_ptr], to=TensorProto.INT64)
    starts = b.op("Slice", [rp, one, b.const([-1], np.int64)])  # row_ptr[1:NB]
    zeros = b.op("ConstantOfShape", [b.op("Add", [nnzb, one])],
                 value=helper.make_tensor("z", TensorProto.INT64, [1], [0]))
    ones = b.op("ConstantOfShape", [b.shape(starts)], value=helper.make_tensor("o", TensorProto.INT64, [1], [1]))
    marks = b.op("ScatterElements", [zeros, starts, ones], axis=0, reduction="add")
    return b.op("Slice", [b.op("CumSum", [marks, b.const(0, np.int64)]), b.const([0], np.int64), nnzb])


def _to_nchw(b: _Body, x: str) -> str:
    """X as NCHW whether it is NCHW or NCHW16c (without knowing which: a 4-D [N, C, H, W] is read
    as [N, C, H, W, 1], whose transpose and reshape below leave it as it was)."""
    five = b.op("Reshape", [x, b.op("Concat", [b.shape(x, end=4), b.const([-1], np.int64)], axis=0)])
    t = b.op("Transpose", [five], perm=[0, 1, 4, 2, 3])
    return b.op("Reshape", [t, b.op("Concat", [b.shape(x, end=1), b.const([-1], np.int64), b.shape(x, start=2, end=4)],
                                   axis=0)])


def _to_y_layout(b: _Body, y: str, out: str) -> None:
    """out = NCHW y in the layout of the calling node's y_channel_block (1: as is; 16: NCHW16c):
    [N, O/k, OH, OW, k] with the last axis dropped when k = 1."""
    k = b.op("Reshape", [b.attr_const("value_int", "y_channel_block"), b.const([1], np.int64)])
    n, hw, minus1 = b.shape(y, end=1), b.shape(y, start=2), b.const([-1], np.int64)
    five = b.op("Reshape", [y, b.op("Concat", [n, minus1, k, hw], axis=0)])
    t = b.op("Transpose", [five], perm=[0, 1, 3, 4, 2])
    keep = b.op("Min", [b.op("Sub", [k, b.const([1], np.int64)]), b.const([1], np.int64)])  # 0 when k = 1
    last = b.op("Slice", [k, b.const([0], np.int64), keep])
    b.nodes.append(helper.make_node("Reshape", [t, b.op("Concat", [n, minus1, hw, last], axis=0)], [out]))


def _block_sparse_conv(opset: int, residual: bool = False) -> onnx.FunctionProto:
    b = _Body(opset)
    b.nodes.append(helper.make_node("Identity", [_to_nchw(b, "X")], ["_x"]))
    one = b.const([1], np.int64)
    zero = b.const([0], np.int64)
    nnzb = b.shape("values", end=1)
    taps = b.shape("values", start=1, end=2)
    block = b.shape("values", start=2)
    c = b.shape("_x", start=1, end=2)
    nb = b.op("Sub", [b.shape("row_ptr"), one])
    row_of = _row_of_blocks(b, "row_ptr", nnzb)
    idx = b.op("Concat", [b.op("Unsqueeze", [row_of, one]),
                          b.op("Unsqueeze", [b.op("Cast", ["c_index"], to=TensorProto.INT64), one])], axis=1)
    zeros = b.op("ConstantOfShape", [b.op("Concat", [nb, c, taps, block], axis=0)],
                 value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
    w4 = b.op("ScatterND", [zeros, idx, "values"])  # [NB, C, taps, B]
    wt = b.op("Transpose", [w4], perm=[0, 3, 1, 2])  # [NB, B, C, taps]
    ks = b.attr_const("value_ints", "kernel_shape")
    w = b.op("Reshape", [wt, b.op("Concat", [b.const([-1], np.int64), c, ks], axis=0)])
    o1 = b.op("Reshape", [b.attr_const("value_int", "out_channels"), one])
    w = b.op("Slice", [w, zero, o1, zero])  # [O, C, kh, kw]
    conv = helper.make_node("Conv", ["_x", w, "bias"], ["_conv_out"])
    for name in ("kernel_shape", "strides", "pads", "dilations"):
        a = onnx.AttributeProto()
        a.name, a.ref_attr_name, a.type = name, name, onnx.AttributeProto.INTS
        conv.attribute.append(a)
    b.nodes.append(conv)
    b.activation("_conv_out", ("relu", "relu6", "silu"), "_act_out")
    if residual:
        b.nodes.append(helper.make_node("Add", ["_act_out", _to_nchw(b, "residual")], ["_sum_out"]))
    _to_y_layout(b, "_sum_out" if residual else "_act_out", "Y")
    return helper.make_function(
        DOMAIN, "BlockSparseConvAdd" if residual else "BlockSparseConv",
        ["X", "values", "c_index", "row_ptr", "bias", *(["residual"] if residual else [])], ["Y"], b.nodes,
        [helper.make_opsetid("", opset)], attributes=["out_channels", "in_channels", "kernel_shape", "strides", "pads", "dilations"],
        attribute_protos=[_string_default("activation", "none"), helper.make_attribute("x_channel_block", 1),
                          helper.make_attribute("y_channel_block", 1)],
    )


def _depthwise_conv(opset: int) -> onnx.FunctionProto:
    b = _Body(opset)
    conv = helper.make_node("Conv", [_to_nchw(b, "X"), "W", "B"], ["_conv_out"])
    for name, kind in (("group", onnx.AttributeProto.INT), ("kernel_shape", onnx.AttributeProto.INTS),
                       ("strides", onnx.AttributeProto.INTS), ("pads", onnx.AttributeProto.INTS),
                       ("dilations", onnx.AttributeProto.INTS)):
        a = onnx.AttributeProto()
        a.name, a.ref_attr_name, a.type = name, name, kind
        conv.attribute.append(a)
    b.nodes.append(conv)
    b.activation("_conv_out", ("relu", "relu6", "silu"), "_act_out")
    _to_y_layout(b, "_act_out", "Y")
    return helper.make_function(
        DOMAIN, "DepthwiseConv", ["X", "W", "B"], ["Y"], b.nodes, [helper.make_opsetid("", opset)],
        attributes=["group", "kernel_shape", "strides", "pads", "dilations"],
        attribute_protos=[_string_default("activation", "none"), helper.make_attribute("x_channel_block", 1),
                          helper.make_attribute("y_channel_block", 1)],
    )


def _gathered_ffn(opset: int) -> onnx.FunctionProto:
    b = _Body(opset)
    minus1 = b.const([-1], np.int64)
    sel = b.op("Cast", ["experts"], to=TensorProto.INT64)
    d = b.shape("X", start=-1)
    xf = b.op("Reshape", ["X", b.op("Concat", [minus1, d], axis=0)])  # [T, D]

    def project(w: str, bias: str) -> str:  # X @ [selected experts' columns] + bias -> [T, n*S]
        wsel = b.op("Transpose", [b.op("Gather", [w, sel], axis=0)], perm=[1, 0, 2])  # [D, n, S]
        w2 = b.op("Reshape", [wsel, b.op("Concat", [d, minus1], axis=0)])
        bsel = b.op("Reshape", [b.op("Gather", [bias, sel], axis=0), minus1])
        return b.op("Gemm", [xf, w2, bsel])

    up = project("w_up", "b_up")
    gate = project("w_gate", "b_gate")
    b.activation(up, ("relu", "gelu", "silu"), "_act_up")
    b.activation(gate, ("relu", "gelu", "silu"), "_act_gate")
    gated = b.op("Cast", [b.attr_const("value_int", "gated")], to=TensorProto.BOOL)
    h = b.op("Where", [gated, b.op("Mul", ["_act_gate", up]), "_act_up"])  # [T, n*S]
    d_out = b.shape("w_down", start=2)
    wd = b.op("Reshape", [b.op("Gather", ["w_down", sel], axis=0), b.op("Concat", [minus1, d_out], axis=0)])
    y2 = b.op("Gemm", [h, wd, "b_down"])
    b.nodes.append(helper.make_node("Reshape", [y2, b.op("Concat", [b.shape("X", end=-1), d_out], axis=0)], ["Y"]))
    return helper.make_function(
        DOMAIN, "GatheredFFN", ["X", "experts", "w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down"], ["Y"],
        b.nodes, [helper.make_opsetid("", opset)], attributes=[],
        attribute_protos=[helper.make_attribute("gated", 0), _string_default("activation", "none")],
    )


def _routed_ffn(opset: int) -> onnx.FunctionProto:
    """The full FFN with expert e's activated h scaled by routes[..., e] (the kernel skips, per
    chunk, the experts whose routes are all zero; the dense meaning computes them all)."""
    b = _Body(opset)
    minus1 = b.const([-1], np.int64)
    d = b.shape("X", start=-1)
    xf = b.op("Reshape", ["X", b.op("Concat", [minus1, d], axis=0)])  # [T, D]
    s = b.shape("w_up", start=2)

    def project(w: str, bias: str) -> str:  # X @ [all experts' columns] + bias -> [T, E*S]
        w2 = b.op("Reshape", [b.op("Transpose", [w], perm=[1, 0, 2]), b.op("Concat", [d, minus1], axis=0)])
        return b.op("Gemm", [xf, w2, b.op("Reshape", [bias, minus1])])

    up = project("w_up", "b_up")
    gate = project("w_gate", "b_gate")
    b.activation(up, ("relu", "gelu", "silu"), "_act_up")
    b.activation(gate, ("relu", "gelu", "silu"), "_act_gate")
    gated = b.op("Cast", [b.attr_const("value_int", "gated")], to=TensorProto.BOOL)
    h = b.op("Where", [gated, b.op("Mul", ["_act_gate", up]), "_act_up"])  # [T, E*S]
    e = b.shape("w_up", end=1)
    t = b.op("Shape", [xf], end=1)
    h3 = b.op("Reshape", [h, b.op("Concat", [t, e, s], axis=0)])  # [T, E, S]
    r3 = b.op("Reshape", ["routes", b.op("Concat", [t, e, b.const([1], np.int64)], axis=0)])  # [T, E, 1]
    hs = b.op("Reshape", [b.op("Mul", [h3, r3]), b.op("Concat", [t, minus1], axis=0)])
    d_out = b.shape("w_down", start=2)
    wd = b.op("Reshape", ["w_down", b.op("Concat", [minus1, d_out], axis=0)])
    y2 = b.op("Gemm", [hs, wd, "b_down"])
    b.nodes.append(helper.make_node("Reshape", [y2, b.op("Concat", [b.shape("X", end=-1), d_out], axis=0)], ["Y"]))
    return helper.make_function(
        DOMAIN, "RoutedFFN", ["X", "routes", "w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down"], ["Y"],
        b.nodes, [helper.make_opsetid("", opset)], attributes=[],
        attribute_protos=[helper.make_attribute("gated", 0), helper.make_attribute("chunk", 0),
                          _string_default("activation", "none")],
    )


_BUILDERS = {
    "BlockSparseMatMul": _block_sparse_matmul,
    "BlockSparseConv": _block_sparse_conv,
    "BlockSparseConvAdd": lambda opset: _block_sparse_conv(opset, residual=True),
    "DepthwiseConv": _depthwise_conv,
    "GatheredFFN": _gathered_ffn,
    "RoutedFFN": _routed_ffn,
}


def function_protos(opset_import) -> list[onnx.FunctionProto]:
    """Dense-meaning functions of all edgesparse ops, to append to ``model.functions``.

    ``opset_import``: the model's ``opset_import`` list (or its default-domain
    version as an int); bodies use exactly that version (>= 16).
    """
    opset = _opset_version(opset_import)
    if opset < MIN_OPSET:
        from edgesparse.errors import EdgesparseError

        raise EdgesparseError(f"edgesparse operators need default-domain opset >= {MIN_OPSET}, model has {opset}")
    return [build(opset) for build in _BUILDERS.values()]


def attach_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Adds the com.edgesparse opset import and any missing edgesparse functions (in place)."""
    if not any(imp.domain == DOMAIN for imp in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, DOMAIN_VERSION))
    have = {(f.domain, f.name) for f in model.functions}
    for f in function_protos(model.opset_import):
        if (f.domain, f.name) not in have:
            model.functions.append(f)
    return model
