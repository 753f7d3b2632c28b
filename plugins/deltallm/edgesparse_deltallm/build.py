"""Compile the deltallm kernel library (csrc/) for a toolchain, cached by content hash.

One shared library: the ONNX Runtime glue plus one copy of the kernel per ISA the toolchain
names (x86: AVX2 and AVX-512; always a 16-byte generic copy that also serves ARM NEON), picked
when the library loads (override with DELTALLM_ISA=generic|avx2|avx512). Links only libc and
libstdc++. Headers: ONNX Runtime's C API, located by edgesparse.kernels.ort_include_dir().
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
LIBRARY = "libedgesparse_deltallm"
COMMON = ("-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=fast", "-fno-math-errno")
VARIANTS = {  # name: (vector floats, flags)
    "generic": (4, ()),
    "avx2": (8, ("-mavx2", "-mfma")),
    "avx512": (16, ("-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma")),
}


def _cache_root() -> Path:
    env = os.environ.get("EDGESPARSE_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "edgesparse") / "deltallm"


def _variants(toolchain) -> list[str]:
    wanted = ["generic"]
    for isa in getattr(toolchain, "isa_variants", ()) or ():
        if isa in VARIANTS and isa not in wanted:
            wanted.append(isa)
    return wanted


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        first = next((line for line in lines if "error" in line), lines[0] if lines else "")
        raise EdgesparseError(f"deltallm kernel build failed: {' '.join(cmd[:2])} ...: {first}")


def build_library(toolchain=None, cache_dir: Path | None = None) -> Path:
    """Compile (or reuse) the library for `toolchain` (default: the host's x86-64 one)."""
    from edgesparse.kernels import X86_64, ort_include_dir

    toolchain = toolchain or X86_64
    if toolchain.name.startswith("wasm"):
        raise EdgesparseError(f"deltallm: ONNX Runtime custom-op libraries cannot be loaded on {toolchain.name}")
    cxx = list(toolchain.cxx)
    if not cxx or shutil.which(cxx[0]) is None:
        raise EdgesparseError(f"deltallm: C++ compiler '{cxx[0] if cxx else ''}' for {toolchain.name} not found (Debian package g++)")
    include = Path(ort_include_dir())
    variants = _variants(toolchain)
    digest = hashlib.sha256()
    for src in sorted(CSRC.iterdir()):
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    digest.update(repr((toolchain.name, toolchain.cxx, toolchain.flags, variants, COMMON, VARIANTS)).encode())
    digest.update((include / "onnxruntime_c_api.h").read_bytes())
    try:
        digest.update(subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60).stdout.encode())
    except (OSError, subprocess.SubprocessError):
        pass
    root = Path(cache_dir) if cache_dir else _cache_root()
    final = root / digest.hexdigest()[:20]
    lib = final / f"{LIBRARY}{toolchain.suffix}"
    if lib.exists():
        return lib
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        base = [*cxx, *COMMON, *toolchain.flags]
        objects = []
        for isa in variants:
            width, flags = VARIANTS[isa]
            obj = tmp / f"kernel_{isa}.o"
            _run([*base, *flags, f"-DDL_WIDTH={width}", f"-DDL_TABLE_NAME=dl_table_{isa}", f'-DDL_ISA_NAME="{isa}"',
                  "-c", str(CSRC / "delta_kernel.cpp"), "-o", str(obj)], tmp)
            objects.append(obj)
        have = [f"-DDL_HAVE_{isa.upper()}" for isa in variants if isa != "generic"]
        objects.append(tmp / "isa_select.o")
        _run([*base, *have, "-c", str(CSRC / "isa_select.cpp"), "-o", str(objects[-1])], tmp)
        objects.append(tmp / "ort_delta.o")
        _run([*base, f"-I{include}", "-c", str(CSRC / "ort_delta.cpp"), "-o", str(objects[-1])], tmp)
        link = [*cxx, *toolchain.flags, "-shared", "-o", str(tmp / lib.name), *map(str, objects)]
        if "linux" in toolchain.name:
            link.append("-Wl,--no-undefined")
        _run(link, tmp)
        for obj in objects:
            obj.unlink()
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return lib
