"""Per-target dispatch rule: keep a layer dense where the sparse kernel would be slower.

Backed by a measured table. For each measured case (op, isa, threads, block, shape, M) a table
stores the speedup over ORT's dense kernel at several sparsities and the break-even sparsity: the
lowest measured sparsity from which the sparse kernel wins by at least ``margin`` at that and every
higher measured sparsity. `edgesparse tune` measures one (edgesparse.kernels.tune).

Which table decides, for a build's ISA (`table_for`), first found wins:

1. tuned: measured on this machine by `edgesparse tune` (builds for this machine's ISA only),
2. imported: measured elsewhere and taken in with `edgesparse tune --import FILE`,
3. shipped: ``dispatch_table.json`` next to this file, measured by the project (its entries name
   the CPU they were measured on).

Tables in the user cache are keyed by ISA, CPU model and the kernel library's source hash; one
from another CPU or library version is ignored with a warning, a corrupt one likewise.

The rule is conservative: unknown ISA / op / block / thread count -> dense; shapes much smaller
than anything measured -> dense; several candidate entries (both neighbouring sizes, every token
count when M is unknown) -> the highest break-even among them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
TABLE_VERSION = 1
# ISAs the x86 library compiles, best first; "neon" is the Arm64 library's 16-byte code.
X86_ISAS = ("avx512", "avx2")

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


# -- this machine ------------------------------------------------------------------------------

def _cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_supports(isa: str) -> bool:
    """Whether this machine can run the library's code for `isa` (the library's own check)."""
    if isa in ("generic",):
        return True
    if isa == "neon":
        return platform.machine() in ("aarch64", "arm64")
    flags = _cpu_flags()
    if isa == "avx512":
        return {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"} <= flags
    if isa == "avx2":
        return {"avx2", "fma"} <= flags
    return False


def best_isa() -> str:
    """The ISA the kernel library picks on this machine when nothing forces it."""
    if platform.machine() in ("aarch64", "arm64"):
        return "neon"
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic"
    return next((isa for isa in X86_ISAS if host_supports(isa)), "generic")


def current_isa() -> str:
    """The ISA the kernel library will run here: $EDGESPARSE_ISA when it names code this machine
    can run (the library reads the same variable when a session creates its kernels), else the best."""
    forced = os.environ.get("EDGESPARSE_ISA", "")
    if forced in (*X86_ISAS, "generic") and host_supports(forced):
        return forced
    return best_isa()


def host_cpu() -> str:
    """The CPU model name, as tuned tables are keyed."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.split(":", 1)[0].strip() in ("model name", "Model", "Hardware"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def library_hash() -> str:
    """Hash of the kernel sources: a table measured with other kernels says nothing of these."""
    from .build import CSRC

    h = hashlib.sha256()
    for p in sorted(CSRC.iterdir()):
        if p.suffix in (".h", ".cpp"):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# -- tables ------------------------------------------------------------------------------------

@dataclass
class Table:
    entries: list[dict]
    source: str            # "tuned" | "imported" | "shipped"
    path: str
    cpu: str = ""
    generated: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.source} ({self.cpu}, {self.generated[:10]})" if self.cpu else self.source

    def source_for(self, op: str, block: int, threads: int = 1) -> str | None:
        """Which table's entries decide for layers of this op, block and thread count."""
        op = OP_ALIASES.get(op, op)
        cands = [e for e in self.entries if e["op"] == op and e["block"] == block and e["threads"] <= threads]
        if not cands:
            return None
        most = max(e["threads"] for e in cands)
        return next(e.get("table", self.source) for e in cands if e["threads"] == most)

    def describe(self) -> dict:
        return {"source": self.source, "path": self.path, "cpu": self.cpu, "generated": self.generated,
                "entries": len(self.entries)}


def cache_dir() -> Path:
    from .build import default_cache_dir

    return default_cache_dir() / "dispatch"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:48] or "cpu"


def tuned_path(isa: str, cpu: str | None = None) -> Path:
    cpu = cpu or host_cpu()
    return cache_dir() / f"tuned-{isa}-{_slug(cpu)}-{hashlib.sha256(cpu.encode()).hexdigest()[:8]}.json"


def imported_path(isa: str) -> Path:
    return cache_dir() / f"imported-{isa}.json"


def check_table(data, where: str) -> str | None:
    """Why `data` is not a usable dispatch table, or None."""
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        return f"{where} is not a dispatch table (no 'entries' list)"
    for i, e in enumerate(data["entries"]):
        try:
            ok = (OP_ALIASES.get(e["op"]) == e["op"] and isinstance(e["isa"], str) and e["block"] in (4, 8, 16)
                  and int(e["threads"]) >= 1 and float(e["size"]) > 0 and float(e["tokens"]) > 0
                  and (e["break_even"] is None or 0.0 <= float(e["break_even"]) <= 1.0))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            return f"{where}: entry {i} is malformed"
    return None


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@functools.lru_cache(maxsize=4)
def load_table(path: str | None = None) -> dict:
    """The shipped table (or the one at `path`) as stored."""
    return _read(Path(path) if path else TABLE_PATH) or {"entries": []}


def table_for(isa: str) -> Table:
    """The table that decides for builds of `isa` (see the module docstring for the order)."""
    warnings = []
    candidates = []
    if isa == current_isa():
        candidates.append(("tuned", tuned_path(isa)))
    candidates.append(("imported", imported_path(isa)))
    for source, path in candidates:
        if not path.exists():
            continue
        data = _read(path)
        problem = check_table(data, str(path)) if data is not None else f"{path} is not valid JSON"
        if problem is None and data.get("isa") != isa:
            problem = f"{path} holds {data.get('isa')} timings, not {isa}"
        if problem is None and data.get("library_hash") != library_hash():
            problem = f"{path} was measured with another kernel library version"
        if problem is None and source == "tuned" and data.get("cpu") != host_cpu():
            problem = f"{path} was measured on another CPU ({data.get('cpu')})"
        if problem:
            warnings.append(f"dispatch table ignored: {problem}; using the next one")
            continue
        entries = [{**e, "table": source} for e in data["entries"] if e["isa"] == isa]
        # cases it did not measure (a quick tune: one block size, one thread count) keep the shipped ones
        groups = {_group(e) for e in entries}
        entries += [e for e in _shipped_entries(isa) if _group(e) not in groups]
        return Table(entries, source, str(path), data.get("cpu", ""), data.get("generated", ""), warnings)
    entries = _shipped_entries(isa)
    cpus = sorted({e.get("cpu", "") for e in entries} - {""})
    return Table(entries, "shipped", str(TABLE_PATH), ", ".join(cpus),
                 max((e.get("generated", "") for e in entries), default=""), warnings)


def _group(e: dict) -> tuple:
    return e["op"], e["block"], e["threads"], tuple(e.get("kind", ()))


def _shipped_entries(isa: str) -> list[dict]:
    shipped = load_table()
    machine = shipped.get("machine", {}).get("cpu", "")
    return [{"cpu": machine, "generated": shipped.get("generated", ""), **e, "table": "shipped"}
            for e in shipped.get("entries", []) if e.get("isa") == isa]


def save_table(data: dict, path: Path) -> Path:
    """Write a table atomically: an interrupted write leaves the old file (or none), never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# -- the rule ----------------------------------------------------------------------------------

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
        stride = stride[0] if isinstance(stride, (list, tuple)) else stride
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


def _neighbours(op: str, shape: dict, block: int, isa: str, threads: int, table) -> list[dict] | None:
    """The measured entries that decide for this layer (same op, ISA, block and kind; the thread
    count at or below; the nearest token count; the neighbouring sizes), or None when nothing
    measured comes close."""
    if table is None:
        table = table_for(isa)
    entries = table.entries if isinstance(table, Table) else table.get("entries", [])
    size = _size(op, shape)
    if size is None:
        return None
    cands = [
        e for e in entries
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
    return [e for e in cands if e["size"] in near]


def break_even(op: str, shape: dict, block: int, isa: str, threads: int = 1, table: Table | dict | None = None) -> float | None:
    """Lowest sparsity at which the sparse kernel is known to win, or None if unknown."""
    op = OP_ALIASES.get(op, op)
    near = _neighbours(op, shape, block, isa, threads, table)
    if not near:
        return None
    values = [e["break_even"] for e in near]
    if any(v is None for v in values):
        return None  # some neighbour never wins
    return max(values)


def _interpolate(points: list, sparsity: float) -> float | None:
    """The measured speedup at `sparsity`, linear between measured sparsities; None below the
    lowest; the highest measured point's value above it (no extrapolation upwards)."""
    pts = sorted((float(s), float(v)) for s, v in points or ())
    if not pts or sparsity < pts[0][0] - 1e-9:
        return None
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 - 1e-9 <= sparsity <= s1 + 1e-9:
            return v0 + (v1 - v0) * (sparsity - s0) / (s1 - s0) if s1 > s0 else v1
    return pts[-1][1]


def predicted_speedup(op: str, shape: dict, sparsity: float, block: int, isa: str | None = None, threads: int = 1,
                      table: Table | dict | None = None) -> float | None:
    """The sparse kernel's speedup over ORT's dense one (dense time / sparse time) that the table
    predicts for this layer at `sparsity`: the measured points of the entries that decide for it
    (as `break_even` picks them), interpolated linearly in sparsity, the lowest among them
    (conservative, like the rule). None where nothing measured decides or `sparsity` lies below
    the measured points."""
    isa = isa or current_isa()
    op = OP_ALIASES.get(op, op)
    near = _neighbours(op, shape, block, isa, threads, table)
    if not near:
        return None
    values = [_interpolate(e.get("points"), sparsity) for e in near]
    if any(v is None for v in values):
        return None
    return min(values)


def prefers_sparse(op: str, shape: dict, sparsity: float, block: int, isa: str | None = None, threads: int = 1,
                   table: Table | dict | None = None) -> bool:
    """True when the sparse kernel is measured to beat ORT's dense kernel for this layer.

    op: "BlockSparseMatMul" (shape {"K", "N"} and optionally "M" tokens) or
    "BlockSparseConv" (shape {"C", "O", "kernel", "stride"} and optionally "H", "W").
    isa: "avx512" | "avx2" | "neon" | "generic"; default: the one the library runs here.
    table: default `table_for(isa)`.
    """
    isa = isa or current_isa()
    if op in LAYOUT_OPS:
        return isa in LAYOUT_OPS[op]
    be = break_even(op, shape, block, isa, threads, table)
    return be is not None and sparsity >= be


# Operators and layouts that pay next to sparse convs, and the ISAs where they were measured to
# (docs/kernels.md, "Depthwise convolution" and "NCHW16c"). BlockSparseConvAdd folds a residual Add
# into the sparse conv (one node and one pass over memory less). DepthwiseConv in NCHW16c between
# two sparse 1x1 convs in NCHW16c (no reorders at all) beat ORT's NCHWc depthwise plus its two
# reorders on every layer of the sample CNN; in NCHW it was slower on every one, so a depthwise conv
# is rewritten only where it can be blocked ("NCHW16c"). On AVX2 (measured as an AVX2-only machine,
# samples/sparsebytenn/results/nchw16c_layers_avx2.json) the blocked depthwise conv ran 1.8-2.0x
# ORT's and the blocked 1x1 convs 16-22 % faster than in NCHW; the residual fold was not measured
# there. dispatch=measure also tries the NCHW form and keeps a rewrite only when the whole model
# gets faster.
LAYOUT_OPS = {"BlockSparseConvAdd": ("avx512",), "DepthwiseConv": ("avx512", "avx2"), "NCHW16c": ("avx512", "avx2")}
