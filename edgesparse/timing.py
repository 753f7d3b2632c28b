"""Side-by-side timing: candidates run interleaved in one process, so that a noisy neighbour
slows them all alike, and the figures are medians with their spread."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def interleaved(candidates: dict[str, Callable[[], object]], *, rounds: int = 30, budget_s: float = 5.0,
                warmup: int = 3) -> dict[str, dict]:
    """Time each candidate once per round, in rotating order, for at least 5 and at most `rounds`
    rounds or `budget_s` seconds. Returns {name: {median_ms, p25_ms, p75_ms, rounds}}."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    samples = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            candidates[name]()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if r >= 4 and time.perf_counter() - start > budget_s:
            break
    return {name: summarize(s) for name, s in samples.items()}


def summarize(samples_ms: list[float]) -> dict:
    a = np.asarray(samples_ms)
    return {
        "median_ms": float(np.median(a)),
        "p25_ms": float(np.percentile(a, 25)),
        "p75_ms": float(np.percentile(a, 75)),
        "rounds": int(a.size),
    }
