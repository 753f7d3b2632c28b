"""Fashion-MNIST (60k train / 10k test, 28x28 grey images of 10 clothing classes), fetched once from
Debian's `dataset-fashion-mnist` package with `apt-get download` into the edgesparse cache (a private
sources list and state directory: the machine's apt configuration is not touched, no root needed).

    python samples/sparsebytenn/data.py     # fetch and print the split sizes
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

PACKAGE = "dataset-fashion-mnist"
SOURCES = "deb http://deb.debian.org/debian bookworm main\n"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MEAN, STD = 0.2860, 0.3530  # of the training images, in [0, 1]


def cache_dir() -> Path:
    root = Path(os.environ.get("EDGESPARSE_CACHE") or Path.home() / ".cache" / "edgesparse")
    return root / "datasets" / "fashion-mnist"


def fetch() -> Path:
    """Directory holding the four idx.gz files (downloaded on first use)."""
    target = cache_dir()
    if all((target / f).is_file() for f in FILES.values()):
        return target
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"fetching Fashion-MNIST needs '{tool}' (Debian/Ubuntu)")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        (work / "lists" / "partial").mkdir(parents=True)
        (work / "sources.list").write_text(SOURCES)
        opts = ["-o", f"Dir::Etc::sourcelist={work / 'sources.list'}", "-o", "Dir::Etc::sourceparts=-",
                "-o", f"Dir::State::Lists={work / 'lists'}"]
        for cmd in (["apt-get", *opts, "update"], ["apt-get", *opts, "download", PACKAGE]):
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[:1] + cmd[-2:])} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
        deb = next(work.glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True, timeout=300)
        src = work / "root" / "usr" / "share" / "datasets" / "fashion-mnist"
        staged = work / "files"
        staged.mkdir()
        for f in FILES.values():
            shutil.copy2(src / f, staged / f)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staged, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images float32 [N, 1, 28, 28] normalised, labels int64 [N])."""
    root = fetch()
    prefix = "train" if split == "train" else "test"
    x = _idx(root / FILES[f"{prefix}_images"]).astype(np.float32) / 255.0
    y = _idx(root / FILES[f"{prefix}_labels"]).astype(np.int64)
    return ((x - MEAN) / STD)[:, None], y


if __name__ == "__main__":
    for split in ("train", "test"):
        x, y = load(split)
        print(split, x.shape, y.shape, np.bincount(y))
