"""Lowering of edgesparse's custom ONNX nodes to `call_tir`s of the hand-written TIR kernels, for
one device ("cpu" or "cuda"). Each function gets the Relax BlockBuilder, the node's imported
inputs and attributes, and a `Kernels` cache (one PrimFunc per distinct specialisation).

Weights must be constant initializers (the kernels are specialised to their shapes; the
sparsity pattern itself is data). Anything outside the operator contracts of docs/kernels.md,
or added to them later without a TIR kernel here, fails with one line naming the node.
"""
from __future__ import annotations

import numpy as np

from edgesparse import EdgesparseError

ORT_HINT = "build with --backend ort"  # the way out; TvmBackend rewords it for TVM-only targets
SUPPORTED = ("BlockSparseMatMul", "BlockSparseConv", "GatheredFFN", "RoutedFFN")


class Kernels:
    """The kernels already added to the module being built, by specialisation."""

    def __init__(self, device: str):
        self.device = device
        self.funcs: dict[tuple, object] = {}
        self.calls = 0

    def get(self, bb, key: tuple, make, label: str, op: str):
        if key not in self.funcs:
            func = make().with_attr("edgesparse.op", op)
            self.funcs[key] = bb.add_func(func, f"edgesparse_{label}_{len(self.funcs)}")
        return self.funcs[key]


def _name(attr, op: str) -> str:
    return attr.get("tvm_custom", {}).get("name", op)


def _text(value, default: str) -> str:
    value = default if value is None else value
    return value.decode() if isinstance(value, bytes) else str(value)


def _constants(op, name, inputs: dict):
    from tvm.ir.expr import Constant

    for label, value in inputs.items():
        if value is not None and not isinstance(value, Constant):
            raise EdgesparseError(f"{op} '{name}': {label} must be a constant initializer for the tvm backend")


def _only(op, name, attr, known, inputs, n_inputs):
    extra = sorted(set(attr) - set(known) - {"tvm_custom"})
    if extra:
        raise EdgesparseError(f"{op} '{name}': attribute '{extra[0]}' is not supported by the tvm backend's kernels; {ORT_HINT}")
    if len(inputs) > n_inputs:
        raise EdgesparseError(f"{op} '{name}': input {n_inputs} and later are not supported by the tvm backend's kernels; {ORT_HINT}")


def _static(dim, op, name, what):
    from tvm import tirx

    if not isinstance(dim, tirx.IntImm):
        raise EdgesparseError(f"{op} '{name}': {what} must be static for the tvm backend (pin symbolic input dims with EDGESPARSE_TVM_DIMS=name=size,...)")
    return int(dim)


def _rows(bb, x, op, name, what):
    """x [..., K] -> (x as [M, K], M as expr, M as int or None, leading dims, K)."""
    from tvm import relax, tirx

    ty = x.ty
    if ty.dtype != "float32":
        raise EdgesparseError(f"{op} '{name}': input is {ty.dtype}, the kernels take float32")
    shape = list(ty.shape.values)
    k = _static(shape[-1], op, name, what)
    lead = shape[:-1]
    m_expr = lead[0] if lead else tirx.IntImm("int64", 1)
    for d in lead[1:]:
        m_expr = m_expr * d
    m_static = int(m_expr) if isinstance(m_expr, tirx.IntImm) else None
    if m_static is not None:
        m_expr = tirx.IntImm("int64", m_static)
    x2 = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, relax.ShapeExpr([m_expr, k])))
    return x2, m_expr, m_static, lead, k


def _unrows(bb, y, lead, n):
    from tvm import relax

    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, relax.ShapeExpr([*lead, n])))


def block_sparse_matmul(bb, inputs, attr, cache: Kernels):
    from tvm import relax

    from . import kernels

    op = "BlockSparseMatMul"
    name = _name(attr, op)
    _only(op, name, attr, ("N", "activation"), inputs, 5)
    x, values, k_index, row_ptr = inputs[:4]
    bias = inputs[4] if len(inputs) > 4 else None
    _constants(op, name, {"values": values, "k_index": k_index, "row_ptr": row_ptr, "bias": bias})
    activation = _text(attr.get("activation"), "none")
    n = int(attr["N"])
    x2, m_expr, m, lead, k = _rows(bb, x, op, name, "the input feature dimension")
    block = int(values.value.shape[1])
    make = kernels.cpu_kernel if cache.device == "cpu" else kernels.cuda_kernel
    func = cache.get(bb, (op, m, k, n, block, activation), lambda: make(m, k, n, block, activation), "bsmm", op)
    bias = bias if bias is not None else relax.const(np.zeros(n, np.float32))
    y = bb.emit(relax.call_tir(func, [x2, values, k_index, row_ptr, bias], relax.TensorType([m_expr, n], "float32")))
    cache.calls += 1
    return _unrows(bb, y, lead, n)


def block_sparse_conv(bb, inputs, attr, cache: Kernels):
    from tvm import relax, tirx

    from . import kernels_conv

    op = "BlockSparseConv"
    name = _name(attr, op)
    _only(op, name, attr, ("out_channels", "in_channels", "kernel_shape", "strides", "pads", "dilations", "activation", "group"), inputs, 5)
    if int(attr.get("group", 1)) != 1:
        raise EdgesparseError(f"{op} '{name}': group={attr['group']} is not supported (only 1, as the operator contract says)")
    x, values, c_index, row_ptr = inputs[:4]
    bias = inputs[4] if len(inputs) > 4 else None
    _constants(op, name, {"values": values, "c_index": c_index, "row_ptr": row_ptr, "bias": bias})
    ty = x.ty
    if ty.dtype != "float32" or len(ty.shape.values) != 4:
        raise EdgesparseError(f"{op} '{name}': input must be float32 NCHW, got {ty.dtype} of rank {len(ty.shape.values)}")
    batch, c, h, w = ty.shape.values
    c, h, w = (_static(d, op, name, "channels, height and width") for d in (c, h, w))
    n_static = int(batch) if isinstance(batch, tirx.IntImm) else None
    o = int(attr["out_channels"])
    kernel_shape = tuple(int(v) for v in attr["kernel_shape"])
    strides = tuple(int(v) for v in attr.get("strides", (1, 1)))
    dilations = tuple(int(v) for v in attr.get("dilations", (1, 1)))
    pt, pl, pb, pr = (int(v) for v in attr.get("pads", (0, 0, 0, 0)))
    activation = _text(attr.get("activation"), "none")
    block = int(values.value.shape[2])
    if any((pt, pl, pb, pr)):  # the kernels compute valid convolutions: pad in the graph
        x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, pt, pb, pl, pr]))
    hp, wp = h + pt + pb, w + pl + pr
    oh = kernels_conv.conv_out_size(hp, kernel_shape[0], strides[0], dilations[0])
    ow = kernels_conv.conv_out_size(wp, kernel_shape[1], strides[1], dilations[1])
    make = kernels_conv.conv_cpu_kernel if cache.device == "cpu" else kernels_conv.conv_cuda_kernel
    key = (op, n_static, c, hp, wp, o, kernel_shape, block, strides, dilations, activation)
    try:
        func = cache.get(bb, key, lambda: make(n_static, c, hp, wp, o, kernel_shape, block, strides, dilations, activation),
                         "bsconv", op)
    except ValueError as exc:
        raise EdgesparseError(f"{op} '{name}': {exc}") from None
    bias = bias if bias is not None else relax.const(np.zeros(o, np.float32))
    out = relax.TensorType([batch, o, oh, ow], "float32")
    y = bb.emit(relax.call_tir(func, [x, values, c_index, row_ptr, bias], out))
    cache.calls += 1
    return y


def gathered_ffn(bb, inputs, attr, cache: Kernels, op: str = "GatheredFFN"):
    """GatheredFFN (experts int32 [n_active]) and RoutedFFN (routes float [..., E], one row per
    token): two call_tirs, up (h = the selected experts' activated neurons) then down."""
    from tvm import relax, tirx

    from . import kernels_ffn

    routed = op == "RoutedFFN"
    name = _name(attr, op)
    _only(op, name, attr, ("gated", "activation") + (("chunk",) if routed else ()), inputs, 8)
    if len(inputs) < 8 or any(v is None for v in inputs[:8]):
        raise EdgesparseError(f"{op} '{name}': needs all 8 inputs (docs/kernels.md)")
    x, selection, w_up, w_gate, w_down, b_up, b_gate, b_down = inputs[:8]
    _constants(op, name, {"w_up": w_up, "w_gate": w_gate, "w_down": w_down, "b_up": b_up, "b_gate": b_gate,
                          "b_down": b_down})
    gated = bool(int(attr.get("gated", 0)))
    activation = _text(attr.get("activation"), "none")
    e, d, s = (int(v) for v in w_up.value.shape)
    d_out = int(w_down.value.shape[2])
    x2, m_expr, m, lead, k = _rows(bb, x, op, name, "the model dimension D")
    if k != d:
        raise EdgesparseError(f"{op} '{name}': input has {k} features, w_up expects {d}")
    if routed:
        # the routes' per-chunk union of the C++ kernel is replaced by a per-token-tile check in
        # the TIR kernels: exact either way, so the `chunk` attribute needs no code here
        if selection.ty.dtype != "float32":
            raise EdgesparseError(f"{op} '{name}': routes must be float32, got {selection.ty.dtype}")
        selection = bb.emit(relax.op.reshape(selection, relax.ShapeExpr([m_expr, e])))
        slots = e
    else:
        if selection.ty.dtype != "int32":
            raise EdgesparseError(f"{op} '{name}': experts must be int32, got {selection.ty.dtype}")
        shape = getattr(selection.ty.shape, "values", None)
        if shape is None or len(shape) != 1:
            selection = bb.match_cast(selection, relax.TensorType([tirx.Var("n_active", "int64")], "int32"))
        slots = selection.ty.shape.values[0]
    try:
        if cache.device == "cpu":
            up = lambda: kernels_ffn.ffn_up_cpu(m, e, d, s, gated, activation, routed=routed)
            down = lambda: kernels_ffn.ffn_down_cpu(m, e, s, d_out, routed=routed)
        else:
            up = lambda: kernels_ffn.ffn_up_cuda(m, e, d, s, gated, activation, routed=routed)
            down = lambda: kernels_ffn.ffn_down_cuda(m, e, s, d_out, routed=routed)
        f_up = cache.get(bb, (op, "up", m, e, d, s, gated, activation), up, "ffn_up", op)
        f_down = cache.get(bb, (op, "down", m, e, s, d_out), down, "ffn_down", op)
    except ValueError as exc:
        raise EdgesparseError(f"{op} '{name}': {exc}") from None
    h = bb.emit(relax.call_tir(f_up, [x2, selection, w_up, w_gate, b_up, b_gate],
                               relax.TensorType([m_expr, slots * s], "float32")))
    y = bb.emit(relax.call_tir(f_down, [h, selection, w_down, b_down], relax.TensorType([m_expr, d_out], "float32")))
    cache.calls += 1
    return _unrows(bb, y, lead, d_out)


def routed_ffn(bb, inputs, attr, cache: Kernels):
    return gathered_ffn(bb, inputs, attr, cache, op="RoutedFFN")


LOWER = {"BlockSparseMatMul": block_sparse_matmul, "BlockSparseConv": block_sparse_conv, "GatheredFFN": gathered_ffn,
         "RoutedFFN": routed_ffn}
