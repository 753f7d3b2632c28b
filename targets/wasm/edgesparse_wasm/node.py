"""node and onnxruntime-web: the pinned npm package in edgesparse's cache, and running packages
in node (for verification and benchmarks) with tensors passed through files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgesparse import EdgesparseError
from edgesparse.kernels.build import default_cache_dir

ORT_WEB_VERSION = "1.30.0"  # pinned: the runtime is tested against exactly this version
NODE_MIN_MAJOR = 20
JS = Path(__file__).parent / "js"
SETUP_HINT = "sh targets/wasm/setup_env.sh"

# numpy dtype <-> the names onnxruntime-web's Tensor uses
DTYPES = {"float32": "float32", "float64": "float64", "int64": "int64", "int32": "int32", "int16": "int16",
          "int8": "int8", "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "bool": "bool"}


def check_node() -> str:
    node = shutil.which("node")
    if node is None:
        raise EdgesparseError(f"the wasm target needs node >= {NODE_MIN_MAJOR} (Debian package nodejs) to verify packages")
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, ValueError, subprocess.SubprocessError):
        raise EdgesparseError("cannot run 'node --version'") from None
    if major < NODE_MIN_MAJOR:
        raise EdgesparseError(f"the wasm target needs node >= {NODE_MIN_MAJOR}, found {version}")
    return version


def ort_web_dir() -> Path:
    """node_modules/onnxruntime-web of the pinned version, installed with npm into the cache once."""
    root = default_cache_dir() / "wasm" / "npm" / f"onnxruntime-web-{ORT_WEB_VERSION}"
    pkg = root / "node_modules" / "onnxruntime-web"
    if (pkg / "package.json").is_file():
        return pkg
    npm = shutil.which("npm")
    if npm is None:
        raise EdgesparseError("the wasm target needs npm (Debian package npm, or node's own) to fetch onnxruntime-web")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ortweb-", dir=root.parent))
    try:
        (tmp / "package.json").write_text('{"name": "edgesparse-ortweb-cache", "private": true}\n')
        proc = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error",
             f"onnxruntime-web@{ORT_WEB_VERSION}"],
            cwd=tmp, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            line = next((l for l in proc.stderr.splitlines() if l.strip()), "no output")
            raise EdgesparseError(f"npm install onnxruntime-web@{ORT_WEB_VERSION} failed: {line}")
        try:
            os.rename(tmp, root)
        except OSError:
            if not pkg.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return pkg


def ort_web_node_module() -> Path:
    return ort_web_dir() / "dist" / "ort.node.min.mjs"


def write_tensors(folder: Path, name: str, tensors: dict[str, np.ndarray]) -> None:
    """<name>.json (name, dtype, shape, offset, bytes) + <name>.bin, the format the JS side reads."""
    specs, offset = [], 0
    with open(folder / f"{name}.bin", "wb") as f:
        for key, value in tensors.items():
            value = np.ascontiguousarray(value)
            dtype = str(value.dtype)
            if dtype not in DTYPES:
                raise EdgesparseError(f"input '{key}' has dtype {dtype}, which onnxruntime-web does not take")
            data = value.astype(np.uint8).tobytes() if dtype == "bool" else value.tobytes()
            pad = (-offset) % 16
            f.write(b"\0" * pad)
            offset += pad
            f.write(data)
            specs.append({"name": key, "dtype": DTYPES[dtype], "shape": list(value.shape), "offset": offset,
                          "bytes": len(data)})
            offset += len(data)
    (folder / f"{name}.json").write_text(json.dumps(specs))


def read_tensors(folder: Path, name: str) -> list[tuple[str, np.ndarray]]:
    specs = json.loads((folder / f"{name}.json").read_text())
    blob = (folder / f"{name}.bin").read_bytes()
    out = []
    for s in specs:
        raw = blob[s["offset"]: s["offset"] + s["bytes"]]
        dtype = "uint8" if s["dtype"] == "bool" else s["dtype"]
        array = np.frombuffer(raw, dtype=dtype).reshape(s["shape"]).copy()
        out.append((s["name"], array.astype(bool) if s["dtype"] == "bool" else array))
    return out


def run_script(script: str, *args, timeout: float = 600) -> str:
    """Run one of the node scripts in js/; return its stdout."""
    node = shutil.which("node")
    if node is None:
        check_node()
    proc = subprocess.run([node, str(JS / script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        lines = [l for l in (proc.stderr or proc.stdout).splitlines() if l.strip()]
        message = next((l for l in lines if l.lstrip().startswith(("Error", "EdgesparseError"))), lines[-1] if lines else "")
        raise EdgesparseError(f"node {script} failed: {message.strip()}")
    return proc.stdout


def run_in_node(package_dir: Path, inputs: dict[str, np.ndarray], threads: int = 1,
                dense: bool = False) -> tuple[list[np.ndarray], dict]:
    """Run a package in node with edgesparse.mjs (dense=True: plain onnxruntime-web on model.onnx).
    Returns (outputs in the manifest's order, stats with kernelNodes)."""
    module = ort_web_node_module()
    with tempfile.TemporaryDirectory(prefix="edgesparse-node-") as tmp:
        io = Path(tmp)
        write_tensors(io, "inputs", inputs)
        run_script("run_node.mjs", module, Path(package_dir).resolve(), io, "dense" if dense else "package", threads)
        outputs = [a for _, a in read_tensors(io, "outputs")]
        stats = json.loads((io / "stats.json").read_text())
    return outputs, stats


def bench_in_node(package_dir: Path, dense_model: Path, inputs: dict[str, np.ndarray], rounds: int = 30,
                  budget_s: float = 5.0, threads: int = 1, functions: bool = False) -> dict:
    """The package against plain onnxruntime-web on `dense_model`, interleaved in one node process.
    Returns {"package": {median_ms, p25_ms, p75_ms, rounds}, "dense": {...}, ["functions": {...}],
    "max_abs_diff", "kernel_nodes", "ort_web", "node", "threads"}."""
    module = ort_web_node_module()
    with tempfile.TemporaryDirectory(prefix="edgesparse-bench-") as tmp:
        io = Path(tmp)
        write_tensors(io, "inputs", inputs)
        out = run_script("bench_node.mjs", module, Path(package_dir).resolve(), Path(dense_model).resolve(), io,
                         rounds, budget_s, threads, "functions" if functions else "", timeout=1800)
    return json.loads(out.strip().splitlines()[-1])
