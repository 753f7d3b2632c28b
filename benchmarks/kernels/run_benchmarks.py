"""Run the kernel benchmarks (edgesparse.kernels.bench) and print/save a markdown table for docs/kernels.md.

    .venv/bin/python benchmarks/kernels/run_benchmarks.py [--quick] [--threads 1,2] [--ops matmul,conv]
        [--json out.json] [--markdown out.md]

Each row: ORT dense vs BlockSparseMatMul / BlockSparseConv timed side by side in
this one process (interleaved rounds, medians, p25-p75 spread), outputs checked.
The summary gives the median speedup over the FFN shapes x M per sparsity and
thread count (the performance bar of the kernel issue).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edgesparse.kernels.bench import machine_info, run_kernel_benchmarks  # noqa: E402


def _spread(r: dict, which: str) -> str:
    return f"{r[f'{which}_ms_p25']:.3f}-{r[f'{which}_ms_p75']:.3f}"


def markdown(records: list[dict], info: dict) -> str:
    lines = [
        f"Measured {info['date']} on {info['cpu']} ({info['machine']}), onnxruntime {info['onnxruntime']}, "
        f"onnx {info['onnx']}, numpy {info['numpy']}, Python {info['python']}, kernel ISA {records[0]['isa']}, "
        f"block {records[0]['block']}. Times are per run (ms, median; p25-p75 in brackets).",
        "",
    ]
    mm = [r for r in records if r["op"] == "BlockSparseMatMul"]
    if mm:
        lines += ["| K x N | M | sparsity | threads | ORT dense ms | sparse ms | speedup |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in mm:
            lines.append(
                f"| {r['K']}x{r['N']} | {r['M']} | {r['sparsity']:.2f} | {r['threads']} | "
                f"{r['dense_ms_median']:.3f} [{_spread(r, 'dense')}] | {r['sparse_ms_median']:.3f} "
                f"[{_spread(r, 'sparse')}] | **{r['speedup']:.2f}x** |"
            )
        lines += ["", "Median speedup over the shapes x M above:", "",
                  "| threads | " + " | ".join(f"{s:.0%} sparse" for s in sorted({r['sparsity'] for r in mm})) + " |",
                  "|---|" + "---|" * len({r['sparsity'] for r in mm})]  # fmt: skip
        for t in sorted({r["threads"] for r in mm}):
            meds = [np.median([r["speedup"] for r in mm if r["threads"] == t and r["sparsity"] == s])
                    for s in sorted({r["sparsity"] for r in mm})]  # fmt: skip
            lines.append(f"| {t} | " + " | ".join(f"{m:.2f}x" for m in meds) + " |")
        lines.append("")
    cv = [r for r in records if r["op"] == "BlockSparseConv"]
    if cv:
        lines += ["| C -> O | HxW | kernel/stride | sparsity | threads | ORT dense ms | sparse ms | speedup |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in cv:
            lines.append(
                f"| {r['C']}->{r['O']} | {r['H']}x{r['W']} | {r['kernel']}x{r['kernel']}/{r['stride']} | "
                f"{r['sparsity']:.2f} | {r['threads']} | {r['dense_ms_median']:.3f} [{_spread(r, 'dense')}] | "
                f"{r['sparse_ms_median']:.3f} [{_spread(r, 'sparse')}] | **{r['speedup']:.2f}x** |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ops", default="matmul,conv")
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    start = time.time()

    def progress(r):
        shape = f"M={r['M']} K={r['K']} N={r['N']}" if "M" in r else f"C={r['C']} O={r['O']} HW={r['H']} k={r['kernel']}"
        print(f"[{time.time() - start:5.0f}s] {r['op']} {shape} sp={r['sparsity']} t={r['threads']}: "
              f"dense {r['dense_ms_median']:.4f} sparse {r['sparse_ms_median']:.4f} -> {r['speedup']:.2f}x", flush=True)

    records = run_kernel_benchmarks(quick=args.quick, threads=[int(t) for t in args.threads.split(",")],
                                    ops=args.ops.split(","), budget_s=args.budget, progress=progress)  # fmt: skip
    info = machine_info() | {"date": dt.date.today().isoformat()}
    md = markdown(records, info)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "records": records}, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(md)


if __name__ == "__main__":
    main()
