"""PyTorch -> ONNX export and the checks that run on every model before and after the passes."""
from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import onnx

from .errors import EdgesparseError
from .source import TorchModel

OPSET = 18


def export_torch(model: TorchModel) -> onnx.ModelProto:
    """Export with torch's dynamo exporter (the TorchScript one fails on current transformers)."""
    import torch

    module = model.module.eval()
    names = list(model.example_inputs)
    args = tuple(model.example_inputs[n] for n in names)
    axes = None
    if model.dynamic_axes:  # torch pairs these with the arguments by position: list every input, in order
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
                    opset_version=OPSET,
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgesparseError(f"torch.onnx.export failed: {first}") from exc
        return load_onnx(path)


def load_onnx(path: Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.is_file():
        raise EdgesparseError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:
        raise EdgesparseError(f"cannot read ONNX model {path}: {type(exc).__name__}") from exc
    if not model.graph.node:
        raise EdgesparseError(f"{path} holds no ONNX graph")
    return model


def check(model: onnx.ModelProto, stage: str) -> onnx.ModelProto:
    """Run the ONNX checker and shape inference; a failure names the pipeline stage."""
    try:
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgesparseError(f"invalid ONNX model {stage}: {first}") from exc


class _quiet:
    """Silence a logger's warnings for a block (the exporter logs optional-package notices)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
