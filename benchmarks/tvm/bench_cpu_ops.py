"""The tvm backend's CPU TIR kernels for BlockSparseConv and GatheredFFN against edgesparse's C++
kernels on ONNX Runtime (informational: on CPUs the x86 target uses ORT).

Each case is a one-node model run as deployed: an ORT session (1 intra-op thread) with the C++
kernel library registered, a TVM module (Relax VM, TVM_NUM_THREADS=1, LLVM x86-64-v4) holding the
TIR kernel (for a padded conv, plus the Relax pad in front of it), and ORT's dense equivalent
(Conv on the dense pruned weights; the full dense FFN) for context. Interleaved rounds, medians
and quartiles in us per call; max abs error TIR vs C++.

    flock /tmp/edgesparse-timing.lock nice -n 0 .venv/bin/python benchmarks/tvm/bench_cpu_ops.py --out out/tvm_cpu_ops.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts its thread pool

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

SPARSITY = 0.75
BLOCK = 16
CONV_CASES = ((64, 64, 56, 56, 3), (128, 128, 28, 28, 3), (256, 256, 14, 14, 3), (256, 1024, 14, 14, 1))  # C, O, H, W, k
FFN = {"D": 768, "I": 3072, "S": 64, "active": 12}  # 48 experts of 64 neurons, 25% active, gated SiLU
FFN_TOKENS = (1, 8, 64)


def _model(nodes, inits, inputs, outputs):
    from edgesparse.kernels import attach_functions

    graph = helper.make_graph(nodes, "op", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    attach_functions(model)
    return model


def conv_case(c, o, h, w, k, rng):
    from edgesparse.kernels import make_block_sparse_conv, pack_block_sparse_conv

    weight = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    nb = o // BLOCK
    keep = np.zeros(nb * c, bool)
    keep[rng.permutation(nb * c)[: int((1 - SPARSITY) * nb * c)]] = True
    weight *= np.repeat(keep.reshape(nb, c), BLOCK, axis=0)[:, :, None, None]
    bias = (0.1 * rng.standard_normal(o)).astype(np.float32)
    p = k // 2
    node, inits = make_block_sparse_conv("x", "y", pack_block_sparse_conv(weight, BLOCK), o, (k, k), name="conv",
                                         pads=(p, p, p, p), bias=bias, activation="relu")
    f = TensorProto.FLOAT
    sparse = _model([node], inits, [helper.make_tensor_value_info("x", f, [1, c, h, w])],
                    [helper.make_tensor_value_info("y", f, [1, o, h, w])])
    dense_nodes = [helper.make_node("Conv", ["x", "w", "b"], ["z"], kernel_shape=[k, k], pads=[p] * 4),
                   helper.make_node("Relu", ["z"], ["y"])]
    dense = _model(dense_nodes, [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")],
                   [helper.make_tensor_value_info("x", f, [1, c, h, w])], [helper.make_tensor_value_info("y", f, [1, o, h, w])])
    return sparse, dense, {"x": rng.standard_normal((1, c, h, w)).astype(np.float32)}


def ffn_case(m, rng):
    from edgesparse.kernels import make_gathered_ffn, pack_gathered_ffn

    d, inter, s = FFN["D"], FFN["I"], FFN["S"]
    w_up, w_gate = ((rng.standard_normal((inter, d)) / np.sqrt(d)).astype(np.float32) for _ in range(2))
    w_down = (rng.standard_normal((d, inter)) / np.sqrt(inter)).astype(np.float32)
    b_up, b_gate = ((0.1 * rng.standard_normal(inter)).astype(np.float32) for _ in range(2))
    b_down = (0.1 * rng.standard_normal(d)).astype(np.float32)
    packed = pack_gathered_ffn(w_up, w_down, s, w_gate=w_gate, b_up=b_up, b_gate=b_gate, b_down=b_down)
    node, inits = make_gathered_ffn("x", "experts", "y", packed, name="ffn", activation="silu")
    f = TensorProto.FLOAT
    sparse = _model([node], inits, [helper.make_tensor_value_info("x", f, [m, d]),
                                    helper.make_tensor_value_info("experts", TensorProto.INT32, [FFN["active"]])],
                    [helper.make_tensor_value_info("y", f, [m, d])])
    # the dense FFN a user runs without edgesparse: all I neurons
    from onnx.numpy_helper import from_array
    dense_nodes = [helper.make_node("MatMul", ["x", "wg"], ["g0"]), helper.make_node("Add", ["g0", "bg"], ["g"]),
                   helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["ag"]),
                   helper.make_node("MatMul", ["x", "wu"], ["u0"]), helper.make_node("Add", ["u0", "bu"], ["u"]),
                   helper.make_node("Mul", ["ag", "u"], ["h"]), helper.make_node("MatMul", ["h", "wd"], ["y0"]),
                   helper.make_node("Add", ["y0", "bd"], ["y"])]
    dense = _model(dense_nodes, [from_array(np.ascontiguousarray(w_gate.T), "wg"), from_array(b_gate, "bg"),
                                 from_array(np.ascontiguousarray(w_up.T), "wu"), from_array(b_up, "bu"),
                                 from_array(np.ascontiguousarray(w_down.T), "wd"), from_array(b_down, "bd")],
                   [helper.make_tensor_value_info("x", f, [m, d])], [helper.make_tensor_value_info("y", f, [m, d])])
    experts = np.sort(rng.permutation(inter // s)[: FFN["active"]]).astype(np.int32)
    return sparse, dense, {"x": rng.standard_normal((m, d)).astype(np.float32), "experts": experts}


def ort_fn(model, feeds, lib):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = {n: feeds[n] for n in names}
    return lambda: sess.run(None, feeds)[0]


def tvm_fn(model, feeds):
    import tvm
    from tvm import relax

    from edgesparse_tvm import frontend

    mod, calls = frontend.import_model(model, "cpu")
    assert calls == 1
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v4"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    args = [tvm.runtime.tensor(feeds[i.name]) for i in model.graph.input]
    return lambda: vm["main"](*args).numpy()


def per_call_us(fn, seconds=0.05):
    reps, t = 1, 0.0
    while True:  # enough calls per sample to last `seconds`
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        t = time.perf_counter() - t0
        if t >= seconds or reps >= 4096:
            return t / reps * 1e6, reps
        reps *= 2


def measure(fns: dict, rounds: int) -> dict:
    reps = {n: per_call_us(fn)[1] for n, fn in fns.items()}  # warm-up and calibration
    samples = {n: [] for n in fns}
    for _ in range(rounds):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps[n]):
                fn()
            samples[n].append((time.perf_counter() - t0) / reps[n] * 1e6)
    out = {}
    for n, v in samples.items():
        q = statistics.quantiles(v, n=4)
        out[n] = {"median_us": q[1], "p25_us": q[0], "p75_us": q[2]}
    return out


def main():
    from edgesparse.kernels import X86_64, build_library

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lib = build_library(X86_64)
    rng = np.random.default_rng(0)
    cases = [(f"conv {c}->{o} {h}x{w} {k}x{k}", conv_case(c, o, h, w, k, rng)) for c, o, h, w, k in CONV_CASES]
    cases += [(f"gathered FFN {FFN['D']}x{FFN['I']} {FFN['active']}/{FFN['I'] // FFN['S']} experts M={m}", ffn_case(m, rng))
              for m in FFN_TOKENS]
    records = []
    for label, (sparse, dense, feeds) in cases:
        fns = {"cpp_kernel": ort_fn(sparse, feeds, lib), "tir_kernel": tvm_fn(sparse, feeds), "ort_dense": ort_fn(dense, feeds, None)}
        want, got = fns["cpp_kernel"](), fns["tir_kernel"]()
        error = float(np.abs(got - want).max())
        times = measure(fns, args.rounds)
        rec = {"case": label, "max_abs_error_tir_vs_cpp": error, "times": times,
               "tir_over_cpp": times["tir_kernel"]["median_us"] / times["cpp_kernel"]["median_us"],
               "dense_over_cpp": times["ort_dense"]["median_us"] / times["cpp_kernel"]["median_us"]}
        records.append(rec)
        t = {n: f"{v['median_us']:.0f} [{v['p25_us']:.0f}-{v['p75_us']:.0f}]" for n, v in times.items()}
        print(f"{label}: C++ {t['cpp_kernel']} us, TIR {t['tir_kernel']} us ({rec['tir_over_cpp']:.2f}x the C++ time), "
              f"ORT dense {t['ort_dense']} us; err {error:.1e}", flush=True)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": 1, "sparsity": SPARSITY,
              "block": BLOCK, "rounds": args.rounds, "load": os.getloadavg(), "records": records}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
