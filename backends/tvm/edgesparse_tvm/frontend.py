"""ONNX (after edgesparse's passes) -> Relax IRModule.

TVM's Relax ONNX frontend imports the standard operators. edgesparse's custom nodes are added to
its converter table for the duration of one import: each BlockSparseMatMul becomes a `call_tir`
of a hand-written TIR kernel (edgesparse_tvm.kernels) specialised for the layer's shape and for
the device being compiled for. Anything the frontend cannot import is reported up front, by name,
with the ORT backend as the way out.
"""
from __future__ import annotations

import contextlib
import os
import re

import numpy as np
import onnx

from edgesparse import EdgesparseError

from . import kernels

DOMAIN = "com.edgesparse"
SUPPORTED_CUSTOM = {"BlockSparseMatMul"}
STANDARD_DOMAINS = ("", "ai.onnx")
DIMS_ENV = "EDGESPARSE_TVM_DIMS"


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Operators (as domain::op) that this backend cannot import, in graph order."""
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map()) | {"If", "Constant"}
    missing = []
    for node in model.graph.node:
        if node.domain == DOMAIN:
            ok = node.op_type in SUPPORTED_CUSTOM
        elif node.domain in STANDARD_DOMAINS:
            ok = node.op_type in known
        else:
            ok = False
        name = f"{node.domain}::{node.op_type}" if node.domain else node.op_type
        if not ok and name not in missing:
            missing.append(name)
    return missing


def pinned_dims(text: str | None = None) -> dict[str, int]:
    """EDGESPARSE_TVM_DIMS="batch=1,seq=64": fix symbolic input dims before import."""
    text = os.environ.get(DIMS_ENV, "") if text is None else text
    dims = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"([^=]+)=(\d+)", item)
        if not m or int(m.group(2)) < 1:
            raise EdgesparseError(f"{DIMS_ENV}: expected name=positive integer, got '{item}'")
        dims[m.group(1).strip()] = int(m.group(2))
    return dims


def _pin(model: onnx.ModelProto, dims: dict[str, int]) -> onnx.ModelProto:
    if not dims:
        return model
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    for value in [*pinned.graph.input, *pinned.graph.output, *pinned.graph.value_info]:
        for d in value.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in dims:
                d.dim_value = dims[d.dim_param]
    return pinned


def _fold_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """With every input dim static, fold the exporter's shape arithmetic (Shape/Gather/Concat...)
    into constants: TVM's frontend rejects Reshapes fed by it (dynamo exports of transformers).
    The model-local functions (dense fallbacks of custom ops) are dropped first so that nothing
    inlines them; TVM does not use them."""
    static = all(d.HasField("dim_value") for v in model.graph.input for d in v.type.tensor_type.shape.dim)
    if not static:
        return model
    try:
        import onnxscript.optimizer
    except ImportError:
        return model
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    del stripped.functions[:]
    with _quiet():
        try:
            return onnxscript.optimizer.optimize(stripped, inline=False)
        except Exception:  # folding is an aid: import the model as it is
            return stripped


class _Importer:
    """Holds the kernel choice (CPU or CUDA) and the kernels already added to the module."""

    def __init__(self, device: str):
        self.device = device
        self.kernels: dict[tuple, object] = {}
        self.calls = 0

    def converter(self):
        importer = self
        from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

        class BlockSparseMatMul(OnnxOpConverter):
            @classmethod
            def _impl_v1(cls, bb, inputs, attr, params):
                return importer.block_sparse_matmul(bb, inputs, attr)

        return BlockSparseMatMul

    def block_sparse_matmul(self, bb, inputs, attr):
        from tvm import relax, tirx
        from tvm.ir.expr import Constant

        name = attr.get("tvm_custom", {}).get("name", "BlockSparseMatMul")
        x, values, k_index, row_ptr = inputs[:4]
        bias = inputs[4] if len(inputs) > 4 else None
        for label, value in (("values", values), ("k_index", k_index), ("row_ptr", row_ptr)):
            if not isinstance(value, Constant):
                raise EdgesparseError(f"BlockSparseMatMul '{name}': {label} must be a constant initializer for the tvm backend")
        if bias is not None and not isinstance(bias, Constant):
            raise EdgesparseError(f"BlockSparseMatMul '{name}': bias must be a constant initializer for the tvm backend")
        activation = attr.get("activation", "none")
        activation = activation.decode() if isinstance(activation, bytes) else str(activation)
        n = int(attr["N"])
        ty = x.ty
        if ty.dtype != "float32":
            raise EdgesparseError(f"BlockSparseMatMul '{name}': input is {ty.dtype}, the kernels take float32")
        shape = list(ty.shape.values)
        if not isinstance(shape[-1], tirx.IntImm):
            raise EdgesparseError(f"BlockSparseMatMul '{name}': the input feature dimension must be static")
        k = int(shape[-1])
        block = int(values.value.shape[1])
        lead = shape[:-1]
        m_expr = lead[0] if lead else tirx.IntImm("int64", 1)
        for d in lead[1:]:
            m_expr = m_expr * d
        m_static = int(m_expr) if isinstance(m_expr, tirx.IntImm) else None
        if isinstance(m_expr, tirx.IntImm):
            m_expr = tirx.IntImm("int64", m_static)
        key = (m_static, k, n, block, activation)
        if key not in self.kernels:
            make = kernels.cpu_kernel if self.device == "cpu" else kernels.cuda_kernel
            func = make(m_static, k, n, block, activation).with_attr("edgesparse.op", "BlockSparseMatMul")
            self.kernels[key] = bb.add_func(func, f"edgesparse_bsmm_{len(self.kernels)}")
        x2 = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, relax.ShapeExpr([m_expr, k])))
        bias = bias if bias is not None else relax.const(np.zeros(n, np.float32))
        y = bb.emit(relax.call_tir(self.kernels[key], [x2, values, k_index, row_ptr, bias],
                                   relax.TensorType([m_expr, n], "float32")))
        self.calls += 1
        if len(shape) != 2:
            y = bb.emit(relax.op.reshape(y, relax.ShapeExpr([*lead, n])))
        return y


@contextlib.contextmanager
def _custom_converters(importer: _Importer):
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    extra = {"BlockSparseMatMul": importer.converter()}
    onnx_frontend._get_convert_map = lambda: {**original(), **extra}
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


@contextlib.contextmanager
def _quiet():
    """Collect what TVM prints while importing (Python prints and C++ log lines on fds 1 and 2), so
    that a failed build still ends with one line; yields a StringIO filled on exit."""
    import gc
    import io
    import sys
    import tempfile

    text = io.StringIO()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            gc.collect()  # TVM warns about unfinished blocks when a failed import is collected
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            text.write(sink.read().decode(errors="replace"))


def import_model(model: onnx.ModelProto, device: str):
    """Relax IRModule of the model with edgesparse kernels for `device` ("cpu" or "cuda"), and
    the number of sparse nodes lowered to a hand-written kernel."""
    from tvm.relax.frontend.onnx import from_onnx

    missing = unsupported_ops(model)
    if missing:
        raise EdgesparseError(
            f"the tvm backend cannot import operator '{missing[0]}' (TVM's Relax ONNX frontend has no converter"
            f"{' and edgesparse has no TIR kernel' if missing[0].startswith(DOMAIN) else ''}); build with --backend ort")
    model = _fold_shapes(_pin(model, pinned_dims()))
    importer = _Importer(device)
    failure = None
    with _custom_converters(importer), _quiet() as chatter:
        try:
            mod = from_onnx(model, keep_params_in_input=False)
        except EdgesparseError:
            raise
        except Exception as exc:  # the frontend's errors are long multi-line traces; keep one line
            failure = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        # leaving the except block frees the failed import, so TVM's complaints land in `chatter`
    if failure is not None:
        op = re.search(r"Error converting operator (\w+)", chatter.getvalue())
        failure = f"operator {op.group(1)}: {failure}" if op else failure
        symbolic = any(d.HasField("dim_param") or not d.HasField("dim_value")
                       for v in model.graph.input for d in v.type.tensor_type.shape.dim)
        hint = f"pin the symbolic input dims with {DIMS_ENV}=name=size,... or " if symbolic else ""
        raise EdgesparseError(f"TVM's Relax ONNX frontend failed to import the model: {failure[:300]} ({hint}build with --backend ort)")
    return mod, importer.calls
