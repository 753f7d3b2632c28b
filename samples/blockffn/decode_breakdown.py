"""Where a decode step's time goes: the from-scratch packages (bench_scratch_decode.py's) timed whole
and with their FFNs cut out, interleaved in one process, one thread, one token after a cache of
`prefix` tokens. BlockFFN without its routers and RoutedFFN ops, the twin without its FFN: the
differences are each FFN's cost in place (weights cold, as in a real step), the rest is common.
Also ORT's own cost per node: a chain of 100 Relu nodes on 32 floats against one.

    .venv/bin/python samples/blockffn/decode_breakdown.py --run <run> --blockffn <pkg> --dense <pkg>
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import interleaved, session, with_chunk  # noqa: E402
from bench_scratch_decode import step_runner  # noqa: E402


def _prune(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the nodes no graph output depends on."""
    needed, keep = {o.name for o in model.graph.output}, []
    for node in reversed(list(model.graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    return model


def without_ffn(model: onnx.ModelProto) -> onnx.ModelProto:
    """The residual Add after each FFN reads only the residual: RoutedFFN's and its router's nodes
    (BlockFFN) or the gated FFN's (the twin) are left without consumers and dropped."""
    producer = {o: n for n in model.graph.node for o in n.output}

    def ffn_output(value: str) -> bool:
        scale = producer.get(value)  # the residual branch's scale, after the FFN
        if scale is None or scale.op_type != "Mul" or scale.input[0] not in producer:
            return False
        ffn = producer[scale.input[0]]
        after_gate = producer.get(ffn.input[0]) if ffn.input else None
        return ffn.op_type == "RoutedFFN" or (ffn.op_type == "MatMul" and after_gate is not None and
                                               after_gate.op_type == "Mul")  # down(act(gate) * up)

    cut = 0
    for node in model.graph.node:
        if node.op_type == "Add" and len(node.input) == 2:
            for i in (0, 1):
                if ffn_output(node.input[i]):
                    residual = node.input[1 - i]
                    node.op_type = "Identity"
                    del node.input[:]
                    node.input.append(residual)
                    cut += 1
                    break
    if not cut:
        raise SystemExit("found no FFN to cut out")
    return _prune(model)


def per_node_us(budget_s: float = 2.0) -> float:
    """ORT's cost per node: (chain of 101 Relu - chain of 1) / 100, one thread, medians."""
    def chain(n):
        nodes = [helper.make_node("Relu", [f"x{i}"], [f"x{i + 1}"]) for i in range(n)]
        io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 1, 32])  # noqa: E731
        m = helper.make_model(helper.make_graph(nodes, "chain", [io("x0")], [io(f"x{n}")]),
                              opset_imports=[helper.make_opsetid("", 18)])
        m.ir_version = 10
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = {"x0": np.ones((1, 1, 32), np.float32)}
        return lambda: s.run(None, x)

    stats = interleaved({"1": chain(1), "101": chain(101)}, budget_s)
    return round((stats["101"]["median_ms"] - stats["1"]["median_ms"]) * 1e3 / 100, 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="the train_scratch.py run folder (held-out text)")
    ap.add_argument("--blockffn", type=Path, required=True)
    ap.add_argument("--dense", type=Path, required=True)
    ap.add_argument("--prefix", type=int, default=256)
    ap.add_argument("--budget", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "decode_breakdown.json")
    args = ap.parse_args(argv)
    ids = np.load(args.run / "data.npz")["held"].astype(np.int64)
    manifest = json.loads((args.blockffn / "manifest.json").read_text())
    lib = str(args.blockffn / manifest["runtime"]["custom_op_libraries"][0])
    sparse = with_chunk(args.blockffn / manifest["runtime"]["model"], 1)
    dense = onnx.load(str(args.dense / json.loads((args.dense / "manifest.json").read_text())["runtime"]["model"]))
    variants = {"blockffn": sparse, "blockffn_without_ffn": without_ffn(onnx.ModelProto.FromString(sparse.SerializeToString())),
                "dense": dense, "dense_without_ffn": without_ffn(onnx.ModelProto.FromString(dense.SerializeToString()))}
    runners = {k: step_runner(session(m, lib), ids, args.prefix, 1) for k, m in variants.items()}
    stats = interleaved(runners, args.budget)
    ms = {k: v["median_ms"] for k, v in stats.items()}
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": 1, "prefix": args.prefix,
              "onnxruntime": ort.__version__, "steps": stats,
              "blockffn_ffn_ms": round(ms["blockffn"] - ms["blockffn_without_ffn"], 3),
              "dense_ffn_ms": round(ms["dense"] - ms["dense_without_ffn"], 3),
              "common_ms": round((ms["blockffn_without_ffn"] + ms["dense_without_ffn"]) / 2, 3),
              "ort_per_node_us": per_node_us()}
    print({k: v for k, v in result.items() if k != "steps"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
