"""Where a MiniLM package's time goes (docs/kernels.md, "Why MiniLM stays at 1.67x on AVX-512"):

1. BlockSparseMatMul against ORT's MatMul at MiniLM's own shapes and token counts (M = 64, 128:
   the bench's 4 x 32 tokens), one thread, 75 % sparse 16 x 1 blocks, interleaved medians;
2. with --package DIR: ORT's profiler on that package and on its dense baseline, one thread, node time per
   op type.

    .venv/bin/python benchmarks/kernels/minilm_breakdown.py --package /tmp/edgesparse-isa-minilm-avx512
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np

SHAPES = ((384, 384), (384, 1536), (1536, 384))  # (K, N): Q/K/V/O, FFN up, FFN down


def kernels(sparsity: float, tokens=(64, 128)) -> None:
    from edgesparse.kernels import bench
    from edgesparse.kernels.build import build_library, host_toolchain

    lib = build_library(host_toolchain())
    for k, n in SHAPES:
        for m in tokens:
            r = bench.bench_matmul_case(lib, m, k, n, sparsity, 16, 1, budget_s=1.5, rounds=61)
            print(f"M={m:4d} K={k:5d} N={n:5d}: dense {r['dense_ms_median']:.4f} ms, sparse {r['sparse_ms_median']:.4f} ms, "
                  f"{r['speedup']:.2f}x (paired {r['paired_speedup']:.2f}x)", flush=True)


def profile(package: Path, runs: int = 30) -> None:
    """ORT's node times for the package and for its dense baseline (what `edgesparse bench` times)."""
    import onnx

    from edgesparse import verify
    from edgesparse.plugins import registry

    manifest = json.loads((package / "manifest.json").read_text())
    data = np.load(package / "verification.npz")
    feed = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
    model = onnx.load(str(package / manifest["runtime"]["model"]))
    domains = set(manifest["runtime"].get("custom_domains", []))
    dense = verify.dense_equivalent(model, [lib for lib in registry().kernels.values() if lib.domain in domains])
    _profile_model(f"{package}", model, [package / lib for lib in manifest["runtime"]["custom_op_libraries"]], feed, runs)
    _profile_model("its dense baseline", dense, [], feed, runs)


def _profile_model(label: str, model, libraries, feed: dict, runs: int) -> None:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        for lib in libraries:
            so.register_custom_ops_library(str(lib))
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
    total = sum(by_op.values())
    print(f"{label}: {total / runs / 1000:.2f} ms of node time per run ({ {k: list(v.shape) for k, v in feed.items()} })")
    for op, us in by_op.most_common(8):
        print(f"  {op:30s} {us / runs / 1000:6.2f} ms  {100 * us / total:5.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--package", type=Path, help="a built MiniLM package (e.g. from isa_checks.sh) to profile")
    args = ap.parse_args()
    kernels(args.sparsity)
    if args.package:
        profile(args.package)


if __name__ == "__main__":
    main()
