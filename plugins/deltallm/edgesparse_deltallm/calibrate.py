"""Calibration: choose the window and the thresholds from a few calibration inputs.

Thresholds are scale-free. theta_q for layer l, head h and query dimension d is
alpha * sigma[l, h, d], where sigma is the median |q_t[d] - q_{t-1}[d]| of that dimension on the
calibration text (so one alpha means the same thing in every layer, head and dimension: RoPE turns
some dimensions fast and others barely, and a head-wide scale sent the fast ones every step while
the slow ones drifted), or alpha * sigma[l, h] with the head's median over all its dimensions
(Setting.per "dimension" or "head"; which works better depends on the model, so the search tries
both); theta_v is a fraction of the softmax denominator. The
search runs the rewritten model in ONNX Runtime with the deltallm kernels (one session per
window, thresholds fed as inputs) and measures, on the calibration batches:

* attention sparsity: skipped attention MACs / dense causal attention MACs, as the kernel counts
  them;
* the error against the exact model: the relative perplexity increase when the model is a
  language model (an int64 token input and logits over a vocabulary), else the relative RMS
  error of the first output.

Target "sparsity": for each candidate (window, theta_v), bisect alpha until the sparsity reaches
the target; keep the candidate with the smallest error. Target "accuracy": bisect alpha for the
largest sparsity whose error stays within the budget; keep the candidate with the most sparsity.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from edgesparse import EdgesparseError

from .probe import Probe

ALPHA_MAX = 8.0
BISECT_STEPS = 6
EXACT_WINDOW = 1 << 30


@dataclass
class Setting:
    window: int
    sinks: int
    alpha: float
    theta_v: float
    per: str = "head"  # theta_q's scale: each query "dimension"'s median change, or the "head"'s


@dataclass
class Evaluation:
    setting: Setting
    sparsity: float
    error: float
    layer_sparsity: list = field(default_factory=list)
    qk_sparsity: float = 0.0
    pv_sparsity: float = 0.0

    def row(self) -> dict:
        s = self.setting
        return {"window": s.window, "sinks": s.sinks, "alpha": round(s.alpha, 4), "theta_q_per": s.per, "theta_v": s.theta_v,
                "sparsity": round(self.sparsity, 4), "error": round(self.error, 5)}


def _softmax_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    x = logits.reshape(-1, logits.shape[-1])[:-1].astype(np.float64)
    x -= x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    tokens = ids.reshape(-1)
    return float(-lp[np.arange(len(tokens) - 1), tokens[1:]].sum()), len(tokens) - 1


class Calibrator:
    def __init__(self, dense: onnx.ModelProto, delta: onnx.ModelProto, batches: list[dict], library: str,
                 threads: int = 1, log=lambda message: None):
        import onnxruntime as ort

        if not batches:
            raise EdgesparseError("deltallm: calibration needs at least one input batch")
        self.delta = delta
        self.batches = batches
        self.library = library
        self.threads = threads
        self.log = log
        self.probes: dict[tuple, Probe] = {}
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        session = ort.InferenceSession(dense.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in session.get_outputs()]
        self.reference = [session.run(None, b) for b in batches]
        del session
        self.tokens = self._token_input(batches[0], self.reference[0][0])
        if self.tokens:
            nll = sum(_softmax_nll(ref[0], b[self.tokens])[0] for ref, b in zip(self.reference, batches))
            count = sum(_softmax_nll(ref[0], b[self.tokens])[1] for ref, b in zip(self.reference, batches))
            self.dense_nll = nll / count
        # per-head query delta scale and the context length, from the first batch
        probe = Probe(delta, library, threads, window=EXACT_WINDOW, sinks=0, capture_queries=True)
        self.layers = probe.layers
        zero = [np.zeros(l.heads, np.float32) for l in self.layers]
        outputs, _, captured = probe.run(batches[0], zero, zero)
        self.context = int(captured[0][0].shape[2])
        self.sigma, self.sigma_dim = [], []  # per head [H]; per head and query dimension [H, D]
        for q, _ in captured:
            change = np.abs(np.diff(q, axis=2)) if q.shape[2] > 1 else np.abs(q)
            self.sigma.append(np.maximum(np.median(change, axis=(0, 2, 3)), 1e-6).astype(np.float32))
            self.sigma_dim.append(np.maximum(np.median(change, axis=(0, 2)), 1e-6).astype(np.float32))
        # the rewrite must reproduce the model when nothing is approximated
        first = outputs[self.output_names[0]]
        ref = self.reference[0][0]
        err = float(np.abs(first - ref).max())
        if not err <= 1e-3 * max(1.0, float(np.abs(ref).max())):
            raise EdgesparseError(f"deltallm: the rewritten model with exact attention differs from the original by "
                                  f"{err:.3g}; the matched subgraph is not plain causal attention")
        self.exact_check = err

    @staticmethod
    def _token_input(batch: dict, first_output: np.ndarray) -> str | None:
        if first_output.ndim < 2:
            return None
        vocab = first_output.shape[-1]
        for name, value in batch.items():
            if value.dtype == np.int64 and value.ndim == 2 and value.size and value.shape[-1] == first_output.shape[-2] \
                    and value.min() >= 0 and value.max() < vocab:
                return name
        return None

    def thresholds(self, setting: Setting):
        """theta_q per layer ([H, D] or [H]), theta_v per layer ([H])."""
        theta_q = [setting.alpha * s for s in (self.sigma_dim if setting.per == "dimension" else self.sigma)]
        theta_v = [np.full(l.heads, setting.theta_v, np.float32) for l in self.layers]
        return theta_q, theta_v

    def _probe(self, window: int, sinks: int) -> Probe:
        key = (window, sinks)
        if key not in self.probes:
            self.probes = {key: Probe(self.delta, self.library, self.threads, window=window, sinks=sinks)}
        return self.probes[key]

    def evaluate(self, setting: Setting, batches: list[int] | None = None) -> Evaluation:
        probe = self._probe(setting.window, setting.sinks)
        theta_q, theta_v = self.thresholds(setting)
        macs = np.zeros((len(self.layers), 3))
        nll = count = 0.0
        sq_err = sq_ref = 0.0
        for i in batches if batches is not None else range(len(self.batches)):
            outputs, m, _ = probe.run(self.batches[i], theta_q, theta_v)
            macs += m
            first = outputs[self.output_names[0]]
            if self.tokens:
                a, b = _softmax_nll(first, self.batches[i][self.tokens])
                nll, count = nll + a, count + b
            else:
                ref = self.reference[i][0].astype(np.float64)
                sq_err += float(((first - ref) ** 2).sum())
                sq_ref += float((ref ** 2).sum())
        if self.tokens:
            error = float(np.exp(nll / count - self.dense_nll) - 1.0)
        else:
            error = float(np.sqrt(sq_err / max(sq_ref, 1e-30)))
        dense = macs[:, 0].sum()
        layer = [float(1 - (r[1] + r[2]) / r[0]) if r[0] else 0.0 for r in macs]
        return Evaluation(setting, float(1 - macs[:, 1:].sum() / dense) if dense else 0.0, error, layer,
                          float(1 - 2 * macs[:, 1].sum() / dense) if dense else 0.0,
                          float(1 - 2 * macs[:, 2].sum() / dense) if dense else 0.0)

    def _bisect(self, window, sinks, theta_v, per, accept) -> tuple[Evaluation | None, list[Evaluation]]:
        """Largest alpha in [0, ALPHA_MAX] whose evaluation is accepted (accept is monotone: true
        for small alpha). Returns (best accepted, all evaluations)."""
        seen = []
        lo_eval = self.evaluate(Setting(window, sinks, 0.0, theta_v, per))
        seen.append(lo_eval)
        if not accept(lo_eval):
            return None, seen
        hi_eval = self.evaluate(Setting(window, sinks, ALPHA_MAX, theta_v, per))
        seen.append(hi_eval)
        if accept(hi_eval):
            return hi_eval, seen
        lo, hi, best = 0.0, ALPHA_MAX, lo_eval
        for _ in range(BISECT_STEPS):
            mid = 0.5 * (lo + hi)
            e = self.evaluate(Setting(window, sinks, mid, theta_v, per))
            seen.append(e)
            if accept(e):
                lo, best = mid, e
            else:
                hi = mid
        return best, seen

    def search(self, *, target: str, sparsity: float, budget: float, windows, sinks: int, theta_vs,
               alpha: float | None = None, pers=("dimension", "head")) -> tuple[Evaluation, list[Evaluation]]:
        """The calibrated setting and every evaluation made on the way."""
        tried: list[Evaluation] = []
        finalists: list[Evaluation] = []
        for window, theta_v, per in ((w, t, p) for w in windows for t in theta_vs for p in pers):
            if alpha is not None:  # alpha fixed by the user: nothing to search on that axis
                e = self.evaluate(Setting(window, sinks, alpha, theta_v, per))
                tried.append(e)
                finalists.append(e)
                continue
            if target == "sparsity":
                # smallest alpha that reaches the target: bisect on "below target"
                below, seen = self._bisect(window, sinks, theta_v, per, lambda e: e.sparsity < sparsity)
                tried += seen
                reached = [e for e in seen if e.sparsity >= sparsity]
                finalists.append(min(reached, key=lambda e: e.setting.alpha) if reached
                                 else max(seen, key=lambda e: e.sparsity))
            else:
                best, seen = self._bisect(window, sinks, theta_v, per, lambda e: e.error <= budget)
                tried += seen
                if best is not None:
                    finalists.append(best)
            self.log(f"deltallm: window {window}, theta_v {theta_v}, theta_q per {per}: {len(tried)} evaluations so far")
        if not finalists:
            raise EdgesparseError(f"deltallm: no setting keeps the calibration error within the budget {budget}")
        if target == "sparsity":
            reached = [e for e in finalists if e.sparsity >= sparsity]
            chosen = min(reached, key=lambda e: e.error) if reached else max(finalists, key=lambda e: e.sparsity)
        else:
            chosen = max(finalists, key=lambda e: e.sparsity)
        return chosen, tried


@dataclass
class DecodePlan:
    tokens: str
    mask: str | None
    positions: str | None
    caches: dict  # past input -> present output


def decode_plan(model: onnx.ModelProto, batch: dict, tokens: str | None) -> DecodePlan | None:
    """How to run the model one token at a time: a token input, and past inputs whose present
    twins are outputs. None when the model has no KV cache."""
    if tokens is None:
        return None
    outputs = {o.name for o in model.graph.output}
    caches = {}
    for name in batch:
        if "past" in name:
            twin = name.replace("past", "present")
            if twin in outputs:
                caches[name] = twin
    if not caches:
        return None
    mask = next((n for n in batch if "mask" in n and batch[n].dtype == np.int64), None)
    positions = next((n for n in batch if "position" in n), None)
    return DecodePlan(tokens, mask, positions, caches)


def measure_decode(model: onnx.ModelProto, plan: DecodePlan, batch: dict, library: str, threads: int,
                   theta_q, theta_v, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Prefill the first tokens of `batch`, then decode its last `steps` tokens one at a time (the
    node keeps its delta state between calls). Returns per-layer MACs [L, 3] of the prefill and of
    the decode steps."""
    probe = Probe(model, library, threads, carry=True)
    ids = batch[plan.tokens]
    steps = max(1, min(steps, ids.shape[1] - 1))
    prompt = ids.shape[1] - steps
    feeds = dict(batch)
    feeds[plan.tokens] = ids[:, :prompt]
    if plan.mask:
        feeds[plan.mask] = np.ones((ids.shape[0], prompt), np.int64)
    if plan.positions:
        feeds[plan.positions] = np.arange(prompt, dtype=np.int64)[None].repeat(ids.shape[0], 0)
    values, prefill, _ = probe.run(feeds, theta_q, theta_v)
    decode = np.zeros_like(prefill)
    for s in range(steps):
        position = prompt + s
        feeds = {past: values[present] for past, present in plan.caches.items()}
        feeds[plan.tokens] = ids[:, position:position + 1]
        if plan.mask:
            feeds[plan.mask] = np.ones((ids.shape[0], position + 1), np.int64)
        if plan.positions:
            feeds[plan.positions] = np.full((ids.shape[0], 1), position, np.int64)
        for name, value in batch.items():
            feeds.setdefault(name, value)
        values, m, _ = probe.run(feeds, theta_q, theta_v)
        decode += m
    return prefill, decode
