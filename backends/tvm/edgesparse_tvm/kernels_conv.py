"""Hand-written TIR kernels for edgesparse's BlockSparseConv (contract: docs/kernels.md and
edgesparse/kernels/conv.py): NCHW Conv2d, group 1, weights kept in groups of B output channels x
1 input channel x all kh*kw taps, packed as values [nnzb, kh*kw, B], c_index [nnzb], row_ptr [NB+1].

The kernels compute a *valid* convolution of an already padded input: the importer pads with a
Relax `nn.pad` when the node has pads, so the hot loops carry no bounds checks. Every kernel
takes (x, values, c_index, row_ptr, bias) and writes y [N, O, OH, OW]; H, W and C are static,
the batch N may be symbolic, `nnzb` is symbolic (one kernel serves any weights of its shape).

CPU (`conv_cpu_kernel`): one task per (image, block row, output row); a register tile of OWT
output positions x B channels (the B outputs of a group in one vector, the input value
broadcast), every tap of every kept group accumulated into it. Same idea as the C++ kernel's
register tile, without its phase planes (strided convolutions read the input with a stride).

CUDA (`conv_cuda_kernel`): one thread per output position and group, 128 positions per CTA,
grid (position tiles, block rows, images). A warp's lanes read consecutive input positions
(coalesced for stride 1) and the same weights (a broadcast load); B accumulators per thread.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from .kernels import _epilogue

CONV_ACTIVATIONS = ("none", "relu", "relu6", "silu")
CPU_POSITIONS = 8      # output positions per CPU register tile (8 x 16 floats = 8 AVX-512 registers)
CUDA_THREADS = 128


def conv_out_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Output size of a valid convolution over an (already padded) input."""
    return (size - dilation * (kernel - 1) - 1) // stride + 1


def _check(c, hp, wp, o, kernel_shape, block, strides, dilations, activation) -> tuple[int, int]:
    if block not in (4, 8, 16):
        raise ValueError(f"block must be 4, 8 or 16, got {block}")
    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
    if min(c, hp, wp, o, *kernel_shape, *strides, *dilations) < 1:
        raise ValueError("channels, sizes, kernel, strides and dilations must be positive")
    oh = conv_out_size(hp, kernel_shape[0], strides[0], dilations[0])
    ow = conv_out_size(wp, kernel_shape[1], strides[1], dilations[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"the kernel {tuple(kernel_shape)} does not fit the padded input {hp}x{wp}")
    return oh, ow


def _batch(n: int | None):
    return tirx.Var("n", "int64") if n is None else n


def conv_cpu_kernel(n: int | None, c: int, hp: int, wp: int, o: int, kernel_shape, block: int,
                    strides=(1, 1), dilations=(1, 1), activation: str = "none") -> tirx.PrimFunc:
    """Block-sparse valid Conv2d for CPUs on a padded input x [N, C, HP, WP]; n=None: symbolic."""
    OH, OW = _check(c, hp, wp, o, kernel_shape, block, strides, dilations, activation)
    act = _epilogue(activation)
    B, C, HP, WP, O = block, c, hp, wp, o
    KH, KW = (int(v) for v in kernel_shape)
    SH, SW = (int(v) for v in strides)
    DH, DW = (int(v) for v in dilations)
    NB = -(-o // block)
    PT = min(CPU_POSITIONS, OW)  # the last tile of a row overlaps the previous one: no guards
    N = _batch(n)

    @T.prim_func(private=True)
    def bsconv_cpu(x_h: T.handle, values_h: T.handle, c_index_h: T.handle, row_ptr: T.Buffer((NB + 1,), "int32"),
                   bias: T.Buffer((O,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        nnzb = T.int64()
        x = T.match_buffer(x_h, (N, C, HP, WP), "float32")
        values = T.match_buffer(values_h, (nnzb, KH * KW, B), "float32")
        c_index = T.match_buffer(c_index_h, (nnzb,), "int32")
        y = T.match_buffer(y_h, (N, O, OH, OW), "float32")
        for task in T.parallel(N * NB * OH):
            acc = T.alloc_buffer((PT, B), "float32", scope="local")
            img = T.meta_var(task // (NB * OH))
            j = T.meta_var(task // OH % NB)
            oh = T.meta_var(task % OH)
            for wt in range(T.ceildiv(OW, PT)):
                w0 = T.meta_var(T.min(wt * PT, OW - PT))
                for w in T.unroll(PT):
                    for b in T.vectorized(B):
                        acc[w, b] = T.float32(0)
                for p in range(row_ptr[j], row_ptr[j + 1]):
                    for ky in T.unroll(KH):
                        for kx in T.unroll(KW):
                            for w in T.unroll(PT):
                                for b in T.vectorized(B):
                                    acc[w, b] = acc[w, b] + x[img, c_index[p], oh * SH + ky * DH, (w0 + w) * SW + kx * DW] * values[p, ky * KW + kx, b]
                for b in T.serial(B):
                    if j * B + b < O:
                        for w in T.serial(PT):
                            y[img, j * B + b, oh, w0 + w] = act(acc[w, b] + bias[j * B + b])

    return bsconv_cpu


def conv_cuda_kernel(n: int | None, c: int, hp: int, wp: int, o: int, kernel_shape, block: int,
                     strides=(1, 1), dilations=(1, 1), activation: str = "none",
                     threads: int = CUDA_THREADS) -> tirx.PrimFunc:
    """Block-sparse valid Conv2d for NVIDIA GPUs on a padded input; n=None: symbolic batch."""
    OH, OW = _check(c, hp, wp, o, kernel_shape, block, strides, dilations, activation)
    if threads % 32 or threads > 1024:
        raise ValueError(f"threads must be a multiple of 32 up to 1024, got {threads}")
    act = _epilogue(activation)
    B, C, HP, WP, O = block, c, hp, wp, o
    KH, KW = (int(v) for v in kernel_shape)
    SH, SW = (int(v) for v in strides)
    DH, DW = (int(v) for v in dilations)
    NB = -(-o // block)
    N = _batch(n)
    TH = threads

    @T.prim_func(private=True)
    def bsconv_cuda(x_h: T.handle, values_h: T.handle, c_index_h: T.handle, row_ptr: T.Buffer((NB + 1,), "int32"),
                    bias: T.Buffer((O,), "float32"), y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        nnzb = T.int64()
        x = T.match_buffer(x_h, (N, C, HP, WP), "float32")
        values = T.match_buffer(values_h, (nnzb, KH * KW, B), "float32")
        c_index = T.match_buffer(c_index_h, (nnzb,), "int32")
        y = T.match_buffer(y_h, (N, O, OH, OW), "float32")
        tile = T.launch_thread("blockIdx.x", T.ceildiv(OH * OW, TH))
        j = T.launch_thread("blockIdx.y", NB)
        img = T.launch_thread("blockIdx.z", T.max(N, 1))  # >= 1: keeps the img < N guard (N = 0)
        tx = T.launch_thread("threadIdx.x", TH)
        acc = T.alloc_buffer((B,), "float32", scope="local")
        xv = T.alloc_buffer((1,), "float32", scope="local")
        pos = T.meta_var(tile * TH + tx)
        if pos < OH * OW and img < N:  # TVM launches one CTA for an empty grid dimension (N = 0)
            for b in T.unroll(B):
                acc[b] = T.float32(0)
            for p in range(row_ptr[j], row_ptr[j + 1]):
                for ky in T.unroll(KH):
                    for kx in T.unroll(KW):
                        xv[0] = x[img, c_index[p], pos // OW * SH + ky * DH, pos % OW * SW + kx * DW]
                        for b in T.unroll(B):
                            acc[b] = acc[b] + xv[0] * values[p, ky * KW + kx, b]
            for b in T.unroll(B):
                if j * B + b < O:
                    y[img, j * B + b, pos // OW, pos % OW] = act(acc[b] + bias[j * B + b])

    return bsconv_cuda
