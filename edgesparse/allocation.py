"""`sparsity=auto`: per-layer sparsities chosen for speed within the build's quality budget.

Passes that prune layers (magnitude, sparsebytenn) share this search; each supplies how to prune
its layers and how to run the pruned model, the search does the rest:

1. **Levels.** For each prunable layer, the sparsities of a ladder (`LADDER`) at which the target's
   measured dispatch rule says the sparse kernel beats the dense one (`ctx.target.prefers_sparse`),
   each with the speedup the measured table predicts there (`ctx.target.predicted_speedup`; where
   a target has no figure, half the ideal saving: 1 / (1 - sparsity / 2)). A layer's dense time is
   taken as its multiply-adds, so its predicted time at sparsity s is macs / speedup(s).
2. **Sensitivity** (the quick proxy). Each layer is pruned alone at each of its levels and the
   model's outputs on held-out batches (`ctx.evaluation_inputs()`; the calibration batches only
   when the build has no held-out ones, which the report says) are compared with the unpruned
   outputs: KL divergence of the softmax for logits (2-D outputs), relative squared error otherwise.
3. **The path.** From all-dense, a greedy walk repeatedly takes the step (one layer to one of its
   higher levels) with the most predicted time saved per proxy loss added (layers assumed to add
   up), until every layer sits at its highest level. Each step is a point: an allocation, its
   mean sparsity (weighted by weights) and its predicted speedup over the prunable layers.
4. **The budget.** Points along the path are checked with the budget's own metrics
   (`ctx.measure_quality`: the same comparison with the original model the build's quality section
   makes; a factory's `evaluate()` only when the budget names one of its metrics, since it can be
   slow), by bisection: the path's quality falls as it goes (assumed, not proven: layers interact),
   so about log2(points) checks find the furthest point that meets the budget. The pass prunes
   to that allocation; its package is checked against the budget again at the end of the build.

Every point checked goes to the pass's report (`auto`): allocation, mean sparsity, predicted
speedup, measured quality, whether it met the budget, and which one was chosen. The measured
speed of the chosen package is what `edgesparse bench` says of it.

No budget: `sparsity=auto` fails with one line (it needs `--min-quality`). No point meets the
budget: one line naming the lightest point checked and what it missed; nothing is written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import EdgesparseError

AUTO = "auto"
LADDER = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class Layer:
    """A layer the search may prune. op/shape/block as the dispatch rule takes them; weights: its
    weight count (for the mean sparsity); macs: dense multiply-adds per input batch (its time)."""

    name: str
    op: str
    shape: dict
    block: int
    weights: int
    macs: float
    levels: dict[float, float] = field(default_factory=dict)  # sparsity -> predicted speedup (> 0)
    loss: dict[float, float] = field(default_factory=dict)    # sparsity -> proxy loss (pruned alone)


def require_budget(ctx, pass_name: str) -> dict:
    """The build's budget, or the one-line error sparsity=auto gives without one."""
    budget = ctx.quality_budget
    if not budget:
        raise EdgesparseError(f"{pass_name}: sparsity=auto needs a quality budget to search within: "
                              "add --min-quality METRIC=VALUE (e.g. cosine=0.98, top1_agreement=0.99, accuracy_drop=0.01)")
    return budget


def held_out(ctx) -> tuple[list[dict], str]:
    """The batches sensitivities are measured on: held-out ones, else the calibration batches."""
    batches = ctx.evaluation_inputs()
    if batches:
        return list(batches), "held-out"
    return list(ctx.calibration_inputs()), "calibration (the build has no held-out inputs)"


def levels(ctx, layer: Layer, allowed: Callable[[float], bool] | None = None, ladder=LADDER) -> dict[float, float]:
    """{sparsity: predicted speedup} for the ladder's sparsities at which the layer may go sparse:
    where `allowed(sparsity)` (default: the target's dispatch rule) says so."""
    if allowed is None:
        def allowed(s):
            return bool(ctx.target.prefers_sparse(layer.op, layer.shape, s, layer.block, ctx.threads))
    found = {}
    for s in ladder:
        if not allowed(s):
            continue
        speedup = None
        predict = getattr(ctx.target, "predicted_speedup", None)
        if predict is not None:
            speedup = predict(layer.op, layer.shape, s, layer.block, ctx.threads)
        if speedup is None or not speedup > 0:
            speedup = 1.0 / (1.0 - s / 2.0)  # no figure: half the ideal saving
        found[float(s)] = float(speedup)
    return found


def output_distance(reference: list[np.ndarray], got: list[np.ndarray]) -> float:
    """The proxy loss between two runs' outputs: KL(softmax(ref) || softmax(got)) for 2-D float
    outputs with several columns (logits), relative squared error for other float outputs."""
    total = 0.0
    for r, g in zip(reference, got):
        r, g = np.asarray(r), np.asarray(g)
        if not np.issubdtype(r.dtype, np.floating):
            continue
        r, g = r.astype(np.float64), g.astype(np.float64)
        if r.ndim == 2 and r.shape[1] > 1:
            lr = r - r.max(1, keepdims=True)
            lr -= np.log(np.exp(lr).sum(1, keepdims=True))
            lg = g - g.max(1, keepdims=True)
            lg -= np.log(np.exp(lg).sum(1, keepdims=True))
            total += float((np.exp(lr) * (lr - lg)).sum(1).mean())
        else:
            total += float(((r - g) ** 2).mean() / ((r ** 2).mean() + 1e-12))
    return total if math.isfinite(total) else 1e30


def sensitivities(layers: list[Layer], run: Callable[[dict], list], batches: list[dict],
                  prune_alone: Callable[[Layer, float], Callable[[], None]]) -> None:
    """Fill each layer's `loss`: `prune_alone(layer, s)` prunes the layer alone and returns the
    function that restores it; `run(batch)` runs the model as it is now."""
    reference = [run(b) for b in batches]
    for layer in layers:
        layer.loss = {0.0: 0.0}
        for s in sorted(layer.levels):
            restore = prune_alone(layer, s)
            try:
                layer.loss[s] = float(np.mean([output_distance(r, run(b)) for r, b in zip(reference, batches)]))
            finally:
                restore()


def _time(layer: Layer, s: float) -> float:
    return layer.macs / layer.levels[s] if s > 0 else layer.macs


def describe(layers: list[Layer], allocation: dict[str, float]) -> dict:
    """Mean sparsity (weighted by weights) and predicted speedup of the prunable layers."""
    weights = sum(l.weights for l in layers) or 1
    dense = sum(l.macs for l in layers) or 1.0
    sparse = sum(_time(l, allocation.get(l.name, 0.0)) for l in layers) or dense
    return {"mean_sparsity": round(sum(l.weights * allocation.get(l.name, 0.0) for l in layers) / weights, 4),
            "predicted_speedup": round(dense / sparse, 3),
            "layers_sparse": sum(1 for l in layers if allocation.get(l.name, 0.0) > 0)}


def path(layers: list[Layer]) -> list[dict[str, float]]:
    """The greedy walk from all-dense: each point takes the step with the most predicted time saved
    per proxy loss added. Returns the allocations after each step (all-dense not included)."""
    current = {l.name: 0.0 for l in layers}
    points = []
    while True:
        best = None
        for l in layers:
            cur = current[l.name]
            for s in sorted(l.levels):
                if s <= cur:
                    continue
                saved = _time(l, cur) - _time(l, s)
                if saved <= 0:
                    continue
                added = max(l.loss.get(s, 0.0) - l.loss.get(cur, 0.0), 0.0) + 1e-12
                score = saved / added
                if best is None or score > best[0]:
                    best = (score, l.name, s)
        if best is None:
            return points
        current[best[1]] = best[2]
        points.append(dict(current))


def search(layers: list[Layer], check: Callable[[dict[str, float]], dict], pass_name: str, ctx) -> dict[str, float]:
    """Bisect the greedy path for its furthest allocation that meets the budget. `check(allocation)`
    prunes the model to the allocation, measures it (`ctx.measure_quality`) and restores it; it
    returns measure_quality's result. Reports the points under `auto` and returns {layer: sparsity}."""
    points = path(layers)
    report = {"method": "greedy path by predicted time saved per sensitivity, bisected with the budget's metrics",
              "budget": ctx.quality_budget, "path_points": len(points), "tried": []}
    ctx.report("auto", report)
    if not points:
        raise EdgesparseError(f"{pass_name}: sparsity=auto found no layer that the target's dispatch rule says "
                              f"would run faster sparse on {ctx.target.name}")
    results: dict[int, dict] = {}

    def passes(i: int) -> bool:
        allocation = points[i - 1]
        ctx.log(f"[{pass_name}] auto: checking point {i}/{len(points)} "
                f"(mean sparsity {describe(layers, allocation)['mean_sparsity']:.0%})")
        q = check(allocation)
        entry = {"point": i, **describe(layers, allocation), "quality": _brief(q), "passed": bool(q["passed"]),
                 **({"missed": q["missed"]} if q["missed"] else {}),
                 "allocation": {k: v for k, v in allocation.items() if v > 0}}
        report["tried"].append(entry)
        results[i] = entry
        return bool(q["passed"])

    lo, hi = 0, len(points)  # points[lo - 1] passes (0: all dense, assumed), every point past hi fails
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if passes(mid):
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        first = results[min(results)]
        raise EdgesparseError(f"{pass_name}: sparsity=auto: no allocation meets the quality budget; the lightest "
                              f"tried ({first['mean_sparsity']:.0%} mean sparsity, {first['layers_sparse']} layer(s)) "
                              f"missed {first['missed']}")
    chosen = points[lo - 1]
    report["chosen"] = {"point": lo, **describe(layers, chosen)}
    report["allocation"] = {l.name: chosen[l.name] for l in layers}
    report["sensitivity"] = {l.name: {f"{s:.2f}": round(v, 6) for s, v in sorted(l.loss.items())} for l in layers}
    report["predicted_layer_speedup"] = {l.name: {f"{s:.2f}": round(v, 3) for s, v in sorted(l.levels.items())}
                                         for l in layers}
    c = report["chosen"]
    ctx.log(f"[{pass_name}] auto: chose point {lo}/{len(points)}: mean sparsity {c['mean_sparsity']:.0%}, "
            f"{c['layers_sparse']} layer(s) sparse, predicted {c['predicted_speedup']:.2f}x on the prunable layers")
    return {l.name: chosen[l.name] for l in layers}


def _brief(q: dict) -> dict:
    out = dict(q.get("summary", {}))
    for name, m in q.get("metrics", {}).items():
        out[name] = m["package"]
        out[name + "_drop"] = m["drop"]
    return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}


def torch_runner(module) -> Callable[[dict], list[np.ndarray]]:
    """Run a torch module on an input batch ({name: array}, in forward() order) -> its outputs as
    numpy arrays, flattened in order (the order the exported model's outputs take)."""
    import torch

    from .recovery import tensors

    def run(batch: dict) -> list[np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(v)) for v in batch.values()]
        with torch.no_grad():
            out = module(*args)
        return [t.detach().cpu().numpy() for t in tensors(out)]
    return run


def onnx_runner(model_proto, threads: int = 1) -> Callable[[dict], list[np.ndarray]]:
    """Run a plain ONNX model (no custom ops) densely with ONNX Runtime."""
    from . import verify

    session = verify.dense_session(model_proto, threads, spin=False)
    return lambda batch: session.run(None, batch)
