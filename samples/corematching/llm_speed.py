"""Decode (and prefill, and whole generation) speed of SmolLM2-135M with CoreInfer on ONNX Runtime,
side by side with the dense ONNX model a user would otherwise run (the transformers model
exported with its KV cache, as samples/deltallm/export.py does), one thread, interleaved rounds
in one process, medians with p25/p75.

    flock /tmp/edgesparse-timing.lock nice -n 0 .venv/bin/python samples/corematching/llm_speed.py \\
        --keep 0.5 --out samples/corematching/results/llm_speed_keep0.5.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import cache_dir, eval_windows  # noqa: E402
from export import exported  # noqa: E402


def session(path, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def stats(samples):
    a = np.asarray(samples) * 1e3
    return {"median_ms": round(float(np.median(a)), 3), "p25_ms": round(float(np.percentile(a, 25)), 3),
            "p75_ms": round(float(np.percentile(a, 75)), 3), "n": len(a)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--layers", default="1-28")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=40, help="interleaved decode-step rounds")
    ap.add_argument("--generate", type=int, default=32, help="tokens per whole-generation run")
    ap.add_argument("--generate-rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    dense_path = cache_dir() / "deltallm-samples" / "smollm2.onnx"
    if not dense_path.exists():
        raise SystemExit(f"{dense_path} is missing: run samples/deltallm/export.py once")
    pre_path, dec_path = exported(args.keep, args.layers)
    tok = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-fp32")
    ids = eval_windows(tok, args.prompt, 1)[0][None]
    dense, pre, dec = (session(p, args.threads) for p in (dense_path, pre_path, dec_path))
    layers = 30
    empty = np.zeros((layers, 1, 3, 0, 64), np.float32)

    def dense_prefill():
        return dense.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids), "past_keys": empty, "past_values": empty})

    def core_prefill():
        return pre.run(None, {"input_ids": ids})

    d_logits, d_k, d_v = dense_prefill()
    c = core_prefill()
    token = np.array([[int(d_logits[0, -1].argmax())]], np.int64)
    d_feed = {"input_ids": token, "attention_mask": np.ones((1, args.prompt + 1), np.int64), "past_keys": d_k, "past_values": d_v}
    weight_names = [o.name for o in pre.get_outputs()][4:]
    c_weights = dict(zip(weight_names, c[4:]))
    c_feed = {"input_ids": token, "past_keys": c[1], "past_values": c[2], **c_weights}
    prefill_agree = int(c[0][0, -1].argmax()) == int(d_logits[0, -1].argmax())

    def dense_step():
        dense.run(None, d_feed)

    def core_step():
        dec.run(None, c_feed)

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    for fn in (dense_step, core_step):  # warm up
        fn()
    steps = {"dense": [], "coreinfer": []}
    for r in range(args.rounds):
        order = (("dense", dense_step), ("coreinfer", core_step))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            steps[name].append(timed(fn))
    prefill = {"dense": [], "coreinfer": []}
    for r in range(max(3, args.rounds // 8)):
        order = (("dense", dense_prefill), ("coreinfer", core_prefill))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            prefill[name].append(timed(fn))

    def dense_generate():
        logits, k, v = dense_prefill()
        out = [int(logits[0, -1].argmax())]
        for _ in range(args.generate - 1):
            logits, k, v = dense.run(None, {"input_ids": np.array([[out[-1]]]), "attention_mask": np.ones((1, k.shape[3] + 1), np.int64),
                                            "past_keys": k, "past_values": v})
            out.append(int(logits[0, -1].argmax()))
        return out

    def core_generate():
        logits, k, v, _, *w = core_prefill()
        w = dict(zip(weight_names, w))
        out = [int(logits[0, -1].argmax())]
        for _ in range(args.generate - 1):
            logits, k, v = dec.run(None, {"input_ids": np.array([[out[-1]]]), "past_keys": k, "past_values": v, **w})
            out.append(int(logits[0, -1].argmax()))
        return out

    generate = {"dense": [], "coreinfer": []}
    texts = {}
    for r in range(args.generate_rounds):
        order = (("dense", dense_generate), ("coreinfer", core_generate))
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            texts[name] = fn()
            generate[name].append(time.perf_counter() - t)
    same = next((i for i, (a, b) in enumerate(zip(texts["dense"], texts["coreinfer"])) if a != b), args.generate)

    result = {
        "model": "SmolLM2-135M-Instruct fp32", "keep": args.keep, "neuron_layers": args.layers, "prompt_tokens": args.prompt,
        "threads": args.threads, "onnxruntime": __import__("onnxruntime").__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "load_average": os.getloadavg(), "cpu": platform.processor() or platform.machine(),
        "decode_step": {k: stats(v) for k, v in steps.items()},
        "prefill": {k: stats(v) for k, v in prefill.items()},
        "generate": {k: stats(v) for k, v in generate.items()} | {"tokens": args.generate},
        "decode_speedup": round(float(np.median(steps["dense"]) / np.median(steps["coreinfer"])), 3),
        "prefill_speedup": round(float(np.median(prefill["dense"]) / np.median(prefill["coreinfer"])), 3),
        "generate_speedup": round(float(np.median(generate["dense"]) / np.median(generate["coreinfer"])), 3),
        "prefill_next_token_equal": prefill_agree,
        "generated_equal_prefix": same,
        "sliced_weights_mb": round(sum(a.nbytes for a in c[4:]) / 1e6, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
