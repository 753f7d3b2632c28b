"""Attention time, delta vs the dense attention ONNX Runtime runs for the same exported SmolLM2.

1. Operator alone, every layer: the exported model's own attention nodes for that layer (from
   the query after RoPE and the cache-concatenated K/V to the P.V MatMul, mask and shapes frozen)
   vs one DeltaAttention node with the calibrated thresholds, and vs the same node with an exact
   window (no approximation: what causal skipping alone buys). Real q, k, v from one evaluation
   window. Interleaved runs, medians.
2. Whole-model prefill: the exported model vs the rewritten one, interleaved medians; plus one
   profiled run of each, summing the attention nodes' own time inside the whole model.

    python samples/deltallm/bench.py --thresholds samples/deltallm/results/accuracy.thresholds.npz
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))

import evalkit  # noqa: E402
from common import cache_dir, wiki_tokens, windows  # noqa: E402

DOMAIN = "com.edgesparse.deltallm"


def op_model(scale, window, sinks, theta_q, theta_v):
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkv"]
    inits = [numpy_helper.from_array(np.asarray(theta_q, np.float32), "tq"),
             numpy_helper.from_array(np.asarray(theta_v, np.float32), "tv")]
    node = helper.make_node("DeltaAttention", ["q", "k", "v", "tq", "tv"], ["y", "", "macs"], domain=DOMAIN,
                            scale=float(scale), window=int(window), sinks=int(sinks), carry=0)
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("macs", TensorProto.INT64, None)]
    g = helper.make_graph([node], "delta", inputs, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def interleaved(runs: dict, reps: int) -> dict:
    """{name: fn} -> {name: [seconds]}; one call of each per round, rounds repeated."""
    times = {n: [] for n in runs}
    for fn in runs.values():
        fn()  # warm up
    for _ in range(reps):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def summary(times: list[float]) -> dict:
    a = np.asarray(times) * 1e3
    return {"median_ms": round(float(np.median(a)), 3), "p25_ms": round(float(np.percentile(a, 25)), 3),
            "p75_ms": round(float(np.percentile(a, 75)), 3), "min_ms": round(float(a.min()), 3), "runs": len(a)}


def operator_alone(original, library, thresholds, ids, threads, reps, layers):
    parts = evalkit.dense_attention_subgraphs(original, layers, ids)
    window, sinks = int(thresholds["window"]), int(thresholds["sinks"])
    totals = {"dense_ort": [0.0] * reps, "delta": [0.0] * reps, "exact_kernel": [0.0] * reps}
    macs_total = np.zeros(3)
    max_diff_exact = 0.0
    for layer, (sub, qkv, info) in zip(layers, parts):
        dense = evalkit.session(sub, threads)
        dfeed = {info["q"]: qkv["q"], info["k"]: qkv["k"], info["v"]: qkv["v"]}
        delta = evalkit.session(op_model(info["scale"], window, sinks, thresholds["theta_q"][layer],
                                         thresholds["theta_v"][layer]), threads, library)
        exact = evalkit.session(op_model(info["scale"], 1 << 30, 0, [0.0], [0.0]), threads, library)
        ref = dense.run(None, dfeed)[0]
        y_exact = exact.run(None, qkv)[0]
        max_diff_exact = max(max_diff_exact, float(np.abs(y_exact - ref).max()))
        macs_total += delta.run(None, qkv)[1].reshape(-1, 3).sum(0)
        t = interleaved({"dense_ort": lambda: dense.run(None, dfeed), "delta": lambda: delta.run(None, qkv),
                         "exact_kernel": lambda: exact.run(None, qkv)}, reps)
        for name in totals:  # per round, summed over layers: one "attention of the whole model" per round
            totals[name] = [a + b for a, b in zip(totals[name], t[name])]
    out = {name: summary(v) for name, v in totals.items()}
    out["speedup_delta"] = round(out["dense_ort"]["median_ms"] / out["delta"]["median_ms"], 3)
    out["speedup_exact_kernel"] = round(out["dense_ort"]["median_ms"] / out["exact_kernel"]["median_ms"], 3)
    ratios = np.asarray(totals["dense_ort"]) / np.asarray(totals["delta"])
    out["speedup_delta_per_round"] = {"median": round(float(np.median(ratios)), 3),
                                      "p25": round(float(np.percentile(ratios, 25)), 3),
                                      "p75": round(float(np.percentile(ratios, 75)), 3)}
    out["sparsity"] = round(float(1 - macs_total[1:].sum() / macs_total[0]), 4)
    out["exact_kernel_max_abs_diff_vs_dense"] = max_diff_exact
    return out


def whole_model(original, delta_proto, library, ids, threads, reps, profile_dir):
    feeds = evalkit.feeds(ids)
    dense = evalkit.session(original, threads)
    delta = evalkit.session(delta_proto, threads, library)
    t = interleaved({"dense_ort": lambda: dense.run(["logits"], feeds),
                     "delta": lambda: delta.run(["logits"], feeds)}, reps)
    out = {name: summary(v) for name, v in t.items()}
    out["speedup"] = round(out["dense_ort"]["median_ms"] / out["delta"]["median_ms"], 3)
    # attention's share inside the whole model, from one profiled run of each (ORT's own timings)
    import onnx_ir as ir
    from edgesparse_deltallm import rewrite

    m = ir.from_proto(onnx.shape_inference.infer_shapes(original))
    attention_nodes = {n.name for att in rewrite.find_attention(m) for n in att.removed}
    prof = {}
    for name, model, lib in (("dense_ort", original, None), ("delta", delta_proto, library)):
        s = evalkit.session(model, threads, lib, profile=str(Path(profile_dir) / name))
        s.run(["logits"], feeds)
        s.run(["logits"], feeds)
        path = s.end_profiling()
        events = json.loads(Path(path).read_text())
        runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
        last_start = runs[-1]["ts"] if runs else 0
        att = total = 0
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < last_start:
                continue
            node = e["name"][: -len("_kernel_time")]
            total += e["dur"]
            if node in attention_nodes or e.get("args", {}).get("op_name") == "DeltaAttention":
                att += e["dur"]
        prof[name] = {"attention_ms": round(att / 1e3, 3), "all_nodes_ms": round(total / 1e3, 3)}
        os.unlink(path)
    prof["attention_speedup"] = round(prof["dense_ort"]["attention_ms"] / prof["delta"]["attention_ms"], 3)
    out["profile"] = prof
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--thresholds", required=True, help=".thresholds.npz written by evaluate.py")
    ap.add_argument("--contexts", default="256,512,1024")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--model-reps", type=int, default=9)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from edgesparse_deltallm.build import build_library
    from evaluate import delta_model

    th = dict(np.load(args.thresholds))
    tok = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-fp32")
    original = evalkit.original()
    library = str(build_library())
    delta = delta_model(original)
    # the calibrated thresholds into the whole-model graph
    inits = {i.name: i for i in delta.graph.initializer}
    nodes = [n for n in delta.graph.node if n.op_type == "DeltaAttention"]
    for i, node in enumerate(nodes):
        for a in node.attribute:
            if a.name == "window":
                a.i = int(th["window"])
            if a.name == "sinks":
                a.i = int(th["sinks"])
        tq = np.repeat(np.asarray(th["theta_q"][i], np.float32).reshape(-1, 1), 64, axis=1)
        inits[node.input[3]].CopyFrom(numpy_helper.from_array(tq, node.input[3]))
        inits[node.input[4]].CopyFrom(numpy_helper.from_array(np.asarray(th["theta_v"][i], np.float32), node.input[4]))
    layers = list(range(evalkit.LAYERS)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    eval_ids = wiki_tokens(tok, "eval")
    report = {"date": time.strftime("%Y-%m-%d"), "cpu": _cpu(), "cores_visible": os.cpu_count(),
              "load_average_at_start": os.getloadavg(), "window": int(th["window"]), "sinks": int(th["sinks"]),
              "thresholds": args.thresholds, "operator": {}, "whole_model": {}}
    with tempfile.TemporaryDirectory() as profile_dir:
        for length in [int(x) for x in args.contexts.split(",")]:
            ids = windows(eval_ids, length, 3)[1]
            for threads in [int(x) for x in args.threads.split(",")]:
                key = f"T{length}_threads{threads}"
                report["operator"][key] = operator_alone(original, library, th, ids, threads, args.reps, layers)
                print(key, "operator", json.dumps(report["operator"][key]), flush=True)
                report["whole_model"][key] = whole_model(original, delta, library, ids, threads, args.model_reps,
                                                         profile_dir)
                print(key, "model", json.dumps(report["whole_model"][key]), flush=True)
                if args.out:
                    Path(args.out).write_text(json.dumps(report, indent=1))
    report["load_average_at_end"] = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
