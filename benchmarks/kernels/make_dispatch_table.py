"""Regenerate edgesparse/kernels/dispatch_table.json from measurements on this machine.

    .venv/bin/python benchmarks/kernels/make_dispatch_table.py [--quick] [--isa avx512,avx2]
        [--threads 1,2] [--out PATH] [--raw raw.json]

For every (op, isa, threads, block, shape, tokens) case the sparse kernel and
ORT's dense kernel are timed side by side (edgesparse.kernels.bench) at several
sparsities; the entry keeps the measured speedups and the break-even sparsity
(lowest sparsity from which the sparse kernel wins by MARGIN at that and every
higher measured sparsity, using the more pessimistic of the median ratio and
the paired per-round ratio). ISAs other than the machine's best are measured by
forcing the library's choice with EDGESPARSE_ISA (ORT's dense kernel keeps
using the best ISA, so those entries are pessimistic: conservative).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edgesparse.kernels import X86_64, build_library  # noqa: E402
from edgesparse.kernels.bench import bench_conv_case, bench_matmul_case, machine_info  # noqa: E402
from edgesparse.kernels.dispatch import TABLE_PATH, current_isa  # noqa: E402

MARGIN = 1.1
MATMUL_SIZES = ((384, 384), (384, 1536), (1536, 384), (768, 3072), (3072, 768), (1024, 4096))
MATMUL_TOKENS = (1, 8, 64)
MATMUL_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
# (C, O, H=W, kernel, stride). The rule only trusts sizes down to half the smallest measured at the
# nearest token count, so each spatial size carries small and large pointwise layers (MobileNet-style
# networks run 128-512 channels at 7x7-28x28).
CONV_SHAPES = ((64, 64, 56, 1, 1), (128, 128, 28, 1, 1), (128, 128, 14, 1, 1), (256, 256, 14, 1, 1),
               (256, 256, 7, 1, 1), (512, 512, 7, 1, 1), (1024, 1024, 7, 1, 1), (64, 64, 56, 3, 1),
               (128, 128, 28, 3, 1), (128, 256, 28, 3, 2), (256, 256, 14, 3, 1))  # fmt: skip
CONV_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9)
BLOCKS = (4, 8, 16)


def break_even(points: list[tuple[float, float]], margin: float = MARGIN) -> float | None:
    """Lowest sparsity s with speedup >= margin at s and every higher measured sparsity."""
    best = None
    for sp, speedup in sorted(points, reverse=True):
        if speedup < margin:
            break
        best = sp
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few shapes, short timings (smoke test)")
    ap.add_argument("--isa", default=None, help="comma-separated ISAs (default: this machine's)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--ops", default="matmul,conv")
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of timing per case")
    ap.add_argument("--out", default=str(TABLE_PATH))
    ap.add_argument("--raw", default=None, help="also write every measured record here")
    ap.add_argument("--blocks", default=",".join(map(str, BLOCKS)))
    ap.add_argument("--conv-shapes", default=None, metavar="C:O:HW:K:S,...",
                    help="measure only these conv shapes (default: CONV_SHAPES); with --merge, adds to the table")
    ap.add_argument("--merge", action="store_true",
                    help="keep entries of --out that this run does not re-measure (e.g. other thread counts)")
    args = ap.parse_args()

    lib = build_library(X86_64)
    isas = args.isa.split(",") if args.isa else [current_isa()]
    threads = [int(t) for t in args.threads.split(",")]
    ops = args.ops.split(",")
    sizes = MATMUL_SIZES[:2] if args.quick else MATMUL_SIZES
    conv_shapes = CONV_SHAPES[:2] if args.quick else CONV_SHAPES
    if args.conv_shapes:
        conv_shapes = [tuple(int(v) for v in spec.split(":")) for spec in args.conv_shapes.split(",")]
    blocks = (16,) if args.quick else tuple(int(b) for b in args.blocks.split(","))
    entries, raw = [], []
    kept = []
    if args.merge and Path(args.out).exists():
        kept = json.loads(Path(args.out).read_text()).get("entries", [])
    start = time.time()

    def key(e):
        return (e["op"], e["isa"], e["threads"], e["block"], json.dumps(e["shape"], sort_keys=True), e["tokens"])

    def save():  # after every entry, so an interrupted run keeps what it measured
        mine = {key(e) for e in entries}
        table = {
            "version": 1,
            "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(),
            "margin": MARGIN,
            "note": "regenerate with benchmarks/kernels/make_dispatch_table.py; speedup = ORT dense / sparse, "
                    "min(median ratio, paired per-round ratio)",
            "entries": [e for e in kept if key(e) not in mine] + entries,
        }  # fmt: skip
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1) + "\n")
        os.replace(tmp, args.out)
        if args.raw:
            Path(args.raw).write_text(json.dumps(raw, indent=1) + "\n")

    for isa in isas:
        os.environ["EDGESPARSE_ISA"] = isa  # read by the library when each session creates its kernels
        for t in threads:
            for block in blocks:
                if "matmul" in ops:
                    for k, n in sizes:
                        for m in MATMUL_TOKENS:
                            points = []
                            for sp in MATMUL_SPARSITIES:
                                r = bench_matmul_case(lib, m, k, n, sp, block, t, budget_s=args.budget)
                                r["isa"] = isa
                                raw.append(r)
                                points.append((sp, round(min(r["speedup"], r["paired_speedup"]), 3)))
                            entries.append({
                                "op": "BlockSparseMatMul", "isa": isa, "threads": t, "block": block,
                                "shape": {"K": k, "N": n}, "tokens": m, "size": k * n, "kind": [],
                                "points": points, "break_even": break_even(points),
                            })  # fmt: skip
                            save()
                            print(f"[{time.time() - start:6.0f}s] {isa} t={t} B={block} M={m} K={k} N={n}: "
                                  f"{points} -> {entries[-1]['break_even']}", flush=True)  # fmt: skip
                if "conv" in ops and block in (8, 16):
                    for c, o, hw, kernel, stride in conv_shapes:
                        points = []
                        for sp in CONV_SPARSITIES:
                            r = bench_conv_case(lib, c, o, hw, kernel, stride, sp, block, t, budget_s=args.budget)
                            r["isa"] = isa
                            raw.append(r)
                            points.append((sp, round(min(r["speedup"], r["paired_speedup"]), 3)))
                        entries.append({
                            "op": "BlockSparseConv", "isa": isa, "threads": t, "block": block,
                            "shape": {"C": c, "O": o, "H": hw, "W": hw, "kernel": kernel, "stride": stride},
                            "tokens": (hw // stride) ** 2, "size": c * o * kernel * kernel, "kind": [kernel, stride],
                            "points": points, "break_even": break_even(points),
                        })  # fmt: skip
                        save()
                        print(f"[{time.time() - start:6.0f}s] {isa} t={t} B={block} conv C={c} O={o} HW={hw} "
                              f"k={kernel} s={stride}: {points} -> {entries[-1]['break_even']}", flush=True)  # fmt: skip
    os.environ.pop("EDGESPARSE_ISA", None)
    print(f"wrote {len(entries)} entries to {args.out} in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
