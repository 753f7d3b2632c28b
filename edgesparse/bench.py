"""`edgesparse bench PACKAGE`: the package against its dense baseline, in one process.

The dense baseline is the package's model with every sparse node replaced by standard ONNX ops on
the same weights stored densely (verify.dense_equivalent), run by ONNX Runtime's own kernels
(MLAS): the model a user would otherwise deploy."""
from __future__ import annotations

import numpy as np
import onnx

from . import verify
from .errors import EdgesparseError
from .timing import interleaved


def bench_package(package, batch: dict[str, np.ndarray], libraries, threads=(1,), rounds: int = 30,
                  budget_s: float = 5.0) -> list[dict]:
    model = onnx.load(str(package.model_path))
    dense_model = verify.dense_equivalent(model, libraries)
    approximating = verify.uses_op_references(model, libraries)
    reference = None
    records = []
    for t in threads:
        # alternating sessions: a spinning idle pool would steal the core the other one needs
        dense = verify.dense_session(dense_model, threads=t, spin=False)
        sparse = package.session(threads=t, spin=False)
        want, got = dense.run(None, batch), sparse.run(None, batch)
        error = verify.max_abs_error([got], [want])
        tolerance = package.manifest.get("verification", {}).get("tolerance", 1e-4)
        if approximating:  # the package differs from the dense baseline on purpose: check it against its reference
            if reference is None:
                reference = verify.verification_reference(model, libraries, [batch])[0]
            error = verify.max_abs_error([got], reference)
        if error > tolerance:
            raise EdgesparseError(f"package and {'its reference' if approximating else 'dense baseline'} disagree "
                                  f"(max abs error {error:.3g}): not timing")
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
