"""The evidence for the sparcl plugin: dense DER++ vs SparCL on Split Fashion-MNIST, several seeds.

    python samples/sparcl/run_evidence.py            # every run (resumes finished/unfinished ones)
    python samples/sparcl/run_evidence.py --only main --seeds 0,1,2
    python samples/sparcl/run_evidence.py --runs sparcl-block4-s90:3 dense-derpp:3
    python samples/sparcl/run_evidence.py --summarize

Each run is `edgesparse-continual train` in its own process (one CPU thread, nice 10), so a run
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
    "sparcl-block4-s75-noddr": ("tuning", ["--sparsity", "0.75", "--pattern", "block", "--block", "4", "--no-ddr"]),
    "sparcl-block16-s75-noddr": ("tuning", ["--sparsity", "0.75", "--pattern", "block", "--block", "16", "--no-ddr"]),
    # the unstructured pattern with the default schedule (no removal in 3-epoch tasks)
    "sparcl-unstructured-s90-noddr": ("patterns", ["--sparsity", "0.9", "--pattern", "unstructured", "--no-ddr"]),
    # DGM is the only component that acts differently at 75% and 90% (80% gradient sparsity)
    "sparcl-block16-s90-noddr-notdm": ("ablation", ["--sparsity", "0.9", "--pattern", "block", "--block", "16",
                                                    "--no-ddr", "--no-tdm"]),
    "sparcl-block16-s75-noddr-nodgm": ("ablation", ["--sparsity", "0.75", "--pattern", "block", "--block", "16",
                                                    "--no-ddr", "--no-dgm"]),
    "sparcl-block16-s75-nodgm": ("ablation", ["--sparsity", "0.75", "--pattern", "block", "--block", "16",
                                              "--no-dgm"]),
}


# What each run is, for the tables. With 3 epochs per task the scaled schedule removes no data
# (removals need two presentations): the "-noddr" runs are exactly what the defaults do; the runs
# without the suffix remove 30% after the first epoch (the earlier scaling).
LABELS = {
    "dense-derpp": "dense DER++",
    "sparcl-block16-s75": "B=16 75%, DDR after epoch 1",
    "sparcl-block16-s90": "B=16 90%, DDR after epoch 1",
    "sparcl-unstructured-s75": "unstructured 75%, DDR after epoch 1",
    "sparcl-unstructured-s90": "unstructured 90%, DDR after epoch 1",
    "sparcl-block8-s90": "B=8 90%, DDR after epoch 1",
    "sparcl-block4-s90": "B=4 90%, DDR after epoch 1",
    "sparcl-block4-s75": "B=4 75%, DDR after epoch 1",
    "sparcl-block16-s90-noddr": "**B=16 90%, default schedule**",
    "sparcl-block4-s90-noddr": "B=4 90%, default schedule",
    "sparcl-block4-s75-noddr": "B=4 75%, default schedule",
    "sparcl-block16-s75-noddr": "**B=16 75%, default schedule**",
    "sparcl-block16-s75-nodgm": "B=16 75%, DDR after epoch 1, no DGM",
    "sparcl-unstructured-s90-noddr": "unstructured 90%, default schedule",
    "sparcl-block16-s75-noddr-nodgm": "B=16 75%, default schedule, no DGM",
    "sparcl-block16-s90-noddr-notdm": "B=16 90%, default schedule, no TDM (fixed mask)",
}


def run_one(name: str, seed: int) -> Path:
    out = RUNS / f"{name}-seed{seed}"
    log = RUNS / f"{name}-seed{seed}.log"
    cmd = ["nice", "-n", "10", *CLI, "train", str(out), *COMMON, *CONFIGS[name][1], "--seed", str(seed)]
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


# Accuracy two ways: batch norm statistics re-estimated over the buffer after each task (the
# trainer's default since 2026-11-29; earlier runs re-evaluated from their final checkpoint by
# reeval_bn.py, which gives the final accuracy but not forgetting), and the running statistics.
VIEWS = ("class_il", "task_il", "forgetting", "class_il_running_bn", "task_il_running_bn", "forgetting_running_bn")
ROOT_RUNS = (HERE / "runs").resolve()


def _views(r: dict, reeval: dict | None) -> dict:
    if "class_il_running_bn" in r:  # trained with the re-estimation: both views in results.json
        return r
    old = dict(r)
    r = {**r, "_old_acc": old["per_task"]["acc_class_il"], "class_il_running_bn": old["class_il"], "task_il_running_bn": old["task_il"],
         "forgetting_running_bn": old["forgetting"], "forgetting": None,
         "class_il": reeval["class_il"] if reeval else None, "task_il": reeval["task_il"] if reeval else None,
         "per_task": {**old["per_task"], "acc_class_il": []}}
    return r


def _per_task(r: dict) -> dict:
    """Class-IL % per task: right after learning it, and after the last task (both batch norm views
    where the run has them; runs trained before the re-estimation have only the running view)."""
    out = {}
    for view, key in (("buffer_bn", "acc_class_il"), ("running_bn", "acc_class_il_running_bn")):
        acc = r["per_task"].get(key) or []
        if view == "running_bn" and not acc:
            acc = r["_old_acc"] if "_old_acc" in r else []
        if len(acc) == len(r["tasks"]):
            out[view] = {"after_learning": [round(acc[t][t], 2) for t in range(len(acc))],
                         "final": [round(a, 2) for a in acc[-1]]}
    return out


def summarize() -> dict:
    rows, by_seed = {}, {}
    reeval_file = HERE / "results" / "bn-reeval.json"
    reeval = json.loads(reeval_file.read_text()) if reeval_file.exists() else {}
    for name in CONFIGS:
        runs = []
        for path in sorted(RUNS.glob(f"{name}-seed*/results.json")):
            r = json.loads(path.read_text())
            if r["completed_tasks"] == len(r["tasks"]):
                runs.append(_views(r, reeval.get(str(path.parent.resolve().relative_to(ROOT_RUNS)))))
        if not runs:
            continue
        by_seed[name] = {r["options"]["seed"]: r for r in runs}
        stat = lambda key: _stat([r[key] for r in runs if r.get(key) is not None])
        rows[name] = {
            "seeds": [r["options"]["seed"] for r in runs],
            **{key: stat(key) for key in VIEWS},
            "train_tflops": _stat([r["train_flops"]["total"] / 1e12 for r in runs]),
            "train_seconds": stat("train_seconds"), "train_cpu_seconds": stat("train_cpu_seconds"),
            "steps": sum(sum(r["per_task"]["steps"]) for r in runs) / len(runs),
            "layers_on_kernel": sum(l["on_kernel"] for l in runs[0]["layers"]),
            "per_seed": {r["options"]["seed"]: _per_task(r) for r in runs},
        }
    dense = by_seed.get("dense-derpp")
    if dense:
        for name, row in rows.items():
            # paired by seed: the dense and sparse runs of one seed ran at the same time, on the same load
            seeds = sorted(set(by_seed[name]) & set(dense))
            pair = lambda f: [f(dense[s]) / f(by_seed[name][s]) for s in seeds]
            def diff(key):
                both = [s for s in seeds if by_seed[name][s].get(key) is not None and dense[s].get(key) is not None]
                return _stat([by_seed[name][s][key] - dense[s][key] for s in both]) if both else None

            row["vs_dense"] = {
                "paired_seeds": seeds,
                "class_il_points": diff("class_il"), "task_il_points": diff("task_il"),
                "class_il_running_bn_points": diff("class_il_running_bn"),
                "task_il_running_bn_points": diff("task_il_running_bn"),
                "flops_reduction": _quartiles(pair(lambda r: r["train_flops"]["total"])),
                "wall_clock_speedup": _quartiles(pair(lambda r: r["train_seconds"])),
                "cpu_time_speedup": _quartiles(pair(lambda r: r["train_cpu_seconds"])),
            }
    benches = {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob("step-t*.json"))}
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": _machine(), "setup": " ".join(COMMON), "runs": rows,
               "step_benches": benches}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / "summary.md").write_text(_markdown(summary))
    print(_markdown(summary))
    return summary


# two-sided 95% quantiles of Student's t for 1..12 degrees of freedom
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179)


def _stat(values):
    if not values:
        return None
    out = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
           "n": len(values), "values": values}
    if 1 < len(values) <= len(T975) + 1:  # 95% confidence interval of the mean
        half = T975[len(values) - 2] * out["std"] / len(values) ** 0.5
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


def _quartiles(values):
    if not values:
        return None
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "p25": q[0], "p75": q[2], "values": values}


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
    f = lambda s, d=2: f"{s['mean']:.{d}f} ± {s['std']:.{d}f}" if s else ""
    fn = lambda s: f"{f(s)} ({s['n']})" if s else ""
    fci = lambda s: f"{fn(s)} [{s['ci95'][0]:+.2f}, {s['ci95'][1]:+.2f}]" if s and "ci95" in s else fn(s)
    q = lambda s: f"{s['median']:.2f}x [{s['p25']:.2f}, {s['p75']:.2f}]" if s else ""
    lines = [f"Split Fashion-MNIST, 5 tasks x 2 classes; {summary['setup']}; {summary['machine']}; {summary['date']}",
             "", "Mean ± std over seeds (n); \"vs dense\" pairs each run with the dense run of the same seed "
             "(mean ± std of the paired differences (n) [95% confidence interval of the mean]). Accuracy with batch norm statistics re-estimated over the "
             "rehearsal buffer after each task (the trainer's default; runs trained before it: re-estimated from "
             "the final checkpoint by reeval_bn.py, so no forgetting), and with the running statistics.", "",
             "| SparCL run | seeds | class-IL %, buffer BN | vs dense (points) | task-IL %, buffer BN | "
             "class-IL %, running BN | vs dense (points) | task-IL %, running BN | forgetting, running BN |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        v = r.get("vs_dense") if name != "dense-derpp" else None
        v = v or {}
        lines.append(f"| {LABELS.get(name, name)} | {len(r['seeds'])} | {fn(r['class_il'])} | {fci(v.get('class_il_points'))} | "
                     f"{f(r['task_il'])} | {fn(r['class_il_running_bn'])} | {fci(v.get('class_il_running_bn_points'))} | "
                     f"{f(r['task_il_running_bn'])} | {f(r['forgetting_running_bn'])} |")
    lines += ["", "Training cost of the whole run (5 tasks). Ratios vs dense per seed pair: median [p25, p75]. CPU s "
              "is the process time of the training loop at 1 thread (robust on the shared VM). Wall s is shown "
              "but not compared: these runs went at different times at load averages from 4 to 40; the "
              "wall-clock ratio is measured interleaved below.", "",
              "| run | steps | train TFLOPs | CPU s | wall s | FLOPs lower | CPU time lower |",
              "|---|---|---|---|---|---|---|"]
    for name, r in summary["runs"].items():
        v = r.get("vs_dense") or {}
        lines.append(f"| {LABELS.get(name, name)} | {r['steps']:.0f} | {r['train_tflops']['mean']:.3f} | "
                     f"{f(r['train_cpu_seconds'], 0)} | {f(r['train_seconds'], 0)} | {q(v.get('flops_reduction'))} | "
                     f"{q(v.get('cpu_time_speedup'))} |")
    if summary.get("step_benches"):
        lines += ["", "One training step (32 new + 2 x 32 buffered images: forward, backward, SGD, mask upkeep), "
                      "dense and sparse interleaved in one process under the timing lock "
                      "(`bench_step.py`): median ms [p25, p75].", "",
                  "| file (date, rounds x steps) | threads | run | wall ms/step | CPU ms/step | wall vs dense |",
                  "|---|---|---|---|---|---|"]
        for file, bench in summary["step_benches"].items():
            what = f"{file} ({bench.get('date', '')}, {bench.get('rounds')} x {bench.get('steps_per_block')})"
            for threads, rows in bench["by_threads"].items():
                for name, row in rows.items():
                    p25, p75 = row["wall_ms_quartiles"][0], row["wall_ms_quartiles"][2]
                    lines.append(f"| {what} | {threads} | {name} | {row['wall_ms']:.0f} [{p25:.0f}, {p75:.0f}] | "
                                 f"{row['cpu_ms']:.0f} | {row['wall_speedup_vs_dense']:.2f}x |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="main,patterns,ablation,tuning", help="groups: main, patterns, ablation, tuning")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--workers", type=int, default=1, help="runs at a time (the VM is shared: 1)")
    ap.add_argument("--runs", nargs="+", metavar="NAME:SEED", help="these runs, in this order (instead of --only)")
    ap.add_argument("--summarize", action="store_true", help="only write the summary")
    args = ap.parse_args()
    if not args.summarize:
        RUNS.mkdir(exist_ok=True)
        if args.runs:
            jobs = [(r.rsplit(":", 1)[0], int(r.rsplit(":", 1)[1])) for r in args.runs]
            unknown = [name for name, _ in jobs if name not in CONFIGS]
            if unknown:
                sys.exit(f"error: unknown run configuration {unknown[0]!r} (known: {', '.join(CONFIGS)})")
        else:
            jobs = schedule(args.only.split(","), [int(s) for s in args.seeds.split(",")])
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(lambda job: run_one(*job), jobs))
    summarize()


if __name__ == "__main__":
    main()
