"""`sparsity=auto` on the Fashion-MNIST CNN: the build chooses per-layer sparsities within
`--min-quality accuracy_drop=0.01`, then recovers with the model's own loop; its package against
the dense control (the dense model fine-tuned by the same loop for the same steps) and against the
30 % default build, speed from `edgesparse bench` at 1 thread. Results: results/cnn_auto.json.

    SBNN_AUTO_STEPS=469 SBNN_AUTO_PROBE_STEPS=100 nice -n 10 python samples/sparsebytenn/auto.py \
        control build-auto build-30 bench

Steps (each resumes: a step whose result is recorded is skipped):
- control: the dense model fine-tuned SBNN_AUTO_STEPS steps by model.py's loop (seed = steps), top-1
- build-auto: `edgesparse build ... --pass sparsebytenn:sparsity=auto,recovery=train,recovery_steps=N,
  recovery_seconds=0,auto_probe_steps=P --min-quality accuracy_drop=0.01` into out/sparsebytenn/fashion-auto
- build-30: the 30 % default build's groups (`sparsity=0.3,recovery=none`: speed depends only on the groups
  kept) into out/sparsebytenn/fashion-30-default
- bench: `edgesparse bench --threads 1` of both, SBNN_AUTO_BENCH_RUNS times (3) alternating, 300 rounds each
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from evidence import load, save  # noqa: E402

OUT = Path(os.environ.get("SBNN_OUT", ROOT / "out" / "sparsebytenn"))
STEPS = int(os.environ.get("SBNN_AUTO_STEPS", "469"))
PROBE_STEPS = int(os.environ.get("SBNN_AUTO_PROBE_STEPS", "100"))
BUDGET = os.environ.get("SBNN_AUTO_BUDGET", "accuracy_drop=0.01")
RUNS = int(os.environ.get("SBNN_AUTO_BENCH_RUNS", "3"))
KEY = f"steps={STEPS}/probe={PROBE_STEPS}/{BUDGET}"
ES = [sys.executable, str(HERE / "es.py")]


def control() -> None:
    import torch

    import cnn
    import data
    import model as factory

    key = f"control/steps={STEPS}"
    if key in load("cnn_auto"):
        return
    t0 = time.time()
    dense = cnn.trained()
    xt, yt = data.load("test")
    m = copy.deepcopy(dense)
    factory.train_loop(m, STEPS)
    save("cnn_auto", key, {"top1_original": round(cnn.accuracy(dense, xt, yt), 4),
                           "top1": round(cnn.accuracy(m, xt, yt), 4), "steps": STEPS,
                           "torch_threads": torch.get_num_threads(), "seconds": round(time.time() - t0, 1)})


def _build(out: Path, options: str, budget: str | None) -> dict:
    cmd = [*ES, "build", f"{HERE / 'model.py'}:build", "--target", "x86", "--pass", f"sparsebytenn:{options}",
           "-o", str(out), "--force", *(["--min-quality", budget] if budget else [])]
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("SBNN_THREADS", "1"))  # the build's torch threads
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (out.parent / f"{out.name}.build.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"build failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    manifest = json.loads((out / "manifest.json").read_text())
    rep = manifest["passes"][0]["report"]
    return {"command": " ".join(cmd[1:]), "build_seconds": round(time.time() - t0, 1),
            "quality": manifest["quality"], "auto": rep.get("auto"),
            "layers": {l["layer"]: l["sparsity"] for l in rep["layers"] if l["kind"] != "depthwise"},
            "sparse_nodes": manifest["verification"]["sparse_nodes"],
            "on_kernel": manifest["verification"]["fraction_on_sparse_kernels"],
            "recovery": {k: rep["recovery"][k] for k in ("mode", "steps", "steps_requested", "seconds")
                         if k in rep["recovery"]},
            "weight_sparsity_of_conv_linear": round(rep["weight_sparsity_of_conv_linear"], 4),
            "warnings": manifest["warnings"], "load_average_after": os.getloadavg()}


def build_auto() -> None:
    key = f"auto/{KEY}"
    if key not in load("cnn_auto"):
        options = (f"sparsity=auto,recovery=train,recovery_steps={STEPS},recovery_seconds=0,"
                   f"auto_probe_steps={PROBE_STEPS}")
        save("cnn_auto", key, _build(OUT / "fashion-auto", options, BUDGET))


def build_30() -> None:
    if "default-30" not in load("cnn_auto"):
        save("cnn_auto", "default-30", _build(OUT / "fashion-30-default", "sparsity=0.3,recovery=none", None))


def bench() -> None:
    key = f"bench/{KEY}"
    if key in load("cnn_auto"):
        return
    runs = []
    for _ in range(RUNS):
        for name in ("fashion-auto", "fashion-30-default"):
            out = subprocess.run([*ES, "bench", str(OUT / name), "--threads", "1", "--json", "--rounds", "300"],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out[out.index("["):])[0]
            runs.append({"package": name, "speedup": round(r["speedup"], 3),
                         "dense_ms": round(r["dense"]["median_ms"], 4), "package_ms": round(r["package"]["median_ms"], 4),
                         "load_average": os.getloadavg()[0]})
    summary = {}
    for name in ("fashion-auto", "fashion-30-default"):
        mine = [r for r in runs if r["package"] == name]
        summary[name] = {"speedup_median": float(np.median([r["speedup"] for r in mine])),
                         "package_ms_median": float(np.median([r["package_ms"] for r in mine]))}
    summary["auto_vs_30"] = round(summary["fashion-30-default"]["package_ms_median"]
                                  / summary["fashion-auto"]["package_ms_median"], 3)
    save("cnn_auto", key, {"runs": runs, "summary": summary, "threads": 1})


STEP_FUNCS = {"control": control, "build-auto": build_auto, "build-30": build_30, "bench": bench}

if __name__ == "__main__":
    import torch

    torch.set_num_threads(int(os.environ.get("SBNN_THREADS", "1")))
    for step in sys.argv[1:] or list(STEP_FUNCS):
        if step not in STEP_FUNCS:
            sys.exit(f"unknown step {step!r}; steps: {', '.join(STEP_FUNCS)}")
        STEP_FUNCS[step]()
