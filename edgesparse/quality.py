"""Quality: what the passes cost, measured against the model as the user gave it.

The build keeps that original model, runs it (densely, with ONNX Runtime's own kernels) and the
finished package on held-out input batches, and compares their outputs:

    cosine          mean over rows of each output's cosine similarity (a row: the last axis; all
                    other axes are flattened into rows), `cosine_min` the lowest row
    rel_l2          ||package - original|| / ||original|| over the whole output
    top1_agreement  fraction of rows whose argmax over the last axis agrees; reported for every
                    floating output whose last axis has at least 2 entries (logits, and anything
                    else: it is cheap, and a reader can ignore it for embeddings)

Non-floating outputs get `exact_match` (fraction of equal elements) instead.
A model factory's `evaluate(run)` adds its own metrics, measured on both models.

A budget (`--min-quality METRIC=VALUE`, or a recipe's `min_quality` table) holds the build to
minimums: `cosine`, `cosine_min`, `top1_agreement` (the worst output must reach the value),
`rel_l2` (a maximum, for the worst output), a factory metric by name (the package's value must
reach it), and `NAME_drop` for a factory metric NAME (original - package <= value).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import inputs, verify
from .errors import EdgesparseError

EVALUATION_BATCHES = 16  # at most this many batches are taken from the factory's evaluation()

# built-in metric -> (bound kind, lowest allowed value, highest allowed value)
METRICS = {
    "cosine": ("min", -1.0, 1.0),
    "cosine_min": ("min", -1.0, 1.0),
    "top1_agreement": ("min", 0.0, 1.0),
    "rel_l2": ("max", 0.0, math.inf),
}
DROP = "_drop"


# --- the budget ---------------------------------------------------------------------------------

def parse_budget(spec: dict) -> dict[str, float]:
    """{metric: value} from flags (strings) or a recipe table (numbers), values range-checked.
    Factory metric names are checked later, once evaluate() has said what it measures."""
    if not isinstance(spec, dict):
        raise EdgesparseError("min_quality must be a table of metric = value, e.g. {cosine = 0.98}")
    budget = {}
    for name, raw in spec.items():
        try:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw)
        except (TypeError, ValueError):
            raise EdgesparseError(f"quality budget {name}: {raw!r} is not a number") from None
        if math.isnan(value):
            raise EdgesparseError(f"quality budget {name}: {raw!r} is not a number")
        if name in METRICS:
            _, lo, hi = METRICS[name]
            if not lo <= value <= hi:
                range_text = f"[{lo:g}, {hi:g}]" if hi != math.inf else f">= {lo:g}"
                raise EdgesparseError(f"quality budget {name}={raw} is out of range: {name} must be {range_text}")
        elif not math.isfinite(value):
            raise EdgesparseError(f"quality budget {name}: {raw!r} is not a finite number")
        budget[str(name)] = value
    return budget


def parse_budget_flags(flags, base: dict | None = None) -> dict:
    """`--min-quality METRIC=VALUE` flags over a recipe's table: a flag wins for its metric."""
    spec = dict(base or {})
    for flag in flags:
        name, eq, value = flag.partition("=")
        if not eq or not name.strip():
            raise EdgesparseError(f"--min-quality must be METRIC=VALUE: {flag!r}")
        spec[name.strip()] = value.strip()
    return spec


def check_metric_names(budget: dict, factory_metrics: set[str] | None) -> None:
    """Every name must be a built-in metric, a factory metric, or a factory metric + `_drop`.
    factory_metrics is None when the model has no evaluate()."""
    known = set(METRICS) | {m for name in (factory_metrics or ()) for m in (name, name + DROP)}
    for name in budget:
        if name not in known:
            extra = "; a model factory's evaluate() adds its own" if factory_metrics is None else ""
            raise EdgesparseError(f"unknown quality metric '{name}' (known: {', '.join(sorted(known))}{extra})")


def check_budget(quality: dict, budget: dict) -> dict:
    """The budget against the measured quality: {metric: {limit, value, passed}}. The first miss
    raises, naming the metric, its value and the limit."""
    results, missed = budget_results(quality, budget)
    if missed:
        raise EdgesparseError(f"quality budget missed: {missed}")
    return results


def budget_results(quality: dict, budget: dict) -> tuple[dict, str | None]:
    """The budget against the measured quality, without raising: ({metric: {limit, value,
    passed}}, the first miss as text, e.g. "cosine 0.91 < 0.95", or None)."""
    results, missed = {}, None
    for name, limit in budget.items():
        value, kind, note = _budget_value(quality, name)
        passed = (value >= limit) if kind == "min" else (value <= limit)  # NaN never passes
        results[name] = {"min" if kind == "min" else "max": limit, "value": value, "passed": bool(passed)}
        if not passed and missed is None:
            sign = "<" if kind == "min" else ">"
            missed = f"{name} {value:.4g} {sign} {limit:.4g}{note}"
    return results, missed


def needs_evaluate(budget: dict) -> bool:
    """Whether the budget holds a factory metric (evaluate() must run to check it)."""
    return any(name not in METRICS for name in budget)


def _budget_value(quality: dict, name: str) -> tuple[float, str, str]:
    if name in METRICS:
        value = quality["summary"].get(name)
        if value is None:
            raise EdgesparseError(f"quality budget {name}: no output of the model has it "
                                  "(top1_agreement needs a floating output whose last axis has at least 2 entries)")
        return value, METRICS[name][0], ""
    metrics = quality["metrics"]
    if name in metrics:
        return metrics[name]["package"], "min", ""
    m = metrics[name[: -len(DROP)]]
    note = f" ({name[: -len(DROP)]} {m['original']:.4g} -> {m['package']:.4g})"
    return m["drop"], "max", note


# --- measuring ----------------------------------------------------------------------------------

@dataclass
class Baseline:
    """The original model's outputs on the held-out batches, and its factory metrics."""

    batches: list[dict]
    inputs: str          # where the batches came from: evaluation, file or calibration
    outputs: list[list[np.ndarray]]
    metrics: dict[str, float] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # the original's output names


def measure_original(original, batches: list[dict], kind: str, evaluate: Callable | None, threads: int = 1) -> Baseline:
    """Run the original model (a dense ONNX model: no custom ops) where the build runs."""
    session = verify.dense_session(original, threads, spin=False)
    names = [o["name"] for o in inputs.signature(original, "output")]

    def run_batch(batch):
        try:
            return session.run(None, batch)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EdgesparseError(f"the original model does not run on the {kind} inputs: {first}") from None

    outputs = [run_batch(b) for b in batches]
    metrics = call_evaluate(evaluate, runner(run_batch, names), "original") if evaluate else {}
    return Baseline(batches, kind, outputs, metrics, names)


def compare(baseline: Baseline, run_batch: Callable, names: list[str], evaluate: Callable | None) -> dict:
    """The manifest's quality section: the package (run by `run_batch`: an input batch -> the
    list of outputs, in `names` order) against the baseline; evaluate=None leaves the factory
    metrics out."""
    got = [run_batch(b) for b in baseline.batches]
    if len(baseline.outputs[0]) != len(names):
        raise EdgesparseError(f"the package has {len(names)} outputs where the original has {len(baseline.outputs[0])}")
    outputs = {}
    for i, name in enumerate(names):
        outputs[name] = output_quality(name, [o[i] for o in baseline.outputs], [o[i] for o in got])
    metrics = {}
    if evaluate is not None:
        package_metrics = call_evaluate(evaluate, runner(run_batch, names), "package")
        for key, original in baseline.metrics.items():
            value = package_metrics.get(key, math.nan)
            metrics[key] = {"original": original, "package": value, "drop": original - value}
    return {
        "inputs": baseline.inputs,
        "held_out": baseline.inputs != "calibration",
        "batches": len(baseline.batches),
        "outputs": outputs,
        "summary": _summary(outputs),
        "metrics": metrics,
    }


def output_quality(name: str, original: list[np.ndarray], package: list[np.ndarray]) -> dict:
    for a, p in zip(original, package, strict=True):
        if a.shape != p.shape:
            raise EdgesparseError(f"package output '{name}' has shape {list(p.shape)} where the original's has {list(a.shape)}")
    if not all(np.issubdtype(a.dtype, np.floating) for a in original):
        equal = sum(int((a == p).sum()) for a, p in zip(original, package))
        total = sum(a.size for a in original)
        return {"exact_match": equal / total if total else 1.0}
    rows_a = np.concatenate([_rows(a) for a in original])
    rows_p = np.concatenate([_rows(p) for p in package])
    if rows_a.size == 0:
        return {"rows": 0}
    norm_a, norm_p = np.linalg.norm(rows_a, axis=1), np.linalg.norm(rows_p, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (rows_a * rows_p).sum(axis=1) / (norm_a * norm_p)
    cosine = np.where((norm_a == 0) & (norm_p == 0), 1.0, np.where((norm_a == 0) | (norm_p == 0), 0.0, cosine))
    cosine = np.nan_to_num(np.clip(cosine, -1.0, 1.0), nan=-1.0)  # a NaN in the package is the worst case
    diff, ref = float(np.linalg.norm(rows_p - rows_a)), float(np.linalg.norm(rows_a))
    rel_l2 = diff / ref if ref else (0.0 if diff == 0 else math.inf)
    # rounded: an unchanged model scores exactly 1.0 rather than 1 - 2e-16, which a budget of 1 would miss
    result = {"rows": int(rows_a.shape[0]), "cosine": round(float(cosine.mean()), 10),
              "cosine_min": round(float(cosine.min()), 10),
              "rel_l2": rel_l2 if math.isfinite(rel_l2) else math.inf}
    if rows_a.shape[1] >= 2:
        result["top1_agreement"] = float((rows_a.argmax(axis=1) == rows_p.argmax(axis=1)).mean())
    return result


def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x.reshape(1, 1) if x.ndim == 0 else x.reshape(-1, x.shape[-1])


def _summary(outputs: dict) -> dict:
    """The worst output for each metric: what a budget is held against."""
    def worst(key, pick):
        values = [o[key] for o in outputs.values() if key in o]
        return pick(values) if values else None

    summary = {"cosine": worst("cosine", min), "cosine_min": worst("cosine_min", min),
               "rel_l2": worst("rel_l2", max), "top1_agreement": worst("top1_agreement", min)}
    return {k: v for k, v in summary.items() if v is not None}


# --- the factory's evaluate() ---------------------------------------------------------------------

def runner(run_batch: Callable, names: list[str]) -> Callable:
    """The `run` given to evaluate(): a list of input batches ({name: array or tensor}) -> a list
    of {output name: numpy array}, one per batch."""
    def run(batches):
        return [dict(zip(names, run_batch(inputs.to_numpy(b)))) for b in batches]
    return run


def call_evaluate(evaluate: Callable, run: Callable, which: str) -> dict[str, float]:
    try:
        result = evaluate(run)
    except EdgesparseError:
        raise
    except Exception as exc:
        raise EdgesparseError(f"the model factory's evaluate() failed on the {which} model: "
                              f"{type(exc).__name__}: {exc}") from None
    if not isinstance(result, dict):
        raise EdgesparseError(f"the model factory's evaluate() must return {{metric: number}}, got {type(result).__name__}")
    if not result:
        raise EdgesparseError("the model factory's evaluate() returned no metrics")
    metrics = {}
    for key, value in result.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise EdgesparseError(f"the model factory's evaluate() returned {type(value).__name__} for '{key}': "
                                  "metrics must be numbers")
        metrics[str(key)] = float(value)
    return metrics


# --- the line the build prints ----------------------------------------------------------------------

def summary_line(quality: dict | None) -> str:
    if not quality:
        return "quality: not measured"
    s = quality["summary"]
    parts = []
    if "cosine" in s:
        parts.append(f"cosine {s['cosine']:.4f} (lowest {s['cosine_min']:.4f})")
    if "rel_l2" in s:
        parts.append(f"rel L2 {s['rel_l2']:.2e}")
    if "top1_agreement" in s:
        parts.append(f"top-1 agreement {s['top1_agreement']:.1%}")
    parts += [f"{k} {m['original']:.4g} -> {m['package']:.4g}" for k, m in quality.get("metrics", {}).items()]
    where = (f"{quality['batches']} held-out batches ({quality['inputs']})" if quality["held_out"]
             else f"{quality['batches']} calibration batches, not held out")
    line = f"quality vs the original on {where}: " + ", ".join(parts or ["no floating outputs"])
    if quality.get("budget"):
        line += "; budget met: " + ", ".join(f"{k} {'>=' if 'min' in b else '<='} {b.get('min', b.get('max')):g}"
                                             for k, b in quality["budget"].items())
    return line


# --- the held-out batches -------------------------------------------------------------------------

def held_out_batches(eval_inputs, source, model, calibration: list[dict]) -> tuple[list[dict], str]:
    """Batches the passes did not see, and where they came from: an --eval-inputs file (ONNX
    models), the factory's evaluation(), failing both the calibration batches."""
    if eval_inputs is not None:
        if model is None:
            raise EdgesparseError("--eval-inputs is for ONNX models; a model factory provides evaluation=")
        return inputs.from_npz(eval_inputs, model), "file"
    if source is not None and source.evaluation is not None:
        batches = []
        try:
            for batch in source.evaluation():
                batches.append(inputs.to_numpy(batch))
                if len(batches) == EVALUATION_BATCHES:
                    break
        except Exception as exc:
            raise EdgesparseError(f"the model factory's evaluation() failed: {type(exc).__name__}: {exc}") from None
        if not batches:
            raise EdgesparseError("the model factory's evaluation() yielded no batches")
        return batches, "evaluation"
    return calibration, "calibration"
