"""What core-neuron selection costs in ONNX Runtime (one thread): ORT's TopK over one layer's
activations [T, I] for the full sort (k = I) against the partial top-k the graphs use
(k = ceil(rho x I) + 1), and the exported CoreInfer prefill's node time by op type (ORT profiler).

    flock /tmp/edgesparse-timing.lock nice -n 0 .venv/bin/python samples/corematching/selection_cost.py \\
        [--tokens 256] [--keep 0.5] [--out samples/corematching/results/selection_cost.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def topk_ms(tokens: int, inter: int, k: int, rounds: int = 20) -> float:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1)], "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, inter])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, None), helper.make_tensor_value_info("i", TensorProto.INT64, None)],
        [onnx.numpy_helper.from_array(np.array([k], np.int64), "k")])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), so)
    feed = {"x": np.random.default_rng(0).standard_normal((tokens, inter)).astype(np.float32)}
    session.run(None, feed)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 3)


def prefill_profile(keep: float, tokens: int) -> dict:
    import onnxruntime as ort

    from common import eval_windows, load_smollm2
    from export import exported

    prefill, _ = exported(keep, "1-28")
    tok, _ = load_smollm2()
    ids = np.array(eval_windows(tok, tokens, 1)[0], np.int64)[None]
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prefill")
        session = ort.InferenceSession(str(prefill), so, providers=["CPUExecutionProvider"])
        runs = 3
        for _ in range(runs):
            session.run(None, {"input_ids": ids})
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op, nodes = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"] / runs / 1e3
            nodes[e["args"]["op_name"]] += 1 / runs
    return {op: {"ms": round(ms, 1), "nodes": round(nodes[op])} for op, ms in by_op.most_common()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--rho", type=float, default=0.2)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    partial = math.ceil(args.rho * args.inter) + 1
    result = {"tokens": args.tokens, "inter": args.inter,
              "topk_full_sort_ms": topk_ms(args.tokens, args.inter, args.inter),
              "topk_partial_ms": topk_ms(args.tokens, args.inter, partial), "partial_k": partial,
              "prefill_node_ms_by_op": prefill_profile(args.keep, args.tokens)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
