"""Model inputs to a build: an .onnx file, a Python factory `path/to/model.py:build` that
returns a TorchModel, or `hf:PATH`, a Hugging Face causal LM (edgesparse/hf.py)."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import EdgesparseError


@dataclass
class TorchModel:
    """What a model factory returns.

    module:          the torch.nn.Module to export (put in eval mode by the build).
    example_inputs:  {input name: tensor}, in forward()'s argument order; used for export.
    dynamic_axes:    {input or output name: {axis: "name"}} for axes whose size varies at run time.
    output_names:    names of the outputs, in order.
    calibration:     optional () -> iterable of {input name: array}: real inputs for passes that
                     calibrate and for the build's verification.
    train:           optional (module, steps: int) -> None: the user's training loop, for passes
                     that fine-tune.
    evaluation:      optional () -> iterable of {input name: array}, like calibration but held out
                     (the passes never see it): the build compares the package with the original
                     model on these batches (see edgesparse.quality).
    evaluate:        optional (run) -> {metric: number}: the user's own measure of one model; `run`
                     maps a list of input batches to a list of {output name: array}. The build
                     calls it on the original model and on the package and records both.
    """

    module: Any
    example_inputs: dict[str, Any]
    output_names: list[str] = field(default_factory=lambda: ["output"])
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    calibration: Callable[[], Iterable[dict]] | None = None
    train: Callable | None = None
    evaluation: Callable[[], Iterable[dict]] | None = None
    evaluate: Callable[[Callable], dict] | None = None


def load_factory(spec: str, calibration_text=None) -> TorchModel:
    """Import `path/to/model.py:build` and call it; `hf:PATH` loads a Hugging Face causal LM
    (edgesparse.hf), calibrated on `calibration_text` when given."""
    if spec.startswith("hf:"):
        from . import hf

        return hf.load(spec[len("hf:"):], calibration_text=calibration_text)
    if calibration_text is not None:
        raise EdgesparseError("--calibration-text is for hf: models; a model factory provides calibration=")
    path_str, _, func = spec.rpartition(":")
    path = Path(path_str)
    if not path.is_file():
        raise EdgesparseError(f"model factory file not found: {path}")
    module_name = f"_edgesparse_model_{abs(hash(path.resolve()))}"
    try:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        raise EdgesparseError(f"cannot import {path}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, func, None)
    if not callable(factory):
        raise EdgesparseError(f"{path} has no function '{func}'")
    try:
        result = factory()
    except EdgesparseError as exc:  # already a user-facing message: keep it, say where it came from
        raise EdgesparseError(f"{spec}: {exc}") from exc
    except Exception as exc:
        raise EdgesparseError(f"{spec} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(result, TorchModel):
        raise EdgesparseError(f"{spec} must return edgesparse.TorchModel, got {type(result).__name__}")
    return result


def is_factory(spec: str) -> bool:
    return ".py:" in spec or spec.startswith("hf:")
