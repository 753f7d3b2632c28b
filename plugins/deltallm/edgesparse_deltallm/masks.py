"""What each attention block's mask means, read from a run of the dense model: causal attention
over the whole cache, or a sliding window of S keys (Mistral, and the local layers of Gemma 2/3,
which alternate with global ones). DeltaAttention does not read masks, so the window becomes the
node's `span` attribute; any other mask (padding, bidirectional, chunked) stops the build with
the layer named.

A window shows only in rows longer than it, and calibration text is short (Gemma 3's local layers
see 512 keys, Mistral's and Gemma 2's 4096): so the masks are read for the first calibration
sequence placed after PROBE_TOKENS of (zero) KV cache, the attention mask all ones, running only
the subgraph that computes the masks (it reads the cache's shape, not its values). A model
without a cache input gets its ids repeated to PROBE_TOKENS instead; one whose inputs cannot be
stretched either way is read on the calibration sequence itself.
"""
from __future__ import annotations

import numpy as np
import onnx

from edgesparse import EdgesparseError

PROBE_TOKENS = 16384   # windows up to this long are seen
NO_CACHE_TOKENS = 4096  # without a cache input the probe's rows are the tokens themselves


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


def stretched(batch: dict, past: int) -> dict | None:
    """`batch` as its sequence after `past` cached tokens (an empty cache input, one with a zero-size
    axis, grown to `past` zeros), or without a cache input as its ids repeated to `past` tokens;
    the attention mask all ones and position ids counted on. None when the batch does not look
    like one unpadded sequence."""
    ints = {n: v for n, v in batch.items() if v.dtype == np.int64 and v.ndim == 2 and v.shape[0] == 1}
    masks = [n for n in ints if "mask" in n.lower()]
    positions = [n for n in ints if "position" in n.lower()]
    tokens = [n for n in ints if n not in masks and n not in positions]
    if len(tokens) != 1 or any(not np.all(ints[m] == 1) for m in masks):
        return None
    ids = ints[tokens[0]]
    caches = [n for n, v in batch.items() if v.dtype.kind == "f" and 0 in v.shape]
    out = dict(batch)
    if caches:
        for n in caches:  # np.zeros maps untouched pages: a long empty cache costs no memory until read
            out[n] = np.zeros(tuple(past if d == 0 else d for d in batch[n].shape), batch[n].dtype)
        new, offset = ids.shape[1], past
    else:
        out[tokens[0]] = np.resize(ids, (1, NO_CACHE_TOKENS))
        new, offset = NO_CACHE_TOKENS, 0
    for m in masks:
        out[m] = np.ones((1, ints[m].shape[1] - ids.shape[1] + offset + new), np.int64)
    for p in positions:
        out[p] = (offset + ints[p][:, :1] + np.arange(new)).astype(np.int64)
    return out


def _run(model: onnx.ModelProto, names: list[str], batch: dict, threads: int) -> dict | None:
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name not in present:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:  # only the nodes the masks need: a long probe must not run the whole model
        probe = onnx.utils.Extractor(probe).extract_model([i.name for i in probe.graph.input], names)
    except Exception:  # noqa: BLE001 - the whole graph still answers, just slower
        pass
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in session.get_inputs()}
        return dict(zip(names, session.run(names, {k: v for k, v in batch.items() if k in wanted})))
    except Exception:  # noqa: BLE001 - the caller falls back to the calibration sequence
        return None


def read_spans(model: onnx.ModelProto, found, batch: dict, threads: int = 1) -> list[int]:
    """The sliding window of each attention block in `found` (rewrite.Attention, in order), from
    the masks `model` (the dense graph) computes for `batch` (one sequence without padding),
    stretched to PROBE_TOKENS tokens where it can be."""
    names = [att.mask.name if att.mask is not None else None for att in found]
    wanted = [n for n in dict.fromkeys(names) if n]
    if not wanted:
        return [0] * len(found)
    long = stretched(batch, PROBE_TOKENS)
    values = _run(model, wanted, long, threads) if long is not None else None
    if values is None:
        values = _run(model, wanted, batch, threads)
        if values is None:
            raise EdgesparseError("deltallm: the dense model does not run on the first calibration batch")
    return [classify(_allowed(values[n], att.mask_keeps), att.name) if n else 0 for n, att in zip(names, found)]
