"""Re-measure some BlockSparseMatMul or BlockSparseConv entries of a dispatch table and merge them in.

`edgesparse tune --out FILE --merge` re-measures a whole plan (every block size, the convs); after a
kernel change that only touches some cases this measures just those (the same cases, sparsities
and timing as the full plan, by the same `tune.measure`) and replaces them in FILE, keeping every
other entry as it was (each entry names its CPU and date). FILE's top-level library_hash becomes
this source tree's, as with `tune --merge`.

  .venv/bin/python benchmarks/kernels/retune.py --isa avx512 --block 16 --tokens 64 --threads 1,2
  benchmarks/avx2_host/run.sh .venv/bin/python benchmarks/kernels/retune.py --isa avx2 --block 16 --tokens 1,8,64 --threads 1,2
  .venv/bin/python benchmarks/kernels/retune.py --op conv --isa avx512 --block 8,16 --threads 1,2   # the conv entries
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from edgesparse.kernels import dispatch, tune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--op", choices=("matmul", "conv"), default="matmul")
    ap.add_argument("--isa", required=True)
    ap.add_argument("--block", default="16", help="comma-separated block sizes")
    ap.add_argument("--tokens", default="1,8,64")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--out", default=str(dispatch.TABLE_PATH))
    args = ap.parse_args()
    plan = dataclasses.replace(tune.FULL, matmul_tokens=tuple(int(t) for t in args.tokens.split(",")),
                               blocks=tuple(int(b) for b in args.block.split(",")))
    threads = [int(t) for t in args.threads.split(",")]

    def show(e):
        print(f"{e['shape']} M={e['tokens']} threads {e['threads']}: {e['points']} break-even {e['break_even']}",
              flush=True)

    new = tune.measure([args.isa], threads, plan, ops=(args.op,), on_entry=show)
    path = Path(args.out)
    old = dispatch.load_table(str(path)).get("entries", []) if path.exists() else []
    mine = {tune._key(e) for e in new}
    entries = [e for e in old if tune._key(e) not in mine] + new
    dispatch.save_table(tune.table(entries, None, quick=False), path)
    print(f"{path}: {len(new)} entries measured, {len(entries)} in all")


if __name__ == "__main__":
    main()
