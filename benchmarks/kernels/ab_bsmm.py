"""A/B of kernel libraries on the BlockSparseMatMul FFN cases of `edgesparse bench kernels`.

Each case (FFN shape x M x sparsity, one thread, 16 x 1 blocks) is timed for every library in
turn, each against ORT's dense MatMul interleaved in one process (bench_matmul_case), so the
libraries' speedups are measured under the same load minutes apart. Prints the median speedup
over the 9 cases per sparsity for each library (of the medians, and of the fastest samples'
ratio, which load disturbs least), and each case's speedups.

  .venv/bin/python benchmarks/kernels/ab_bsmm.py OLD.so NEW.so [--json out.json]
  benchmarks/avx2_host/run.sh .venv/bin/python benchmarks/kernels/ab_bsmm.py OLD.so NEW.so   (AVX2)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from edgesparse.kernels.bench import FFN_SHAPES, SPARSITIES, TOKENS, bench_matmul_case
from edgesparse.kernels.dispatch import current_isa


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("libs", nargs="+")
    ap.add_argument("--json")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    records = []
    for k, n in FFN_SHAPES:
        for sp in SPARSITIES:
            for m in tokens:
                line = []
                for i, lib in enumerate(args.libs):
                    r = bench_matmul_case(lib, m, k, n, sp, 16, 1, budget_s=args.budget)
                    r.update(lib=os.path.basename(lib), lib_index=i, isa=current_isa(), load=os.getloadavg()[0])
                    records.append(r)
                    line.append(f"{r['speedup']:.2f}x (best {r['dense_ms_min'] / r['sparse_ms_min']:.2f}x)")
                print(f"{k}x{n} M={m} s={sp}: " + " / ".join(line), flush=True)
    print(f"isa {current_isa()}, load average now {os.getloadavg()}")
    # "best": dense min / sparse min, the ratio of the fastest samples, which a loaded machine
    # (other processes preempting the timed runs) disturbs least
    for i, lib in enumerate(args.libs):
        for what, f in (("median", lambda r: r["speedup"]), ("best", lambda r: r["dense_ms_min"] / r["sparse_ms_min"])):
            meds = [statistics.median(f(r) for r in records if r["lib_index"] == i and r["sparsity"] == sp)
                    for sp in SPARSITIES]
            print(f"{os.path.basename(lib)}: {what} speedup, median of the cases: "
                  + " / ".join(f"{m:.2f}x" for m in meds) + " at " + " / ".join(f"{int(s * 100)} %" for s in SPARSITIES))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
