"""The pure kernels (edgesparse/kernels/csrc, C ABI of es_kernels.h) compiled to wasm32-wasi with
SIMD128 and run under node's WASI by a small driver, against the numpy reference; and the same
kernels in the browser module (edgesparse_kernels.wasm, the one packages ship) through its exports."""
from __future__ import annotations

import json
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from wasm_helpers import HERE, require_toolchain

from edgesparse.kernels import block_sparse_matmul_reference, pack_block_sparse
from edgesparse.kernels.reference import apply_activation

ACT = {"none": 0, "relu": 1, "gelu": 2, "silu": 3, "relu6": 4}


def sparse_weight(rng, k, n, block, sparsity, empty_rows=()):
    """W [k, n] with `sparsity` of its block x 1 blocks zero, and some block rows entirely empty."""
    nb = -(-n // block)
    keep = rng.random((k, nb)) >= sparsity
    for j in empty_rows:
        keep[:, j] = False
    w = rng.standard_normal((k, nb * block)).astype(np.float32)
    w *= np.repeat(keep, block, axis=1)
    return np.ascontiguousarray(w[:, :n])


# (m, k, n, block, sparsity, activation, bias, empty block rows)
CASES = [
    (1, 768, 3072, 16, 0.75, "none", True, ()),            # FFN up, one token
    (8, 3072, 768, 16, 0.75, "gelu", True, ()),            # FFN down, register tiles of tokens
    (9, 37, 45, 16, 0.5, "relu", True, (0, 2)),            # K, N not multiples of the block; empty rows
    (1, 100, 33, 8, 0.6, "silu", False, (4,)),             # M = 1, partial last block row
    (17, 64, 20, 4, 0.3, "relu6", True, (1,)),             # odd M past the tile, block 4
    (3, 50, 70, 8, 0.9, "none", False, ()),                # very sparse
    (5, 24, 16, 16, 1.0, "relu", True, ()),                # every block pruned: bias and activation only
    (2, 1, 5, 4, 0.0, "none", True, ()),                   # K = 1, N < block
    (0, 32, 32, 16, 0.5, "none", True, ()),                # no tokens at all
]


def encode(cases) -> tuple[bytes, list]:
    rng = np.random.default_rng(42)
    blob = [struct.pack("<i", len(cases))]
    expected = []
    for m, k, n, block, sparsity, act, with_bias, empty in cases:
        w = sparse_weight(rng, k, n, block, sparsity, empty)
        packed = pack_block_sparse(w, block)
        x = rng.standard_normal((m, k)).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
        nnzb = len(packed["k_index"])
        blob.append(struct.pack("<8i", m, k, n, block, ACT[act], nnzb, int(with_bias), 0))
        blob += [x.tobytes(), packed["values"].tobytes(), packed["k_index"].tobytes(), packed["row_ptr"].tobytes()]
        if with_bias:
            blob.append(bias.tobytes())
        if act == "relu6":  # not an ONNX-level activation of BlockSparseMatMul, but a kernel one
            ref = apply_activation(block_sparse_matmul_reference(x, packed, n, bias, "none"), "relu6")
        else:
            ref = block_sparse_matmul_reference(x, packed, n, bias, act)
        scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64) + (np.abs(bias) if with_bias else 0)
        expected.append((ref.reshape(m, n), scale.reshape(m, n)))
    return b"".join(blob), expected


def bad_cases() -> bytes:
    """Packed weights es_bsmm_validate must reject: (header, arrays) with k, n = 8, 8, block 4."""
    x = np.zeros((1, 8), np.float32).tobytes()
    vals = np.ones((2, 4), np.float32).tobytes()
    cases = [
        (np.array([0, 9], np.int32), np.array([0, 1, 2], np.int32)),   # k_index >= K
        (np.array([3, 3], np.int32), np.array([0, 2, 2], np.int32)),   # not strictly ascending
        (np.array([0, 1], np.int32), np.array([0, 2, 1], np.int32)),   # row_ptr decreasing / wrong end
    ]
    blob = [struct.pack("<i", len(cases))]
    for k_index, row_ptr in cases:
        blob += [struct.pack("<8i", 1, 8, 8, 4, 0, 2, 0, 0), x, vals, k_index.tobytes(), row_ptr.tobytes()]
    return b"".join(blob)


@pytest.fixture(scope="module")
def driver() -> Path:
    require_toolchain()
    from edgesparse_wasm import toolchain

    return toolchain.wasi_command(HERE / "wasi_driver.cpp", "bsmm_driver.wasm")


def run_driver(driver: Path, cases: bytes, count: int) -> tuple[str, list]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cases.bin").write_bytes(cases)
        proc = subprocess.run(["node", "--no-warnings", str(HERE / "run_wasi.mjs"), str(driver), tmp,
                               "/data/cases.bin", "/data/out.bin"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out = (Path(tmp) / "out.bin").read_bytes()
    return proc.stdout, out


def test_pure_kernels_under_node_wasi_match_numpy(driver):
    cases, expected = encode(CASES)
    stdout, out = run_driver(driver, cases, len(CASES))
    assert stdout.startswith("isa generic vec_floats 4"), stdout  # SIMD128: 4 floats per vector
    pos = 0
    for (m, k, n, *_), (ref, scale) in zip(CASES, expected):
        (status,) = struct.unpack_from("<i", out, pos)
        pos += 4
        assert status == 0, f"case m={m} k={k} n={n} was rejected"
        y = np.frombuffer(out, np.float32, m * n, pos).reshape(m, n)
        pos += 4 * m * n
        err = np.abs(y.astype(np.float64) - ref) / (scale + 1.0)
        assert err.max(initial=0.0) < 2e-6, f"case m={m} k={k} n={n}: relative error {err.max():.2e}"
    assert pos == len(out)


def test_validation_rejects_bad_packing(driver):
    stdout, out = run_driver(driver, bad_cases(), 3)
    statuses = struct.unpack("<3i", out)
    assert statuses == (1, 1, 1), stdout
    assert "k_index has an entry >= K" in stdout
    assert "strictly ascending" in stdout


def test_browser_module_has_no_imports_and_matches_numpy(tmp_path):
    """The module packages ship, instantiated with {} (as a browser does), called like the runtime."""
    require_toolchain()
    from edgesparse_wasm import toolchain

    module = toolchain.kernel_module()
    assert toolchain.wasm_imports(module.read_bytes()) == []
    rng = np.random.default_rng(7)
    m, k, n, block = 5, 70, 50, 16
    w = sparse_weight(rng, k, n, block, 0.75, (1,))
    packed = pack_block_sparse(w, block)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    for name, a in {"x": x, "values": packed["values"], "k_index": packed["k_index"], "row_ptr": packed["row_ptr"],
                    "bias": bias}.items():
        (tmp_path / f"{name}.bin").write_bytes(a.tobytes())
    script = tmp_path / "call.mjs"
    script.write_text(f"""
import fs from "node:fs";
const {{ instance }} = await WebAssembly.instantiate(fs.readFileSync({json.dumps(str(module))}), {{}});
const e = instance.exports; e._initialize();
const put = (name) => {{ const b = fs.readFileSync({json.dumps(str(tmp_path))} + "/" + name + ".bin");
  const p = e.esw_malloc(b.length); new Uint8Array(e.memory.buffer, p, b.length).set(b); return p; }};
const [x, v, ki, rp, bias] = ["x", "values", "k_index", "row_ptr", "bias"].map(put);
const y = e.esw_malloc({m * n * 4});
if (e.esw_bsmm(x, {m}, {k}, {n}, {block}, 2, v, ki, rp, bias, y) !== 0) throw new Error("kernel failed");
fs.writeFileSync({json.dumps(str(tmp_path / "y.bin"))}, new Uint8Array(e.memory.buffer, y, {m * n * 4}));
""")
    proc = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    y = np.frombuffer((tmp_path / "y.bin").read_bytes(), np.float32).reshape(m, n)
    ref = block_sparse_matmul_reference(x, packed, n, bias, "gelu")
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-5)


# (batch, cin, H, W, cout, (kh, kw), (sh, sw), (dh, dw), pads t/l/b/r, block, activation, bias, sparsity)
CONV_CASES = [
    (1, 8, 9, 9, 20, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 16, "relu", True, 0.5),   # cout not a block multiple
    (2, 5, 7, 10, 12, (3, 2), (2, 1), (2, 1), (1, 0, 0, 1), 4, "silu", False, 0.3),  # strides, dilation, odd pads
    (1, 16, 4, 4, 24, (1, 1), (1, 1), (1, 1), (0, 0, 0, 0), 8, "relu6", False, 0.9), # 1x1, very sparse
    (1, 3, 6, 5, 16, (3, 3), (1, 1), (1, 1), (0, 0, 0, 0), 16, "none", True, 1.0),   # every group pruned
]
# (t, d, d_out, s, experts total, selected experts, activation, gated)
FFN_CASES = [
    (1, 64, 48, 16, 8, [5, 0, 3], "silu", True),
    (9, 30, 20, 8, 5, [4, 4, 1, 0, 2], "gelu", False),   # duplicates count twice; D not a multiple of 4
    (3, 16, 8, 4, 4, [], "relu", True),                  # no expert selected: bias only
]


def encode_ops() -> tuple[bytes, list]:
    from edgesparse.kernels.conv import block_sparse_conv_reference, pack_block_sparse_conv, random_block_sparse_conv
    from edgesparse.kernels.gathered_ffn import gathered_ffn_reference, pack_gathered_ffn

    rng = np.random.default_rng(11)
    blob = [struct.pack("<i", len(CONV_CASES) + len(FFN_CASES))]
    expected = []
    for batch, cin, h, w, cout, (kh, kw), (sh, sw), (dh, dw), pads, block, act, with_bias, sparsity in CONV_CASES:
        weight = random_block_sparse_conv(rng, cout, cin, kh, kw, block, sparsity)
        packed = pack_block_sparse_conv(weight, block)
        x = rng.standard_normal((batch, cin, h, w)).astype(np.float32)
        bias = rng.standard_normal(cout).astype(np.float32) if with_bias else None
        pt, pl, pb, pr = pads
        oh, ow = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1, (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        header = [1, batch, cin, h, w, cout, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, block, ACT[act],
                  len(packed["c_index"]), int(with_bias)]
        blob += [struct.pack("<20i", *header), x.tobytes(), packed["values"].tobytes(), packed["c_index"].tobytes(),
                 packed["row_ptr"].tobytes()] + ([bias.tobytes()] if with_bias else [])
        expected.append(block_sparse_conv_reference(x, packed, cout, (kh, kw), bias, (sh, sw), pads, (dh, dw), act))
    for t, d, d_out, s, e, experts, act, gated in FFN_CASES:
        inter = e * s
        f = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)  # noqa: E731
        packed = pack_gathered_ffn(f(inter, d), f(d_out, inter), s, w_gate=f(inter, d) if gated else None,
                                   b_up=f(inter), b_gate=f(inter) if gated else None, b_down=f(d_out))
        x = rng.standard_normal((t, d)).astype(np.float32)
        header = [2, t, d, d_out, s, e, len(experts), ACT[act], int(gated)] + [0] * 11
        parts = [x, packed["w_up"]] + ([packed["w_gate"]] if gated else []) + [packed["w_down"], packed["b_up"]]
        parts += ([packed["b_gate"]] if gated else []) + [packed["b_down"], np.asarray(experts, np.int32)]
        blob += [struct.pack("<20i", *header)] + [np.ascontiguousarray(p).tobytes() for p in parts]
        expected.append(gathered_ffn_reference(x, packed, np.asarray(experts, np.int32), act))
    return b"".join(blob), expected


def test_conv_and_gathered_ffn_under_node_wasi_match_numpy():
    require_toolchain()
    from edgesparse_wasm import toolchain

    driver = toolchain.wasi_command(HERE / "wasi_ops_driver.cpp", "ops_driver.wasm")
    cases, expected = encode_ops()
    _, out = run_driver(driver, cases, len(expected))
    pos = 0
    names = [f"conv{i}" for i in range(len(CONV_CASES))] + [f"ffn{i}" for i in range(len(FFN_CASES))]
    for name, ref in zip(names, expected):
        y = np.frombuffer(out, np.float32, ref.size, pos).reshape(ref.shape)
        pos += 4 * ref.size
        scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
        err = float(np.abs(y.astype(np.float64) - ref).max(initial=0.0))
        assert err <= 1e-4 * scale, f"{name}: max abs error {err:.2e} (scale {scale:.1f})"
    assert pos == len(out)
