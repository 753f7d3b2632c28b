"""samples/embed_c: the embedding sample, cross-built with its own Makefile and run under qemu on a
snapdragon package, with the kernel library registered (as an app does) and without it."""
from __future__ import annotations

import re
import subprocess

import numpy as np
import onnxruntime as ort
import pytest
from snapdragon_helpers import REPO, manifest

from edgesparse.kernels import ort_include_dir
from edgesparse_snapdragon import emulator, ort_aarch64

SAMPLE = REPO / "samples" / "embed_c"


@pytest.fixture(scope="module")
def embed(tmp_path_factory):
    out = tmp_path_factory.mktemp("embed")
    ort_dir = ort_aarch64.library_dir()
    proc = subprocess.run(["make", "-s", "-C", str(SAMPLE), f"O={out}", f"ORT_INCLUDE={ort_include_dir()}",
                           f"ORT_LIB={ort_dir}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert ort_aarch64.is_aarch64_elf(out / "embed")
    return out / "embed", ort_dir


def parse(stdout: str) -> dict:
    m = re.search(r"output (\S+) shape \[([\d,]+)\] sum (\S+) first((?: \S+)+)", stdout)
    assert m, stdout
    return {"name": m.group(1), "shape": [int(d) for d in m.group(2).split(",")], "sum": float(m.group(3)),
            "first": np.array(m.group(4).split(), np.float64)}


def pattern(shape):
    count = int(np.prod(shape))
    return (((np.arange(count) * 37) % 101).astype(np.float32) / np.float32(50.0) - np.float32(1.0)).reshape(shape)


@pytest.mark.parametrize("with_library", [True, False], ids=["kernel-library", "function-fallback"])
def test_embedding_sample_runs_the_package(embed, snapdragon_package, with_library):
    exe, ort_dir = embed
    m = manifest(snapdragon_package)
    argv = [exe, snapdragon_package / m["runtime"]["model"]]
    if with_library:
        argv += [snapdragon_package / lib for lib in m["runtime"]["custom_op_libraries"]]
    got = parse(emulator.run(argv, env={"LD_LIBRARY_PATH": str(ort_dir)}, what="the embedding sample").stdout)
    # the same input through x86 ORT and the model's dense function bodies
    x = pattern([1, 256])
    want = ort.InferenceSession(str(snapdragon_package / "model.onnx"),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got["name"] == "y" and got["shape"] == [1, 256]
    assert np.abs(got["first"] - want.ravel()[:8]).max() <= 1e-5
    assert abs(got["sum"] - float(want.astype(np.float64).sum())) <= 1e-3


def test_embedding_sample_reports_a_missing_library(embed, snapdragon_package, tmp_path):
    exe, ort_dir = embed
    proc = subprocess.run(emulator.namespaced(emulator.qemu_command(
        [exe, snapdragon_package / "model.onnx", tmp_path / "libnothere.so"], {"LD_LIBRARY_PATH": str(ort_dir)})),
        capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("embed: ") and "libnothere.so" in proc.stderr
