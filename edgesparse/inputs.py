"""Inputs for calibration and verification: real ones from the model factory or an .npz file,
else generated from the model's input signature."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .errors import EdgesparseError

# Sizes given to dynamic axes when inputs are generated: batch-like first axis 1, others 16.
DEFAULT_DYNAMIC = (1, 16)


def signature(model: onnx.ModelProto, which: str = "input") -> list[dict]:
    """[{name, dtype, shape}] with symbolic dims as strings."""
    initializers = {i.name for i in model.graph.initializer}
    values = model.graph.input if which == "input" else model.graph.output
    result = []
    for v in values:
        if v.name in initializers:
            continue
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        result.append({
            "name": v.name,
            "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)),
            "shape": dims,
        })
    return result


def generated(model: onnx.ModelProto, count: int = 2, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        batch = {}
        for spec in signature(model):
            shape = [d if isinstance(d, int) else DEFAULT_DYNAMIC[min(i, 1)] for i, d in enumerate(spec["shape"])]
            dtype = np.dtype(spec["dtype"])
            if dtype.kind == "f":
                batch[spec["name"]] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                batch[spec["name"]] = np.ones(shape, dtype)
            else:
                batch[spec["name"]] = rng.integers(0, 10, shape).astype(dtype)
        batches.append(batch)
    return batches


def from_npz(path: Path, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """One batch per .npz file entry set: arrays named like the model's inputs."""
    try:
        data = np.load(path)
    except Exception as exc:
        raise EdgesparseError(f"cannot read inputs file {path}: {type(exc).__name__}") from exc
    specs = signature(model)
    missing = [s["name"] for s in specs if s["name"] not in data]
    if missing:
        raise EdgesparseError(f"inputs file {path} lacks input '{missing[0]}'")
    extra = [n for n in data.files if n not in {s["name"] for s in specs}]
    if extra:
        raise EdgesparseError(f"inputs file {path} holds '{extra[0]}', which is not an input of the model "
                              f"(inputs: {', '.join(s['name'] for s in specs)})")
    for spec in specs:  # caught here, in one line, rather than as an ONNX Runtime error mid-build
        array, shape = data[spec["name"]], spec["shape"]
        fits = not shape or array.ndim == len(shape) and all(not isinstance(d, int) or d == a for d, a in zip(shape, array.shape))
        if not fits:
            raise EdgesparseError(f"inputs file {path}: '{spec['name']}' has shape {list(array.shape)}, "
                                  f"the model takes {shape}")
        if array.dtype != np.dtype(spec["dtype"]):
            raise EdgesparseError(f"inputs file {path}: '{spec['name']}' is {array.dtype}, the model takes {spec['dtype']}")
    return [{s["name"]: data[s["name"]] for s in specs}]


def to_numpy(batch: dict) -> dict[str, np.ndarray]:
    out = {}
    for name, value in batch.items():
        out[name] = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    return out
