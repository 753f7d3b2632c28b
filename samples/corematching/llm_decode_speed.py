"""Decode-step speed of CoreInfer on SmolLM2-135M in ONNX Runtime, side by side with the dense ONNX
model a user would otherwise run (transformers' SmolLM2 exported with its KV cache, as
samples/deltallm/export.py does), one thread, interleaved rounds in one process, medians with
p25/p75.

The CoreInfer decode graph here is that same dense graph with the FFN MatMuls of the sliced layers
fed the core neurons' weight slices (graph inputs, MatMul layout, gate [D, k], up [D, k],
down [k, D]) instead of the full weights: everything else is identical, so the ratio isolates the
sliced FFNs. The slices are the ones the torch engine picks from a real prompt (the same
selection as the pass's prefill graph), and the first decode step's logits are checked against
the engine.

    flock /tmp/edgesparse-timing.lock nice -n 0 .venv/bin/python samples/corematching/llm_decode_speed.py \\
        --keeps 0.5,0.7,0.85 --out samples/corematching/results/llm_decode_speed.json
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
import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import cache_dir, eval_windows, load_smollm2  # noqa: E402
from edgesparse_corematching.engine import Engine  # noqa: E402
from edgesparse_corematching.settings import Settings, parse_span  # noqa: E402

LAYERS, FFN_MATMULS = 30, (4, 5, 6)   # per layer the exporter emits 7 linear MatMuls: q k v o gate up down


def sliced_graph(dense: onnx.ModelProto, layers: list[int], keep: int) -> onnx.ModelProto:
    """The dense graph with the FFN weights of `layers` turned into graph inputs of k neurons."""
    g = onnx.ModelProto()
    g.CopyFrom(dense)
    linear = [n for n in g.graph.node if n.op_type == "MatMul" and n.name.startswith("node_linear")]
    if len(linear) != LAYERS * 7 + 0 and len(linear) != LAYERS * 7 + 1:
        raise SystemExit(f"unexpected graph: {len(linear)} linear MatMuls")
    dropped = set()
    for layer in layers:
        for role, j in zip(("gate", "up", "down"), FFN_MATMULS):
            node = linear[layer * 7 + j]
            dropped.add(node.input[1])
            name = f"core_{role}_{layer}"
            node.input[1] = name
            shape = [576, keep] if role != "down" else [keep, 576]
            g.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    del g.graph.value_info[:]   # the recorded intermediate shapes say 1536 neurons
    kept = [i for i in g.graph.initializer if i.name not in dropped]
    del g.graph.initializer[:]
    g.graph.initializer.extend(kept)
    return g


def session(model, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model), so,
                                providers=["CPUExecutionProvider"])


def stats(samples):
    a = np.asarray(samples) * 1e3
    return {"median_ms": round(float(np.median(a)), 3), "p25_ms": round(float(np.percentile(a, 25)), 3),
            "p75_ms": round(float(np.percentile(a, 75)), 3), "n": len(a)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keeps", default="0.5,0.7,0.85")
    ap.add_argument("--layers", default="1-28")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dense_path = cache_dir() / "deltallm-samples" / "smollm2.onnx"
    if not dense_path.exists():
        raise SystemExit(f"{dense_path} is missing: run samples/deltallm/export.py once")
    tok, lm = load_smollm2()
    ids = torch.tensor(eval_windows(tok, args.prompt, 1)[0])[None]
    dense_proto = onnx.load(str(dense_path))
    dense = session(dense_proto, args.threads)
    empty = np.zeros((LAYERS, 1, 3, 0, 64), np.float32)
    logits, keys, values = dense.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy()),
                                            "past_keys": empty, "past_values": empty})
    token = np.array([[int(logits[0, -1].argmax())]], np.int64)
    base = {"input_ids": token, "attention_mask": np.ones((1, args.prompt + 1), np.int64), "past_keys": keys, "past_values": values}
    span = parse_span(args.layers)
    layers = [i for i in range(LAYERS) if span is None or span[0] <= i <= span[1]]
    variants, checks = {}, {}
    for keep in (float(k) for k in args.keeps.split(",")):
        engine = Engine(lm, Settings(keep=keep, neuron_layers=span))
        state, _ = engine.prefill(lm.model.embed_tokens(ids))
        ref = engine.decode(state, torch.tensor(token))[0, -1].numpy()
        feed = dict(base)
        for i in layers:
            wg, wu, wd = (w[0].detach().numpy() for w in state.sliced[i])
            feed |= {f"core_gate_{i}": np.ascontiguousarray(wg.T), f"core_up_{i}": np.ascontiguousarray(wu.T),
                     f"core_down_{i}": np.ascontiguousarray(wd)}
        sess = session(sliced_graph(dense_proto, layers, engine.keep), args.threads)
        out = sess.run(None, feed)[0][0, -1]
        checks[keep] = float(np.abs(out - ref).max())
        variants[f"keep={keep}"] = (sess, feed)
    runs = {"dense": (dense, base)} | variants
    for s, f in runs.values():
        s.run(None, f)
    times = {k: [] for k in runs}
    for r in range(args.rounds):
        names = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for name in names:
            s, f = runs[name]
            t = time.perf_counter()
            s.run(None, f)
            times[name].append(time.perf_counter() - t)
    dense_median = np.median(times["dense"])
    result = {
        "model": "SmolLM2-135M-Instruct fp32", "prompt_tokens": args.prompt, "neuron_layers": args.layers,
        "threads": args.threads, "onnxruntime": __import__("onnxruntime").__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "load_average": os.getloadavg(),
        "decode_step": {k: stats(v) for k, v in times.items()},
        "speedup_vs_dense": {k: round(float(dense_median / np.median(v)), 3) for k, v in times.items() if k != "dense"},
        "max_abs_logit_error_vs_engine": checks,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
