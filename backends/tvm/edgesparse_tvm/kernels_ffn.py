"""Hand-written TIR kernels for edgesparse's GatheredFFN (contract: docs/kernels.md and
edgesparse/kernels/gathered_ffn.py): an FFN whose I = E x S intermediate neurons are grouped in
E experts of S neurons; a chunk of M tokens runs only the selected experts (`experts`, int32
[n_active], chosen at run time, duplicates count twice):

    gated = 1:  Y = sum_{e in experts} (act(X Wg_e + bg_e) * (X Wu_e + bu_e)) Wd_e + bd
    gated = 0:  Y = sum_{e in experts} act(X Wu_e + bu_e) Wd_e + bd

Two kernels per node, as the C++ kernel's two phases; the importer chains them with two call_tir:

- phase 1 (`ffn_up_*`): h [M, n_active * S], h[m, a*S + s] = the activated (gated) neuron s of
  the a-th selected expert. Inputs (x, experts, w_up, w_gate, b_up, b_gate); a plain FFN passes
  the up tensors again as gate (the contract's convention) and the kernel never reads them.
- phase 2 (`ffn_down_*`): y [M, D_out] = b_down + h @ (the selected experts' rows of w_down).
  Inputs (h, experts, w_down, b_down).

RoutedFFN (BlockFFN routers) runs through the same kernels with `routed=True`: the selection
input is `routes` float [M, E] (per-token expert scales) instead of `experts`, every expert has a
slot (n_active = E), h is scaled by the token's route, and a slot whose routes are all zero for a
token tile is skipped in both phases (its h is zero): exact, and at least as sparse as the C++
kernel's per-chunk union (a tile is never larger than a chunk would need to be useful).

`n_active` and, unless the model pins it, M are symbolic. An expert index outside [0, E) is an
error on the CPU (an assert, like the C++ kernel's error status); CUDA code cannot raise, so the
GPU kernels skip such an expert (it contributes nothing) instead of reading out of bounds.

CPU: phase 1 runs one task per (selected expert, chunk of SV neurons), tokens in tiles of 4 with
register accumulators (vectors along the neurons, the input broadcast), D split over 4/M
accumulators when M < 4; phase 2 one task per chunk of OV output columns, the same tile.
CUDA: phase 1 one CTA per (selected expert, chunk of SC neurons, token tile): lanes along the
neurons (coalesced weight rows), the CTA's warps split D, partial sums meet in shared memory;
phase 2 one CTA per (chunk of OC output columns, token tile), lanes along the columns, warps
split each selected expert's S rows.
"""
from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from .kernels import _epilogue

FFN_ACTIVATIONS = ("none", "relu", "gelu", "silu")
CPU_TOKEN_TILE = 4
CUDA_TOKEN_TILE = 8
CUDA_THREADS = 256


def _check(e, d, s, d_out, activation):
    if min(e, d, s, d_out) < 1:
        raise ValueError("E, D, S and D_out must be positive")
    if s % 4 or d_out % 4:
        raise ValueError(f"S and D_out must be multiples of 4, got S={s}, D_out={d_out}")
    if activation not in FFN_ACTIVATIONS:
        raise ValueError(f"activation must be one of {FFN_ACTIVATIONS}, got {activation!r}")


def _chunk(size: int, widest: int) -> int:
    """The widest of widest, widest/2, ..., 4 dividing size (size is a multiple of 4)."""
    c = widest
    while size % c:
        c //= 2
    return c


def _tokens(m: int | None):
    return tirx.Var("m", "int64") if m is None else m


class _Selection:
    """What differs between GatheredFFN (experts int32 [n_active]) and RoutedFFN (routes float
    [M, E], one slot per expert); its methods build TIR expressions while a kernel is parsed."""

    def __init__(self, routed: bool, e: int, tokens, mt: int):
        self.routed, self.e, self.tokens, self.mt = bool(routed), e, tokens, mt
        self.slots = e if routed else tirx.Var("n_active", "int64")
        self.shape = (tokens, e) if routed else (self.slots,)
        self.dtype = "float32" if routed else "int32"

    def expert(self, sel, a):
        return a if self.routed else sel[a]

    def runs(self, sel, m0, a, check_index: bool):
        """Whether slot a computes for the token tile starting at m0 (Python True: always)."""
        parts = []
        if check_index and not self.routed:  # GPU code cannot raise: skip an index out of range
            parts += [tirx.And(sel[a] >= 0, sel[a] < self.e)]
        if self.routed:
            last = self.tokens - 1
            parts += [functools.reduce(tirx.Or, [sel[tirx.min(m0 + t, last), a] != tirx.const(0, "float32")
                                                 for t in range(self.mt)])]
        return functools.reduce(tirx.And, parts) if parts else True

    def scale(self, sel, m, a, value):
        return value * sel[m, a] if self.routed else value


def ffn_up_cpu(m: int | None, e: int, d: int, s: int, gated: bool, activation: str = "none",
               routed: bool = False) -> tirx.PrimFunc:
    _check(e, d, s, 4, activation)
    act = _epilogue(activation)
    E, D, S, G, R = e, d, s, bool(gated), bool(routed)
    SV = _chunk(s, 16)
    mt = CPU_TOKEN_TILE if m is None else min(CPU_TOKEN_TILE, m)
    P = max(1, CPU_TOKEN_TILE // mt)  # independent accumulators over D when the tile is short
    DQ, DR = D // P, D % P
    M = _tokens(m)
    sel = _Selection(routed, e, M, mt)
    NA = sel.slots

    @T.prim_func(private=True)
    def ffn_up(x_h: T.handle, experts_h: T.handle, w_up: T.Buffer((E, D, S), "float32"),
               w_gate: T.Buffer((E, D, S), "float32"), b_up: T.Buffer((E, S), "float32"),
               b_gate: T.Buffer((E, S), "float32"), h_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (M, D), "float32")
        experts = T.match_buffer(experts_h, sel.shape, sel.dtype)
        h = T.match_buffer(h_h, (M, NA * S), "float32")
        if not R:
            for a in range(NA):
                assert 0 <= experts[a] and experts[a] < E, "GatheredFFN: expert index out of range"
        for task in T.parallel(NA * (S // SV)):
            up = T.alloc_buffer((P, mt, SV), "float32", scope="local")
            gate = T.alloc_buffer((P, mt, SV), "float32", scope="local")
            a = T.meta_var(task // (S // SV))
            s0 = T.meta_var(task % (S // SV) * SV)
            ex = T.meta_var(sel.expert(experts, a))
            for mo in range(T.ceildiv(M, mt)):
                for pp, mi in T.grid(P, mt):
                    for v in T.vectorized(SV):
                        up[pp, mi, v] = T.float32(0)
                        gate[pp, mi, v] = T.float32(0)
                # rows past M re-read row M-1 (results dropped at the store): no guards in the loop
                if sel.runs(experts, mo * mt, a, False):
                    for dq in range(DQ):
                        for pp in T.unroll(P):
                            for mi in T.unroll(mt):
                                for v in T.vectorized(SV):
                                    up[pp, mi, v] = up[pp, mi, v] + x[T.min(mo * mt + mi, M - 1), dq * P + pp] * w_up[ex, dq * P + pp, s0 + v]
                                    if G:
                                        gate[pp, mi, v] = gate[pp, mi, v] + x[T.min(mo * mt + mi, M - 1), dq * P + pp] * w_gate[ex, dq * P + pp, s0 + v]
                    for dr in T.unroll(DR):
                        for mi in T.unroll(mt):
                            for v in T.vectorized(SV):
                                up[0, mi, v] = up[0, mi, v] + x[T.min(mo * mt + mi, M - 1), DQ * P + dr] * w_up[ex, DQ * P + dr, s0 + v]
                                if G:
                                    gate[0, mi, v] = gate[0, mi, v] + x[T.min(mo * mt + mi, M - 1), DQ * P + dr] * w_gate[ex, DQ * P + dr, s0 + v]
                    for pp in T.unroll(P - 1):
                        for mi in T.unroll(mt):
                            for v in T.vectorized(SV):
                                up[0, mi, v] = up[0, mi, v] + up[pp + 1, mi, v]
                                gate[0, mi, v] = gate[0, mi, v] + gate[pp + 1, mi, v]
                # a skipped routed slot stores act(bias) * 0 = 0
                for mi in T.serial(mt):
                    if mo * mt + mi < M:
                        for v in T.serial(SV):
                            if G:
                                h[mo * mt + mi, a * S + s0 + v] = sel.scale(experts, mo * mt + mi, a, act(
                                    gate[0, mi, v] + b_gate[ex, s0 + v]) * (up[0, mi, v] + b_up[ex, s0 + v]))
                            else:
                                h[mo * mt + mi, a * S + s0 + v] = sel.scale(experts, mo * mt + mi, a, act(
                                    up[0, mi, v] + b_up[ex, s0 + v]))

    return ffn_up


def ffn_down_cpu(m: int | None, e: int, s: int, d_out: int, routed: bool = False) -> tirx.PrimFunc:
    _check(e, 4, s, d_out, "none")
    E, S, DO = e, s, d_out
    OV = _chunk(d_out, 16)
    mt = CPU_TOKEN_TILE if m is None else min(CPU_TOKEN_TILE, m)
    P = max(1, CPU_TOKEN_TILE // mt)
    P = P if S % P == 0 else 1
    M = _tokens(m)
    sel = _Selection(routed, e, M, mt)
    NA = sel.slots

    @T.prim_func(private=True)
    def ffn_down(h_h: T.handle, experts_h: T.handle, w_down: T.Buffer((E, S, DO), "float32"),
                 b_down: T.Buffer((DO,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        h = T.match_buffer(h_h, (M, NA * S), "float32")
        experts = T.match_buffer(experts_h, sel.shape, sel.dtype)
        y = T.match_buffer(y_h, (M, DO), "float32")
        for ot in T.parallel(DO // OV):
            acc = T.alloc_buffer((P, mt, OV), "float32", scope="local")
            for mo in range(T.ceildiv(M, mt)):
                for pp, mi in T.grid(P, mt):
                    for v in T.vectorized(OV):
                        acc[pp, mi, v] = T.float32(0)
                for a in range(NA):
                    if sel.runs(experts, mo * mt, a, False):
                        for sq in range(S // P):
                            for pp in T.unroll(P):
                                for mi in T.unroll(mt):
                                    for v in T.vectorized(OV):
                                        acc[pp, mi, v] = acc[pp, mi, v] + h[T.min(mo * mt + mi, M - 1), a * S + sq * P + pp] * w_down[sel.expert(experts, a), sq * P + pp, ot * OV + v]
                for pp in T.unroll(P - 1):
                    for mi in T.unroll(mt):
                        for v in T.vectorized(OV):
                            acc[0, mi, v] = acc[0, mi, v] + acc[pp + 1, mi, v]
                for mi in T.serial(mt):
                    if mo * mt + mi < M:
                        for v in T.serial(OV):
                            y[mo * mt + mi, ot * OV + v] = acc[0, mi, v] + b_down[ot * OV + v]

    return ffn_down


def ffn_up_cuda(m: int | None, e: int, d: int, s: int, gated: bool, activation: str = "none",
                routed: bool = False, threads: int = CUDA_THREADS) -> tirx.PrimFunc:
    _check(e, d, s, 4, activation)
    act = _epilogue(activation)
    E, D, S, G, TH = e, d, s, bool(gated), threads
    SC = _chunk(s, 32)          # neurons per CTA: lanes along them read one weight row segment
    DP = TH // SC               # partitions of D (one per group of SC lanes)
    mt = CUDA_TOKEN_TILE if m is None else min(CUDA_TOKEN_TILE, m)
    M = _tokens(m)
    OUT = mt * SC
    sel = _Selection(routed, e, M, mt)
    NA = sel.slots

    @T.prim_func(private=True)
    def ffn_up(x_h: T.handle, experts_h: T.handle, w_up: T.Buffer((E, D, S), "float32"),
               w_gate: T.Buffer((E, D, S), "float32"), b_up: T.Buffer((E, S), "float32"),
               b_gate: T.Buffer((E, S), "float32"), h_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        x = T.match_buffer(x_h, (M, D), "float32")
        experts = T.match_buffer(experts_h, sel.shape, sel.dtype)
        h = T.match_buffer(h_h, (M, NA * S), "float32")
        # grid extents of at least 1 (what TVM launches anyway): with the exact extent TVM's
        # simplifier would drop the `a < NA and m0 < M` guard below as always true
        a = T.launch_thread("blockIdx.x", T.max(NA, 1))
        chunk = T.launch_thread("blockIdx.y", S // SC)
        tile = T.launch_thread("blockIdx.z", T.max(T.ceildiv(M, mt), 1))
        tx = T.launch_thread("threadIdx.x", TH)
        up = T.alloc_buffer((mt,), "float32", scope="local")
        gate = T.alloc_buffer((mt,), "float32", scope="local")
        red_up = T.alloc_buffer((DP, mt, SC), "float32", scope="shared")
        red_gate = T.alloc_buffer((DP if G else 1, mt, SC), "float32", scope="shared")
        total = T.alloc_buffer((2,), "float32", scope="local")
        sn = T.meta_var(chunk * SC + tx % SC)
        m0 = T.meta_var(tile * mt)
        # TVM launches one CTA for an empty grid dimension (n_active or M = 0): nothing to do then
        if a < NA and m0 < M:
            for t in T.unroll(mt):
                up[t] = T.float32(0)
                gate[t] = T.float32(0)
            if sel.runs(experts, m0, a, True):
                for dq in range(T.ceildiv(D, DP)):
                    if dq * DP + tx // SC < D:
                        for t in T.unroll(mt):
                            up[t] = up[t] + x[T.min(m0 + t, M - 1), dq * DP + tx // SC] * w_up[sel.expert(experts, a), dq * DP + tx // SC, sn]
                            if G:
                                gate[t] = gate[t] + x[T.min(m0 + t, M - 1), dq * DP + tx // SC] * w_gate[sel.expert(experts, a), dq * DP + tx // SC, sn]
            for t in T.unroll(mt):
                red_up[tx // SC, t, tx % SC] = up[t]
                if G:
                    red_gate[tx // SC, t, tx % SC] = gate[t]
            T.tvm_storage_sync("shared")
            for r in range(T.ceildiv(OUT, TH)):
                if r * TH + tx < OUT:
                    if m0 + (r * TH + tx) // SC < M:
                        total[0] = T.float32(0)
                        total[1] = T.float32(0)
                        for q in range(DP):
                            total[0] = total[0] + red_up[q, (r * TH + tx) // SC, (r * TH + tx) % SC]
                            if G:
                                total[1] = total[1] + red_gate[q, (r * TH + tx) // SC, (r * TH + tx) % SC]
                        if sel.runs(experts, m0, a, True):
                            if G:
                                h[m0 + (r * TH + tx) // SC, a * S + chunk * SC + (r * TH + tx) % SC] = sel.scale(
                                    experts, m0 + (r * TH + tx) // SC, a,
                                    act(total[1] + b_gate[sel.expert(experts, a), chunk * SC + (r * TH + tx) % SC])
                                    * (total[0] + b_up[sel.expert(experts, a), chunk * SC + (r * TH + tx) % SC]))
                            else:
                                h[m0 + (r * TH + tx) // SC, a * S + chunk * SC + (r * TH + tx) % SC] = sel.scale(
                                    experts, m0 + (r * TH + tx) // SC, a,
                                    act(total[0] + b_up[sel.expert(experts, a), chunk * SC + (r * TH + tx) % SC]))
                        else:
                            h[m0 + (r * TH + tx) // SC, a * S + chunk * SC + (r * TH + tx) % SC] = T.float32(0)

    return ffn_up


def ffn_down_cuda(m: int | None, e: int, s: int, d_out: int, routed: bool = False,
                  threads: int = CUDA_THREADS) -> tirx.PrimFunc:
    _check(e, 4, s, d_out, "none")
    E, S, DO, TH = e, s, d_out, threads
    OC = _chunk(d_out, 32)      # output columns per CTA: lanes along one weight row segment
    RP = TH // OC               # partitions of each slot's S rows
    mt = CUDA_TOKEN_TILE if m is None else min(CUDA_TOKEN_TILE, m)
    M = _tokens(m)
    OUT = mt * OC
    sel = _Selection(routed, e, M, mt)
    NA = sel.slots

    @T.prim_func(private=True)
    def ffn_down(h_h: T.handle, experts_h: T.handle, w_down: T.Buffer((E, S, DO), "float32"),
                 b_down: T.Buffer((DO,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        h = T.match_buffer(h_h, (M, NA * S), "float32")
        experts = T.match_buffer(experts_h, sel.shape, sel.dtype)
        y = T.match_buffer(y_h, (M, DO), "float32")
        chunk = T.launch_thread("blockIdx.x", DO // OC)
        tile = T.launch_thread("blockIdx.y", T.max(T.ceildiv(M, mt), 1))  # >= 1: keeps the m0 < M guard
        tx = T.launch_thread("threadIdx.x", TH)
        acc = T.alloc_buffer((mt,), "float32", scope="local")
        red = T.alloc_buffer((RP, mt, OC), "float32", scope="shared")
        total = T.alloc_buffer((1,), "float32", scope="local")
        col = T.meta_var(chunk * OC + tx % OC)
        m0 = T.meta_var(tile * mt)
        # TVM launches one CTA for an empty grid dimension (M = 0): nothing to do then
        if m0 < M:
            for t in T.unroll(mt):
                acc[t] = T.float32(0)
            for a in range(NA):
                if sel.runs(experts, m0, a, True):  # uniform over the CTA: no divergence
                    for sq in range(T.ceildiv(S, RP)):
                        if sq * RP + tx // OC < S:
                            for t in T.unroll(mt):
                                acc[t] = acc[t] + h[T.min(m0 + t, M - 1), a * S + sq * RP + tx // OC] * w_down[
                                    sel.expert(experts, a), sq * RP + tx // OC, col]
            for t in T.unroll(mt):
                red[tx // OC, t, tx % OC] = acc[t]
            T.tvm_storage_sync("shared")
            for r in range(T.ceildiv(OUT, TH)):
                if r * TH + tx < OUT:
                    if m0 + (r * TH + tx) // OC < M:
                        total[0] = b_down[chunk * OC + (r * TH + tx) % OC]
                        for q in range(RP):
                            total[0] = total[0] + red[q, (r * TH + tx) // OC, (r * TH + tx) % OC]
                        y[m0 + (r * TH + tx) // OC, chunk * OC + (r * TH + tx) % OC] = total[0]

    return ffn_down
