"""Locate (or fetch once) the ONNX Runtime 1.21 C/C++ headers the glue compiles against.

Headers of API version 21 load into any newer runtime (pip's 1.32 included).
Fetching uses ``apt-get download`` of Debian trixie's libonnxruntime-dev with a
private sources list and state directory, so the machine's apt configuration
is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgesparse.errors import EdgesparseError

ORT_HEADERS_VERSION = "1.21"
_SOURCES_LINE = "deb http://deb.debian.org/debian trixie main\n"
_PACKAGE = "libonnxruntime-dev"


def _has_headers(path: Path) -> bool:
    return (path / "onnxruntime_cxx_api.h").is_file() and (path / "onnxruntime_c_api.h").is_file()


def ort_include_dir(cache_dir: Path | None = None) -> Path:
    """Directory containing ``onnxruntime_cxx_api.h``.

    ``$ORT_INCLUDE_DIR`` if set; else ``<cache>/ort-headers/1.21/``; else the
    headers are fetched into that directory first.
    """
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        path = Path(env)
        if not _has_headers(path):
            raise EdgesparseError(f"ORT_INCLUDE_DIR={env} does not contain onnxruntime_cxx_api.h")
        return path
    from edgesparse.kernels.build import default_cache_dir

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "ort-headers" / ORT_HEADERS_VERSION
    if _has_headers(target):
        return target
    _fetch(target)
    return target


def _fetch(target: Path) -> None:
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise EdgesparseError(
                f"ONNX Runtime headers not found and '{tool}' is unavailable to fetch them; "
                f"set ORT_INCLUDE_DIR to a directory with onnxruntime_cxx_api.h (ORT >= {ORT_HEADERS_VERSION})"
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "sources.list").write_text(_SOURCES_LINE)
        opts = [
            "-o", f"Dir::Etc::sourcelist={work / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={work / 'lists'}",
        ]  # fmt: skip
        _apt(["apt-get", *opts, "update"], work)
        _apt(["apt-get", *opts, "download", _PACKAGE], work)
        debs = sorted(work.glob(f"{_PACKAGE}_*.deb"))
        if not debs:
            raise EdgesparseError(f"apt-get download {_PACKAGE} produced no .deb file")
        _apt(["dpkg", "-x", str(debs[0]), str(work / "root")], work)
        src = work / "root" / "usr" / "include" / "onnxruntime"
        if not _has_headers(src):
            raise EdgesparseError(f"{debs[0].name} has no usr/include/onnxruntime/onnxruntime_cxx_api.h")
        staged = work / "headers"
        shutil.copytree(src, staged)
        try:
            os.rename(staged, target)
        except OSError:
            if not _has_headers(target):
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _apt(cmd: list[str], cwd: Path) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise EdgesparseError(f"fetching ONNX Runtime headers timed out: {' '.join(cmd[:3])}") from e
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise EdgesparseError(
            f"fetching ONNX Runtime headers failed ({' '.join(cmd[:1] + cmd[-1:])}): {last}; "
            "set ORT_INCLUDE_DIR to skip the download"
        )
