"""What each attention block's mask means, read from a run of the dense model: causal attention
over the whole cache, or a sliding window of S keys (Mistral, and the local layers of Gemma 2/3,
which alternate with global ones). DeltaAttention does not read masks, so the window becomes the
node's `span` attribute; any other mask (padding, bidirectional, chunked) stops the build with
the layer named.

Only windows shorter than the calibration context can be seen this way; a model whose window is
longer than every calibration sequence behaves causally there, and the pass says what it saw.
"""
from __future__ import annotations

import numpy as np
import onnx

from edgesparse import EdgesparseError


def _allowed(value: np.ndarray, keeps: bool | None) -> np.ndarray:
    """[T, N] booleans: True where the mask lets a query row see a key."""
    v = np.asarray(value)
    while v.ndim > 2:
        v = v[0]
    if v.dtype == np.bool_:
        return v if keeps else ~v
    return v > -1e30  # additive: 0 where visible, -inf (or the dtype's min) elsewhere


def classify(allowed: np.ndarray, layer: str) -> int:
    """0 for causal attention over the cache, S for a sliding window of S keys."""
    t, n = allowed.shape
    pos = np.arange(n - t, n)[:, None]
    keys = np.arange(n)[None, :]
    causal = keys <= pos
    if np.array_equal(allowed, causal):
        return 0
    counts = allowed.sum(1)
    span = int(counts.max()) if counts.size else 0
    if span > 0 and np.array_equal(allowed, causal & (keys > pos - span)):
        return span
    row = int(np.argmax((allowed != causal).any(1)))
    raise EdgesparseError(f"deltallm: the mask of attention '{layer}' is neither causal nor a sliding window "
                          f"(query row {row} sees keys {np.flatnonzero(allowed[row]).tolist()[:8]}...); "
                          "padded or bidirectional batches are not supported")


def read_spans(model: onnx.ModelProto, found, batch: dict, threads: int = 1) -> list[int]:
    """The sliding window of each attention block in `found` (rewrite.Attention, in order), from
    one run of `model` (the dense graph) on `batch` (one sequence without padding)."""
    import onnxruntime as ort

    names = [att.mask.name if att.mask is not None else None for att in found]
    wanted = [n for n in dict.fromkeys(names) if n]
    if not wanted:
        return [0] * len(found)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in wanted:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    values = dict(zip(wanted, session.run(wanted, batch)))
    return [classify(_allowed(values[n], att.mask_keeps), att.name) if n else 0 for n, att in zip(names, found)]
