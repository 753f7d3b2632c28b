"""The CUDA kernels' generated code, run on the CPU by tvm_cuda_emulator (a std::thread per CUDA
thread, barriers for __syncthreads), against numpy references: what can be checked of them
without a GPU (indexing, guards, shared-memory and warp reductions, empty grids)."""
from __future__ import annotations

import numpy as np

from edgesparse.kernels import block_sparse_matmul_reference, pack_block_sparse, pack_block_sparse_conv
from edgesparse.kernels.conv import block_sparse_conv_reference
from edgesparse.kernels.gathered_ffn import gathered_ffn_reference, pack_gathered_ffn, routed_ffn_reference
from edgesparse_tvm import kernels, kernels_conv, kernels_ffn
from tvm_cuda_emulator import Emulated

ceil = lambda a, b: -(-a // b)


def test_block_sparse_matmul_cuda_variants():
    """The default launch configuration (a partial token tile) and the GPU check's alternatives
    (more outputs per lane, shorter token tile, more blocks in flight) with symbolic tokens. Two
    warps per CTA (still a cross-warp reduction) keep the emulation's barriers cheap."""
    k, n, block = 48, 72, 16
    cases = {"default": (3, {}), "variant": (None, {"vec": 16, "token_tile": 4, "unroll": 8})}
    emu = Emulated({name: kernels.cuda_kernel(m, k, n, block, "gelu", threads=64, **kw) for name, (m, kw) in cases.items()})
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32) * np.repeat(rng.random((k, ceil(n, block))) < 0.3, block, 1)[:, :n]
    packed, bias = pack_block_sparse(w, block), rng.standard_normal(n).astype(np.float32)
    for name, (m, kw) in cases.items():
        tokens = m or 9
        tile = kw.get("token_tile", 8) if m is None else min(m, kw.get("token_tile", 8))
        x = rng.standard_normal((tokens, k)).astype(np.float32)
        y = np.full((tokens, n), np.nan, np.float32)
        emu.launch(name, (ceil(n, block), ceil(tokens, tile)),
                   dict(x=x, values=packed["values"], k_index=packed["k_index"], row_ptr=packed["row_ptr"], bias=bias, y=y),
                   {"m": tokens})
        np.testing.assert_allclose(y, block_sparse_matmul_reference(x, packed, n, bias, "gelu"), rtol=1e-4, atol=1e-4)


def test_block_sparse_conv_cuda():
    c, h, w, o, block = 5, 9, 11, 20, 8
    emu = Emulated({"conv": kernels_conv.conv_cuda_kernel(None, c, h, w, o, (3, 3), block, (2, 1), (1, 2), "relu6"),
                    "pw": kernels_conv.conv_cuda_kernel(2, c, h, w, o, (1, 1), block, (1, 1), (1, 1), "silu")})
    rng = np.random.default_rng(1)
    bias = rng.standard_normal(o).astype(np.float32)
    for name, kernel, stride, dilation, act, batch in (("conv", (3, 3), (2, 1), (1, 2), "relu6", 3),
                                                       ("pw", (1, 1), (1, 1), (1, 1), "silu", 2), ("conv", (3, 3), (2, 1), (1, 2), "relu6", 0)):
        weight = rng.standard_normal((o, c, *kernel)).astype(np.float32) * (rng.random((o, c, 1, 1)) < 0.5)
        packed = pack_block_sparse_conv(weight, block)
        x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
        want = block_sparse_conv_reference(x, packed, o, kernel, bias, stride, (0, 0, 0, 0), dilation, act)
        y = np.full(want.shape, np.nan, np.float32)
        emu.launch(name, (ceil(want.shape[2] * want.shape[3], kernels_conv.CUDA_THREADS), ceil(o, block), max(batch, 1)),
                   dict(x=x, values=packed["values"], c_index=packed["c_index"], row_ptr=packed["row_ptr"], bias=bias, y=y),
                   {"n": batch})
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def test_gathered_and_routed_ffn_cuda():
    e, d, s, d_out = 6, 40, 12, 20
    rng = np.random.default_rng(2)
    packed = pack_gathered_ffn(rng.standard_normal((e * s, d)), rng.standard_normal((d_out, e * s)), s,
                               w_gate=rng.standard_normal((e * s, d)), b_up=rng.standard_normal(e * s),
                               b_gate=rng.standard_normal(e * s), b_down=rng.standard_normal(d_out))
    funcs = {}
    for mode, routed in (("g", False), ("r", True)):  # one module (one compile) for both operators
        funcs.update({f"{mode}up": kernels_ffn.ffn_up_cuda(None, e, d, s, True, "silu", routed=routed),
                      f"{mode}down": kernels_ffn.ffn_down_cuda(None, e, s, d_out, routed=routed),
                      f"{mode}up1": kernels_ffn.ffn_up_cuda(1, e, d, s, True, "silu", routed=routed, threads=1024),
                      f"{mode}down1": kernels_ffn.ffn_down_cuda(1, e, s, d_out, routed=routed, threads=512)})
    emu = Emulated(funcs)
    # TVM launches one CTA for an empty grid; its simplifier once proved these guards true and
    # dropped them (an empty selection then read experts[0] and wrote past h)
    assert "blockIdx.x) < n_active)" in emu.source and "* (int64_t)8) < m)" in emu.source
    sc, oc = kernels_ffn._chunk(s, 32), kernels_ffn._chunk(d_out, 32)

    def routes(tokens):
        r = np.maximum(rng.standard_normal((tokens, e)), 0).astype(np.float32)
        r[:, 0] = 0
        r[: min(tokens, 8), 3] = 0  # silent for the first token tile
        return r
    # (kernels, tokens, selection): gathered with a repeat, none, and an index out of range that the
    # GPU code skips (the reference is computed without it); routed with silent experts; 0 tokens
    cases = [("g", 11, np.int32([4, 1, 4])), ("g1", 1, np.int32([5, 0])), ("g", 3, np.int32([])),
             ("g", 3, np.int32([2, 9])), ("r", 11, routes(11)), ("r1", 1, routes(1)), ("r", 0, routes(0))]
    for prefix, tokens, selection in cases:
        routed = prefix.startswith("r")
        slots = e if routed else len(selection)
        tile = 1 if prefix.endswith("1") else 8
        kernel_up, kernel_down = f"{prefix[0]}up{prefix[1:]}", f"{prefix[0]}down{prefix[1:]}"
        x = rng.standard_normal((tokens, d)).astype(np.float32)
        h = np.full((tokens, slots * s), np.nan, np.float32)
        y = np.full((tokens, d_out), np.nan, np.float32)
        sizes = {"m": tokens, "n_active": slots}
        emu.launch(kernel_up, (max(slots, 1), s // sc, max(ceil(tokens, tile), 1)),
                   dict(x=x, experts=selection, w_up=packed["w_up"], w_gate=packed["w_gate"], b_up=packed["b_up"],
                        b_gate=packed["b_gate"], h=h), sizes)
        emu.launch(kernel_down, (d_out // oc, max(ceil(tokens, tile), 1)),
                   dict(h=h, experts=selection, w_down=packed["w_down"], b_down=packed["b_down"], y=y), sizes)
        if tokens == 0:  # one idle CTA ran: nothing to compare
            continue
        if routed:
            want = routed_ffn_reference(x, packed, selection, "silu")
        else:
            want = gathered_ffn_reference(x, packed, selection[(selection >= 0) & (selection < e)], "silu")
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()), err_msg=f"{prefix} {tokens}")
