"""Speed against quality for the MiniLM sample: one-shot pruning at 30-90 % and the recovery
recipe's snapshots (recover.py, after 10, 30 and 60 CPU minutes), as measured pairs.

    .venv/bin/python samples/minilm/pareto.py        # ~10 min on 2 cores; after the recover.py runs
    benchmarks/avx2_host/run.sh .venv/bin/python samples/minilm/pareto.py --only recovered   # as on AVX2

- One-shot: `edgesparse build samples/minilm/model.py:build --pass magnitude:sparsity=S,block=16`
  (what a user gets from the pass alone), quality from the build's manifest (the sample's
  `evaluate()`: 512 held-out Wikipedia sentences) and speed from `edgesparse bench --threads 1`.
- Recovered: every snapshot in out/minilm-recovery/s*/progress.json; its quality is the recipe's
  own evaluation on the same 512 sentences (PyTorch); its speed is that of the package built from
  the snapshot (`model.py:recovered`), which this script builds and benches for the last snapshot of
  each run (the pattern is the same for every snapshot of a run: same sparsity, same blocks,
  same layers; the dispatch decides by shape and sparsity, not by values).

Writes samples/minilm/results/pareto.json and docs/minilm-pareto.png on AVX-512 hosts, pareto_<isa>.json
and minilm-pareto_<isa>.png elsewhere (the ISA of the kernels that run: under benchmarks/avx2_host
that is AVX2 on both sides, and the packages are built for it). `--only recovered` builds and
benches the recovered packages only (the one-shot rows' quality does not depend on the ISA).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from edgesparse.kernels import dispatch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
EDGESPARSE = str(Path(sys.executable).with_name("edgesparse"))
RUNS = ROOT / "out" / "minilm-recovery"
ISA = dispatch.current_isa()  # the kernels that run here (AVX2 under benchmarks/avx2_host)
SUFFIX = "" if ISA == "avx512" else f"_{ISA}"
WORK = ROOT / "out" / f"minilm-pareto{SUFFIX}"
RESULTS = HERE / "results" / f"pareto{SUFFIX}.json"
PLOT = ROOT / "docs" / f"minilm-pareto{SUFFIX}.png"
SPARSITIES = (0.3, 0.5, 0.75, 0.9)


def build_and_bench(factory: str, sparsity: float, out: Path, env=None) -> dict:
    subprocess.run([EDGESPARSE, "build", f"samples/minilm/model.py:{factory}", "--target", "x86",
                    "--pass", f"magnitude:sparsity={sparsity},block=16", "-o", str(out), "--force"],
                   cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL)
    bench = subprocess.run([EDGESPARSE, "bench", str(out), "--threads", "1", "--json"], cwd=ROOT, check=True,
                           capture_output=True, text=True, env=env)
    record = json.loads(bench.stdout)
    record = record[0] if isinstance(record, list) else record
    manifest = json.loads((out / "manifest.json").read_text())
    metrics = manifest["quality"].get("metrics", {})
    return {"speedup": round(record["speedup"], 3),
            "dense_ms": record["dense"], "package_ms": record["package"],
            "sparse_layers": len(manifest["layers"]),
            **{k: round(v["package"], 4) for k, v in metrics.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description="MiniLM speed against quality: one-shot and recovered")
    ap.add_argument("--only", choices=("all", "recovered"), default="all")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in SPARSITIES if args.only == "all" else ():
        row = {"method": "one-shot", "sparsity": s, **build_and_bench("build", s, WORK / f"oneshot-{int(s * 100)}")}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for progress_file in sorted(RUNS.glob("s*/progress.json")):
        run = json.loads(progress_file.read_text())
        snaps = run["snapshots"]
        if not snaps:
            continue
        last = snaps[-1]
        env = dict(os.environ, MINILM_WEIGHTS=str(progress_file.parent / f"snap-{last['minutes']:g}min.pt"))
        built = build_and_bench("recovered", run["sparsity"], WORK / f"recovered-{progress_file.parent.name}", env)
        for snap in snaps:
            row = {"method": f"recovered {snap['minutes']:g} min", "sparsity": run["sparsity"], "minutes": snap["minutes"],
                   "speedup": built["speedup"], **{k: snap[k] for k in ("embedding_cosine", "embedding_cosine_min", "nn_agreement")}}
            if snap is last:
                row["package"] = built  # the package built from this snapshot: its own quality and speed
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows.append({"method": "recipe's one-shot start", "sparsity": run["sparsity"], "speedup": built["speedup"],
                     **run["one_shot"]})
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": f"{dispatch.host_cpu()} ({ISA})", "threads": 1, "rows": rows}, indent=1) + "\n")
    plot(rows)


def plot(rows) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for r in rows:
        series.setdefault(r["method"], []).append(r)
    markers = {"one-shot": "o", "recipe's one-shot start": "x"}
    for name, pts in series.items():
        pts = sorted(pts, key=lambda r: r["sparsity"])
        ax.plot([p["embedding_cosine"] for p in pts], [p["speedup"] for p in pts], marker=markers.get(name, "s"),
                linestyle="-" if name == "one-shot" else "none", label=name)
        for p in pts:
            ax.annotate(f"{p['sparsity']:.0%}", (p["embedding_cosine"], p["speedup"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.axvline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.axhline(1.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("mean embedding cosine vs the original (512 held-out Wikipedia sentences)")
    ax.set_ylabel("speedup vs ONNX Runtime dense, 1 thread")
    ax.set_title("all-MiniLM-L6-v2, 16x1 blocks: one-shot vs recovered")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)


if __name__ == "__main__":
    main()
