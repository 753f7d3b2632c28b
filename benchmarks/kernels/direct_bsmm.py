"""BlockSparseMatMul's kernel called directly (`es_bsmm_f32`, one thread, no ORT in the loop).

Times one call on a random block-sparse matrix and prints the best and median time and the useful
GFLOP/s (2 x M x nonzeros). What docs/kernels.md's "kernel alone" figures come from: compare two
libraries by running this with each (`--lib`), the pack alone with one block row (`--n 16`), and
cold caches with `--flush-mb` (that many MB written between calls, as other layers do in a model).
EDGESPARSE_ISA=avx2 runs the AVX2 code.

    .venv/bin/python benchmarks/kernels/direct_bsmm.py --k 384 --n 384 --m 128 --sparsity 0.75
    EDGESPARSE_ISA=avx2 .venv/bin/python benchmarks/kernels/direct_bsmm.py --k 3072 --n 768 --m 8
"""
from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np

from edgesparse.kernels.bench import random_block_sparse
from edgesparse.kernels.blocksparse import pack_block_sparse
from edgesparse.kernels.build import build_library, host_toolchain

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}


class BsmmArgs(ctypes.Structure):  # es_bsmm_args (es_kernels.h)
    _fields_ = [("x", ctypes.c_void_p), ("m", ctypes.c_int64), ("k", ctypes.c_int64), ("n", ctypes.c_int64),
                ("block", ctypes.c_int32), ("activation", ctypes.c_int32), ("values", ctypes.c_void_p),
                ("k_index", ctypes.c_void_p), ("row_ptr", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("y", ctypes.c_void_p)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--m", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--activation", choices=sorted(ACTIVATIONS), default="none")
    ap.add_argument("--flush-mb", type=int, default=0)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--lib", help="a kernel library (default: this source tree's, built if needed)")
    args = ap.parse_args()

    lib = ctypes.CDLL(args.lib or str(build_library(host_toolchain())))
    rng = np.random.default_rng(0)
    packed = pack_block_sparse(random_block_sparse(rng, args.k, args.n, args.block, args.sparsity), args.block)
    x = rng.standard_normal((args.m, args.k)).astype(np.float32)
    y = np.empty((args.m, args.n), np.float32)
    a = BsmmArgs(x.ctypes.data, args.m, args.k, args.n, args.block, ACTIVATIONS[args.activation],
                 packed["values"].ctypes.data, packed["k_index"].ctypes.data, packed["row_ptr"].ctypes.data, None,
                 y.ctypes.data)
    junk = np.zeros(args.flush_mb << 18, np.float32)
    times = []
    for _ in range(args.reps):
        junk += 1.0  # evicts the weights, the scratch and Y from the caches
        t0 = time.perf_counter()
        lib.es_bsmm_f32(ctypes.byref(a))
        times.append(time.perf_counter() - t0)
    flops = 2.0 * args.m * packed["values"].size
    best, median = min(times), float(np.median(times))
    print(f"K={args.k} N={args.n} M={args.m} sparsity={args.sparsity} flush={args.flush_mb} MB: best {best * 1e6:.1f} us "
          f"({flops / best / 1e9:.1f} GFLOP/s), median {median * 1e6:.1f} us ({flops / median / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
