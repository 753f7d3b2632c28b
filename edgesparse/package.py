"""Writing a package: a folder with manifest.json, the model and the kernel libraries, plus a
single-file .zip of it. Everything is written into a temporary folder beside the destination and
renamed into place at the end, so a failed build leaves nothing behind."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from .errors import EdgesparseError
from .runtime import FORMAT, FORMAT_VERSION, MANIFEST, sha256



def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise EdgesparseError(f"output folder already exists: {out} (use --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgesparseError(f"cannot create the output's folder {out.parent}: {exc.strerror}") from None


@contextlib.contextmanager
def staging_for(out: Path):
    """A temporary folder beside `out`, removed unless it was published."""
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def finalize(staging: Path, manifest: dict) -> dict:
    """Record the checksum of every file and write the manifest last."""
    files = sorted(p for p in staging.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    manifest["files"] = {p.relative_to(staging).as_posix(): sha256(p) for p in files}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def publish(staging: Path, out: Path, force: bool) -> Path:
    """Move the finished package into place and write `<out>.zip` beside it, both atomically."""
    archive_tmp = out.parent / f".{out.name}.zip.tmp"
    with zipfile.ZipFile(archive_tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for p in sorted(staging.rglob("*")):
            if p.is_file():
                archive.write(p, Path(out.name) / p.relative_to(staging))
    if out.exists() and force:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(staging, out)
    os.replace(archive_tmp, out.parent / f"{out.name}.zip")
    return out
