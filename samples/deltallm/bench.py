"""Attention time, delta vs the dense attention ONNX Runtime runs for the same exported SmolLM2.

1. Operator alone, every layer, prefill: the exported model's own attention nodes for that
   layer (from the query after RoPE and the cache-concatenated K/V to the P.V MatMul, mask and
   shapes frozen) vs one DeltaAttention node with the calibrated thresholds, and vs the same node
   with an exact window (no approximation: what causal skipping alone buys). Real q, k, v from
   one evaluation window. Interleaved runs; per round the 30 layers are summed.
2. Operator alone, decode: the same, for one new token against the cache of the window (the
   dense subgraph captured at decode shapes; the delta node continues from the state its prefill
   of the first N - 1 tokens left).
3. Whole-model prefill: the exported model vs the rewritten one (carry=1, as the pass ships it),
   interleaved; and the attention nodes' own time inside the whole model from ORT's profiler,
   profiled runs of the two models interleaved.
4. Whole-model decode: one new token per call through the KV cache (teacher-forced with the
   text that follows the window), dense and delta steps interleaved.

Every timing is recorded as wall time and as the calling thread's CPU time (ORT runs a 1-thread
session on the caller's thread), because the machine is shared: CPU time does not count the
time other processes held the core.

    python samples/deltallm/bench.py --thresholds samples/deltallm/results/accuracy_s60_c512.thresholds.npz \
        --contexts 512 --parts operator --out samples/deltallm/results/bench.json
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


def op_model(scale, window, sinks, theta_q, theta_v, state=False):
    """One DeltaAttention node; with `state`, a state input and output (decode from a prefill)."""
    names = ["q", "k", "v", "tq", "tv"] + (["s"] if state else [])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkv" + ("s" if state else "")]
    inits = [numpy_helper.from_array(np.asarray(theta_q, np.float32), "tq"),
             numpy_helper.from_array(np.asarray(theta_v, np.float32), "tv")]
    node = helper.make_node("DeltaAttention", names, ["y", "so" if state else "", "macs"], domain=DOMAIN,
                            scale=float(scale), window=int(window), sinks=int(sinks), carry=0)
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in
            (("y", TensorProto.FLOAT), ("so", TensorProto.FLOAT), ("macs", TensorProto.INT64)) if state or n != "so"]
    g = helper.make_graph([node], "delta", inputs, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])


def interleaved(runs: dict, reps: int) -> dict:
    """{name: fn} -> {name: {"wall": [s], "cpu": [s]}}; one call of each per round, rounds repeated."""
    times = {n: {"wall": [], "cpu": []} for n in runs}
    for fn in runs.values():
        fn()  # warm up
    for _ in range(reps):
        for name, fn in runs.items():
            c, t = time.thread_time(), time.perf_counter()
            fn()
            times[name]["wall"].append(time.perf_counter() - t)
            times[name]["cpu"].append(time.thread_time() - c)
    return times


def summary(times: list[float]) -> dict:
    a = np.asarray(times) * 1e3
    return {"median_ms": round(float(np.median(a)), 3), "p25_ms": round(float(np.percentile(a, 25)), 3),
            "p75_ms": round(float(np.percentile(a, 75)), 3), "min_ms": round(float(a.min()), 3), "runs": len(a)}


def ratios(base: list[float], other: list[float]) -> dict:
    """Per-round base/other (rounds are interleaved, so each ratio compares neighbours in time)."""
    r = np.asarray(base) / np.asarray(other)
    return {"median": round(float(np.median(r)), 3), "p25": round(float(np.percentile(r, 25)), 3),
            "p75": round(float(np.percentile(r, 75)), 3)}


def report_of(totals: dict, base: str = "dense_ort") -> dict:
    out = {}
    for clock in ("wall", "cpu"):
        out[clock] = {name: summary(t[clock]) for name, t in totals.items()}
        out[clock]["speedup"] = {name: ratios(totals[base][clock], t[clock]) for name, t in totals.items() if name != base}
    return out


def add_rounds(totals: dict, times: dict) -> None:
    """Sum one layer's per-round times into the whole-model totals (one round = every layer once)."""
    for name, t in times.items():
        for clock in ("wall", "cpu"):
            acc = totals.setdefault(name, {"wall": [], "cpu": []})[clock]
            if not acc:
                acc.extend([0.0] * len(t[clock]))
            for i, x in enumerate(t[clock]):
                acc[i] += x


def operator_alone(original, library, th, ids, threads, reps, layers):
    """Prefill: every layer's dense attention subgraph vs the delta node vs the exact-window node."""
    parts = evalkit.dense_attention_subgraphs(original, layers, ids)
    window, sinks = int(th["window"]), int(th["sinks"])
    totals, macs, max_diff_exact = {}, np.zeros(3), 0.0
    for layer, (sub, qkv, info) in zip(layers, parts):
        dense = evalkit.session(sub, threads)
        dfeed = {info["q"]: qkv["q"], info["k"]: qkv["k"], info["v"]: qkv["v"]}
        delta = evalkit.session(op_model(info["scale"], window, sinks, th["theta_q"][layer], th["theta_v"][layer]),
                                threads, library)
        exact = evalkit.session(op_model(info["scale"], 1 << 30, 0, [0.0], [0.0]), threads, library)
        max_diff_exact = max(max_diff_exact, float(np.abs(exact.run(None, qkv)[0] - dense.run(None, dfeed)[0]).max()))
        macs += delta.run(None, qkv)[1].reshape(-1, 3).sum(0)
        add_rounds(totals, interleaved({"dense_ort": lambda: dense.run(None, dfeed),
                                        "delta": lambda: delta.run(None, qkv),
                                        "exact_kernel": lambda: exact.run(None, qkv)}, reps))
    out = report_of(totals)
    out["sparsity"] = round(float(1 - macs[1:].sum() / macs[0]), 4)
    out["exact_kernel_max_abs_diff_vs_dense"] = max_diff_exact
    return out


def operator_decode(original, library, th, ids, threads, reps, layers):
    """Decode: one token (the window's last) against N keys, the dense subgraph vs the delta node
    as the pass ships it (carry=1: it continues from the state, and the transposed keys, that its
    own prefill of the first N - 1 tokens left; that prefill runs untimed before every timed step)."""
    dense_model = evalkit.session(original, threads)
    _, pk, pv = dense_model.run(["logits", "present_keys", "present_values"], evalkit.feeds(ids[:-1]))
    del dense_model
    step = evalkit.feeds(ids[-1:], cache=(pk, pv))
    dec_parts = evalkit.dense_attention_subgraphs(original, layers, ids, run_feeds=step)
    pre_parts = evalkit.dense_attention_subgraphs(original, layers, ids)
    window, sinks = int(th["window"]), int(th["sinks"])
    totals, macs, n = {}, np.zeros(3), len(ids)
    for layer, (sub, dqkv, info), (_, qkv, _) in zip(layers, dec_parts, pre_parts):
        dense = evalkit.session(sub, threads)
        dfeed = {info["q"]: dqkv["q"], info["k"]: dqkv["k"], info["v"]: dqkv["v"]}
        model = op_model(info["scale"], window, sinks, th["theta_q"][layer], th["theta_v"][layer])
        next(a for a in model.graph.node[0].attribute if a.name == "carry").i = 1
        delta = evalkit.session(model, threads, library)
        q, k, v = qkv["q"], qkv["k"], qkv["v"]
        prefill = {"q": q[:, :, :n - 1], "k": k[:, :, :n - 1], "v": v[:, :, :n - 1]}
        feed = {"q": q[:, :, n - 1:], "k": k, "v": v}
        delta.run(None, prefill)
        macs += delta.run(None, feed)[1].reshape(-1, 3).sum(0)
        times = {"dense_ort": {"wall": [], "cpu": []}, "delta": {"wall": [], "cpu": []}}
        dense.run(None, dfeed)
        for _ in range(reps):
            delta.run(None, prefill)  # untimed: leaves the state the timed step continues from
            for name, fn in (("dense_ort", lambda: dense.run(None, dfeed)), ("delta", lambda: delta.run(None, feed))):
                c, t = time.thread_time(), time.perf_counter()
                fn()
                times[name]["wall"].append(time.perf_counter() - t)
                times[name]["cpu"].append(time.thread_time() - c)
        add_rounds(totals, times)
    out = report_of(totals)
    out["sparsity"] = round(float(1 - macs[1:].sum() / macs[0]), 4)
    return out


def attention_profile(sessions: dict, feeds: dict, attention_nodes: set, reps: int) -> dict:
    """Per profiled run, the summed kernel time of the attention nodes and of all nodes (ORT's
    profiler), the sessions' runs interleaved. sessions: {name: profiling session}."""
    for s in sessions.values():
        s.run(["logits"], feeds)  # warm up
    for _ in range(reps):
        for s in sessions.values():
            s.run(["logits"], feeds)
    out = {}
    for name, s in sessions.items():
        events = json.loads(Path(s.end_profiling()).read_text())
        runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")[1:]
        att, tot = np.zeros(len(runs)), np.zeros(len(runs))
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or not runs or e["ts"] < runs[0]:
                continue
            i = int(np.searchsorted(runs, e["ts"], side="right")) - 1
            tot[i] += e["dur"]
            if e["name"][: -len("_kernel_time")] in attention_nodes or e.get("args", {}).get("op_name") == "DeltaAttention":
                att[i] += e["dur"]
        out[name] = {"attention": summary(att / 1e6), "all_nodes": summary(tot / 1e6)}
        out[name]["_att"] = att
    out["attention_speedup"] = ratios(out["dense_ort"].pop("_att"), out["delta"].pop("_att"))
    return out


def whole_model(original, delta_proto, library, ids, threads, reps, profile_dir):
    import onnx_ir as ir
    from edgesparse_deltallm import rewrite

    feeds = evalkit.feeds(ids)
    dense = evalkit.session(original, threads)
    delta = evalkit.session(delta_proto, threads, library)
    out = report_of(interleaved({"dense_ort": lambda: dense.run(["logits"], feeds),
                                 "delta": lambda: delta.run(["logits"], feeds)}, reps))
    del dense, delta
    m = ir.from_proto(onnx.shape_inference.infer_shapes(original))
    attention_nodes = {n.name for att in rewrite.find_attention(m) for n in att.removed}
    sessions = {"dense_ort": evalkit.session(original, threads, profile=str(Path(profile_dir) / "dense")),
                "delta": evalkit.session(delta_proto, threads, library, profile=str(Path(profile_dir) / "delta"))}
    out["profile"] = attention_profile(sessions, feeds, attention_nodes, reps)
    return out


def whole_model_decode(original, delta_proto, library, ids, follow, threads):
    """Prefill `ids` in both models, then one token per call (the tokens of `follow`), the dense
    and the delta step interleaved; each model keeps its own KV cache."""
    dense = evalkit.session(original, threads)
    delta = evalkit.session(delta_proto, threads, library)
    names = ["logits", "present_keys", "present_values"]
    caches = {}
    for name, s in (("dense_ort", dense), ("delta", delta)):
        _, k, v = s.run(names, evalkit.feeds(ids))
        caches[name] = (k, v)
    times = {"dense_ort": {"wall": [], "cpu": []}, "delta": {"wall": [], "cpu": []}}
    for token in follow:
        for name, s in (("dense_ort", dense), ("delta", delta)):
            f = evalkit.feeds(np.asarray([token]), cache=caches[name])
            c, t = time.thread_time(), time.perf_counter()
            _, k, v = s.run(names, f)
            times[name]["wall"].append(time.perf_counter() - t)
            times[name]["cpu"].append(time.thread_time() - c)
            caches[name] = (k, v)
    out = report_of(times)
    out["steps"] = len(follow)
    out["cache_from"] = len(ids)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--thresholds", required=True, help=".thresholds.npz written by evaluate.py")
    ap.add_argument("--contexts", default="256,512,1024")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--model-reps", type=int, default=7)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--layers", default="all")
    ap.add_argument("--parts", default="operator,decode,model,model_decode")
    ap.add_argument("--out", default=None, help="JSON report; an existing one is extended")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from edgesparse_deltallm.build import build_library
    from evaluate import delta_model

    th = dict(np.load(args.thresholds))
    tok = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-fp32")
    original = evalkit.original()
    library = str(build_library())
    delta = delta_model(original, carry=True)
    # the calibrated thresholds into the whole-model graph
    inits = {i.name: i for i in delta.graph.initializer}
    nodes = [n for n in delta.graph.node if n.op_type == "DeltaAttention"]
    for i, node in enumerate(nodes):
        for a in node.attribute:
            if a.name == "window":
                a.i = int(th["window"])
            if a.name == "sinks":
                a.i = int(th["sinks"])
        tq = np.repeat(np.asarray(th["theta_q"][i], np.float32).reshape(-1, 1), evalkit.HEAD_DIM, axis=1)
        inits[node.input[3]].CopyFrom(numpy_helper.from_array(tq, node.input[3]))
        inits[node.input[4]].CopyFrom(numpy_helper.from_array(np.asarray(th["theta_v"][i], np.float32), node.input[4]))
    layers = list(range(evalkit.LAYERS)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    parts = set(args.parts.split(","))
    eval_ids = wiki_tokens(tok, "eval")
    report = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    report.update({"date": time.strftime("%Y-%m-%d"), "cpu": _cpu(), "cores_visible": os.cpu_count(),
                   "window": int(th["window"]), "sinks": int(th["sinks"]), "thresholds": args.thresholds,
                   "ort_version": __import__("onnxruntime").__version__})
    runs = report.setdefault("runs", {})

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1))

    with tempfile.TemporaryDirectory() as profile_dir:
        for length in [int(x) for x in args.contexts.split(",")]:
            text = windows(eval_ids, length + args.decode_steps, 3)[1]
            ids, follow = text[:length], text[length:]
            for threads in [int(x) for x in args.threads.split(",")]:
                for part in ("operator", "decode", "model", "model_decode"):
                    if part not in parts:
                        continue
                    load = os.getloadavg()
                    started = time.time()
                    if part == "operator":
                        r = operator_alone(original, library, th, ids, threads, args.reps, layers)
                    elif part == "decode":
                        r = operator_decode(original, library, th, ids, threads, args.reps, layers)
                    elif part == "model":
                        r = whole_model(original, delta, library, ids, threads, args.model_reps, profile_dir)
                    else:
                        r = whole_model_decode(original, delta, library, ids, follow, threads)
                    r.update({"context": length, "threads": threads, "layers": len(layers),
                              "load_average_before": [round(x, 2) for x in load],
                              "load_average_after": [round(x, 2) for x in os.getloadavg()],
                              "seconds": round(time.time() - started), "date": time.strftime("%Y-%m-%d %H:%M")})
                    runs[f"{part}_T{length}_threads{threads}"] = r
                    print(f"{part} T{length} threads{threads}", json.dumps({k: r[k] for k in ("wall", "cpu") if k in r}),
                          flush=True)
                    save()
    save()


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
