"""Whole-model speed of SmolLM2-135M with BlockFFN vs the dense model, both in ONNX Runtime (one
thread): a decode step (1 token after a 256-token prefix, chunk 1) and an 8-token step (a
speculative draft, chunk 8), each model continuing its own prefix of held-out Wikipedia text.

    nice -n 10 .venv/bin/python samples/blockffn/bench_decode.py --state ~/.cache/edgesparse/blockffn/smollm2_s70_c8.pt --build
    flock /tmp/edgesparse-timing.lock nice -n 0 .venv/bin/python samples/blockffn/bench_decode.py --time

--build writes out/blockffn/dense.onnx and the package out/blockffn/smollm2 (the pipeline, with
verification); --time measures (interleaved, medians, p25/p75) and writes results/bench_decode.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from blockffn_common import HERE, wiki_tokens, windows, write_result

OUT = HERE.parent.parent / "out" / "blockffn"
PREFIX = 256


def build(state: str, tolerance: float) -> None:
    from edgesparse import export
    from edgesparse.pipeline import BuildRequest, build as run_build
    from edgesparse.source import load_factory

    OUT.mkdir(parents=True, exist_ok=True)
    if not (OUT / "dense.onnx").exists():
        onnx.save(export.export_torch(load_factory(f"{HERE / 'model.py'}:build")), str(OUT / "dense.onnx"))
    request = BuildRequest(model=f"{HERE / 'model.py'}:build", target="x86", output=OUT / "smollm2",
                           passes=[("blockffn", {"state": state, "chunk": 1})], tolerance=tolerance, force=True)
    manifest = run_build(request)
    print(json.dumps(manifest["verification"]), flush=True)


def session(model, lib=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if lib:
        so.register_custom_ops_library(lib)
    return ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def with_chunk(path: Path, chunk: int) -> onnx.ModelProto:
    m = onnx.load(str(path))
    for n in m.graph.node:
        if n.op_type == "RoutedFFN":
            for a in n.attribute:
                if a.name == "chunk":
                    a.i = chunk
    return m


def step_runner(sess, ids: np.ndarray, steps: int):
    """A callable running `steps` new tokens after the model's own 256-token prefix."""
    layers, heads, dim = 30, 3, 64
    empty = np.zeros((layers, 1, heads, 0, dim), np.float32)
    feeds = {"input_ids": ids[None, :PREFIX], "attention_mask": np.ones((1, PREFIX), np.int64),
             "past_keys": empty, "past_values": empty}
    _, pk, pv = sess.run(None, feeds)
    step = {"input_ids": ids[None, PREFIX:PREFIX + steps], "attention_mask": np.ones((1, PREFIX + steps), np.int64),
            "past_keys": pk, "past_values": pv}
    binding = sess.io_binding()
    for k, v in step.items():
        binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)))
    for o in sess.get_outputs():
        binding.bind_output(o.name)
    return lambda: sess.run_with_iobinding(binding), lambda: sess.run(None, step)[0]


def interleaved(fns: dict, budget_s: float) -> dict:
    names = list(fns)
    for f in fns.values():
        f()
    samples = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while r < 8 or time.perf_counter() - start < budget_s:
        for n in names[r % len(names):] + names[:r % len(names)]:  # each callable first in turn
            t = time.perf_counter()
            fns[n]()
            samples[n].append((time.perf_counter() - t) * 1e3)
        r += 1
    return {n: {"median_ms": round(float(np.median(s)), 3), "p25_ms": round(float(np.percentile(s, 25)), 3),
                "p75_ms": round(float(np.percentile(s, 75)), 3), "samples": len(s)} for n, s in samples.items()}


def measure(budget_s: float) -> dict:
    from transformers import AutoTokenizer

    from blockffn_common import cache_dir

    tok = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-fp32")
    ids = windows(wiki_tokens(tok, "eval"), PREFIX + 8, 3)[1].astype(np.int64)
    manifest = json.loads((OUT / "smollm2" / "manifest.json").read_text())
    lib = str(OUT / "smollm2" / manifest["runtime"]["custom_op_libraries"][0])
    dense = session(str(OUT / "dense.onnx"))
    rows = []
    for steps, chunk in ((1, 1), (8, 8)):
        sparse = session(with_chunk(OUT / "smollm2" / "model.onnx", chunk), lib)
        d_fast, d_logits = step_runner(dense, ids, steps)
        s_fast, s_logits = step_runner(sparse, ids, steps)
        agree = float((d_logits().argmax(-1) == s_logits().argmax(-1)).mean())
        stats = interleaved({"dense": d_fast, "blockffn": s_fast}, budget_s)
        rows.append({"new_tokens": steps, "chunk": chunk, "prefix": PREFIX, **{f"{n}_{k}": v for n, s in stats.items()
                     for k, v in s.items()}, "speedup": round(stats["dense"]["median_ms"] / stats["blockffn"]["median_ms"], 3),
                     "greedy_next_token_agreement": agree})
        print(rows[-1], flush=True)
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "threads": 1,
            "onnxruntime": ort.__version__, "state": manifest["passes"][0]["options"]["state"],
            "package_sparsity_report": manifest["passes"][0]["report"].get("sparsity"), "rows": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--state", default="")
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--budget", type=float, default=60)
    args = ap.parse_args()
    if args.build:
        if not args.state:
            sys.exit("--build needs --state (a conversion from convert_smollm2.py)")
        build(args.state, args.tolerance)
    if args.time:
        print(write_result("bench_decode.json", measure(args.budget)))


if __name__ == "__main__":
    main()
