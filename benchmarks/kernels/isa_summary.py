"""Summarise benchmarks/kernels/isa_checks.sh's results: per ISA, the median kernel speedup over
the FFN shapes x M = 1, 8, 64 at each sparsity, and the MiniLM sample's speed and quality."""
import json
import sys
from pathlib import Path

import numpy as np

out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/kernels/results")
for isa in ("avx512", "avx2"):
    path = out / f"{isa}-kernels.json"
    if not path.exists():
        continue
    records = [r for r in json.loads(path.read_text()) if r["op"] == "BlockSparseMatMul"]
    line = [f"{isa} kernels (1 thread, median over {len({(r['K'], r['N'], r['M']) for r in records})} FFN cases):"]
    for sp in sorted({r["sparsity"] for r in records}):
        speedups = [r["speedup"] for r in records if r["sparsity"] == sp]
        line.append(f"{sp:.0%} {np.median(speedups):.2f}x (min {min(speedups):.2f}x)")
    print(" ".join(line))
    bench, build = out / f"{isa}-minilm75-bench.json", out / f"{isa}-minilm75-build.json"
    if bench.exists() and build.exists():
        b, m = json.loads(bench.read_text())[0], json.loads(build.read_text())
        q = m.get("quality", {}).get("metrics", {})
        emb = q.get("embedding_cosine", {}).get("package")
        print(f"{isa} MiniLM 75 %: {len(m['layers'])} sparse layers, speedup {b['speedup']:.2f}x at 1 thread "
              f"(dense {b['dense']['median_ms']:.2f} ms, package {b['package']['median_ms']:.2f} ms); "
              f"embedding cosine vs the original {emb if emb is None else round(emb, 3)}")
