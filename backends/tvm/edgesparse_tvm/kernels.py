"""Hand-written TIR kernels for edgesparse's BlockSparseMatMul (contract: docs/kernels.md and
edgesparse/kernels/blocksparse.py):

    Y[m, n] = act(X[m, :] @ W[:, n] + bias[n]),  W in B x 1 blocks, packed as
    values [nnzb, B], k_index [nnzb] (ascending per block row), row_ptr [NB + 1].

Every kernel takes five buffers (x, values, k_index, row_ptr, bias) and writes y; a node without
a bias gets a zero bias. `nnzb` is a symbolic dimension, so one compiled kernel serves any weights
of its shape; `m` (tokens) is static when the model's shape is, else symbolic.

CPU (`cpu_kernel`): one task per block row (`T.parallel`), tokens in tiles of 4 whose
accumulators stay in registers, the B outputs of a block row in one vector, data-dependent loop
bounds over the row's blocks. With fewer than 4 tokens the row's blocks are split over 4/M
accumulators so that the FMA chains stay independent. Same structure as the C++ kernel.

CUDA (`cuda_kernel`): one thread block (CTA) per block row and token tile. The CTA's threads split
the row's blocks: each weight block is read from memory exactly once per token tile, as 16-byte
vector loads by B/VEC adjacent lanes, and used for every token of the tile from registers; loads
are issued `UNROLL` blocks ahead of the FMAs. Partial sums are reduced with warp shuffles, then
across warps through shared memory, and the last step adds the bias, applies the activation and
writes the outputs. fp32 and fp16 (fp32 accumulation) variants.
"""
from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.script import tirx as T

ACTIVATIONS = ("none", "relu", "gelu", "silu")
CPU_TOKEN_TILE = 4
CUDA_MAX_TOKEN_TILE = 8
CUDA_UNROLL = 4


def _check(k: int, n: int, block: int, activation: str, dtype: str) -> None:
    if block not in (4, 8, 16):
        raise ValueError(f"block must be 4, 8 or 16, got {block}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be float32 or float16, got {dtype}")
    if k < 1 or n < 1:
        raise ValueError(f"K and N must be positive, got K={k}, N={n}")


def _epilogue(activation: str):
    """PrimExpr builder for act(v), v float32."""
    def apply(v):
        if activation == "relu":
            return T.max(v, T.float32(0))
        if activation == "relu6":
            return T.min(T.max(v, T.float32(0)), T.float32(6))
        if activation == "gelu":  # erf form, as torch.nn.GELU()
            return T.float32(0.5) * v * (T.float32(1) + T.erf(v * T.float32(1 / math.sqrt(2.0))))
        if activation == "silu":
            return v / (T.float32(1) + T.exp(T.float32(0) - v))
        return v
    return apply


def cpu_kernel(m: int | None, k: int, n: int, block: int, activation: str = "none",
               dtype: str = "float32") -> tirx.PrimFunc:
    """Block-sparse MatMul for CPUs (llvm). m=None: tokens symbolic."""
    _check(k, n, block, activation, dtype)
    if dtype != "float32":
        raise ValueError("the CPU kernel computes float32")
    nb = -(-n // block)
    mt = CPU_TOKEN_TILE if m is None else min(CPU_TOKEN_TILE, m)
    P = max(1, CPU_TOKEN_TILE // mt)  # independent accumulators: few tokens -> split the blocks
    act = _epilogue(activation)
    B, K, N, NB = block, k, n, nb
    M = _tokens(m)

    @T.prim_func(private=True)
    def bsmm_cpu(x_h: T.handle, values_h: T.handle, k_index_h: T.handle, row_ptr: T.Buffer((NB + 1,), "int32"),
                 bias: T.Buffer((N,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        nnzb = T.int64()
        x = T.match_buffer(x_h, (M, K), "float32")
        values = T.match_buffer(values_h, (nnzb, B), "float32")
        k_index = T.match_buffer(k_index_h, (nnzb,), "int32")
        y = T.match_buffer(y_h, (M, N), "float32")
        for j in T.parallel(NB):
            acc = T.alloc_buffer((P, mt, B), "float32", scope="local")
            for mo in range(T.ceildiv(M, mt)):
                for pp in T.unroll(P):
                    for mi in T.unroll(mt):
                        for b in T.vectorized(B):
                            acc[pp, mi, b] = T.float32(0)
                if mo * mt + mt <= M:  # a full tile: no token guards inside the hot loop
                    for q in range((row_ptr[j + 1] - row_ptr[j]) // P):
                        for pp in T.unroll(P):
                            for mi in T.unroll(mt):
                                for b in T.vectorized(B):
                                    acc[pp, mi, b] = acc[pp, mi, b] + x[mo * mt + mi, k_index[row_ptr[j] + q * P + pp]] * values[row_ptr[j] + q * P + pp, b]
                    for p in range(row_ptr[j] + (row_ptr[j + 1] - row_ptr[j]) // P * P, row_ptr[j + 1]):
                        for mi in T.unroll(mt):
                            for b in T.vectorized(B):
                                acc[0, mi, b] = acc[0, mi, b] + x[mo * mt + mi, k_index[p]] * values[p, b]
                else:
                    for p in range(row_ptr[j], row_ptr[j + 1]):
                        for mi in T.unroll(mt):
                            if mo * mt + mi < M:
                                for b in T.vectorized(B):
                                    acc[0, mi, b] = acc[0, mi, b] + x[mo * mt + mi, k_index[p]] * values[p, b]
                for pp in T.unroll(P - 1):
                    for mi in T.unroll(mt):
                        for b in T.vectorized(B):
                            acc[0, mi, b] = acc[0, mi, b] + acc[pp + 1, mi, b]
                for mi in T.serial(mt):
                    if mo * mt + mi < M:
                        for b in T.serial(B):
                            if j * B + b < N:
                                y[mo * mt + mi, j * B + b] = act(acc[0, mi, b] + bias[j * B + b])

    return bsmm_cpu


def cuda_threads(nb: int) -> int:
    """Threads per CTA: enough resident warps to keep an H200's memory system busy when the layer
    has few block rows (the CTA count is NB x token tiles); small GPUs (Orin) are saturated by
    any of these."""
    if nb < 384:
        return 512
    if nb < 1024:
        return 256
    return 128


def cuda_kernel(m: int | None, k: int, n: int, block: int, activation: str = "none",
                dtype: str = "float32", threads: int | None = None, unroll: int = CUDA_UNROLL,
                vec: int | None = None, token_tile: int | None = None) -> tirx.PrimFunc:
    """Block-sparse MatMul for NVIDIA GPUs. m=None: tokens symbolic (token tiles of 8).

    Launch parameters (defaults chosen by shape; benchmarks/gpu sweeps the others):
    threads per CTA, unroll (blocks loaded ahead per thread), vec (outputs of a block per lane:
    one 16-byte load by default, 2x or 4x fewer lanes per block with more), token_tile (tokens
    sharing one read of the weights)."""
    _check(k, n, block, activation, dtype)
    nb = -(-n // block)
    elem_bytes = 4 if dtype == "float32" else 2
    lv = min(block, 16 // elem_bytes)       # elements per 16-byte load
    vec = vec or lv
    if vec % lv or block % vec:
        raise ValueError(f"vec must be a multiple of {lv} dividing the block {block}, got {vec}")
    lpb = block // vec                      # lanes per weight block
    threads = threads or cuda_threads(nb)
    if threads % 32 or threads > 1024:
        raise ValueError(f"threads must be a multiple of 32 up to 1024, got {threads}")
    groups = threads // lpb                 # blocks handled side by side per step
    warps = threads // 32
    mt = token_tile or CUDA_MAX_TOKEN_TILE
    mt = mt if m is None else min(m, mt)
    n_shuffle = int(math.log2(32 // lpb))  # xor offsets lpb, 2 lpb, ... 16 join the lanes of one q
    act = _epilogue(activation)
    B, K, N, NB, U, VEC, DT, LV = block, k, n, nb, unroll, vec, dtype, lv
    M = _tokens(m)
    out_per_cta = mt * B

    @T.prim_func(private=True)
    def bsmm_cuda(x_h: T.handle, values_h: T.handle, k_index_h: T.handle, row_ptr: T.Buffer((NB + 1,), "int32"),
                  bias: T.Buffer((N,), DT), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        nnzb = T.int64()
        x = T.match_buffer(x_h, (M, K), DT)
        values = T.match_buffer(values_h, (nnzb, B), DT)
        k_index = T.match_buffer(k_index_h, (nnzb,), "int32")
        y = T.match_buffer(y_h, (M, N), DT)
        row = T.launch_thread("blockIdx.x", NB)
        tile = T.launch_thread("blockIdx.y", T.ceildiv(M, mt))
        tx = T.launch_thread("threadIdx.x", threads)
        acc = T.alloc_buffer((mt, VEC), "float32", scope="local")
        wv = T.alloc_buffer((U, VEC), DT, scope="local")
        kv = T.alloc_buffer((U,), "int32", scope="local")
        total = T.alloc_buffer((1,), "float32", scope="local")
        red = T.alloc_buffer((warps, mt, B), "float32", scope="shared")
        start = T.meta_var(row_ptr[row])
        end = T.meta_var(row_ptr[row + 1])
        g = T.meta_var(tx // lpb)
        q = T.meta_var(tx % lpb)
        m0 = T.meta_var(tile * mt)
        for t in T.unroll(mt):
            for c in T.unroll(VEC):
                acc[t, c] = T.float32(0)
        for it in range(T.ceildiv(end - start, groups * U)):
            # loads first (U blocks in flight per thread), FMAs after
            for u in T.unroll(U):
                if start + (it * U + u) * groups + g < end:
                    kv[u] = k_index[start + (it * U + u) * groups + g]
                    for c0 in T.unroll(VEC // LV):
                        for c1 in T.vectorized(LV):
                            wv[u, c0 * LV + c1] = values[start + (it * U + u) * groups + g, q * VEC + c0 * LV + c1]
                else:
                    kv[u] = -1
            for u in T.unroll(U):
                if kv[u] >= 0:
                    for t in T.unroll(mt):
                        if m0 + t < M:
                            for c in T.unroll(VEC):
                                acc[t, c] = acc[t, c] + T.cast(x[m0 + t, kv[u]], "float32") * T.cast(wv[u, c], "float32")
        for t in T.unroll(mt):
            for c in T.unroll(VEC):
                for s in T.unroll(n_shuffle):
                    acc[t, c] = acc[t, c] + T.tvm_warp_shuffle_xor(
                        T.tvm_warp_activemask(), acc[t, c], T.shift_left(lpb, s), 32, 32)
        if tx % 32 < lpb:  # lanes 0..lpb-1 hold their warp's sums of outputs q*VEC .. q*VEC+VEC-1
            for t in T.unroll(mt):
                for c in T.unroll(VEC):
                    red[tx // 32, t, q * VEC + c] = acc[t, c]
        T.tvm_storage_sync("shared")
        for e in range(T.ceildiv(out_per_cta, threads)):
            if e * threads + tx < out_per_cta:
                if m0 + (e * threads + tx) // B < M:
                    if row * B + (e * threads + tx) % B < N:
                        total[0] = T.float32(0)
                        for w in T.unroll(warps):
                            total[0] = total[0] + red[w, (e * threads + tx) // B, (e * threads + tx) % B]
                        y[m0 + (e * threads + tx) // B, row * B + (e * threads + tx) % B] = T.cast(
                            act(total[0] + T.cast(bias[row * B + (e * threads + tx) % B], "float32")), DT)

    return bsmm_cuda


def _tokens(m: int | None):
    """The token count: a constant, or a symbolic int64 bound by the x buffer's shape."""
    return tirx.Var("m", "int64") if m is None else m
