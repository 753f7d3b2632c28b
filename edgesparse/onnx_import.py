"""ONNX files from other exporters, made ready for the passes: initializers that old IR versions
list as graph inputs become plain constants, the model must run in ONNX Runtime on the build's
inputs, and a model below the opset edgesparse's operators need is upgraded with onnx's version
converter and checked against the original before any pass sees it."""
from __future__ import annotations

import re

import numpy as np
import onnx
import onnx.version_converter

from . import verify
from .errors import EdgesparseError
from .export import native_output_silenced
from .kernels.onnx_functions import MIN_OPSET

INPUT_HINT = "give --inputs FILE.npz or --input-shape NAME=d0,d1,..."


def prepare(model: onnx.ModelProto, batches: list[dict], tolerance: float, input_kind: str,
            upgrade_to: int = MIN_OPSET) -> tuple[onnx.ModelProto, dict]:
    """The model the passes start from, and a record of what was done to it for the manifest.
    `upgrade_to`: the opset the passes' operators need (0 when no pass emits any)."""
    record: dict = {"opset": default_opset(model), "input_shapes": {k: list(v.shape) for k, v in batches[0].items()}}
    moved = _initializers_out_of_inputs(model)
    if moved:
        record["initializers_as_inputs"] = moved
    original = run(model, batches, input_kind)
    if record["opset"] < upgrade_to:
        model = upgrade(model, upgrade_to)
        converted = run(model, batches, "converted")
        error = verify.max_abs_error(converted, original)
        bound = tolerance * max(1.0, _scale(original))
        record["converted"] = {"from": record["opset"], "to": upgrade_to, "max_abs_error": error, "tolerance": bound}
        if not error <= bound:
            raise EdgesparseError(f"the model converted from opset {record['opset']} to {upgrade_to} differs from the "
                                  f"original by {error:.3g} (tolerance {bound:.3g})")
    return model, record


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def upgrade(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """onnx's version converter, its failure reduced to the op and opset it could not convert."""
    source = default_opset(model)
    try:
        with native_output_silenced():
            converted = onnx.version_converter.convert_version(model, opset)
            onnx.checker.check_model(converted)
        return onnx.shape_inference.infer_shapes(converted, strict_mode=False)
    except Exception as exc:
        raise EdgesparseError(f"cannot convert the model from opset {source} to {opset}: "
                              f"{_conversion_problem(model, str(exc))}") from None


def _conversion_problem(model: onnx.ModelProto, message: str) -> str:
    """The converter's messages bury the op in C++ assertion text: name the op plainly."""
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    found = sorted((message.find(op), -len(op), op) for op in ops if op in message)
    if found:
        return f"op {found[0][2]} has no conversion (give a model exported at opset >= {MIN_OPSET})"
    first = next((line.strip() for line in message.splitlines() if line.strip()), "conversion failed")
    return first[:300]


def run(model: onnx.ModelProto, batches: list[dict], what: str) -> list[list[np.ndarray]]:
    """Run the model on every batch with ONNX Runtime's own kernels; any failure is the model's or
    the inputs', said in one line with what to give instead."""
    try:
        session = verify.dense_session(model)
    except EdgesparseError as exc:
        which = "the opset-converted model" if what == "converted" else "the model"
        raise EdgesparseError(str(exc).replace("dense model", which)) from None
    expected = {i.name for i in session.get_inputs()}
    outputs = []
    for batch in batches:
        try:
            outputs.append(session.run(None, {k: v for k, v in batch.items() if k in expected}))
        except Exception as exc:
            problem = _ort_message(exc)
            if what == "converted":
                raise EdgesparseError(f"the opset-converted model fails in ONNX Runtime: {problem}") from exc
            shapes = " ".join(f"{k}[{','.join(map(str, v.shape))}]" for k, v in batch.items())
            source = "the --inputs file's" if what == "file" else what
            raise EdgesparseError(f"ONNX Runtime cannot run the model on {source} inputs ({shapes}): {problem}; "
                                  f"{INPUT_HINT}") from exc
    return outputs


def _ort_message(exc: Exception) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).split()) or type(exc).__name__  # ORT colours its log text
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    return text[:400]


def _initializers_out_of_inputs(model: onnx.ModelProto) -> int:
    """IR < 4 models list every initializer as a graph input too (overridable defaults): as inputs
    they are not constants, so nothing would be pruned. Nobody feeds them, so make them constants."""
    names = {i.name for i in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in names]
    moved = len(model.graph.input) - len(kept)
    if moved:
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)
    return moved


def _scale(outputs: list[list[np.ndarray]]) -> float:
    return max((float(np.abs(o).max()) for batch in outputs for o in batch
                if isinstance(o, np.ndarray) and o.size and o.dtype.kind in "fiu"), default=1.0)
