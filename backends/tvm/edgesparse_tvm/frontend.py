"""ONNX (after edgesparse's passes) -> Relax IRModule.

TVM's Relax ONNX frontend imports the standard operators. edgesparse's custom nodes are added to
its converter table for the duration of one import: each BlockSparseMatMul, BlockSparseConv and
GatheredFFN becomes `call_tir`s of hand-written TIR kernels (edgesparse_tvm.ops) specialised for
the layer's shape and for the device being compiled for. Anything the frontend cannot import is reported up front, by name,
with the ORT backend as the way out.
"""
from __future__ import annotations

import contextlib
import os
import re

import onnx

from edgesparse import EdgesparseError

from . import ops
from .ops import ORT_HINT

DOMAIN = "com.edgesparse"
SUPPORTED_CUSTOM = set(ops.SUPPORTED)
STANDARD_DOMAINS = ("", "ai.onnx")
DIMS_ENV = "EDGESPARSE_TVM_DIMS"


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Operators (as domain::op) that this backend cannot import, in graph order."""
    from tvm.relax.frontend.onnx import onnx_frontend

    known = set(onnx_frontend._get_convert_map()) | {"If", "Constant"}
    missing = []
    for node in model.graph.node:
        if node.domain == DOMAIN:
            # the TIR kernels take NCHW only (x/y_channel_block 16 is ORT's NCHW16c kernels)
            ok = node.op_type in SUPPORTED_CUSTOM and all(
                onnx.helper.get_attribute_value(a) == 1 for a in node.attribute if a.name.endswith("_channel_block"))
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
        self.kernels = ops.Kernels(device)

    @property
    def calls(self) -> int:
        return self.kernels.calls

    def converters(self) -> dict:
        from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

        def converter(op: str):
            lower, cache = ops.LOWER[op], self.kernels
            return type(op, (OnnxOpConverter,), {
                "_impl_v1": classmethod(lambda cls, bb, inputs, attr, params: lower(bb, inputs, attr, cache))})

        return {op: converter(op) for op in ops.SUPPORTED}


@contextlib.contextmanager
def _custom_converters(importer: _Importer):
    from tvm.relax.frontend.onnx import onnx_frontend

    original = onnx_frontend._get_convert_map
    extra = importer.converters()
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
            f"{' and edgesparse has no TIR kernel' if missing[0].startswith(DOMAIN) else ''}); {ORT_HINT}")
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
        raise EdgesparseError(f"TVM's Relax ONNX frontend failed to import the model: {failure[:300]} ({hint}{ORT_HINT})")
    return mod, importer.calls
