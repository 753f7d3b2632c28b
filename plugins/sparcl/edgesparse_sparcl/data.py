"""Task streams for class-incremental learning, and Split Fashion-MNIST from Debian's
`dataset-fashion-mnist` package (fetched with `apt-get download` + `dpkg-deb -x` into the cache,
no root install).

A stream is a labelled train/test set plus a list of tasks, each a tuple of class labels. Tasks
must not share classes, and every class a task names must have training and test examples.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgesparse import EdgesparseError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot")
SPLIT_TASKS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def _cache_root() -> Path:
    env = os.environ.get("EDGESPARSE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgesparse"


def fashion_mnist_dir(cache: Path | None = None) -> Path:
    """Folder holding the four idx.gz files, fetched on first use."""
    env = os.environ.get("EDGESPARSE_FASHION_MNIST")
    if env:
        folder = Path(env)
        missing = [f for pair in FILES.values() for f in pair if not (folder / f).is_file()]
        if missing:
            raise EdgesparseError(f"EDGESPARSE_FASHION_MNIST={folder} lacks {missing[0]}")
        return folder
    root = (cache or _cache_root()) / "sparcl" / "datasets" / "fashion-mnist"
    folder = root / "usr" / "share" / "datasets" / "fashion-mnist"
    if all((folder / f).is_file() for pair in FILES.values() for f in pair):
        return folder
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise EdgesparseError(f"fetching Fashion-MNIST needs '{tool}' (Debian) or EDGESPARSE_FASHION_MNIST=<folder of idx.gz files>")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fashion-", dir=root.parent))
    try:
        proc = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp, capture_output=True, text=True)
        debs = list(tmp.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            why = (proc.stderr or proc.stdout).strip().splitlines()
            raise EdgesparseError(f"apt-get download {DEBIAN_PACKAGE} failed: {why[-1] if why else 'no .deb written'}")
        extracted = tmp / "root"
        proc = subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(extracted)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise EdgesparseError(f"dpkg-deb -x {debs[0].name} failed: {proc.stderr.strip()}")
        try:
            os.rename(extracted, root)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not all((folder / f).is_file() for pair in FILES.values() for f in pair):
        raise EdgesparseError(f"the {DEBIAN_PACKAGE} package did not contain the expected idx.gz files under {folder}")
    return folder


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise EdgesparseError(f"{path.name} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise EdgesparseError(f"{path.name} is truncated: {body.size} bytes for shape {dims}")
    return body.reshape(dims)


@dataclass
class TaskStream:
    """Labelled data split into tasks. x: float32 [N, C, H, W] (normalised), y: int64 [N]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    tasks: tuple[tuple[int, ...], ...]
    name: str = "stream"

    def __post_init__(self):
        self.tasks = tuple(tuple(int(c) for c in t) for t in self.tasks)
        check_tasks(self.tasks, self.y_train, self.y_test)

    @property
    def num_classes(self) -> int:
        return int(max(max(t) for t in self.tasks)) + 1

    def task_indices(self, t: int, split: str) -> torch.Tensor:
        y = self.y_train if split == "train" else self.y_test
        return torch.nonzero(torch.isin(y, torch.tensor(self.tasks[t])), as_tuple=False).flatten()

    def train_size(self) -> int:
        return sum(len(self.task_indices(t, "train")) for t in range(len(self.tasks)))

    def fingerprint(self) -> str:
        """Identifies the data a run trained on (checked when a run is resumed)."""
        h = hashlib.sha256(repr(self.tasks).encode())
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes()[: 1 << 20])
            h.update(np.float64(t.double().sum().item()).tobytes())
        return h.hexdigest()[:16]


def check_tasks(tasks, y_train: torch.Tensor, y_test: torch.Tensor) -> None:
    """One-line errors for task lists a class-incremental run cannot use."""
    if not tasks:
        raise EdgesparseError("no tasks given")
    seen: dict[int, int] = {}
    train_classes = set(torch.unique(y_train).tolist())
    test_classes = set(torch.unique(y_test).tolist())
    for i, task in enumerate(tasks):
        if not task:
            raise EdgesparseError(f"task {i} has no classes")
        if len(set(task)) != len(task):
            raise EdgesparseError(f"task {i} lists a class twice: {list(task)}")
        for c in task:
            if c < 0:
                raise EdgesparseError(f"task {i} lists a negative class {c}")
            if c in seen:
                raise EdgesparseError(f"tasks {seen[c]} and {i} both contain class {c}: tasks must not overlap")
            seen[c] = i
            if c not in train_classes:
                raise EdgesparseError(f"task {i} lists class {c}, which has no training examples")
            if c not in test_classes:
                raise EdgesparseError(f"task {i} lists class {c}, which has no test examples")


def parse_tasks(spec: str) -> tuple[tuple[int, ...], ...]:
    """"0,1;2,3;4,5" -> ((0, 1), (2, 3), (4, 5))."""
    tasks = []
    for i, part in enumerate(spec.split(";")):
        try:
            tasks.append(tuple(int(c) for c in part.split(",") if c.strip() != ""))
        except ValueError:
            raise EdgesparseError(f"task {i} in '{spec}' is not a comma-separated list of class numbers") from None
    return tuple(tasks)


def _subset(y: torch.Tensor, tasks, per_task: int | None, seed: int) -> torch.Tensor:
    """Indices of up to per_task examples of each task, balanced over its classes, seeded."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for task in tasks:
        for j, c in enumerate(task):
            idx = torch.nonzero(y == c, as_tuple=False).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            if per_task is not None:
                share = per_task // len(task) + (1 if j < per_task % len(task) else 0)
                idx = idx[:share]
            keep.append(idx)
    return torch.sort(torch.cat(keep)).values


def split_fashion_mnist(tasks=SPLIT_TASKS, train_per_task: int | None = None, test_per_task: int | None = None,
                        seed: int = 0, cache: Path | None = None) -> TaskStream:
    """Split Fashion-MNIST: 5 tasks of 2 classes by default; optional seeded per-task subsets."""
    folder = fashion_mnist_dir(cache)
    arrays = {}
    for split, (images, labels) in FILES.items():
        x = read_idx(folder / images).astype(np.float32) / 255.0
        y = read_idx(folder / labels).astype(np.int64)
        arrays[split] = (torch.from_numpy((x - FASHION_MEAN) / FASHION_STD).unsqueeze(1), torch.from_numpy(y))
    tasks = tuple(tuple(t) for t in tasks)
    check_tasks(tasks, arrays["train"][1], arrays["test"][1])
    xtr, ytr = arrays["train"]
    xte, yte = arrays["test"]
    itr = _subset(ytr, tasks, train_per_task, seed)
    ite = _subset(yte, tasks, test_per_task, seed + 1)
    name = f"split-fashion-mnist({len(tasks)} tasks)"
    return TaskStream(xtr[itr].contiguous(), ytr[itr], xte[ite].contiguous(), yte[ite], tasks, name)
