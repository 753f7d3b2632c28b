"""Core neurons, core tokens and the elbow rule (CoreInfer / CoreMatching, papers.md section 4).

All functions are batched: tensors carry a leading batch axis and a `valid` mask [B, T] that marks
real tokens (padding and tokens removed earlier are False), so sequences of a batch may differ in
length and in what was pruned. Everything stays on the tensor side (no Python loop over tokens and
no host round-trip per sequence), which also lets torch.onnx export it as standard ops.
"""
from __future__ import annotations

import math

import torch


def token_core_neurons(act: torch.Tensor, rho: float) -> torch.Tensor:
    """Token-wise core neurons: per token, the top `rho` fraction of its positively activated
    neurons (by activation). act [B, T, I] -> bool [B, T, I]."""
    positive = act > 0
    count = positive.sum(-1, keepdim=True)                       # [B, T, 1]
    keep = torch.ceil(count.to(act.dtype) * rho).clamp(min=1).to(torch.int64)
    # keep <= ceil(rho * I): a partial top-k of that static size holds every threshold at a third to a
    # quarter of a full sort's cost in ORT (samples/corematching/selection_cost.py)
    limit = min(act.shape[-1], math.ceil(rho * act.shape[-1]) + 1)
    ordered = torch.topk(act, limit, dim=-1).values
    threshold = ordered.gather(-1, keep - 1)                     # the keep-th largest activation
    return positive & (act >= threshold) & (count > 0)


def sentence_core_neurons(core: torch.Tensor, act: torch.Tensor, valid: torch.Tensor, keep: int) -> torch.Tensor:
    """Sentence-wise core neurons: the `keep` neurons that are token-wise core for the most valid
    tokens of each sequence; ties go to the larger summed positive activation.
    core [B, T, I] bool, act [B, T, I], valid [B, T] -> int64 [B, keep], ascending."""
    # sums over the token axis as [B, 1, T] @ [B, T, I] products: ORT's ReduceSum over a middle axis
    # was several times slower than a matrix-vector product (samples/corematching/selection_cost.py)
    mask = valid.to(torch.float32).unsqueeze(1)                            # [B, 1, T]
    counts = (mask @ core.to(torch.float32)).squeeze(1)                     # [B, I]
    strength = (mask @ act.clamp(min=0).to(torch.float32)).squeeze(1)
    score = counts + strength / (strength.amax(-1, keepdim=True) + 1e-12) * 0.5  # < 1: only breaks ties
    idx = torch.topk(score, keep, dim=-1).indices
    return torch.sort(idx, dim=-1).values


def token_scores(core: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """Core-token score: how many of a token's core neurons are sentence-wise core neurons.
    core [B, T, I] bool, neurons [B, k] -> float [B, T]."""
    chosen = torch.zeros(core.shape[0], core.shape[-1], dtype=torch.float32, device=core.device)
    chosen.scatter_(1, neurons, 1.0)
    return (core.to(torch.float32) * chosen.unsqueeze(1)).sum(-1)


def elbow_keep(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Which candidate tokens survive the elbow rule, per sequence.

    The candidates' scores are sorted in descending order; the elbow is the sorted point farthest
    from the straight line joining the first and the last one (both axes scaled to [0, 1]); the
    tokens up to and including the elbow are kept. Non-candidates are always kept. A sequence with
    fewer than 3 candidates, or flat scores, keeps them all.
    scores [B, T], candidates [B, T] bool -> keep [B, T] bool."""
    b, t = scores.shape
    n = candidates.sum(-1)                                                  # [B]
    low = torch.finfo(torch.float32).min
    masked = torch.where(candidates, scores, torch.full_like(scores, low))
    # scores are counts, so ties are common, and torch and ONNX Runtime order ties differently: the
    # sort key breaks them by position (earlier first), so the engine and the graphs keep the same tokens
    position = torch.arange(t, device=scores.device).to(torch.float64)
    _, order = torch.sort(masked.to(torch.float64) * (t + 1) - position, dim=-1, descending=True)
    ordered = masked.gather(1, order)
    rank = torch.arange(t, device=scores.device).expand(b, t)
    last = (n - 1).clamp(min=0).unsqueeze(-1)
    first_s = ordered[:, :1]
    last_s = ordered.gather(1, last)
    span = (first_s - last_s).clamp(min=1e-12)
    x = rank.to(torch.float32) / last.clamp(min=1).to(torch.float32)
    y = (ordered - last_s) / span
    # distance to the line from (0, 1) to (1, 0), up to a constant factor: |x + y - 1|
    distance = torch.where(rank <= last, (x + y - 1).abs(), torch.full_like(x, -1.0))
    elbow = distance.argmax(-1, keepdim=True)                               # [B, 1]
    keep_sorted = rank <= elbow
    flat = (first_s - last_s).squeeze(-1) <= 0
    keep_sorted = keep_sorted | (flat | (n < 3)).unsqueeze(-1)
    keep = torch.zeros_like(candidates)
    keep.scatter_(1, order, keep_sorted)
    return keep | ~candidates
