"""Compile the C++ kernel library (csrc/) for a toolchain, cached by content hash.

One shared library holds the ORT glue plus one copy of the pure kernels per ISA
variant (e.g. AVX2 and AVX-512 on x86-64); the best copy the CPU supports is
chosen when the library is loaded (override: ``EDGESPARSE_ISA=generic|avx2|avx512``).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgesparse.errors import EdgesparseError

CSRC = Path(__file__).parent / "csrc"

# Pure kernels (C headers only, portable to wasm32-wasi and bare ARM drivers).
PURE_SOURCES = ("kernels_isa.cpp", "isa_select.cpp")
# ONNX Runtime glue (C++17 with the STL and exceptions).
GLUE_SOURCES = ("ort_common.cpp", "ort_bsmm.cpp", "ort_conv.cpp", "ort_dwconv.cpp", "ort_ffn.cpp", "ort_register.cpp")

# Extra compiler flags and the selecting macro for each ISA variant. "generic"
# (16-byte vectors: SSE2 / NEON / wasm SIMD128) is always compiled in.
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("-DES_ISA_AVX2", "-mavx2", "-mfma", "-mf16c"),
    "avx512": (
        "-DES_ISA_AVX512",
        "-mavx512f",
        "-mavx512vl",
        "-mavx512bw",
        "-mavx512dq",
        "-mavx2",
        "-mfma",
        "-mf16c",
    ),
}

COMMON_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-ffp-contract=fast")

# Debian package that provides a compiler command, for the error message.
_DEBIAN_PACKAGES = {
    "g++": "g++",
    "c++": "g++",
    "clang++": "clang",
    "clang": "clang",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "arm-linux-gnueabihf-g++": "g++-arm-linux-gnueabihf",
}


@dataclass(frozen=True)
class Toolchain:
    """How to compile the kernels for one target."""

    name: str  # e.g. "x86_64-linux", "aarch64-linux", "wasm32-wasi"
    cxx: tuple[str, ...]  # compiler command, e.g. ("g++",) or ("aarch64-linux-gnu-g++",)
    flags: tuple[str, ...] = ()  # extra common flags (e.g. -mcpu=...)
    isa_variants: tuple[str, ...] = ()  # e.g. ("avx2", "avx512"): one library, chosen at load time
    suffix: str = ".so"


X86_64 = Toolchain("x86_64-linux", ("g++",), (), ("avx2", "avx512"))


def host_toolchain() -> Toolchain:
    """The toolchain for kernels that run in this process: x86-64 with every ISA variant, or the
    16-byte code of another machine (an Arm64 board measuring its own dispatch table)."""
    machine = platform.machine()
    return X86_64 if machine in ("x86_64", "AMD64") else Toolchain(f"{machine}-linux", ("g++",))


def default_cache_dir() -> Path:
    env = os.environ.get("EDGESPARSE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgesparse"


def _check_compiler(toolchain: Toolchain) -> None:
    if not toolchain.cxx:
        raise EdgesparseError(f"toolchain {toolchain.name}: empty compiler command")
    exe = toolchain.cxx[0]
    if shutil.which(exe) is None:
        base = os.path.basename(exe)
        pkg = _DEBIAN_PACKAGES.get(base, "the package that provides it")
        raise EdgesparseError(
            f"C++ compiler '{exe}' for {toolchain.name} not found; install Debian package {pkg}"
        )


def _source_files() -> list[Path]:
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".h", ".cpp"))


def _content_hash(toolchain: Toolchain, extra: bytes) -> str:
    h = hashlib.sha256()
    for p in _source_files():
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(repr((toolchain, COMMON_FLAGS, ISA_FLAGS)).encode())
    try:  # the compiler version matters too
        out = subprocess.run([*toolchain.cxx, "--version"], capture_output=True, text=True, timeout=60)
        h.update(out.stdout.encode())
    except (OSError, subprocess.SubprocessError):
        pass
    h.update(extra)
    return h.hexdigest()[:20]


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        first_error = next((line for line in msg if "error" in line), msg[0] if msg else "")
        raise EdgesparseError(f"kernel build failed: {' '.join(cmd[:2])} ...: {first_error}")


def _isa_variants(toolchain: Toolchain) -> list[str]:
    variants = []
    for isa in toolchain.isa_variants:
        if isa in ("generic", "neon", "simd128", "sse2"):
            continue  # served by the always-present 16-byte variant
        if isa not in ISA_FLAGS:
            raise EdgesparseError(
                f"toolchain {toolchain.name}: unknown ISA variant '{isa}' "
                f"(known: generic, neon, simd128, {', '.join(ISA_FLAGS)})"
            )
        variants.append(isa)
    return variants


def _compile_jobs(toolchain: Toolchain, include: Path | None, tmp: Path) -> list[tuple[list[str], Path]]:
    cxx = [*toolchain.cxx, *COMMON_FLAGS, *toolchain.flags]
    jobs = []
    variants = _isa_variants(toolchain)
    for isa in ["generic", *variants]:
        obj = tmp / f"kernels_{isa}.o"
        flags = list(ISA_FLAGS.get(isa, ()))
        cmd = [*cxx, *flags, f"-DES_TABLE_NAME=es_table_{isa}", "-c", str(CSRC / "kernels_isa.cpp"), "-o", str(obj)]
        jobs.append((cmd, obj))
    have = [f"-DES_HAVE_{isa.upper()}" for isa in variants]
    obj = tmp / "isa_select.o"
    jobs.append(([*cxx, *have, "-c", str(CSRC / "isa_select.cpp"), "-o", str(obj)], obj))
    if include is not None:
        for src in GLUE_SOURCES:
            if not (CSRC / src).exists():
                continue
            obj = tmp / (Path(src).stem + ".o")
            jobs.append(([*cxx, f"-I{include}", "-c", str(CSRC / src), "-o", str(obj)], obj))
    return jobs


def _compile_all(jobs: list[tuple[list[str], Path]], tmp: Path) -> list[Path]:
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with cf.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda job: _run(job[0], tmp), jobs))
    return [obj for _, obj in jobs]


def _atomic_publish(tmp_dir: Path, final_dir: Path) -> None:
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp_dir, final_dir)
    except OSError:
        if not final_dir.exists():  # someone else won the race: keep theirs
            raise


def build_library(toolchain: Toolchain = X86_64, cache_dir: Path | None = None) -> Path:
    """Compile csrc/ into ONE shared library for ``SessionOptions.register_custom_ops_library``.

    Cached under ``<cache>/kernels/<hash>/`` (hash of sources, toolchain and flags);
    the build runs in a temporary directory that is renamed into place.
    Raises EdgesparseError with a one-line message when the compiler is missing.
    """
    if toolchain.name.startswith("wasm"):
        raise EdgesparseError(
            f"toolchain {toolchain.name}: ONNX Runtime custom-op libraries cannot be loaded there; "
            "use edgesparse.kernels.build_kernel_archive for the pure kernels"
        )
    from edgesparse.kernels.ort_headers import ort_include_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _check_compiler(toolchain)
    include = ort_include_dir(cache)
    api_header = (include / "onnxruntime_c_api.h").read_bytes()
    digest = _content_hash(toolchain, hashlib.sha256(api_header).digest())
    final_dir = cache / "kernels" / digest
    lib_name = f"libedgesparse_kernels{toolchain.suffix}"
    lib = final_dir / lib_name
    if lib.exists():
        return lib
    (cache / "kernels").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache / "kernels"))
    try:
        objs = _compile_all(_compile_jobs(toolchain, include, tmp), tmp)
        link = [*toolchain.cxx, *toolchain.flags, "-shared", "-o", str(tmp / lib_name), *map(str, objs)]
        if "linux" in toolchain.name:
            link.append("-Wl,--no-undefined")
        _run(link, tmp)
        for obj in objs:
            obj.unlink()
        _atomic_publish(tmp, final_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return lib


def build_kernel_archive(toolchain: Toolchain, cache_dir: Path | None = None, ar: str | None = None) -> Path:
    """Compile only the pure kernels (C ABI in csrc/es_kernels.h, no ORT) into a
    static archive ``libedgesparse_pure.a`` for test drivers (ARM under qemu,
    wasm32-wasi). ``ar`` defaults to llvm-ar for wasm toolchains, else ``ar``."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _check_compiler(toolchain)
    ar = ar or ("llvm-ar" if toolchain.name.startswith("wasm") else "ar")
    if shutil.which(ar) is None:
        pkg = "llvm" if "llvm" in ar else "binutils"
        raise EdgesparseError(f"archiver '{ar}' not found; install Debian package {pkg}")
    digest = _content_hash(toolchain, b"pure")
    final_dir = cache / "kernels" / digest
    lib = final_dir / "libedgesparse_pure.a"
    if lib.exists():
        return lib
    (cache / "kernels").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache / "kernels"))
    try:
        objs = _compile_all(_compile_jobs(toolchain, None, tmp), tmp)
        _run([ar, "rcs", str(tmp / lib.name), *map(str, objs)], tmp)
        for obj in objs:
            obj.unlink()
        _atomic_publish(tmp, final_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return lib
