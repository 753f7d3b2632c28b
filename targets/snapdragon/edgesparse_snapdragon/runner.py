"""es_run, the small C program (csrc/es_run.c) that runs a package under qemu-aarch64 through ONNX
Runtime's C API with the kernel library registered, as an app on the phone does; built once per
source/compiler/header version into <cache>/snapdragon/runner/<hash>/."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgesparse import EdgesparseError
from edgesparse.kernels import ort_include_dir
from edgesparse.kernels.build import default_cache_dir

from . import emulator, ort_aarch64, tensorfile, toolchains

SOURCE = Path(__file__).parent / "csrc" / "es_run.c"


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def compile_c_program(source: Path, name: str, link: list[str], cache: Path | None = None,
                      include: list[Path] = (), static: bool = False, extra: bytes = b"") -> Path:
    """Cross-compile one C source for aarch64 Linux (glibc) with Debian's toolchain, cached by the
    hash of the source, flags, compiler version, headers and `extra`."""
    cache = cache or default_cache_dir()
    tc = toolchains.debian()
    cxx = tc.cxx[0]
    if shutil.which(cxx) is None:
        raise EdgesparseError(f"C++ cross compiler '{cxx}' not found; install Debian package "
                              f"{toolchains.DEBIAN_PACKAGES[cxx]} ({toolchains.SETUP_COMMAND})")
    flags = ["-x", "c", "-std=gnu99", "-O3", "-Wall", *tc.flags, *(f"-I{p}" for p in include)]
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update(repr((flags, link, static, _compiler_version(cxx))).encode())
    for d in include:
        for header in sorted(Path(d).glob("*.h")):
            digest.update(header.name.encode() + header.read_bytes())
    digest.update(extra)
    final = cache / "snapdragon" / name / digest.hexdigest()[:20]
    exe = final / name
    if exe.is_file():
        return exe
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        cmd = [cxx, *flags, str(source), "-x", "none", *link, *(["-static"] if static else []), "-o", str(work / name)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            first = next((ln for ln in lines if "error" in ln), lines[0] if lines else "")
            raise EdgesparseError(f"building {name} for aarch64 failed: {first}")
        try:
            os.rename(work, final)
        except OSError:
            if not exe.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return exe


def build_runner(cache: Path | None = None) -> Path:
    """es_run for aarch64 glibc, linked against the aarch64 libonnxruntime.so.1."""
    ort_dir = ort_aarch64.library_dir(cache)
    return compile_c_program(SOURCE, "es_run", [f"-L{ort_dir}", f"-l:{ort_aarch64.SONAME}"], cache,
                             include=[ort_include_dir(cache)])


def run_model(model: Path, inputs: dict[str, np.ndarray], libraries: list[Path], threads: int = 1,
              profile: bool = False, cache: Path | None = None, timeout: float = 900):
    """Run a model under qemu with ORT for aarch64; (outputs in the model's order, profile events
    or None)."""
    exe = build_runner(cache)
    ort_dir = ort_aarch64.library_dir(cache)
    with tempfile.TemporaryDirectory(prefix="edgesparse-qemu-") as tmp:
        tmp = Path(tmp)
        tensorfile.write(tmp / "inputs.esbt", list(inputs.items()))
        argv = [exe, Path(model).resolve(), tmp / "inputs.esbt", tmp / "outputs.esbt", "--threads", str(threads)]
        for lib in libraries:
            argv += ["--lib", Path(lib).resolve()]
        if profile:
            argv += ["--profile", tmp / "profile"]
        proc = emulator.run(argv, env={"LD_LIBRARY_PATH": str(ort_dir)}, timeout=timeout,
                            what="the package (ONNX Runtime aarch64)")
        outputs = [array for _, array in tensorfile.read(tmp / "outputs.esbt")]
        events = None
        if profile:
            trace = next((ln.split(":", 1)[1].strip() for ln in proc.stdout.splitlines() if ln.startswith("profile:")), None)
            if not trace or not Path(trace).is_file():
                raise EdgesparseError("the aarch64 runner wrote no ONNX Runtime profile")
            events = json.loads(Path(trace).read_text())
    return outputs, events


def kernel_nodes(events: list[dict], custom_ops: set[str], domains: set[str]) -> dict[str, int]:
    """Nodes that executed on a custom kernel, by op type, from ORT's profile: each node's
    '<name>_kernel_time' event names its op. A sparse node ORT replaced by its ONNX function body
    shows up as the function's standard ops instead, so it is not counted."""
    seen: dict[str, set] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        op = event.get("args", {}).get("op_name")
        if op and (op in custom_ops or any(op.startswith(d) for d in domains)):
            seen.setdefault(op, set()).add(name[: -len("_kernel_time")])
    return {op: len(nodes) for op, nodes in seen.items()}
