"""Benchmark smoke tests: the harness runs, checks outputs, and the sparse kernel wins where it must."""

from __future__ import annotations

from edgesparse.kernels.bench import bench_conv_case, bench_matmul_case, run_kernel_benchmarks


def test_sparse_matmul_beats_dense_at_90_percent(kernel_lib, monkeypatch):
    monkeypatch.delenv("EDGESPARSE_ISA", raising=False)
    rec = bench_matmul_case(kernel_lib, 1, 1024, 1024, 0.9, 16, 1, budget_s=0.5)
    assert rec["max_abs_error"] < 1e-3
    assert rec["speedup"] > 1.0, rec


def test_quick_benchmark_records(kernel_lib):
    recs = run_kernel_benchmarks(quick=True, threads=(1,), ops=("matmul",), sparsities=(0.9,), tokens=(1,),
                                 budget_s=0.05, lib=kernel_lib)
    keys = {"op", "M", "K", "N", "block", "sparsity", "threads", "isa", "dense_ms_median", "sparse_ms_median",
            "dense_ms_p25", "dense_ms_p75", "sparse_ms_min", "sparse_ms_max", "speedup"}
    assert recs and all(keys <= set(r) for r in recs)
    conv = bench_conv_case(kernel_lib, 64, 64, 14, 3, 1, 0.75, 16, 1, budget_s=0.05)
    assert conv["op"] == "BlockSparseConv" and conv["speedup"] > 0


def test_direct_kernel_harness_runs(kernel_lib):
    """benchmarks/kernels/direct_bsmm.py (the kernel alone, docs/kernels.md) on a small case."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "direct_bsmm.py"
    out = subprocess.run([sys.executable, str(script), "--k", "64", "--n", "48", "--m", "8", "--reps", "5",
                          "--flush-mb", "1", "--lib", str(kernel_lib)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "GFLOP/s" in out.stdout and "M=8" in out.stdout


def test_package_ab_harness_runs(built_mlp, kernel_lib):
    """benchmarks/kernels/ab_package.py (package-level library A/Bs, docs/kernels.md) on a small package."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels" / "ab_package.py"
    out = subprocess.run([sys.executable, str(script), str(built_mlp), str(kernel_lib), str(kernel_lib),
                          "--rounds", "5", "--budget-s", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[0].strip().startswith("dense:") and all("speedup" in line for line in lines)
