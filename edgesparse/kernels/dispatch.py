"""Per-target dispatch rule: keep a layer dense where the sparse kernel would be slower.

Backed by ``dispatch_table.json`` (next to this file), regenerated from real
measurements by ``benchmarks/kernels/make_dispatch_table.py``. For each
measured case (op, isa, threads, block, shape, M) the table stores the speedup
over ORT's dense kernel at several sparsities and the break-even sparsity: the
lowest measured sparsity from which the sparse kernel wins by at least
``margin`` at that and every higher measured sparsity.

The rule is conservative: unknown ISA / op / block / thread count -> dense;
shapes much smaller than anything measured -> dense; several candidate
entries (both neighbouring sizes, every token count when M is unknown) ->
the highest break-even among them.
"""

from __future__ import annotations

import functools
import json
import math
import platform
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("dispatch_table.json")

OP_ALIASES = {
    "BlockSparseMatMul": "BlockSparseMatMul",
    "matmul": "BlockSparseMatMul",
    "MatMul": "BlockSparseMatMul",
    "Gemm": "BlockSparseMatMul",
    "BlockSparseConv": "BlockSparseConv",
    "conv": "BlockSparseConv",
    "Conv": "BlockSparseConv",
}

# How far (factor in MACs per token) a query may lie below the smallest measured size.
_SMALLER_OK = 2.0


@functools.lru_cache(maxsize=4)
def load_table(path: str | None = None) -> dict:
    p = Path(path) if path else TABLE_PATH
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {"entries": []}


def current_isa() -> str:
    """The ISA variant the kernel library will pick on this machine."""
    if platform.machine() not in ("x86_64", "AMD64", "i686"):
        return "generic"
    try:
        flags = set()
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        return "generic"
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "generic"


def _size(op: str, shape: dict) -> float | None:
    """Multiply-adds per output row/position: the size used to match table entries."""
    try:
        if op == "BlockSparseMatMul":
            return float(shape["K"]) * float(shape["N"])
        kernel = shape.get("kernel", 1)
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        return float(shape["C"]) * float(shape["O"]) * kh * kw
    except (KeyError, TypeError, ValueError):
        return None


def _tokens(op: str, shape: dict) -> float | None:
    if op == "BlockSparseMatMul":
        return float(shape["M"]) if shape.get("M") else None
    if shape.get("H") and shape.get("W"):
        stride = shape.get("stride", 1)
        return float(shape["H"]) * float(shape["W"]) / float(stride) ** 2
    return None


def _kind(op: str, shape: dict) -> tuple:
    """Entries are only compared within a kind (conv: kernel size and stride)."""
    if op == "BlockSparseConv":
        kernel, stride = shape.get("kernel", 1), shape.get("stride", 1)
        # [k, k] and k name the same kernel (the table stores square sizes as ints)
        if isinstance(kernel, (list, tuple)) and len(set(kernel)) == 1:
            kernel = kernel[0]
        if isinstance(stride, (list, tuple)) and len(set(stride)) == 1:
            stride = stride[0]
        return (kernel, stride)
    return ()


def break_even(op: str, shape: dict, block: int, isa: str, threads: int = 1, table: dict | None = None) -> float | None:
    """Lowest sparsity at which the sparse kernel is known to win, or None if unknown."""
    op = OP_ALIASES.get(op, op)
    table = table if table is not None else load_table()
    size = _size(op, shape)
    if size is None:
        return None
    cands = [
        e for e in table.get("entries", [])
        if e["op"] == op and e["isa"] == isa and e["block"] == block and tuple(e.get("kind", ())) == _kind(op, shape)
    ]  # fmt: skip
    # more threads than measured: the largest measured count below is the best guess
    measured = [t for t in {e["threads"] for e in cands} if t <= threads]
    if not measured:
        return None
    cands = [e for e in cands if e["threads"] == max(measured)]
    tokens = _tokens(op, shape)
    if tokens is not None:  # the measured token count(s) nearest in log scale
        dist = {e["tokens"]: abs(math.log(e["tokens"]) - math.log(tokens)) for e in cands}
        best = min(dist.values())
        cands = [e for e in cands if dist[e["tokens"]] <= best + 1e-9]
    sizes = sorted({e["size"] for e in cands})
    if size < sizes[0] / _SMALLER_OK:
        return None  # far smaller than anything measured: overheads unknown
    below = [s for s in sizes if s <= size]
    above = [s for s in sizes if s >= size]
    near = {below[-1] if below else sizes[0], above[0] if above else sizes[-1]}
    values = [e["break_even"] for e in cands if e["size"] in near]
    if any(v is None for v in values):
        return None  # some neighbour never wins
    return max(values)


def prefers_sparse(op: str, shape: dict, sparsity: float, block: int, isa: str | None = None, threads: int = 1) -> bool:
    """True when the sparse kernel is measured to beat ORT's dense kernel for this layer.

    op: "BlockSparseMatMul" (shape {"K", "N"} and optionally "M" tokens) or
    "BlockSparseConv" (shape {"C", "O", "kernel", "stride"} and optionally "H", "W").
    isa: "avx512" | "avx2" | "generic"; default: this machine's.
    """
    if op in LAYOUT_OPS:
        return (isa or current_isa()) in LAYOUT_OPS[op]
    be = break_even(op, shape, block, isa or current_isa(), threads)
    return be is not None and sparsity >= be


# Operators and layouts that pay next to sparse convs, and the ISAs where they were measured to
# (docs/kernels.md, "Depthwise convolution" and "NCHW16c"). BlockSparseConvAdd folds a residual Add
# into the sparse conv (one node and one pass over memory less). DepthwiseConv in NCHW16c between
# two sparse 1x1 convs in NCHW16c (no reorders at all) beat ORT's NCHWc depthwise plus its two
# reorders on every layer of the sample CNN; in NCHW it was slower on every one, so a depthwise conv
# is rewritten only where it can be blocked ("NCHW16c"). dispatch=measure also tries the NCHW one and
# keeps a rewrite only when the whole model gets faster.
LAYOUT_OPS = {"BlockSparseConvAdd": ("avx512",), "DepthwiseConv": ("avx512",), "NCHW16c": ("avx512",)}
