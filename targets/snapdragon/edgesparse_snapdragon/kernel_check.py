"""The pure kernels (edgesparse/kernels/csrc, C ABI in es_kernels.h: block-sparse matmul and conv,
gathered FFN) on aarch64: a static test driver
(csrc/bsmm_driver.c) cross-compiled against the kernel archive and run under qemu-aarch64-static,
checked against numpy; and dynamic instruction counts of the kernel vs a dense loop, from qemu's
exec trace (one instruction per translation block). Counts are not timings.

    python -m edgesparse_snapdragon.kernel_check [OUT.json]   # the instruction-count table
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgesparse import EdgesparseError
from edgesparse.kernels import block_sparse_matmul_reference, build_kernel_archive, pack_block_sparse

from . import emulator, runner, tensorfile, toolchains

DRIVER = Path(__file__).parent / "csrc" / "bsmm_driver.c"
ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "silu": 3, "relu6": 4}


def kernel_sources() -> Path:
    import edgesparse.kernels

    return Path(edgesparse.kernels.__file__).parent / "csrc"


def build_driver(cache: Path | None = None) -> Path:
    """The static aarch64 driver linked with libedgesparse_pure.a (rebuilt when the kernels change:
    the archive's path carries the hash of their sources)."""
    archive = build_kernel_archive(toolchains.debian(), cache, ar="aarch64-linux-gnu-ar")
    return runner.compile_c_program(DRIVER, "bsmm_driver", [str(archive)], cache,
                                    include=[kernel_sources()], static=True)


@dataclass
class Case:
    m: int
    k: int
    n: int
    block: int
    sparsity: float = 0.75
    activation: str = "none"
    bias: bool = True
    empty_rows: int = 0  # block rows with no block at all
    seed: int = 0
    repeat: int = 1

    def arrays(self):
        """(x, packed weights, bias or None, numpy reference output)."""
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal((self.m, self.k)).astype(np.float32)
        w = (rng.standard_normal((self.k, self.n)) / np.sqrt(self.k)).astype(np.float32)
        nb = -(-self.n // self.block)
        keep = rng.random((self.k, nb)) >= self.sparsity
        if self.empty_rows:
            keep[:, rng.choice(nb, size=min(self.empty_rows, nb), replace=False)] = False
        w *= np.repeat(keep, self.block, axis=1)[:, : self.n]
        packed = pack_block_sparse(w, self.block)
        bias = (rng.standard_normal(self.n) * 0.1).astype(np.float32) if self.bias else None
        ref = block_sparse_matmul_reference(x, packed, self.n, bias, self.activation)
        return x, packed, bias, ref

    def tensors(self, packed=None, x=None, bias=None) -> list[tuple[str, np.ndarray]]:
        if packed is None:
            x, packed, bias, _ = self.arrays()
        meta = np.array([0, 5, self.m, self.k, self.n, self.block, ACTIVATIONS[self.activation], self.repeat], np.int64)
        return [("meta", meta), ("x", x), ("values", packed["values"]), ("k_index", packed["k_index"]),
                ("row_ptr", packed["row_ptr"]), ("bias", bias if bias is not None else np.zeros(0, np.float32))]


NONE = np.zeros(0, np.float32)  # a zero-element tensor: NULL on the C side


@dataclass
class ConvCase:
    """BlockSparseConv (NCHW, group 1) through es_bsconv_f32."""
    batch: int
    cin: int
    h: int
    w: int
    cout: int
    kernel: tuple[int, int] = (3, 3)
    block: int = 8
    sparsity: float = 0.75
    stride: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (1, 1, 1, 1)  # top, left, bottom, right
    activation: str = "none"
    bias: bool = True
    seed: int = 0

    def tensors(self):
        """(tensor group, numpy reference output)."""
        from edgesparse.kernels.conv import block_sparse_conv_reference, pack_block_sparse_conv, random_block_sparse_conv

        rng = np.random.default_rng(self.seed)
        kh, kw = self.kernel
        (sh, sw), (dh, dw), (pt, pl, pb, pr) = self.stride, self.dilation, self.pads
        weight = random_block_sparse_conv(rng, self.cout, self.cin, kh, kw, self.block, self.sparsity)
        packed = pack_block_sparse_conv(weight, self.block)
        x = rng.standard_normal((self.batch, self.cin, self.h, self.w)).astype(np.float32)
        bias = (rng.standard_normal(self.cout) * 0.1).astype(np.float32) if self.bias else None
        oh = (self.h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        ow = (self.w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        meta = np.array([1, 5, self.batch, self.cin, self.h, self.w, self.cout, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow,
                         self.block, ACTIVATIONS[self.activation]], np.int64)
        ref = block_sparse_conv_reference(x, packed, self.cout, (kh, kw), bias, self.stride, self.pads,
                                          self.dilation, self.activation)
        return [("meta", meta), ("x", x), ("values", packed["values"]), ("c_index", packed["c_index"]),
                ("row_ptr", packed["row_ptr"]), ("bias", NONE if bias is None else bias)], ref


@dataclass
class FfnCase:
    """GatheredFFN through es_gffn_f32: only the selected experts of the FFN are computed."""
    t: int
    d: int
    d_out: int
    expert_size: int
    experts: int  # in total
    active: tuple[int, ...]
    gated: bool = True
    activation: str = "silu"
    seed: int = 0

    def tensors(self):
        from edgesparse.kernels.gathered_ffn import gathered_ffn_reference, pack_gathered_ffn

        rng = np.random.default_rng(self.seed)
        inter = self.expert_size * self.experts
        w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)  # noqa: E731
        b = lambda n: (rng.standard_normal(n) * 0.1).astype(np.float32)  # noqa: E731
        packed = pack_gathered_ffn(w(inter, self.d), w(self.d_out, inter), self.expert_size,
                                   w_gate=w(inter, self.d) if self.gated else None, b_up=b(inter),
                                   b_gate=b(inter) if self.gated else None, b_down=b(self.d_out))
        x = rng.standard_normal((self.t, self.d)).astype(np.float32)
        experts = np.array(self.active, np.int32)
        meta = np.array([2, 8, self.t, self.d, self.d_out, self.expert_size, self.experts, len(experts),
                         ACTIVATIONS[self.activation]], np.int64)
        ref = gathered_ffn_reference(x, packed, experts, self.activation)
        return [("meta", meta), ("x", x), ("w_up", packed["w_up"]), ("w_gate", packed.get("w_gate", NONE)),
                ("w_down", packed["w_down"]), ("b_up", packed["b_up"]), ("b_gate", packed.get("b_gate", NONE)),
                ("b_down", packed["b_down"]), ("experts", experts)], ref


def run_driver(groups: list[list[tuple[str, np.ndarray]]], mode: str = "sparse", cache: Path | None = None):
    """Run the driver on case tensor groups; a list of y arrays, or error strings where the kernel's
    validation rejected a case. Also returns the kernel table the driver reported."""
    exe = build_driver(cache)
    with tempfile.TemporaryDirectory(prefix="edgesparse-arm-") as tmp:
        cases, out = Path(tmp) / "cases.esbt", Path(tmp) / "out.esbt"
        tensorfile.write(cases, [t for group in groups for t in group])
        proc = emulator.run([exe, cases, out, mode], cpuinfo=False, timeout=600, what="the aarch64 kernel driver")
        results = [a.tobytes().decode() if name == "error" else a for name, a in tensorfile.read(out)]
    table = re.search(r"kernel table '([^']*)'", proc.stderr)
    return results, table.group(1) if table else None


# -- instruction counts ----------------------------------------------------------------------------

def _qemu_single_step_flag() -> str:
    text = subprocess.run([emulator.QEMU, "-h"], capture_output=True, text=True).stdout
    return "-one-insn-per-tb" if "one-insn-per-tb" in text else "-singlestep"


def _disassembly(exe: Path) -> dict[int, str]:
    out = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(exe)],
                         capture_output=True, text=True, check=True).stdout
    table = {}
    for line in out.splitlines():
        m = re.match(r"\s+([0-9a-f]+):\s+(\S+)\s*(.*)", line)
        if m:
            table[int(m.group(1), 16)] = f"{m.group(2)} {m.group(3)}".strip()
    return table


def classify(insn: str) -> str:
    op, _, args = insn.partition(" ")
    vector = ".4s" in args or ".2d" in args or ".8h" in args or re.search(r"\bq\d+", args) is not None
    if op in ("fmla", "fmls"):
        return "vector FMA"
    if op in ("fmadd", "fmsub", "fnmadd"):
        return "scalar FMA"
    if op.startswith("ld"):
        return "vector load" if vector else "load"
    if op.startswith("st"):
        return "vector store" if vector else "store"
    return "other"


def count_instructions(case: Case, mode: str = "sparse", cache: Path | None = None,
                       packed=None, x=None, bias=None) -> dict:
    """Dynamic aarch64 instructions executed between es_mark(1) and es_mark(2), once per repeat,
    by class, from qemu's per-instruction exec trace."""
    exe = build_driver(cache)
    code = _disassembly(exe)
    with tempfile.TemporaryDirectory(prefix="edgesparse-arm-") as tmp:
        cases, out = Path(tmp) / "cases.esbt", Path(tmp) / "out.esbt"
        tensorfile.write(cases, case.tensors(packed, x, bias) if packed is not None else case.tensors())
        cmd = emulator.qemu_command([exe, cases, out, mode])
        cmd[1:1] = [_qemu_single_step_flag(), "-d", "exec,nochain"]
        pcs: Counter = Counter()
        inside, prev_mark, regions = False, False, 0
        with subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1 << 20) as proc:
            for line in proc.stderr:
                if not line.startswith("Trace "):
                    continue
                parts = line.split()
                mark = len(parts) > 4 and parts[4].startswith("es_mark")
                if mark and not prev_mark:
                    inside = not inside
                    regions += inside
                elif inside and not mark:
                    pcs[int(parts[3].split("/")[1], 16)] += 1  # [cs_base/pc/flags/cflags]
                prev_mark = mark
        if proc.returncode != 0:
            raise EdgesparseError(f"the traced aarch64 driver failed (exit status {proc.returncode})")
    if regions != case.repeat:
        raise EdgesparseError(f"expected {case.repeat} traced kernel calls, saw {regions}")
    by_class: Counter = Counter()
    for pc, n in pcs.items():
        by_class[classify(code.get(pc, "?"))] += n
    total = sum(pcs.values())
    return {"total": total // case.repeat, **{k: v // case.repeat for k, v in by_class.items()}}


def count_table(k: int = 512, n: int = 512, ms=(1, 8), blocks=(16, 8, 4), sparsities=(0.0, 0.5, 0.75, 0.9),
                cache: Path | None = None) -> list[dict]:
    """Instruction counts of the sparse kernel and of the dense loop over one layer shape."""
    rows = []
    for m in ms:
        dense_case = Case(m, k, n, 16, sparsity=0.0, seed=1)
        dense = count_instructions(dense_case, "dense", cache)
        macs = m * k * n
        rows.append({"m": m, "k": k, "n": n, "kernel": "dense loop", "block": None, "sparsity": 0.0, **dense,
                     "per_mac": dense["total"] / macs, "vs_dense": 1.0})
        for block in blocks:
            for s in sparsities:
                case = Case(m, k, n, block, sparsity=s, seed=1)
                got = count_instructions(case, "sparse", cache)
                rows.append({"m": m, "k": k, "n": n, "kernel": f"sparse {block}x1", "block": block, "sparsity": s,
                             **got, "per_mac": got["total"] / macs, "vs_dense": got["total"] / dense["total"]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| M | kernel | sparsity | instructions | vector FMAs | loads | stores | other | "
             "per dense MAC | vs dense loop |", "|" + "---|" * 10]
    for r in rows:
        loads = r.get("vector load", 0) + r.get("load", 0)
        stores = r.get("vector store", 0) + r.get("store", 0)
        other = r["total"] - r.get("vector FMA", 0) - loads - stores
        lines.append(f"| {r['m']} | {r['kernel']} | {r['sparsity']:.2f} | {r['total']:,} | {r.get('vector FMA', 0):,} "
                     f"| {loads:,} | {stores:,} | {other:,} | {r['per_mac']:.3f} | {r['vs_dense']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    rows = count_table()
    print(markdown(rows))
    if len(sys.argv) > 1:  # the plugin's dispatch stand-in reads edgesparse_snapdragon/insn_counts.json
        Path(sys.argv[1]).write_text(json.dumps({"source": "python -m edgesparse_snapdragon.kernel_check",
                                                 "qemu_cpu": emulator.CPU, "rows": rows}, indent=1) + "\n")
