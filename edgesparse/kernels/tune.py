"""Measure a dispatch table on this machine (`edgesparse tune`), or take in one measured elsewhere.

For every (op, isa, threads, block, shape, tokens) case the sparse kernel and ORT's dense kernel
are timed side by side (edgesparse.kernels.bench) at several sparsities; the entry keeps the
measured speedups and the break-even sparsity: the lowest sparsity from which the sparse kernel
wins by MARGIN at that and every higher measured sparsity, using the more pessimistic of the
median ratio and the paired per-round ratio. ISAs other than the machine's best are measured by
forcing the library's choice (EDGESPARSE_ISA); ORT's dense kernel keeps using the best ISA, so
those entries are pessimistic, the safe side.
"""
from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import dispatch
from ..errors import EdgesparseError

MARGIN = 1.1
BLOCKS = (4, 8, 16)


@dataclass(frozen=True)
class Plan:
    """What one tuning run measures."""

    matmul_sizes: tuple  # (K, N)
    matmul_tokens: tuple
    matmul_sparsities: tuple
    conv_shapes: tuple   # (C, O, H=W, kernel, stride)
    conv_sparsities: tuple
    blocks: tuple
    budget_s: float      # seconds of timing per case


FULL = Plan(
    matmul_sizes=((384, 384), (384, 1536), (1536, 384), (768, 3072), (3072, 768), (1024, 4096)),
    matmul_tokens=(1, 8, 64),
    matmul_sparsities=(0.3, 0.5, 0.7, 0.8, 0.9, 0.95),
    # The rule only trusts sizes down to half the smallest measured at the nearest token count, so
    # each spatial size carries small and large pointwise layers (MobileNet-style networks run
    # 128-512 channels at 7x7-28x28).
    conv_shapes=((64, 64, 56, 1, 1), (128, 128, 28, 1, 1), (128, 128, 14, 1, 1), (256, 256, 14, 1, 1),
                 (256, 256, 7, 1, 1), (512, 512, 7, 1, 1), (1024, 1024, 7, 1, 1), (64, 64, 56, 3, 1),
                 (128, 128, 28, 3, 1), (128, 256, 28, 3, 2), (256, 256, 14, 3, 1)),
    conv_sparsities=(0.3, 0.5, 0.7, 0.8, 0.9),
    blocks=BLOCKS,
    budget_s=0.25,
)
# A few minutes on two cores: the default block size, the FFN sizes of small transformers and the
# common pointwise convs, at fewer sparsities and shorter timings.
QUICK = Plan(
    matmul_sizes=((384, 384), (384, 1536), (1536, 384), (768, 3072), (3072, 768)),
    matmul_tokens=(1, 8, 64),
    matmul_sparsities=(0.5, 0.7, 0.8, 0.9),
    conv_shapes=((128, 128, 28, 1, 1), (256, 256, 14, 1, 1), (512, 512, 7, 1, 1), (128, 128, 28, 3, 1)),
    conv_sparsities=(0.5, 0.7, 0.9),
    blocks=(16,),
    budget_s=0.12,
)


def break_even(points: list[tuple[float, float]], margin: float = MARGIN) -> float | None:
    """Lowest sparsity s with speedup >= margin at s and every higher measured sparsity."""
    best = None
    for sp, speedup in sorted(points, reverse=True):
        if speedup < margin:
            break
        best = sp
    return best


def _cases(plan: Plan, ops: tuple[str, ...]):
    for block in plan.blocks:
        if "matmul" in ops:
            for k, n in plan.matmul_sizes:
                for m in plan.matmul_tokens:
                    yield "matmul", block, (k, n, m)
        if "conv" in ops and block in (8, 16):  # 4-channel groups never beat ORT's convs
            for shape in plan.conv_shapes:
                yield "conv", block, shape


def measure(isas: list[str], threads: list[int], plan: Plan = FULL, ops=("matmul", "conv"),
            on_entry: Callable[[dict], None] | None = None) -> list[dict]:
    """Measure table entries on this machine; `on_entry` sees each as it is made (to save as it goes)."""
    from .bench import bench_conv_case, bench_matmul_case
    from .build import build_library, host_toolchain

    for isa in isas:
        if not dispatch.host_supports(isa):
            raise EdgesparseError(f"this machine cannot run the {isa} kernels (it runs {dispatch.best_isa()})")
    lib = build_library(host_toolchain())
    cpu, today = dispatch.host_cpu(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    if os.environ.get("EDGESPARSE_CPU_NOTE"):  # e.g. set by benchmarks/avx2_host/run.sh
        cpu = f"{cpu} ({os.environ['EDGESPARSE_CPU_NOTE']})"
    entries = []
    before = os.environ.get("EDGESPARSE_ISA")
    try:
        for isa in isas:
            os.environ["EDGESPARSE_ISA"] = isa  # read by the library when each session creates its kernels
            for t in threads:
                for op, block, shape in _cases(plan, ops):
                    points = []
                    if op == "matmul":
                        k, n, m = shape
                        for sp in plan.matmul_sparsities:
                            r = bench_matmul_case(lib, m, k, n, sp, block, t, budget_s=plan.budget_s)
                            points.append((sp, round(min(r["speedup"], r["paired_speedup"]), 3)))
                        entry = {"op": "BlockSparseMatMul", "shape": {"K": k, "N": n}, "tokens": m, "size": k * n,
                                 "kind": []}
                    else:
                        c, o, hw, kernel, stride = shape
                        for sp in plan.conv_sparsities:
                            r = bench_conv_case(lib, c, o, hw, kernel, stride, sp, block, t, budget_s=plan.budget_s)
                            points.append((sp, round(min(r["speedup"], r["paired_speedup"]), 3)))
                        entry = {"op": "BlockSparseConv", "shape": {"C": c, "O": o, "H": hw, "W": hw, "kernel": kernel,
                                 "stride": stride}, "tokens": (hw // stride) ** 2, "size": c * o * kernel * kernel,
                                 "kind": [kernel, stride]}
                    entry = {**entry, "isa": isa, "threads": t, "block": block, "points": points,
                             "break_even": break_even(points), "cpu": cpu, "generated": today}
                    entries.append(entry)
                    if on_entry:
                        on_entry(entry)
    finally:
        if before is None:
            os.environ.pop("EDGESPARSE_ISA", None)
        else:
            os.environ["EDGESPARSE_ISA"] = before
    return entries


def table(entries: list[dict], isa: str | None = None, **extra) -> dict:
    """A table file's contents: header (what, where, with which kernels) and entries."""
    from .bench import machine_info

    return {"version": dispatch.TABLE_VERSION, "isa": isa, "cpu": dispatch.host_cpu(),
            "library_hash": dispatch.library_hash(),
            "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "margin": MARGIN,
            "note": "measured by `edgesparse tune`; speedup = ORT dense / sparse, min(median ratio, paired per-round ratio)",
            **extra, "entries": entries}


def tune(isa: str, threads: list[int], quick: bool, progress: Callable[[str], None] = print,
         out: Path | None = None, merge: bool = False) -> Path:
    """Measure this machine's table for `isa` and store it in the user cache, or at `out` (to carry
    it to a build machine, or to regenerate the shipped table; `merge` keeps the entries of `out`
    this run does not measure again). Saved after every entry to a temporary file, renamed into
    place only when complete."""
    path = Path(out) if out else dispatch.tuned_path(isa)
    kept = []
    if merge and path.exists():
        old = dispatch.load_table(str(path))
        kept = old.get("entries", [])
    partial = path.with_name(f".{path.name}.partial")
    start = time.time()
    done = []

    def keep(entry):
        done.append(entry)
        dispatch.save_table(table(done, isa, complete=False), partial)
        shape = " ".join(f"{k}={v}" for k, v in entry["shape"].items())
        progress(f"[{time.time() - start:5.0f}s] {entry['op']} {shape} M/positions={entry['tokens']} "
                 f"block {entry['block']} threads {entry['threads']}: break-even {entry['break_even']}")

    try:
        measure([isa], threads, QUICK if quick else FULL, on_entry=keep)
        mine = {_key(e) for e in done}
        entries = [e for e in kept if _key(e) not in mine] + done
        dispatch.save_table(table(entries, None if out and merge else isa, quick=quick), path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _key(e: dict) -> tuple:
    return e["op"], e["isa"], e["threads"], e["block"], tuple(sorted(e["shape"].items())), e["tokens"]


def import_table(source: Path) -> Path:
    """Check a table measured elsewhere and store it as the imported table of its ISA."""
    try:
        import json

        data = json.loads(Path(source).read_text())
    except OSError as exc:
        raise EdgesparseError(f"cannot read {source}: {exc.strerror}") from None
    except ValueError:
        raise EdgesparseError(f"{source} is not valid JSON") from None
    problem = dispatch.check_table(data, str(source))
    if problem:
        raise EdgesparseError(problem)
    isas = {e["isa"] for e in data["entries"]}
    if not isas or len(isas) > 1:
        raise EdgesparseError(f"{source} must hold the timings of one ISA (found: {', '.join(sorted(isas)) or 'none'})")
    isa = isas.pop()
    if data.get("library_hash") not in (None, dispatch.library_hash()):
        raise EdgesparseError(f"{source} was measured with another kernel library version "
                              f"({data.get('library_hash')}, this one is {dispatch.library_hash()}): measure it again")
    data = {**data, "isa": isa, "library_hash": dispatch.library_hash(), "imported_from": str(source)}
    return dispatch.save_table(data, dispatch.imported_path(isa))
