"""The tensor file ("ESBT") that carries inputs to and outputs from programs running under qemu.

    "ESBT" | u32 version = 1 | u32 count | count x tensor
    tensor: u32 name_len | name (UTF-8) | i32 element type (ONNX TensorProto numbering)
            | u32 rank | i64 dims[rank] | data, row major, little-endian

The C side is csrc/es_run.c (and tests/csrc/bsmm_driver.c)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from edgesparse import EdgesparseError

MAGIC = b"ESBT"
VERSION = 1
_SUPPORTED = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT8, TensorProto.UINT8,
              TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64,
              TensorProto.UINT64, TensorProto.BOOL)


def _element_type(array: np.ndarray) -> int:
    try:
        code = helper.np_dtype_to_tensor_dtype(array.dtype)
    except (KeyError, TypeError, ValueError):
        code = None
    if code not in _SUPPORTED:
        raise EdgesparseError(f"tensors of dtype {array.dtype} cannot be passed to the aarch64 runner")
    return code


def write(path: Path, tensors: list[tuple[str, np.ndarray]]) -> None:
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<II", VERSION, len(tensors)))
        for name, array in tensors:
            array = np.asarray(array)  # tobytes() writes C order; ascontiguousarray would make 0-d 1-d
            raw = name.encode()
            dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
            f.write(struct.pack("<I", len(raw)) + raw)
            f.write(struct.pack("<iI", _element_type(array), array.ndim))
            f.write(struct.pack(f"<{array.ndim}q", *array.shape))
            f.write(array.astype(dtype, copy=False).tobytes())


def read(path: Path) -> list[tuple[str, np.ndarray]]:
    data = Path(path).read_bytes()
    if data[:4] != MAGIC or len(data) < 12:
        raise EdgesparseError(f"{path} is not a tensor file")
    version, count = struct.unpack_from("<II", data, 4)
    if version != VERSION:
        raise EdgesparseError(f"{path}: tensor file version {version} (expected {VERSION})")
    pos, out = 12, []
    try:
        for _ in range(count):
            (length,) = struct.unpack_from("<I", data, pos)
            name = data[pos + 4:pos + 4 + length].decode()
            pos += 4 + length
            code, rank = struct.unpack_from("<iI", data, pos)
            pos += 8
            shape = struct.unpack_from(f"<{rank}q", data, pos)
            pos += 8 * rank
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(code)).newbyteorder("<")
            size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if pos + size > len(data):
                raise EdgesparseError(f"{path} is truncated")
            flat = np.frombuffer(data, dtype, count=size // dtype.itemsize, offset=pos) if size else np.empty(0, dtype)
            out.append((name, flat.reshape(shape).copy()))
            pos += size
    except struct.error:
        raise EdgesparseError(f"{path} is truncated") from None
    return out
