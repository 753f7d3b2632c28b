"""Kernel benchmarks: each sparse operator against ONNX Runtime's dense kernel, side by side.

For every case two one-node models hold the same (pruned) weights: a standard
ONNX MatMul / Conv run by ORT's CPU execution provider (MLAS), and the
edgesparse node run by our library. Both are timed in ONE process, interleaved
round by round (alternating which goes first), with IO bindings to keep the
Python overhead small and equal; each sample times a batch of runs so that
microsecond kernels are resolved. Outputs are compared before any timing counts.

Exposed by the CLI as ``edgesparse bench kernels [--quick] [--json]``.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable

import numpy as np

FFN_SHAPES = ((768, 3072), (3072, 768), (1024, 4096))  # (K, N)
TOKENS = (1, 8, 64)
SPARSITIES = (0.5, 0.75, 0.9)

# MobileNet-style convolutions at 224x224 input: (C_in, C_out, H=W, kernel, stride).
# Pointwise 1x1 layers of MobileNetV1 and the full 3x3 convolutions of the
# ResNet-style stems/blocks that appear in edge models.
CONV_SHAPES = (
    (64, 128, 56, 1, 1),
    (128, 128, 56, 1, 1),
    (256, 256, 28, 1, 1),
    (512, 512, 14, 1, 1),
    (1024, 1024, 7, 1, 1),
    (32, 64, 112, 3, 1),
    (64, 64, 56, 3, 1),
    (128, 128, 28, 3, 1),
    (128, 256, 28, 3, 2),
    (256, 256, 14, 3, 1),
)
QUICK_FFN = ((1024, 1024), (768, 3072))
QUICK_CONV = ((256, 256, 28, 1, 1), (64, 64, 56, 3, 1))

RTOL = ATOL = 1e-3


def _session(model, threads: int, lib=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads > 1:
        # Two multi-threaded sessions are timed alternately: an idle pool's
        # spinning worker would steal a core from the other session's run.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _bound_runner(sess, feeds: dict[str, np.ndarray], out_shape) -> tuple[Callable[[], None], np.ndarray]:
    """A no-argument callable running the session on pre-bound input/output buffers."""
    import onnxruntime as ort

    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_cpu_input(name, arr)
    out = np.empty(out_shape, np.float32)
    binding.bind_ortvalue_output(sess.get_outputs()[0].name, ort.OrtValue.ortvalue_from_numpy(out))

    def run():
        sess.run_with_iobinding(binding)

    return run, out


def _time_pair(dense: Callable[[], None], sparse: Callable[[], None], budget_s: float, rounds: int):
    """Interleaved timing; returns per-run milliseconds for both: lists of samples."""
    for _ in range(3):
        dense(), sparse()
    # batch size: enough runs that one sample of the slower candidate is >= ~2 ms
    t0 = time.perf_counter()
    dense()
    one = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max(1, 2e-3 / one), 2000))
    samples = ([], [])
    start = time.perf_counter()
    for r in range(rounds):
        order = ((0, dense), (1, sparse)) if r % 2 == 0 else ((1, sparse), (0, dense))
        for i, fn in order:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[i].append((time.perf_counter() - t0) * 1e3 / reps)
        if r >= 6 and time.perf_counter() - start > budget_s:
            break
    return samples


def _paired(ds: list[float], ss: list[float]) -> float:
    """Median of per-round ratios: robust to slow drifts in machine load."""
    return float(np.median(np.asarray(ds) / np.asarray(ss)))


def _stats(prefix: str, s: list[float]) -> dict:
    a = np.asarray(s)
    return {
        f"{prefix}_ms_median": float(np.median(a)),
        f"{prefix}_ms_p25": float(np.percentile(a, 25)),
        f"{prefix}_ms_p75": float(np.percentile(a, 75)),
        f"{prefix}_ms_min": float(a.min()),
        f"{prefix}_ms_max": float(a.max()),
    }


def random_block_sparse(rng, k: int, n: int, block: int, sparsity: float) -> np.ndarray:
    """Dense [K, N] weights where a fraction `sparsity` of the B x 1 blocks is zero (exactly)."""
    nb = -(-n // block)
    total = k * nb
    keep = np.zeros(total, bool)
    keep[rng.choice(total, int(round(total * (1 - sparsity))), replace=False)] = True
    w = rng.standard_normal((k, nb * block)).astype(np.float32)
    w *= np.repeat(keep.reshape(k, nb), block, axis=1)
    return np.ascontiguousarray(w[:, :n])


def _matmul_models(m: int, k: int, n: int, w: np.ndarray, block: int, opset: int = 18):
    from onnx import TensorProto, helper, numpy_helper

    from edgesparse.kernels.blocksparse import make_block_sparse_matmul, pack_block_sparse
    from edgesparse.kernels.onnx_functions import attach_functions

    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [m, k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
    dense = helper.make_model(
        helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "dense", [x], [y],
                          [numpy_helper.from_array(w, "W")]),
        opset_imports=[helper.make_opsetid("", opset)],
    )  # fmt: skip
    node, inits = make_block_sparse_matmul("X", "Y", pack_block_sparse(w, block), n, name="sparse")
    sparse = helper.make_model(helper.make_graph([node], "sparse", [x], [y], inits),
                               opset_imports=[helper.make_opsetid("", opset)])  # fmt: skip
    attach_functions(sparse)
    return dense, sparse


def bench_matmul_case(lib, m: int, k: int, n: int, sparsity: float, block: int, threads: int, *,
                      seed: int = 0, budget_s: float = 1.0, rounds: int = 41) -> dict:
    rng = np.random.default_rng(seed)
    w = random_block_sparse(rng, k, n, block, sparsity)
    x = rng.standard_normal((m, k)).astype(np.float32)
    dense_model, sparse_model = _matmul_models(m, k, n, w, block)
    d_run, d_out = _bound_runner(_session(dense_model, threads), {"X": x}, (m, n))
    s_run, s_out = _bound_runner(_session(sparse_model, threads, lib), {"X": x}, (m, n))
    d_run(), s_run()
    err = float(np.max(np.abs(d_out - s_out))) if d_out.size else 0.0
    if not np.allclose(s_out, d_out, rtol=RTOL, atol=ATOL):
        raise AssertionError(f"sparse and dense disagree (max abs error {err:.3g}) for M={m} K={k} N={n}")
    ds, ss = _time_pair(d_run, s_run, budget_s, rounds)
    rec = {"op": "BlockSparseMatMul", "M": m, "K": k, "N": n, "block": block, "sparsity": sparsity,
           "threads": threads, **_stats("dense", ds), **_stats("sparse", ss), "max_abs_error": err}  # fmt: skip
    rec["speedup"] = rec["dense_ms_median"] / rec["sparse_ms_median"]
    rec["paired_speedup"] = _paired(ds, ss)
    return rec


def bench_conv_case(lib, c: int, o: int, hw: int, kernel: int, stride: int, sparsity: float, block: int,
                    threads: int, *, seed: int = 0, budget_s: float = 1.0, rounds: int = 41) -> dict:
    from edgesparse.kernels.conv import conv_benchmark_models

    rng = np.random.default_rng(seed)
    dense_model, sparse_model, x, out_shape = conv_benchmark_models(rng, c, o, hw, kernel, stride, sparsity, block)
    d_run, d_out = _bound_runner(_session(dense_model, threads), {"X": x}, out_shape)
    s_run, s_out = _bound_runner(_session(sparse_model, threads, lib), {"X": x}, out_shape)
    d_run(), s_run()
    err = float(np.max(np.abs(d_out - s_out)))
    if not np.allclose(s_out, d_out, rtol=RTOL, atol=ATOL):
        raise AssertionError(f"sparse and dense conv disagree (max abs error {err:.3g})")
    ds, ss = _time_pair(d_run, s_run, budget_s, rounds)
    rec = {"op": "BlockSparseConv", "C": c, "O": o, "H": hw, "W": hw, "kernel": kernel, "stride": stride,
           "block": block, "sparsity": sparsity, "threads": threads, **_stats("dense", ds), **_stats("sparse", ss),
           "max_abs_error": err}  # fmt: skip
    rec["speedup"] = rec["dense_ms_median"] / rec["sparse_ms_median"]
    rec["paired_speedup"] = _paired(ds, ss)
    return rec


def machine_info() -> dict:
    import onnx
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "machine": platform.machine(), "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__, "numpy": np.__version__, "python": platform.python_version()}  # fmt: skip


def run_kernel_benchmarks(
    quick: bool = False,
    threads: Iterable[int] = (1, 2),
    *,
    ops: Iterable[str] = ("matmul", "conv"),
    sparsities: Iterable[float] = SPARSITIES,
    tokens: Iterable[int] = TOKENS,
    block: int = 16,
    budget_s: float | None = None,
    lib=None,
    progress: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Times every sparse operator against ORT's dense kernel; one record per case.

    Record keys: op, shape fields (M, K, N for matmul; C, O, H, W, kernel, stride
    for conv), block, sparsity, threads, isa, dense_ms_median, sparse_ms_median,
    their p25/p75/min/max, speedup (dense median / sparse median), paired_speedup
    (median of per-round ratios), max_abs_error.
    ``quick`` runs a few shapes briefly (smoke test / CI).
    """
    import os

    from edgesparse.kernels.build import build_library, host_toolchain
    from edgesparse.kernels.dispatch import current_isa

    lib = lib or build_library(host_toolchain())
    budget = budget_s if budget_s is not None else (0.3 if quick else 1.0)
    isa = current_isa()
    ops = tuple(ops)
    records = []

    def emit(rec):
        rec["isa"] = isa
        records.append(rec)
        if progress:
            progress(rec)

    threads = tuple(threads)
    if "matmul" in ops:
        for k, n in QUICK_FFN if quick else FFN_SHAPES:
            for sp in sparsities:
                for m in tuple(m for m in tokens if m <= 8) or (1,) if quick else tokens:
                    for t in threads:
                        emit(bench_matmul_case(lib, m, k, n, sp, block, t, budget_s=budget))
    if "conv" in ops:
        for c, o, hw, kernel, stride in QUICK_CONV if quick else CONV_SHAPES:
            for sp in sparsities:
                for t in threads:
                    emit(bench_conv_case(lib, c, o, hw, kernel, stride, sp, block, t, budget_s=budget))
    return records
