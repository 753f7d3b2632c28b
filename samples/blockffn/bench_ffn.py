"""The FFN alone: RoutedFFN (with and without its router) vs ONNX Runtime's dense MatMuls for
SmolLM2's FFN shape (576 -> 1536 -> 576, gated SiLU), 24 experts of 64 neurons, chunks of 1, 8 and
32 tokens where 7 of 24 experts (29%, i.e. 70.8% chunk sparsity) are active in the chunk.
Other shapes: --dim/--inter/--experts, --plain for BlockFFN's ungated experts (the from-scratch
model: --dim 256 --inter 1024 --experts 32 --plain --active 8 --out bench_ffn_scratch.json).

    flock /tmp/edgesparse-timing.lock nice -n 0 .venv/bin/python samples/blockffn/bench_ffn.py

Interleaved in one process (rotating order), batches of runs of >= 2 ms per sample, medians and
p25/p75; speedup = dense median / routed median. One ORT thread. Outputs are compared first.
"""
from __future__ import annotations

import argparse
import datetime
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from blockffn_common import write_result
from edgesparse.kernels import (X86_64, attach_functions, build_library, make_routed_ffn, pack_gathered_ffn,
                                routed_ffn_reference)
from edgesparse.kernels.dispatch import current_isa, host_cpu

D, I, E = 576, 1536, 24
ACTIVE = 7


def model(nodes, inits, inputs, out="Y"):
    g = helper.make_graph(nodes, "ffn", inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return attach_functions(m)


def dense_model(wg, wu, wd, t):
    """silu(X wg) * (X wu) then wd; wg None: silu(X wu) then wd (an ungated FFN)."""
    d = wu.shape[1]
    pairs = ((wu, "wu"), (wd, "wd")) + (((wg, "wg"),) if wg is not None else ())
    inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), n) for w, n in pairs]
    if wg is None:
        nodes = [helper.make_node("MatMul", ["X", "wu"], ["u"]), helper.make_node("Sigmoid", ["u"], ["su"]),
                 helper.make_node("Mul", ["u", "su"], ["h"]), helper.make_node("MatMul", ["h", "wd"], ["Y"])]
    else:
        nodes = [helper.make_node("MatMul", ["X", "wg"], ["g"]), helper.make_node("Sigmoid", ["g"], ["sg"]),
                 helper.make_node("Mul", ["g", "sg"], ["act"]), helper.make_node("MatMul", ["X", "wu"], ["u"]),
                 helper.make_node("Mul", ["act", "u"], ["h"]), helper.make_node("MatMul", ["h", "wd"], ["Y"])]
    return model(nodes, inits, [helper.make_tensor_value_info("X", TensorProto.FLOAT, [t, d])])


def routed_model(packed, t, chunk, router=None):
    """router=None: routes are an input; else (weight [D, E], gain [E]) computed in the graph as the
    blockffn rewrite emits them (ORT fuses MatMul + Add into Gemm and the RMSNorm into
    SimplifiedLayerNormalization)."""
    e, d, _ = packed["w_up"].shape
    node, inits = make_routed_ffn("X", "R", "Y", packed, name="ffn", activation="silu", chunk=chunk)
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, [t, d])]
    nodes = [node]
    if router is None:
        inputs.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, [t, e]))
    else:
        w, g = router
        inits += [numpy_helper.from_array(w, "wr"), numpy_helper.from_array(g, "gr"),
                  numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
                  numpy_helper.from_array(np.array([-1], np.int64), "axes"),
                  numpy_helper.from_array(np.array(2.0, np.float32), "two"),
                  numpy_helper.from_array(np.zeros(e, np.float32), "br")]
        nodes = [helper.make_node("MatMul", ["X", "wr"], ["mm"]), helper.make_node("Add", ["mm", "br"], ["z"]),
                 helper.make_node("Relu", ["z"], ["a"]), helper.make_node("Pow", ["a", "two"], ["sq"]),
                 helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
                 helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
                 helper.make_node("Div", ["a", "rms"], ["n"]), helper.make_node("Mul", ["n", "gr"], ["R"])] + nodes
    return model(nodes, inits, inputs)


def session(m, lib=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def runner(sess, feeds, out_shape):
    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_cpu_input(name, arr)
    out = np.empty(out_shape, np.float32)
    binding.bind_ortvalue_output("Y", ort.OrtValue.ortvalue_from_numpy(out))
    return (lambda: sess.run_with_iobinding(binding)), out


def time_interleaved(fns: dict, budget_s: float, rounds: int = 40) -> dict:
    names = list(fns)
    for _ in range(5):
        for f in fns.values():
            f()
    t0 = time.perf_counter()
    fns[names[0]]()
    reps = int(min(max(1, 2e-3 / max(time.perf_counter() - t0, 1e-6)), 2000))
    samples = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            for _ in range(reps):
                fns[n]()
            samples[n].append((time.perf_counter() - t) * 1e3 / reps)
        if r >= 8 and time.perf_counter() - start > budget_s:
            break
    return {n: {"median_ms": float(np.median(s)), "p25_ms": float(np.percentile(s, 25)),
                "p75_ms": float(np.percentile(s, 75)), "samples": len(s)} for n, s in samples.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per case")
    ap.add_argument("--active", type=int, default=0, help="experts active in the chunk (0: 7/24 of them, rounded)")
    ap.add_argument("--dim", type=int, default=D)
    ap.add_argument("--inter", type=int, default=I)
    ap.add_argument("--experts", type=int, default=E)
    ap.add_argument("--plain", action="store_true", help="ungated experts (BlockFFN's): silu(X W_up) W_down")
    ap.add_argument("--out", default="bench_ffn.json")
    args = ap.parse_args()
    dim, inter, n_exp = args.dim, args.inter, args.experts
    active = args.active or max(1, round(n_exp * ACTIVE / 24))
    rng = np.random.default_rng(0)
    lib = build_library(X86_64)
    wg, wu = (rng.standard_normal((inter, dim)).astype(np.float32) / float(np.sqrt(dim)) for _ in range(2))
    wg = None if args.plain else wg
    wd = rng.standard_normal((dim, inter)).astype(np.float32) / float(np.sqrt(inter))
    packed = pack_gathered_ffn(wu, wd, inter // n_exp, w_gate=wg)
    on = np.sort(rng.choice(n_exp, active, replace=False))
    # router whose positive logits are exactly the chosen experts: feature 0 of X is a constant 1
    w_r = rng.standard_normal((dim, n_exp)).astype(np.float32) * 1e-3
    w_r[0] = np.where(np.isin(np.arange(n_exp), on), 10.0, -10.0)
    gain = np.ones(n_exp, np.float32)
    rows = []
    for t in (1, 8, 32):
        x = rng.standard_normal((t, dim)).astype(np.float32)
        x[:, 0] = 1.0
        routes = np.zeros((t, n_exp), np.float32)
        routes[:, on] = rng.uniform(0.5, 2.0, (t, active)).astype(np.float32)
        dense_fn, dense_out = runner(session(dense_model(wg, wu, wd, t)), {"X": x}, (t, dim))
        op_fn, op_out = runner(session(routed_model(packed, t, t), lib), {"X": x, "R": routes}, (t, dim))
        full_fn, full_out = runner(session(routed_model(packed, t, t, (w_r, gain)), lib), {"X": x}, (t, dim))
        for f in (dense_fn, op_fn, full_fn):
            f()
        np.testing.assert_allclose(op_out, routed_ffn_reference(x, packed, routes, "silu"), rtol=1e-3, atol=1e-3)
        z = np.maximum(x @ w_r, 0)
        r_ref = z / np.sqrt((z ** 2).mean(-1, keepdims=True) + 1e-6) * gain
        assert ((r_ref != 0).sum(0) > 0).sum() == active
        np.testing.assert_allclose(full_out, routed_ffn_reference(x, packed, r_ref, "silu"), rtol=1e-3, atol=1e-3)
        all_on = np.ones((t, n_exp), np.float32)
        np.testing.assert_allclose(dense_out, routed_ffn_reference(x, packed, all_on, "silu"), rtol=1e-3, atol=1e-3)
        stats = time_interleaved({"dense": dense_fn, "routed_op": op_fn, "routed_with_router": full_fn}, args.budget)
        row = {"tokens": t, "chunk": t, "active_experts": active, "experts": n_exp, "cls": round(1 - active / n_exp, 4), **{
            f"{n}_{k}": round(v, 4) for n, s in stats.items() for k, v in s.items() if k != "samples"},
            "samples": stats["dense"]["samples"]}
        row["speedup_op"] = round(stats["dense"]["median_ms"] / stats["routed_op"]["median_ms"], 2)
        row["speedup_with_router"] = round(stats["dense"]["median_ms"] / stats["routed_with_router"]["median_ms"], 2)
        rows.append(row)
        print(f"T={t:3d}: dense {row['dense_median_ms']:.4f} ms [{row['dense_p25_ms']:.4f}-{row['dense_p75_ms']:.4f}]  "
              f"op {row['routed_op_median_ms']:.4f} ms ({row['speedup_op']}x)  with router "
              f"{row['routed_with_router_median_ms']:.4f} ms ({row['speedup_with_router']}x)", flush=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "shape": {"D": dim, "I": inter, "experts": n_exp, "expert_size": inter // n_exp, "gated": not args.plain, "activation": "silu"},
              "threads": 1, "isa": current_isa(), "onnxruntime": ort.__version__, "cpu": host_cpu(),
              "method": "one process, rotating interleaved order, io-binding, batches of runs >= 2 ms per sample",
              "rows": rows}
    print(write_result(args.out, result))


if __name__ == "__main__":
    main()
