"""Prefill, decode-step and whole-answer latency of the assembled VLM, dense vs CoreMatching, with
the torch reference engine (same code path for both; one thread; interleaved rounds; medians with
p25/p75). This is a stand-in for the ONNX Runtime comparison of vlm_speed.py when the exports
cannot be afforded; it shows what token removal and FFN slicing buy in the same engine.

    flock /tmp/edgesparse-timing.lock nice -n 0 .venv/bin/python samples/corematching/vlm_latency_torch.py \\
        --token-layers 0-3 --out samples/corematching/results/vlm_latency_torch.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import vlm as V  # noqa: E402
from edgesparse_corematching.engine import Engine  # noqa: E402
from edgesparse_corematching.settings import Settings, parse_span  # noqa: E402


def stats(samples):
    a = np.asarray(samples) * 1e3
    return {"median_ms": round(float(np.median(a)), 2), "p25_ms": round(float(np.percentile(a, 25)), 2),
            "p75_ms": round(float(np.percentile(a, 75)), 2), "n": len(a)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--neuron-layers", default="1-28")
    ap.add_argument("--token-layers", default="0-3")
    ap.add_argument("--answer", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = V.load()
    images, _ = V.fashion_mnist("test")
    feats = V.image_features(V.load_vision(), images[:1])
    with torch.no_grad():
        prompt, span = model.prompt(feats)
    prunable = model.prunable(1, prompt.shape[1], span)
    engines = {"dense": Engine(model.lm, Settings(keep=1.0)),
               "corematching": Engine(model.lm, Settings(keep=args.keep, neuron_layers=parse_span(args.neuron_layers),
                                                        token_layers=parse_span(args.token_layers)))}
    times = {part: {k: [] for k in engines} for part in ("prefill", "decode_step", "answer")}
    for r in range(args.rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            e = engines[name]
            t0 = time.perf_counter()
            state, last = e.prefill(prompt, prunable=prunable)
            t1 = time.perf_counter()
            tok = last.argmax(-1)
            steps = []
            for _ in range(args.answer - 1):
                s = time.perf_counter()
                tok = e.decode(state, tok[:, None])[:, -1].argmax(-1)
                steps.append(time.perf_counter() - s)
            t2 = time.perf_counter()
            times["prefill"][name].append(t1 - t0)
            times["decode_step"][name].extend(steps)
            times["answer"][name].append(t2 - t0)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "engine": "torch reference, 1 thread",
              "load_average": os.getloadavg(), "keep": args.keep, "neuron_layers": args.neuron_layers, "token_layers": args.token_layers,
              "prompt_tokens": int(prompt.shape[1]), "answer_tokens": args.answer,
              **{part: {k: stats(v) for k, v in t.items()} for part, t in times.items()},
              "speedup": {part: round(float(np.median(t["dense"]) / np.median(t["corematching"])), 3) for part, t in times.items()}}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
