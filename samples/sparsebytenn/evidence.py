"""The sparsebytenn evidence runs: accuracy grids, package builds, `edgesparse bench`, the plot.

    python samples/sparsebytenn/evidence.py cnn-grid cnn-recovery cnn-ablations cnn-packages \
        cnn-package-repeats eff-grid eff-packages plot   # any subset, in order; each step is resumable

Results accumulate in samples/sparsebytenn/results/*.json (one entry per configuration, with the
date and CPU) and the plot in docs/sparsebytenn-pareto.png. Run with `nice -n 19` on shared
machines. Environment: SBNN_OUT (package folder, default out/sparsebytenn), SBNN_SPARSITIES
(comma-separated, default 0.3,0.5,0.7,0.9), EDGESPARSE_TIMING_LOCK (see measure.py).

- cnn-grid: FashionMobileNet (cnn.py, trained here on real Fashion-MNIST), top-1 on the 10k test
  set, at 30/50/70/90 % group sparsity, rearrangement on/off x recovery none/train (the model's
  own training loop, 100 steps of 128 images); every candidate layer pruned (dispatch=off) so the
  configurations are comparable.
- cnn-ablations: group shapes (4/8/16 x 1), scores (l1/l2/activation), sensitivity allocation, and
  the two ends of the granularity range (unstructured and whole-filter pruning of the same layers);
  SBNN_ABLATIONS (comma-separated names) runs a subset.
- cnn-recovery: one epoch of recovery (SBNN_RECOVERY_STEPS, default 469) through the pass's
  recovery=train, and the dense control fine-tuned by the same loop for the same steps
  (SBNN_RECOVERY_RUNS picks the runs).
- cnn-packages: full builds (dispatch=measure, recovery=train one epoch, rearrangement per
  SBNN_PKG_REARRANGE; SBNN_PKG_DISPATCH the dispatch option; SBNN_PKG_TAG tags a rebuild with
  newer kernels) at each sparsity: package
  top-1 on the test set (ONNX Runtime),
  `edgesparse bench` at 1 and 2 threads; cnn-package-repeats benches them three more times.
- eff-grid / eff-packages: the same for the real pretrained EfficientNet-Lite0; the metric is the
  agreement with the dense model's top-1 on 200 views of 5 real photos never used for calibration.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
OUT = Path(os.environ.get("SBNN_OUT", ROOT / "out" / "sparsebytenn"))
PLOT = ROOT / "docs" / "sparsebytenn-pareto.png"
SPARSITIES = tuple(float(s) for s in os.environ.get("SBNN_SPARSITIES", "0.3,0.5,0.7,0.9").split(","))
GRID_STEPS, PKG_STEPS = 100, 200
EPOCH_STEPS = 469  # one pass over the 60k training images at batch 128
RECOVERY_STEPS = int(os.environ.get("SBNN_RECOVERY_STEPS", EPOCH_STEPS))
# cnn-package-repeats: runs and rounds per run (sub-ms models: hundreds of rounds narrow the spread)
REPEATS, REPEAT_ROUNDS = int(os.environ.get("SBNN_REPEATS", "3")), int(os.environ.get("SBNN_REPEAT_ROUNDS", "100"))
PRUNE_STAGES = int(os.environ.get("SBNN_PRUNE_STAGES", "1"))  # cnn-packages: the pass's prune_stages
# model.py's loop distills from SBNN_TEACHER when set; results are keyed by the teacher's file name
TEACHER_KEY = f"/teacher={Path(os.environ['SBNN_TEACHER']).stem}" if os.environ.get("SBNN_TEACHER") else ""
# model.py's loop seed (SBNN_SEED) when set: a second paired run of a recipe (dense control and package)
SEED_KEY = f"/seed={os.environ['SBNN_SEED']}" if os.environ.get("SBNN_SEED") else ""
# cnn-packages: the pass's dispatch option (SBNN_PKG_DISPATCH, default measure; keyed when not the default)
PKG_DISPATCH = os.environ.get("SBNN_PKG_DISPATCH", "measure")
# cnn-packages: a tag that tells a rebuild of the same recipe with newer kernels from the older one
PKG_TAG = f"/{os.environ['SBNN_PKG_TAG']}" if os.environ.get("SBNN_PKG_TAG") else ""
# plot: the records of the current kernels (bench_all.py --tag, SBNN_PKG_TAG)
PLOT_BENCH_TAG, PLOT_PACKAGE_TAG = "nchw16c-default", "nchw16c"
EFF_DISTILL_STEPS = 60


# -- bookkeeping ----------------------------------------------------------------------------------

def cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor()


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save(name: str, key: str, value: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    data = load(name)
    data[key] = value | {"date": datetime.date.today().isoformat(), "cpu": cpu()}
    tmp = RESULTS / f".{name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, RESULTS / f"{name}.json")
    print(f"[{name}] {key}: " + ", ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, (dict, list))),
          flush=True)


def registry():
    from edgesparse.plugins import registry as reg

    from edgesparse_sparsebytenn.compat import ensure_conv_densify

    r = reg()
    ensure_conv_densify(r)
    return r


def context(calibration, train=None):
    from edgesparse.context import BuildContext

    r = registry()
    ctx = BuildContext(r.get("targets", "x86"), r, calibration=calibration, train=train, quiet=True)
    ctx.begin_pass("sparsebytenn")
    return ctx


def torch_stage(module, calibration, train=None, **options):
    from edgesparse_sparsebytenn import SparseByteNN

    p = SparseByteNN(**options)
    ctx = context(calibration, train)
    t0 = time.time()
    module = p.transform_module(copy.deepcopy(module), ctx)
    report = ctx.reports["sparsebytenn"]
    ra = report.get("rearrangement", {})
    summary = {"achieved_sparsity": round(report["achieved_sparsity_of_candidates"], 4),
               "pruned_layers": sum(1 for l in report["layers"] if l["sparsity"] > 0),
               "seconds": round(time.time() - t0, 1)}
    if ra.get("retained_mass_before") is not None:
        summary["retained_mass_before"] = round(ra["retained_mass_before"], 4)
        summary["retained_mass_after"] = round(ra["retained_mass_after"], 4)
        summary["spaces_permuted"] = len(ra.get("spaces_permuted", []))
    rec = report.get("recovery", {})
    if rec.get("mode", "none") != "none":
        summary["recovery"] = {k: rec[k] for k in ("mode", "steps", "steps_requested", "cut_by_budget", "seconds",
                                                   "loss_first", "loss_last", "stages") if k in rec}
    summary["layer_sparsity"] = {l["layer"]: l["sparsity"] for l in report["layers"] if l["kind"] != "depthwise"}
    return module, summary


def bench(package: Path, rounds: int | None = None) -> list[dict]:
    cmd = [sys.executable, str(HERE / "es.py"), "bench", str(package), "--threads", "1,2", "--json",
           *(["--rounds", str(rounds)] if rounds else [])]
    lock = os.environ.get("EDGESPARSE_TIMING_LOCK")
    if lock:  # never time while another benchmark runs on the shared machine
        cmd = ["flock", lock, "nice", "-n", "0", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("["):] if "[" in out else out)


def build_package(model_spec: str, out: Path, options: dict) -> dict:
    from edgesparse.pipeline import BuildRequest, build

    return build(BuildRequest(model=model_spec, target="x86", output=out, force=True, quiet=True,
                              passes=[("sparsebytenn", options)]), registry=registry())


# -- Fashion-MNIST CNN ----------------------------------------------------------------------------

def cnn_setup():
    import cnn
    import data
    import model as factory

    dense = cnn.trained()
    xt, yt = data.load("test")
    return dense, factory.calibration_batches(), factory.train_loop, xt, yt


def cnn_acc(module, xt, yt) -> float:
    import cnn

    return round(cnn.accuracy(module, xt, yt), 4)


def cnn_grid():
    dense, calib, train, xt, yt = cnn_setup()
    if "dense" not in load("cnn_grid"):
        save("cnn_grid", "dense", {"top1": cnn_acc(dense, xt, yt)})
    for s in SPARSITIES:
        for rearrange in (False, True):
            for recovery in ("none", "train"):
                key = f"s{s:.1f}/rearrange={int(rearrange)}/recovery={recovery}"
                if key in load("cnn_grid"):
                    continue
                m, summary = torch_stage(dense, calib, train, sparsity=s, dispatch="off", rearrange=rearrange,
                                         recovery=recovery, recovery_steps=GRID_STEPS, recovery_seconds=0)
                save("cnn_grid", key, {"top1": cnn_acc(m, xt, yt), "sparsity": s, "rearrange": rearrange,
                                       "recovery": recovery, **summary})


def cnn_recovery():
    """Recovery with a real budget (RECOVERY_STEPS of the model's own loop: AdamW, cosine schedule
    from 1e-3, one call, no time budget) and, for a fair comparison, the dense model fine-tuned by
    the same loop for the same steps (it was trained 3 epochs only, so extra training helps it too).
    SBNN_RECOVERY_RUNS: comma-separated runs, 'dense' or '<sparsity>/<rearrange 0|1>/<block>[/<prune stages>]'."""
    import cnn
    import model as factory

    dense, calib, train, xt, yt = cnn_setup()
    runs = os.environ.get("SBNN_RECOVERY_RUNS", "dense,0.3/1/16,0.7/0/16,0.7/1/16").split(",")
    steps = RECOVERY_STEPS
    for run in runs:
        lr = os.environ.get("SBNN_LR", "1e-3")
        if run == "dense":
            key = f"dense/steps={steps}/lr={lr}" + TEACHER_KEY + SEED_KEY
            keep = cnn.weights_path(f"dense_control_{steps}" + SEED_KEY.replace("/seed=", "_seed"))  # a teacher
            if key in load("cnn_recovery") and (TEACHER_KEY or keep.is_file()):
                continue
            t0 = time.time()
            m = copy.deepcopy(dense)
            factory.train_loop(m, steps)
            if not TEACHER_KEY:
                keep.parent.mkdir(parents=True, exist_ok=True)
                torch.save(m.state_dict(), keep.with_suffix(".tmp"))
                os.replace(keep.with_suffix(".tmp"), keep)
            save("cnn_recovery", key, {"top1": cnn_acc(m, xt, yt), "steps": steps, "lr": float(lr),
                                       "seconds": round(time.time() - t0, 1)})
            continue
        s, rearrange, block, stages = (run.split("/") + ["1"])[:4]
        key = f"s{float(s):.1f}/rearrange={rearrange}/block={block}/steps={steps}/lr={lr}"
        key += (f"/stages={stages}" if stages != "1" else "") + TEACHER_KEY + SEED_KEY
        if key in load("cnn_recovery"):
            continue
        m, summary = torch_stage(dense, calib, train, sparsity=float(s), dispatch="off", rearrange=rearrange == "1",
                                 block_pointwise=int(block), recovery="train", recovery_steps=steps,
                                 recovery_seconds=0, prune_stages=int(stages))
        save("cnn_recovery", key, {"top1": cnn_acc(m, xt, yt), "sparsity": float(s), "rearrange": rearrange == "1",
                                   "block_pointwise": int(block), "steps": steps, "lr": float(lr),
                                   "prune_stages": int(stages), **summary})


def _prune_reference(module, sparsity: float, kind: str, layers: list[str]):
    """Unstructured (per weight) or filter (whole output channels) magnitude pruning of the same
    layers the pass prunes, per layer at `sparsity`: the two ends of the granularity range."""
    m = copy.deepcopy(module)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name in layers:
            w = mods[name].weight
            if kind == "unstructured":
                score = w.abs().flatten()
                drop = int(round(sparsity * score.numel()))
                idx = torch.argsort(score)[:drop]
                flat = w.view(-1)
                flat[idx] = 0
            else:
                norms = w.flatten(1).norm(dim=1)
                idx = torch.argsort(norms)[:int(round(sparsity * norms.numel()))]
                w[idx] = 0
    return m


def cnn_ablations():
    from edgesparse_sparsebytenn import recover

    dense, calib, train, xt, yt = cnn_setup()
    only = [n for n in os.environ.get("SBNN_ABLATIONS", "").split(",") if n]  # e.g. "pointwise 4x1,pointwise 8x1"
    for s in SPARSITIES:
        runs = {
            "pointwise 4x1": {"block_pointwise": 4}, "pointwise 8x1": {"block_pointwise": 8},
            "pointwise 16x1": {"block_pointwise": 16},
            "score l1": {"score": "l1"}, "score activation": {"score": "activation"},
            "allocation sensitivity": {"allocation": "sensitivity"},
            "no BatchNorm recalibration": {"bn_recalibration": False},
        }
        for name, opts in runs.items():
            key = f"s{s:.1f}/{name}"
            if key in load("cnn_ablations") or only and name not in only:
                continue
            m, summary = torch_stage(dense, calib, sparsity=s, dispatch="off", **opts)
            save("cnn_ablations", key, {"top1": cnn_acc(m, xt, yt), **summary})
        if only:
            continue
        layers = [n for n, mod in dense.named_modules()
                  if isinstance(mod, torch.nn.Conv2d) and mod.groups == 1 and mod.kernel_size == (1, 1)]
        for kind in ("unstructured", "filter"):
            key = f"s{s:.1f}/{kind} (reference)"
            if key in load("cnn_ablations"):
                continue
            m = _prune_reference(dense, s, kind, layers)
            recover.recalibrate_batchnorm(m, calib)
            m.eval()
            save("cnn_ablations", key, {"top1": cnn_acc(m, xt, yt), "layers": len(layers)})


def package_key(sparsity: float) -> str:
    return (f"s{sparsity:.1f}/steps={RECOVERY_STEPS}" + (f"/stages={PRUNE_STAGES}" if PRUNE_STAGES > 1 else "")
            + TEACHER_KEY + SEED_KEY + (f"/dispatch={PKG_DISPATCH}" if PKG_DISPATCH != "measure" else "") + PKG_TAG)


def cnn_packages():
    """Full builds through the pass (dispatch=measure, recovery=train RECOVERY_STEPS in one call of the
    model's own loop, no time budget: the same steps whatever the machine's load); the package's own
    top-1 on the test set (ONNX Runtime) and `edgesparse bench` at 1 and 2 threads: accuracy and speed
    of the same package. SBNN_PKG_REARRANGE: per-sparsity rearrangement, e.g. '0.3:1,0.7:0'."""
    from edgesparse import runtime

    dense, calib, train, xt, yt = cnn_setup()
    rearr = dict(kv.split(":") for kv in os.environ.get("SBNN_PKG_REARRANGE", "").split(",") if kv)
    for s in SPARSITIES:
        steps = RECOVERY_STEPS
        key = package_key(s)
        if key in load("cnn_packages"):
            continue
        out = OUT / f"fashion-{int(s * 100)}"
        opts = {"sparsity": s, "dispatch": PKG_DISPATCH, "rearrange": rearr.get(f"{s:g}", "1") == "1",
                "recovery": "train", "recovery_steps": steps, "recovery_seconds": 0, "prune_stages": PRUNE_STAGES}
        t0 = time.time()
        manifest = build_package(f"{HERE / 'model.py'}:build", out, opts)
        build_s = time.time() - t0
        session = runtime.load(out).session()
        logits = np.concatenate([session.run(None, {"x": xt[i:i + 500]})[0] for i in range(0, len(xt), 500)])
        rep = manifest["passes"][0]["report"]
        rec = rep["recovery"]
        save("cnn_packages", key, {
            "top1": round(float((logits.argmax(1) == yt).mean()), 4), "options": opts, "package": out.name,
            "sparse_nodes": manifest["verification"]["sparse_nodes"],
            "on_kernel": manifest["verification"]["fraction_on_sparse_kernels"],
            "max_abs_error": manifest["verification"]["max_abs_error"],
            "achieved_sparsity": round(rep["achieved_sparsity_of_candidates"], 4),
            "weight_sparsity_of_conv_linear": round(rep["weight_sparsity_of_conv_linear"], 4),
            "pruned_layers": sum(1 for l in rep["layers"] if l["sparsity"] > 0),
            "kept_dense": [l["layer"] for l in rep["layers"] if l["sparsity"] == 0 and l["kind"] in ("pointwise", "conv", "linear")],
            "whole_model_check": rep.get("whole_model_check"),
            "not_replaced": len(rep.get("onnx", {}).get("not_replaced", [])),
            "recovery": {k: rec[k] for k in ("mode", "steps", "steps_requested", "cut_by_budget", "seconds", "stages")
                         if k in rec},
            "warnings": manifest.get("warnings", []),
            "build_seconds": round(build_s, 1), "load_average": os.getloadavg()[0], "bench": bench(out)})


def cnn_package_repeats():
    """`edgesparse bench` of the built packages (cnn-packages) SBNN_REPEATS more times (3), SBNN_REPEAT_ROUNDS
    rounds each (100), under the timing lock: the spread of the speedup across runs, not only within one."""
    data = load("cnn_packages")
    for s in SPARSITIES:
        key = package_key(s)
        field = "bench_repeats" if REPEAT_ROUNDS == 100 else f"bench_repeats_{REPEAT_ROUNDS}_rounds"
        if key not in data or data[key].get(field):
            continue
        out = OUT / data[key]["package"]
        runs = [bench(out, rounds=REPEAT_ROUNDS) for _ in range(REPEATS)]
        repeats = [{"threads": b["threads"], "speedup": round(b["speedup"], 3),
                    "dense_ms": round(b["dense"]["median_ms"], 3), "package_ms": round(b["package"]["median_ms"], 3)}
                   for run in runs for b in run]
        save("cnn_packages", key, {k: v for k, v in data[key].items() if k not in ("date", "cpu")}
             | {field: repeats})


# -- EfficientNet-Lite0 ---------------------------------------------------------------------------

def eff_setup():
    import efficientnet as E

    dense = E.load_model()
    calib = E.calibration_batches()[:8]
    images = E.evaluation_images()
    with torch.no_grad():
        ref = torch.cat([dense(torch.from_numpy(images[i:i + 25])) for i in range(0, len(images), 25)]).argmax(1)
    return dense, calib, images, ref


def eff_agreement(module, images, ref) -> dict:
    """Top-1 agreement with the dense model, and how often the dense top-1 is in the top-5."""
    with torch.no_grad():
        logits = torch.cat([module(torch.from_numpy(images[i:i + 25])) for i in range(0, len(images), 25)])
    top5 = logits.topk(5, 1).indices
    return {"agreement": round(float((top5[:, 0] == ref).float().mean()), 4),
            "dense_top1_in_top5": round(float((top5 == ref[:, None]).any(1).float().mean()), 4)}


def eff_grid():
    dense, calib, images, ref = eff_setup()
    recoveries = os.environ.get("SBNN_EFF_RECOVERIES", "none,distill").split(",")
    configs = [(s, r, rec, "uniform") for s in SPARSITIES for r in (False, True) for rec in recoveries]
    configs += [(s, True, rec, "sensitivity") for s in (0.3, 0.5) if s in SPARSITIES for rec in recoveries]
    for s, rearrange, recovery, allocation in configs:
        key = f"s{s:.1f}/rearrange={int(rearrange)}/recovery={recovery}/allocation={allocation}"
        if key in load("eff_grid"):
            continue
        m, summary = torch_stage(dense, calib, sparsity=s, dispatch="off", rearrange=rearrange, recovery=recovery,
                                 recovery_steps=EFF_DISTILL_STEPS, recovery_seconds=0, lr=1e-4, allocation=allocation)
        save("eff_grid", key, {**eff_agreement(m, images, ref), "sparsity": s, "rearrange": rearrange,
                               "recovery": recovery, "allocation": allocation, "views": len(images), **summary})


def eff_packages():
    from edgesparse import runtime

    dense, calib, images, ref = eff_setup()
    for s in SPARSITIES:
        key = f"s{s:.1f}"
        if key in load("eff_packages"):
            continue
        out = OUT / f"effnet-{int(s * 100)}"
        opts = {"sparsity": s, "dispatch": "measure", "recovery": "distill", "recovery_steps": EFF_DISTILL_STEPS,
                "lr": 1e-4}
        t0 = time.time()
        manifest = build_package(f"{HERE / 'efficientnet.py'}:build", out, opts)
        build_s = time.time() - t0
        session = runtime.load(out).session()
        logits = np.concatenate([session.run(None, {"image": images[i:i + 25]})[0] for i in range(0, len(images), 25)])
        top5 = np.argsort(-logits, 1)[:, :5]
        rep = manifest["passes"][0]["report"]
        save("eff_packages", key, {
            "agreement": round(float((top5[:, 0] == ref.numpy()).mean()), 4),
            "dense_top1_in_top5": round(float((top5 == ref.numpy()[:, None]).any(1).mean()), 4), "options": opts,
            "sparse_nodes": manifest["verification"]["sparse_nodes"],
            "on_kernel": manifest["verification"]["fraction_on_sparse_kernels"],
            "achieved_sparsity": round(rep["achieved_sparsity_of_candidates"], 4),
            "pruned_layers": sum(1 for l in rep["layers"] if l["sparsity"] > 0),
            "build_seconds": round(build_s, 1), "bench": bench(out)})


# -- plot -----------------------------------------------------------------------------------------

def plot():
    """Top-1 vs whole-model latency of the Fashion-MNIST CNN (`edgesparse bench`, batch 1).
    Squares: the built packages, accuracy and speed of the same package (cnn_packages.json, labelled
    with their recovery steps, distillation (KD) and pruning stages). Other points: the torch grids (cnn_grid.json without recovery, cnn_recovery.json with
    one epoch) at the latency of a package of that sparsity (cnn_bench.json): a package's speed depends
    only on which groups it keeps, not on their values. Stars: the dense model (3 epochs) and the dense
    controls fine-tuned for the same steps as the recoveries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bench, grid, rec = load("cnn_bench"), load("cnn_grid"), load("cnn_recovery")
    # the newest kernels' speed where recorded (tagged keys, e.g. 's0.7/nchw16c-default'), else the untagged
    tagged = {k.split("/")[0]: v for k, v in bench.items() if k.endswith(f"/{PLOT_BENCH_TAG}")}
    bench = tagged or {k: v for k, v in bench.items() if "/" not in k}
    pkgs = {k: v for k, v in load("cnn_packages").items() if "/steps=" in k}
    pkgs = {k: v for k, v in pkgs.items() if k.endswith(f"/{PLOT_PACKAGE_TAG}")} or pkgs
    if not bench or "dense" not in grid:
        print("plot: needs results/cnn_bench.json and the grid's dense entry")
        return
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(10, 5.0), dpi=100)
    axes = (ax, zoom)
    for ax in axes:
        controls = sorted((v["steps"], v["top1"] * 100) for k, v in rec.items()
                          if k.startswith("dense/") and "/seed=" not in k)
        for threads, color in ((1, "tab:blue"), (2, "tab:orange")):
            lat = {k: next(b for b in r["bench"] if b["threads"] == threads) for k, r in bench.items()}
            dense_ms = float(np.median([b["dense"]["median_ms"] for b in lat.values()]))
            ax.plot([dense_ms], [grid["dense"]["top1"] * 100], marker="*", markersize=12, color=color,
                    markerfacecolor="none", linestyle="none", label=f"{threads}T dense ONNX, 3 epochs")
            if controls:
                ax.plot([dense_ms] * len(controls), [t for _, t in controls], marker="*", markersize=12, color=color,
                        linestyle="none", label=f"{threads}T dense ONNX, controls fine-tuned 469/938/1407 steps")
                for steps, top1 in controls if ax is zoom else ():
                    ax.annotate(f"dense +{steps}", (dense_ms, top1), textcoords="offset points", xytext=(6, -3),
                                fontsize=7)
            series = [("no rearr., no recovery", "x", color,
                       {k: grid.get(f"{k}/rearrange=0/recovery=none") for k in lat}),
                      ("rearr., no recovery", "o", "none", {k: grid.get(f"{k}/rearrange=1/recovery=none") for k in lat})]
            for rearr, marker in ((0, "v"), (1, "o")):
                series.append((f"{'rearr.' if rearr else 'no rearr.'}, 1-epoch recovery", marker, color,
                               {k: next((v for kk, v in rec.items() if kk.startswith(f"{k}/rearrange={rearr}/block=16/")),
                                        None) for k in lat}))
            for label, marker, fill, points in series:
                pts = sorted((lat[k]["package"]["median_ms"], v["top1"] * 100, k) for k, v in points.items() if v)
                if not pts:
                    continue
                xs, ys, ks = zip(*pts)
                ax.plot(xs, ys, marker=marker, markerfacecolor=fill, color=color, linewidth=0.8, label=f"{threads}T, {label}")
                for x, y, k in pts:
                    ax.annotate(f"{float(k[1:]):.0%}", (x, y), textcoords="offset points", xytext=(5, -3), fontsize=7)
            pk = [(next(b for b in r["bench"] if b["threads"] == threads)["package"]["median_ms"], r["top1"] * 100, k)
                  for k, r in pkgs.items()]
            if pk:
                ax.plot([x for x, _, _ in pk], [y for _, y, _ in pk], marker="s", color=color, linestyle="none",
                        markersize=7, label=f"{threads}T, built package, its own top-1 and speed")
                for x, y, k in pk if ax is zoom else ():  # the wide panel has no room for them
                    ax.annotate(_package_label(k), (x, y), textcoords="offset points", xytext=(-10, 6), fontsize=6)
        ax.set_xlabel("whole-model latency, batch 1, ms (median, edgesparse bench)", fontsize=8)
        ax.set_ylabel("Fashion-MNIST test top-1, %", fontsize=8)
        ax.grid(alpha=0.3)
    ax = axes[0]
    zoom.set_ylim(87.5, 92.2)
    zoom.set_title("zoom: recovered models and packages", fontsize=8)
    ax.set_title("FashionMobileNet + sparsebytenn: accuracy vs latency (x86, AVX-512, loaded 2-vCPU VM)", fontsize=8)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6.5, loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(PLOT, dpi=100)
    print(f"wrote {PLOT}")


def _package_label(key: str) -> str:
    """'s0.7/steps=938/teacher=dense_control_938' -> '70 % 938 st. KD'."""
    parts = dict(p.split("=", 1) for p in key.split("/")[1:] if "=" in p)
    extra = (" KD" if "teacher" in parts else "") + (f" {parts['stages']} stages" if "stages" in parts else "")
    return f"{float(key[1:4]):.0%} {parts['steps']} st.{extra}"


STEPS = {"cnn-grid": cnn_grid, "cnn-recovery": cnn_recovery, "cnn-ablations": cnn_ablations, "cnn-packages": cnn_packages, "cnn-package-repeats": cnn_package_repeats,
         "eff-grid": eff_grid, "eff-packages": eff_packages, "plot": plot}

if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("SBNN_THREADS", "2")))
    for step in sys.argv[1:] or list(STEPS):
        if step not in STEPS:
            sys.exit(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
        STEPS[step]()
