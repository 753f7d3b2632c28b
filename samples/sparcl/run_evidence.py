"""The evidence for the sparcl plugin: dense DER++ vs SparCL on Split Fashion-MNIST, several seeds.

    python samples/sparcl/run_evidence.py            # every run (resumes finished/unfinished ones)
    python samples/sparcl/run_evidence.py --only main --seeds 0,1,2
    python samples/sparcl/run_evidence.py --summarize

Each run is `edgesparse-continual train` in its own process (one CPU thread, nice 19), so a run
that is interrupted resumes from its last finished task. Two runs go at a time, paired so that a
dense run shares its time window with a sparse one. The summary (mean and spread over seeds of
accuracy, forgetting, training FLOPs, wall-clock and CPU time) goes to results/summary.{json,md}.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).parent
RUNS = HERE / "runs"
RESULTS = HERE / "results"
CLI = [sys.executable, "-m", "edgesparse_sparcl.cli"]

# Shared by every run: a few epochs per task on a seeded 1000-image subset of each task.
COMMON = ["--epochs", "3", "--lr", "0.1", "--train-per-task", "1000", "--test-per-task", "1000", "--buffer-size", "500",
          "--batch-size", "32", "--width", "32", "--threads", "1", "--quiet"]

CONFIGS = {
    # name: (group, extra options)
    "dense-derpp": ("main", ["--method", "derpp"]),
    "sparcl-block16-s75": ("main", ["--sparsity", "0.75", "--pattern", "block", "--block", "16"]),
    "sparcl-block16-s90": ("main", ["--sparsity", "0.9", "--pattern", "block", "--block", "16"]),
    "sparcl-unstructured-s75": ("patterns", ["--sparsity", "0.75", "--pattern", "unstructured"]),
    "sparcl-unstructured-s90": ("patterns", ["--sparsity", "0.9", "--pattern", "unstructured"]),
    "sparcl-block8-s90": ("patterns", ["--sparsity", "0.9", "--pattern", "block", "--block", "8"]),
    "sparcl-block4-s90": ("patterns", ["--sparsity", "0.9", "--pattern", "block", "--block", "4"]),
    "sparcl-block4-s75": ("patterns", ["--sparsity", "0.75", "--pattern", "block", "--block", "4"]),
    # DDR in a 3-epoch task drops 30% of the data after one presentation: does it cost accuracy?
    "sparcl-block16-s90-noddr": ("tuning", ["--sparsity", "0.9", "--pattern", "block", "--block", "16", "--no-ddr"]),
    "sparcl-block4-s90-noddr": ("tuning", ["--sparsity", "0.9", "--pattern", "block", "--block", "4", "--no-ddr"]),
    # DGM is the only component that acts differently at 75% and 90% (80% gradient sparsity)
    "sparcl-block16-s75-nodgm": ("ablation", ["--sparsity", "0.75", "--pattern", "block", "--block", "16",
                                              "--no-dgm"]),
}


def run_one(name: str, seed: int) -> Path:
    out = RUNS / f"{name}-seed{seed}"
    log = RUNS / f"{name}-seed{seed}.log"
    cmd = ["nice", "-n", "19", *CLI, "train", str(out), *COMMON, *CONFIGS[name][1], "--seed", str(seed)]
    begin = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        # cwd: not the repository root, so that a PYTHONPATH snapshot of the code (taken while
        # others edit the working tree) wins over ./edgesparse
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=RUNS,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode}), see {log}"
    print(f"{name} seed {seed}: {status} in {time.time() - begin:.0f} s", flush=True)
    return out


def schedule(groups, seeds) -> list[tuple[str, int]]:
    """Dense and sparse runs alternate so that concurrent runs are of different kinds."""
    jobs = []
    for seed in seeds:
        for name, (group, _) in CONFIGS.items():
            if group in groups:
                jobs.append((name, seed))
    return jobs


def summarize() -> dict:
    rows = {}
    for name in CONFIGS:
        runs = []
        for path in sorted(RUNS.glob(f"{name}-seed*/results.json")):
            r = json.loads(path.read_text())
            if r["completed_tasks"] == len(r["tasks"]):
                runs.append(r)
        if not runs:
            continue
        stat = lambda key: _stat([r[key] for r in runs])
        rows[name] = {
            "seeds": [r["options"]["seed"] for r in runs],
            "class_il": stat("class_il"), "task_il": stat("task_il"), "forgetting": stat("forgetting"),
            "train_tflops": _stat([r["train_flops"]["total"] / 1e12 for r in runs]),
            "train_seconds": stat("train_seconds"), "train_cpu_seconds": stat("train_cpu_seconds"),
            "steps": sum(sum(r["per_task"]["steps"]) for r in runs) / len(runs),
            "layers_on_kernel": sum(l["on_kernel"] for l in runs[0]["layers"]),
        }
    dense = rows.get("dense-derpp")
    if dense:
        for name, row in rows.items():
            row["vs_dense"] = {
                "class_il_points": row["class_il"]["mean"] - dense["class_il"]["mean"],
                "task_il_points": row["task_il"]["mean"] - dense["task_il"]["mean"],
                "flops_reduction": dense["train_tflops"]["mean"] / row["train_tflops"]["mean"],
                "wall_clock_speedup": dense["train_seconds"]["mean"] / row["train_seconds"]["mean"],
                "cpu_time_speedup": dense["train_cpu_seconds"]["mean"] / row["train_cpu_seconds"]["mean"],
            }
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": _machine(), "setup": " ".join(COMMON), "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / "summary.md").write_text(_markdown(summary))
    print(_markdown(summary))
    return summary


def _stat(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def _markdown(summary) -> str:
    lines = [f"Split Fashion-MNIST, 5 tasks x 2 classes; {summary['setup']}; {summary['machine']}; {summary['date']}",
             "",
             "| run | seeds | class-IL % | task-IL % | forgetting | train TFLOPs | wall s | CPU s | vs dense: FLOPs / wall / CPU |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        f = lambda s, d=2: f"{s['mean']:.{d}f} ± {s['std']:.{d}f}"
        v = r.get("vs_dense", {})
        ratios = (f"{v['flops_reduction']:.1f}x / {v['wall_clock_speedup']:.2f}x / {v['cpu_time_speedup']:.2f}x"
                  if v else "")
        lines.append(f"| {name} | {len(r['seeds'])} | {f(r['class_il'])} | {f(r['task_il'])} | {f(r['forgetting'])} | "
                     f"{f(r['train_tflops'], 3)} | {f(r['train_seconds'], 0)} | {f(r['train_cpu_seconds'], 0)} | {ratios} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="main,patterns,ablation,tuning", help="groups: main, patterns, ablation, tuning")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--summarize", action="store_true", help="only write the summary")
    args = ap.parse_args()
    if not args.summarize:
        RUNS.mkdir(exist_ok=True)
        jobs = schedule(args.only.split(","), [int(s) for s in args.seeds.split(",")])
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda job: run_one(*job), jobs))
    summarize()


if __name__ == "__main__":
    main()
