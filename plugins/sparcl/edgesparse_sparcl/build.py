"""Compile the plugin's training kernels (csrc/sparcl_train.cpp) for this machine.

The library is built with -march=native: it runs where the training runs and never ships in a
package. It is cached by a hash of the source, the kernel library's C header, the flags, the
compiler version and the CPU's feature flags, and published with an atomic rename.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgesparse import EdgesparseError

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "sparcl_train.cpp"
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread", "-march=native", "-ffp-contract=fast",
         "-fvisibility=hidden")
LIB_NAME = "libsparcl_train.so"


def _core_csrc() -> Path:
    import edgesparse.kernels as kernels

    return Path(kernels.__file__).parent / "csrc"


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cache_dir() -> Path:
    env = os.environ.get("EDGESPARSE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "edgesparse") / "sparcl"


def build_training_library(cxx: str = "g++") -> Path:
    """Path of the compiled training kernels, building them on first use."""
    if shutil.which(cxx) is None:
        raise EdgesparseError(f"the sparse training kernels need the C++ compiler '{cxx}' (Debian: apt-get install g++)")
    header = _core_csrc() / "es_kernels.h"
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), header.read_bytes(), repr(FLAGS).encode(), _cpu_flags().encode()):
        digest.update(part + b"\0")
    try:
        digest.update(subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.encode())
    except (OSError, subprocess.SubprocessError):
        pass
    final = cache_dir() / digest.hexdigest()[:20]
    lib = final / LIB_NAME
    if lib.exists():
        return lib
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir()))
    try:
        cmd = [cxx, *FLAGS, f"-I{_core_csrc()}", str(SOURCE), "-o", str(tmp / LIB_NAME)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            first = next((line for line in lines if "error" in line), lines[0] if lines else "")
            raise EdgesparseError(f"building the sparse training kernels failed: {first}")
        try:
            os.rename(tmp, final)
        except OSError:
            if not lib.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return lib
