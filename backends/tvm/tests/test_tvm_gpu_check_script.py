"""The prepared H200 check (benchmarks/gpu) is not run here (no GPU); keep it at least parseable,
and its conv packer (the GPU machine has no edgesparse) equal to edgesparse's."""
from __future__ import annotations

import importlib.util
import py_compile
import subprocess
from pathlib import Path

import numpy as np

GPU = Path(__file__).resolve().parents[3] / "benchmarks" / "gpu"


def test_gpu_check_scripts_parse():
    subprocess.run(["bash", "-n", str(GPU / "run_h200.sh")], check=True)
    for name in ("bench_h200.py", "prepare.py"):
        py_compile.compile(str(GPU / name), doraise=True)


def test_gpu_check_conv_packer_matches_edgesparse():
    from edgesparse.kernels import pack_block_sparse_conv

    spec = importlib.util.spec_from_file_location("edgesparse_h200_bench", GPU / "bench_h200.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    w = bench.pruned_conv_weight(40, 24, 3, 16, seed=1)
    assert abs((w == 0).reshape(40, 24, -1).all(axis=2).mean() - 0.75) < 0.1
    mine, theirs = bench.pack_conv(w, 16), pack_block_sparse_conv(w, 16)
    for key in theirs:
        np.testing.assert_array_equal(mine[key], theirs[key])
