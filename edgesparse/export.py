"""PyTorch -> ONNX export and the checks that run on every model before and after the passes."""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import onnx

from . import external_data
from .errors import EdgesparseError
from .source import TorchModel

OPSET = 18


def export_torch(model: TorchModel) -> onnx.ModelProto:
    """Export with torch's dynamo exporter (the TorchScript one fails on current transformers)."""
    import torch

    module = model.module.eval()
    names = list(model.example_inputs)
    args = tuple(model.example_inputs[n] for n in names)
    axes, shapes = None, _varargs_shapes(module, names, model.dynamic_axes)
    if model.dynamic_axes and shapes is None:  # torch pairs these with the arguments by position: list every input
        axes = {n: model.dynamic_axes.get(n) for n in names}
        axes.update({k: v for k, v in model.dynamic_axes.items() if k not in axes})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad(), _quiet("torch.onnx"):
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    input_names=names,
                    output_names=list(model.output_names),
                    dynamic_axes=axes,
                    dynamic_shapes=shapes,
                    opset_version=OPSET,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgesparseError(f"torch.onnx.export failed: {first}") from exc
        return load_onnx(path)


def _varargs_shapes(module, names: list[str], dynamic_axes: dict) -> dict | None:
    """torch.export's dynamic_shapes for a forward(a, b, *rest) (one input per cache layer, say),
    whose dynamic_axes torch cannot convert: the inputs after the named parameters fill *rest.
    An axis name becomes one shared torch.export.Dim, which also names it in the ONNX graph."""
    import torch

    params = list(inspect.signature(module.forward).parameters.values())
    rest = next((i for i, p in enumerate(params) if p.kind is p.VAR_POSITIONAL), None)
    if rest is None or not dynamic_axes:
        return None
    dims: dict[str, object] = {}

    def spec(name):
        return {int(axis): dims.setdefault(d, torch.export.Dim(d) if d.isidentifier() else torch.export.Dim.DYNAMIC)
                for axis, d in (dynamic_axes.get(name) or {}).items()}

    shapes = {p.name: spec(n) for p, n in zip(params[:rest], names)}
    shapes[params[rest].name] = tuple(spec(n) for n in names[rest:])
    return shapes


def load_onnx(path: Path) -> onnx.ModelProto:
    """The model with its external data (weights in files beside it, as any model over 2 GB has),
    each external file checked first so a missing or short one is named, not a parse error."""
    path = Path(path)
    if not path.is_file():
        raise EdgesparseError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise EdgesparseError(f"cannot read ONNX model {path}: {type(exc).__name__}") from exc
    if not model.graph.node:
        raise EdgesparseError(f"{path} holds no ONNX graph")
    external_data.check_files(model, path)
    if external_data.uses_external(model):
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise EdgesparseError(f"cannot read the external data of {path}: {type(exc).__name__}: {exc}") from exc
    return model


def check(model: onnx.ModelProto, stage: str) -> onnx.ModelProto:
    """Run the ONNX checker and shape inference; a failure names the pipeline stage."""
    try:
        if external_data.is_large(model):  # over protobuf's limit: the tools take it as files
            with external_data.as_file(model) as path:
                with native_output_silenced():
                    onnx.checker.check_model(str(path))
                onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=False, data_prop=True)
                return onnx.load(str(path), load_external_data=True)
        with native_output_silenced():  # the checker prints "Warning: Model contains experimental ops" unbidden
            onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgesparseError(f"invalid ONNX model {stage}: {first}") from exc


@contextlib.contextmanager
def native_output_silenced():
    """Silence what C++ code prints (file descriptors 1 and 2) for a block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


class _quiet:
    """Silence a logger's warnings for a block (the exporter logs optional-package notices)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
