"""Inputs for calibration and verification: real ones from the model factory or an .npz file,
else generated from the model's input signature.

Generated inputs follow the model's dtypes and ranks. Dynamic dims (a name, `-1`, `?` or unset)
take a size from `--input-shape`, else a guess only where a guess is safe: a leading batch dim
(1) or a sequence-like dim (16). A named dim shared by several inputs gets one size. Anything
else (an image's height and width, say) stops the build: a wrong guess fails deep inside the
network with an error that says nothing about the cause.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

from .errors import EdgesparseError

BATCH, SEQUENCE = 1, 16  # sizes given to dynamic dims that can be guessed
# A named dim is sequence-like when its name says so (`sequence_length`, `num_tokens`, `time`...).
_SEQUENCE_NAME = re.compile(r"seq|len|token|time|step|frame|sample|word|char|past|total", re.I)


def signature(model: onnx.ModelProto, which: str = "input") -> list[dict]:
    """[{name, dtype, shape}] with symbolic dims as strings ("?" where unnamed) and shape None
    where the model gives no shape at all."""
    initializers = {i.name for i in model.graph.initializer}
    values = model.graph.input if which == "input" else model.graph.output
    result = []
    for v in values:
        if v.name in initializers:
            continue
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type"):
            raise EdgesparseError(f"{which} '{v.name}' is not a tensor ({v.type.WhichOneof('value')}): "
                                  "edgesparse builds models whose inputs and outputs are tensors")
        dims = None
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
                    for d in t.shape.dim]
        result.append({
            "name": v.name,
            "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else "undefined",
            "shape": dims,
        })
    return result


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """'x=1,3,640,640' -> ('x', [1, 3, 640, 640]); a scalar is 'x='."""
    name, eq, dims = str(text).rpartition("=")
    if not eq or not name:
        raise EdgesparseError(f"--input-shape must be NAME=d0,d1,...: {text!r}")
    try:
        shape = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise EdgesparseError(f"--input-shape {text!r}: dims must be whole numbers") from None
    if any(d < 1 for d in shape):
        raise EdgesparseError(f"--input-shape {text!r}: dims must be at least 1")
    return name, shape


def resolve_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """A concrete shape for every input: fixed dims as the model has them, `given` shapes
    (--input-shape) checked against the model, dynamic dims guessed where that is safe."""
    given = dict(given or {})
    specs = signature(model)
    by_name = {s["name"]: s for s in specs}
    unknown = [n for n in given if n not in by_name]
    if unknown:
        raise EdgesparseError(f"--input-shape names input '{unknown[0]}', which the model lacks "
                              f"(inputs: {', '.join(by_name) or 'none'})")
    bound: dict[str, int] = {}  # named dims -> size, shared by every input that uses the name
    for name, shape in given.items():
        dims = by_name[name]["shape"]
        if dims is None:
            continue
        if len(shape) != len(dims):
            raise EdgesparseError(f"--input-shape {name}={_text(shape)} has {len(shape)} dims; "
                                  f"input '{name}' has {len(dims)}: {_text(dims)}")
        for axis, (want, have) in enumerate(zip(shape, dims)):
            if isinstance(have, int) and have != want:
                raise EdgesparseError(f"--input-shape {name}={_text(shape)} contradicts the model: "
                                      f"dim {axis} of '{name}' is fixed at {have}")
            if isinstance(have, str) and have != "?":
                if bound.setdefault(have, want) != want:
                    raise EdgesparseError(f"--input-shape gives dim '{have}' two sizes: {bound[have]} and {want}")
    for spec in specs:  # guesses for named dims first: an input may use a name another one's guess sizes
        for axis, d in enumerate(spec["shape"] or []):
            if spec["name"] not in given and isinstance(d, str) and d != "?" and d not in bound:
                guess = _guess(spec, axis, d)
                if guess is not None:
                    bound[d] = guess
    shapes = {}
    for spec in specs:
        name, dims = spec["name"], spec["shape"]
        if name in given:
            shapes[name] = given[name]
            continue
        if dims is None:
            raise EdgesparseError(f"input '{name}' has no shape in the model: give --inputs FILE.npz "
                                  f"or --input-shape {name}=d0,d1,...")
        shape, unresolved = [], []
        for axis, d in enumerate(dims):
            if isinstance(d, int):
                shape.append(d)
            elif d != "?" and d in bound:
                shape.append(bound[d])
            else:
                guess = _guess(spec, axis, d)
                if guess is None:
                    unresolved.append(axis)
                elif d != "?":
                    bound[d] = guess
                shape.append(guess)
        if unresolved:
            labels = [dims[a] if dims[a] != "?" else f"d{a}" for a in unresolved]
            example = [labels[unresolved.index(a)] if a in unresolved else shape[a] for a in range(len(dims))]
            raise EdgesparseError(f"input '{name}' has dynamic dims {', '.join(labels)}: give --inputs FILE.npz "
                                  f"or --input-shape {name}={_text(example)}")
        shapes[name] = shape
    return shapes


def _guess(spec: dict, axis: int, dim: str) -> int | None:
    """A size for a dynamic dim only where the guess is safe, else None."""
    rank = len(spec["shape"])
    if axis == 0 and (rank > 1 or dim == "?" or "batch" in dim.lower()):
        return BATCH
    if dim != "?" and _SEQUENCE_NAME.search(dim):
        return SEQUENCE
    if rank == 2 and axis == 1 and np.dtype(spec["dtype"]).kind in "iu":  # token ids / masks [batch, seq]
        return SEQUENCE
    if rank == 3 and axis == 1 and isinstance(spec["shape"][2], int):  # [batch, tokens, features]
        return SEQUENCE
    return None


def _text(dims) -> str:
    return ",".join(str(d) for d in dims)


def generated(model: onnx.ModelProto, count: int = 2, seed: int = 0,
              shapes: dict[str, list[int]] | None = None) -> list[dict[str, np.ndarray]]:
    """`count` random batches for the model's inputs, shaped by resolve_shapes(model, shapes)."""
    resolved = resolve_shapes(model, shapes)
    dtypes = {s["name"]: s["dtype"] for s in signature(model)}
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        batch = {}
        for name, shape in resolved.items():
            try:
                dtype = np.dtype(dtypes[name])
            except TypeError:
                dtype = np.dtype(object)
            if dtype.kind == "f":
                batch[name] = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                batch[name] = np.ones(shape, dtype)
            elif dtype.kind in "iu" and "mask" in name.lower():  # attention masks: attend everywhere
                batch[name] = np.ones(shape, dtype)
            elif dtype.kind in "iu" and "type" in name.lower():  # token_type_ids: one segment
                batch[name] = np.zeros(shape, dtype)
            elif dtype.kind in "iu":  # token ids and the like: small values every vocabulary has
                batch[name] = rng.integers(0, 10, shape).astype(dtype)
            else:
                raise EdgesparseError(f"input '{name}' is of type {dtypes[name]}, which edgesparse cannot generate: "
                                      "give --inputs FILE.npz")
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
