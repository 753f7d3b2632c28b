"""ONNX Runtime for aarch64 Linux: libonnxruntime.so out of PyPI's aarch64 wheel of the same version
as the onnxruntime installed here, fetched once into the edgesparse cache (nothing is installed)."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgesparse import EdgesparseError
from edgesparse.kernels.build import default_cache_dir

PLATFORM = "manylinux_2_28_aarch64"
SONAME = "libonnxruntime.so.1"
_ELF_AARCH64 = 183


def version() -> str:
    try:
        return importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        raise EdgesparseError("onnxruntime is not installed (pip install onnxruntime)") from None


def is_aarch64_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(20)
    return head[:4] == b"\x7fELF" and head[4] == 2 and int.from_bytes(head[18:20], "little") == _ELF_AARCH64


def library_dir(cache: Path | None = None) -> Path:
    """A directory holding libonnxruntime.so.1 for aarch64 Linux (glibc >= 2.28).

    $EDGESPARSE_ORT_AARCH64_DIR if set (for machines without PyPI access), else
    <cache>/ort-aarch64/<version>/, downloaded on first use with pip download."""
    override = os.environ.get("EDGESPARSE_ORT_AARCH64_DIR")
    if override:
        lib = Path(override) / SONAME
        if not lib.is_file() or not is_aarch64_elf(lib):
            raise EdgesparseError(f"EDGESPARSE_ORT_AARCH64_DIR={override} holds no aarch64 {SONAME}")
        return Path(override)
    ver = version()
    final = (cache or default_cache_dir()) / "ort-aarch64" / ver
    if (final / SONAME).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=final.parent))
    try:
        wheel = _download(ver, work)
        staged = work / "lib"
        staged.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist()
                       if m.startswith("onnxruntime/capi/libonnxruntime.so") and not m.endswith(".py")]
            if not members:
                raise EdgesparseError(f"{wheel.name} holds no onnxruntime/capi/libonnxruntime.so*")
            with archive.open(sorted(members, key=len)[-1]) as src, open(staged / SONAME, "wb") as dst:
                shutil.copyfileobj(src, dst)
        if not is_aarch64_elf(staged / SONAME):
            raise EdgesparseError(f"{wheel.name}: libonnxruntime.so is not an aarch64 library")
        (staged / "VERSION").write_text(f"onnxruntime {ver} from {wheel.name}\n")
        try:
            os.rename(staged, final)
        except OSError:
            if not (final / SONAME).is_file():  # another process won the race: keep theirs
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _download(ver: str, work: Path) -> Path:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--platform", PLATFORM, "--python-version", py,
           f"onnxruntime=={ver}", "-d", str(work)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise EdgesparseError(f"downloading the aarch64 onnxruntime {ver} wheel timed out") from None
    wheels = sorted(work.glob("onnxruntime-*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise EdgesparseError(
            f"cannot download onnxruntime=={ver} for {PLATFORM} from PyPI ({lines[-1] if lines else 'no wheel'}); "
            "set EDGESPARSE_ORT_AARCH64_DIR to a folder holding its libonnxruntime.so.1")
    return wheels[0]
