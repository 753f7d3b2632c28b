"""The pure kernels on aarch64 (issue 3's ARM tests): a static driver runs es_bsmm_f32,
es_bsconv_f32 and es_gffn_f32 under qemu-aarch64-static (Cortex-A76 model), checked against the
numpy references on many shapes, awkward ones included."""
from __future__ import annotations

import numpy as np
import pytest

from edgesparse_snapdragon.kernel_check import Case, ConvCase, FfnCase, count_instructions, run_driver

SHAPES = [
    # (m, k, n, block, sparsity, activation, bias, empty block rows)
    (1, 256, 256, 16, 0.75, "none", True, 0),     # one token: the unpacked path
    (1, 33, 70, 16, 0.5, "relu", True, 0),        # K, N not multiples of the block / vector
    (2, 64, 64, 8, 0.9, "none", False, 0),
    (3, 100, 52, 4, 0.5, "gelu", True, 0),        # N a multiple of 4 but not 8/16
    (7, 48, 40, 16, 0.75, "silu", True, 2),       # M below one tile, partial last block row
    (8, 128, 96, 8, 0.6, "relu6", True, 3),       # empty block rows
    (9, 17, 13, 4, 0.3, "none", True, 1),         # N smaller than a vector tail
    (13, 64, 48, 16, 0.0, "none", True, 0),       # fully dense packing, M spanning two tiles
    (17, 96, 80, 4, 0.8, "relu", False, 0),       # several token tiles plus a tail
    (32, 64, 64, 16, 1.0, "none", True, 0),       # every block pruned: output is the bias
    (4, 1, 16, 16, 0.0, "none", True, 0),         # K = 1
]


@pytest.fixture(scope="module")
def arm_results():
    cases = [Case(m, k, n, block, s, act, bias, empty, seed=i) for i, (m, k, n, block, s, act, bias, empty)
             in enumerate(SHAPES)]
    arrays = [c.arrays() for c in cases]
    results, table = run_driver([c.tensors(p, x, b) for c, (x, p, b, _) in zip(cases, arrays)])
    return cases, arrays, results, table


def test_driver_uses_the_neon_build_of_the_kernel_table(arm_results):
    # es_simd.h names its 16-byte (NEON on aarch64) variant "generic"
    assert arm_results[3] == "generic"


@pytest.mark.parametrize("index", range(len(SHAPES)), ids=[f"m{s[0]}k{s[1]}n{s[2]}b{s[3]}s{s[4]}{s[5]}" for s in SHAPES])
def test_kernel_matches_numpy_on_aarch64(arm_results, index):
    cases, arrays, results, _ = arm_results
    got, want = results[index], arrays[index][3]
    assert not isinstance(got, str), got
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    if cases[index].sparsity == 1.0:
        bias = arrays[index][2]
        np.testing.assert_array_equal(got, np.broadcast_to(bias, got.shape))


CONVS = [
    ConvCase(2, 8, 9, 7, 12, (3, 3), block=4, sparsity=0.5),                   # batch 2, cout % 8 != 0
    ConvCase(1, 16, 8, 8, 16, (1, 1), block=16, sparsity=0.75, pads=(0, 0, 0, 0)),
    ConvCase(1, 6, 11, 10, 20, (3, 3), block=8, sparsity=0.6, stride=(2, 2), activation="relu6"),
    ConvCase(1, 5, 12, 12, 8, (3, 3), block=8, sparsity=0.4, dilation=(2, 2), pads=(2, 1, 0, 2)),
    ConvCase(1, 12, 7, 9, 24, (5, 5), block=8, sparsity=0.9, pads=(2, 2, 2, 2), activation="silu"),
    ConvCase(3, 4, 5, 5, 4, (3, 1), block=4, sparsity=0.0, stride=(1, 2), pads=(1, 0, 1, 0), bias=False),
]
FFNS = [
    FfnCase(3, 32, 16, 8, 6, (0, 3, 5)),                                      # gated SiLU (SwiGLU)
    FfnCase(1, 13, 8, 4, 4, (2, 2), gated=False, activation="relu"),           # duplicate expert, odd D
    FfnCase(9, 24, 12, 12, 5, (4, 1), activation="gelu"),                      # tokens past one tile
    FfnCase(2, 16, 8, 4, 3, (), gated=False, activation="none"),               # nothing active: y = b_down
]


@pytest.fixture(scope="module")
def other_ops():
    groups = [c.tensors() for c in [*CONVS, *FFNS]]
    results, _ = run_driver([g for g, _ in groups])
    return results, [ref for _, ref in groups]


@pytest.mark.parametrize("index", range(len(CONVS) + len(FFNS)),
                         ids=[f"conv{i}" for i in range(len(CONVS))] + [f"ffn{i}" for i in range(len(FFNS))])
def test_conv_and_gathered_ffn_match_numpy_on_aarch64(other_ops, index):
    got, want = other_ops[0][index], other_ops[1][index]
    assert not isinstance(got, str), got
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_dense_reference_loop_matches_numpy():
    cases = [Case(5, 40, 48, 16, 0.5, seed=3), Case(1, 64, 37, 8, 0.0, bias=False, seed=4)]
    arrays = [c.arrays() for c in cases]
    results, _ = run_driver([c.tensors(p, x, b) for c, (x, p, b, _) in zip(cases, arrays)], mode="dense")
    for got, (_, _, _, want) in zip(results, arrays):
        assert np.abs(got - want).max() <= 1e-5


def test_validation_rejects_bad_packing_on_aarch64():
    case = Case(2, 32, 32, 16, 0.5, seed=9)
    x, packed, bias, _ = case.arrays()
    bad_ptr = dict(packed, row_ptr=packed["row_ptr"][::-1].copy())
    bad_k = dict(packed, k_index=np.where(np.arange(packed["k_index"].size) == 0, 99, packed["k_index"]).astype(np.int32))
    results, _ = run_driver([case.tensors(bad_ptr, x, bias), case.tensors(bad_k, x, bias)])
    assert results[0] == "row_ptr[0] must be 0"
    assert results[1] == "k_index has an entry >= K (input features)"


def test_instruction_counts_follow_the_kept_blocks():
    """qemu's exec trace: the kernel issues one 4-lane FMA per kept block, vector and token, and
    far fewer instructions than the dense loop at 75% sparsity (counts, not timings)."""
    m, k, n, block = 4, 128, 128, 16
    case = Case(m, k, n, block, sparsity=0.75, seed=2)
    x, packed, bias, _ = case.arrays()
    sparse = count_instructions(case, "sparse", packed=packed, x=x, bias=bias)
    dense = count_instructions(case, "dense", packed=packed, x=x, bias=bias)
    nnzb = packed["k_index"].size
    assert sparse["vector FMA"] == nnzb * (block // 4) * m
    assert dense["vector FMA"] == m * k * n // 4
    assert sparse["total"] < 0.6 * dense["total"]  # 0.50 when written; the pack and call overheads weigh at this size
