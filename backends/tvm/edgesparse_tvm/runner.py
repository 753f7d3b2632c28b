"""Run an edgesparse TVM package with TVM's runtime libraries only (no TVM compiler, no edgesparse).

Needs: numpy, the `apache-tvm-ffi` wheel (tvm_ffi, ~5 MB) and TVM's runtime libraries:
libtvm_runtime.so, plus libtvm_runtime_cuda.so for GPU modules (from the apache-tvm wheel's
tvm/lib/ for the device's architecture, or a runtime-only TVM build). They are looked up in
`libdir`, then $TVM_RUNTIME_LIBS, then <package>/runtime/, then an installed `tvm` package's lib/
folder (located without importing it).

    import run                                   # this file, shipped as <package>/tvm/run.py
    model = run.load("path/to/package")          # device picked from the manifest
    outputs = model.run({"x": x})                # numpy in, numpy out
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

DEVICE_TYPES = {"cpu": 1, "cuda": 2}
POOLED_ALLOCATOR = 2
ALIGNMENT = 64
_loaded: dict[str, ctypes.CDLL] = {}


def runtime_dirs(package: Path | None = None, libdir: str | None = None) -> list[Path]:
    dirs = [Path(p) for p in (libdir, os.environ.get("TVM_RUNTIME_LIBS")) if p]
    if package is not None:
        dirs.append(package / "runtime")
    try:
        spec = importlib.util.find_spec("tvm")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) / "lib" for p in spec.submodule_search_locations]
    return dirs


def load_runtime(device: str, package: Path | None = None, libdir: str | None = None) -> None:
    """Load libtvm_runtime (and its CUDA part) globally, so exported modules resolve against it."""
    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime links)

    names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if device == "cuda" else [])
    dirs = runtime_dirs(package, libdir)
    for name in names:
        if name in _loaded:
            continue
        path = next((d / name for d in dirs if (d / name).is_file()), None)
        if path is None:
            raise RuntimeError(f"{name} not found in {', '.join(map(str, dirs)) or 'any folder'}; set TVM_RUNTIME_LIBS")
        _loaded[name] = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


class Model:
    """One compiled module of a package, ready to run."""

    def __init__(self, module_path: Path, device: str, input_names: list[str], threads: int | None = None):
        import tvm_ffi

        if threads:
            config = tvm_ffi.get_global_func("runtime.config_threadpool", allow_missing=True)
            if config is not None:
                config(1, int(threads))
        self.device = device
        self.input_names = input_names
        self._lib = tvm_ffi.load_module(str(module_path))
        self._vm = self._lib["vm_load_executable"]()
        dev = DEVICE_TYPES[device]
        self._vm["vm_initialization"](dev, 0, POOLED_ALLOCATOR, DEVICE_TYPES["cpu"], 0, POOLED_ALLOCATOR)
        self._main = self._vm["main"]
        self._dev = tvm_ffi.device(device, 0)

    def _to_device(self, array: np.ndarray):
        import tvm_ffi

        array = np.ascontiguousarray(array)
        if self.device == "cpu":
            return tvm_ffi.from_dlpack(_aligned(array))
        return copy_in(array, self._dev)

    def _to_numpy(self, tensor) -> np.ndarray:
        if self.device == "cpu":
            return np.from_dlpack(tensor).copy()
        return copy_out(tensor)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise KeyError(f"missing input '{missing[0]}'")
        result = self._main(*[self._to_device(inputs[n]) for n in self.input_names])
        items = list(result) if not hasattr(result, "shape") else [result]
        return [self._to_numpy(t) for t in items]


def copy_in(array: np.ndarray, device):
    """A new runtime tensor on `device` (e.g. the GPU) holding a copy of a numpy array."""
    import tvm_ffi

    array = np.ascontiguousarray(array)
    alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
    tensor = alloc(tvm_ffi.Shape(array.shape), tvm_ffi.dtype(str(array.dtype)), device, "global")
    tvm_ffi.get_global_func("runtime.TVMTensorCopyFromBytes")(tensor, ctypes.c_void_p(array.ctypes.data), array.nbytes)
    return tensor


def copy_out(tensor) -> np.ndarray:
    """A runtime tensor (on any device) copied into a new numpy array."""
    import tvm_ffi

    out = np.empty(tuple(tensor.shape), np.dtype(str(tensor.dtype)))
    tvm_ffi.get_global_func("runtime.TVMTensorCopyToBytes")(tensor, ctypes.c_void_p(out.ctypes.data), out.nbytes)
    return out


def _aligned(array: np.ndarray, alignment: int = ALIGNMENT) -> np.ndarray:
    """TVM's CPU code assumes 64-byte aligned tensors (it may use aligned vector loads); numpy
    guarantees 16. Copy when needed."""
    if array.ctypes.data % alignment == 0:
        return array
    raw = np.empty(array.nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    out = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def load(package, module: str | None = None, libdir: str | None = None, threads: int | None = None) -> Model:
    """The package's module for this machine (or the named entry of runtime.modules)."""
    import platform

    package = Path(package)
    manifest = json.loads((package / "manifest.json").read_text())
    runtime = manifest["runtime"]
    modules = runtime["modules"]
    if module is None:
        here = platform.machine()
        runnable = [m for m in modules if m["machine"] == here]
        if not runnable:
            raise RuntimeError(f"no module of this package runs on {here} (has: {', '.join(m['machine'] for m in modules)})")
        module = runnable[0]["name"]
    entry = next((m for m in modules if m["name"] == module), None)
    if entry is None:
        raise KeyError(f"no module '{module}' in the package")
    load_runtime(entry["device"], package, libdir)
    return Model(package / entry["file"], entry["device"], runtime["input_order"], threads)
