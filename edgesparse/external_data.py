"""Models whose weights live in files beside the .onnx (external data): every model over
protobuf's 2 GB limit is one. Such a model cannot be serialized in one piece, so the checker,
shape inference and ONNX Runtime get it as a file in a temporary folder instead."""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import external_data_helper

from .errors import EdgesparseError

# Above this many bytes of tensor data a model is handled through files (protobuf's limit is 2 GiB;
# the rest of the model needs room too).
LARGE = 1_800_000_000
# Tensors smaller than this stay inside the .onnx when a model is saved with external data.
INLINE_BELOW = 1024


def tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers and Constant values, in subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from tensors(attr.g)
            for g in attr.graphs:
                yield from tensors(g)


def uses_external(model: onnx.ModelProto) -> bool:
    return any(external_data_helper.uses_external_data(t) for t in tensors(model.graph))


def check_files(model: onnx.ModelProto, model_path: Path) -> None:
    """Each external tensor's file exists beside the model and is long enough: one line if not."""
    for tensor in tensors(model.graph):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        file = model_path.parent / info.location
        if not info.location or not file.is_file():
            raise EdgesparseError(f"external data file '{info.location}' of {model_path.name} is missing "
                                  f"(tensor '{tensor.name}'; it belongs beside {model_path})")
        length = info.length
        if length is None:
            try:
                length = int(np.prod(tensor.dims)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            except (TypeError, ValueError):
                continue
        end, size = (info.offset or 0) + length, file.stat().st_size
        if end > size:
            raise EdgesparseError(f"external data file '{info.location}' of {model_path.name} is truncated: tensor "
                                  f"'{tensor.name}' needs {end} bytes, the file has {size}")


def is_large(model: onnx.ModelProto) -> bool:
    return sum(t.ByteSize() for t in tensors(model.graph)) > LARGE  # ByteSize: reading raw_data would copy it


def save(model: onnx.ModelProto, path: Path, location: str) -> None:
    """Write `model` to `path` with its tensor data in `location` beside it, leaving `model` as it
    was (onnx.save(save_as_external_data=True) empties the tensors of the model it is given)."""
    path = Path(path)
    moved = []
    try:
        with open(path.parent / location, "wb") as data:
            for tensor in tensors(model.graph):
                if not tensor.HasField("raw_data") or tensor.ByteSize() < INLINE_BELOW:
                    continue
                raw = tensor.raw_data
                moved.append((tensor, raw))
                offset = data.tell()
                data.write(raw)
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
        onnx.save(model, str(path))
    finally:
        for tensor, raw in moved:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = raw


@contextlib.contextmanager
def as_file(model: onnx.ModelProto) -> Iterator[Path]:
    """The model as a .onnx file with external data in a temporary folder, for the tools that take
    a path when the model is too large to hand over as bytes."""
    with tempfile.TemporaryDirectory(prefix="edgesparse-large-") as tmp:
        path = Path(tmp) / "model.onnx"
        save(model, path, "model.onnx.data")
        yield path
