"""`edgesparse bench PACKAGE`: the package against its dense baseline, in one process.

The dense baseline is the same model.onnx loaded without the kernel library: ORT then runs each
sparse node's dense ONNX function, whose weight is folded into a constant at load, on its own
kernels (MLAS). That is the model a user would otherwise deploy, with identical weights."""
from __future__ import annotations

import numpy as np

from .errors import EdgesparseError
from .timing import interleaved


def bench_package(package, batch: dict[str, np.ndarray], threads=(1,), rounds: int = 30,
                  budget_s: float = 5.0) -> list[dict]:
    records = []
    for t in threads:
        dense = package.session(threads=t, kernels=False)
        sparse = package.session(threads=t, kernels=True)
        want, got = dense.run(None, batch), sparse.run(None, batch)
        error = max((float(np.abs(a - b).max()) for a, b in zip(want, got) if a.size), default=0.0)
        tolerance = package.manifest.get("verification", {}).get("tolerance", 1e-4)
        if error > tolerance:
            raise EdgesparseError(f"package and dense baseline disagree (max abs error {error:.3g}): not timing")
        stats = interleaved(
            {"dense": lambda: dense.run(None, batch), "package": lambda: sparse.run(None, batch)},
            rounds=rounds, budget_s=budget_s,
        )
        records.append({
            "threads": t,
            "inputs": {k: list(v.shape) for k, v in batch.items()},
            "dense": stats["dense"],
            "package": stats["package"],
            "speedup": stats["dense"]["median_ms"] / stats["package"]["median_ms"],
            "max_abs_error": error,
        })
    return records
