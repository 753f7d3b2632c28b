"""Verification that runs inside every build: the package's outputs against the reference, and
how many of the sparse nodes really run on a sparse kernel."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from .errors import EdgesparseError


def reference_outputs(model_path: Path, batches: list[dict]) -> list[list[np.ndarray]]:
    """The reference: the same pruned weights executed densely. Without the kernel library ORT
    runs each sparse node's dense ONNX function on its own kernels."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EdgesparseError(f"reference model does not load in ONNX Runtime: {str(exc).splitlines()[0]}") from exc
    return [session.run(None, b) for b in batches]


def max_abs_error(got: list[list[np.ndarray]], want: list[list[np.ndarray]]) -> float:
    worst = 0.0
    for g_batch, w_batch in zip(got, want, strict=True):
        for g, w in zip(g_batch, w_batch, strict=True):
            if g.shape != w.shape:
                raise EdgesparseError(f"package output shape {g.shape} differs from reference {w.shape}")
            diff = np.abs(g.astype(np.float64) - w.astype(np.float64))
            if diff.size:
                worst = max(worst, float(np.nanmax(diff)) if not np.isnan(diff).all() else float("inf"))
            if np.isnan(g).any() != np.isnan(w).any():
                worst = float("inf")
    return worst


def sparse_nodes(model: onnx.ModelProto, libraries) -> Counter:
    """Nodes of the model that belong to a kernel library's domain, by op type."""
    domains = {lib.domain for lib in libraries}
    return Counter(n.op_type for n in model.graph.node if n.domain in domains)


def coverage(emitted: Counter, on_kernel: dict[str, int] | None, libraries) -> dict:
    """DeepSparse called this fraction_of_supported_ops: sparse nodes on a sparse kernel / all."""
    total = sum(emitted.values())
    if on_kernel is None:  # the target cannot observe execution: count what the library provides
        provided = {op for lib in libraries for op in lib.ops}
        on_kernel = {op: n for op, n in emitted.items() if op in provided}
        measured = False
    else:
        measured = True
    ran = sum(min(on_kernel.get(op, 0), n) for op, n in emitted.items())
    return {
        "sparse_nodes": total,
        "sparse_nodes_on_kernel": ran,
        "fraction_on_sparse_kernels": (ran / total) if total else None,
        "measured": measured,
        "by_op": {op: {"nodes": n, "on_kernel": min(on_kernel.get(op, 0), n)} for op, n in emitted.items()},
    }
