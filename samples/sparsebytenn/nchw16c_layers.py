"""Each 1x1 and depthwise layer of the sample CNN alone, in each layout, inside ONNX Runtime:
where NCHW16c pays and where it does not (docs/kernels.md, "NCHW16c").

    flock /tmp/edgesparse-timing.lock python samples/sparsebytenn/nchw16c_layers.py [--rounds 400]

70 % block sparsity (16 x 1 groups, random), ReLU6, batch 1, one thread. Every variant of a layer
is timed round-robin in one process (interleaved), medians with p25-p75, in microseconds of
session.run. Writes results/nchw16c_layers.json (or --out); `EDGESPARSE_ISA=avx2` times the AVX2
code (ORT's own kernels keep their best ISA).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgesparse.kernels import attach_functions, build_library
from edgesparse.kernels.conv import make_block_sparse_conv, pack_block_sparse_conv, random_block_sparse_conv
from edgesparse.kernels.depthwise import make_depthwise_conv
from edgesparse.kernels.nchw16c import to_nchw16c

RESULTS = Path(__file__).resolve().parent / "results" / "nchw16c_layers.json"
POINTWISE = [(64, 128, 28), (128, 64, 28), (128, 256, 14), (256, 128, 14), (256, 512, 7), (512, 256, 7)]
DEPTHWISE = [(128, 28, 1), (128, 28, 2), (256, 14, 1), (256, 14, 2), (512, 7, 1)]


def _session(nodes, inits, x_shape, lib):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    attach_functions(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _interleaved(runs: dict, rounds: int) -> dict:
    """{name: (session, feed)} -> {name: [median, p25, p75] us}, timed round-robin."""
    times = {k: [] for k in runs}
    for sess, feed in runs.values():
        for _ in range(20):
            sess.run(None, feed)
    for _ in range(rounds):
        for k, (sess, feed) in runs.items():
            t = time.perf_counter()
            sess.run(None, feed)
            times[k].append((time.perf_counter() - t) * 1e6)
    return {k: [round(float(np.percentile(v, q)), 1) for q in (50, 25, 75)] for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    lib, rng, out = build_library(), np.random.default_rng(0), {"pointwise": {}, "depthwise": {}}
    for c, o, hw in POINTWISE:
        packed = pack_block_sparse_conv(random_block_sparse_conv(rng, o, c, 1, 1, 16, 0.7), 16)
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        runs = {}
        for xb, yb in ((1, 1), (1, 16), (16, 16), (16, 1)):
            node, inits = make_block_sparse_conv("X", "Y", packed, o, (1, 1), name="pw", activation="relu6",
                                                 bias=np.ones(o, np.float32), x_channel_block=xb, y_channel_block=yb)
            xi = to_nchw16c(x) if xb == 16 else x
            runs[f"x{xb}/y{yb}"] = (_session([node], inits, xi.shape, lib), {"X": xi})
        out["pointwise"][f"{c}->{o}@{hw}x{hw}"] = _interleaved(runs, args.rounds)
        print(f"1x1 {c}->{o} @{hw}:", out["pointwise"][f"{c}->{o}@{hw}x{hw}"], flush=True)
    for c, hw, s in DEPTHWISE:
        x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
        w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
        runs = {}
        for yb in (1, 16):
            node, inits = make_depthwise_conv("X", "Y", w, name="dw", strides=(s, s), pads=(1, 1, 1, 1),
                                              activation="relu6", y_channel_block=yb)
            xi = to_nchw16c(x) if yb == 16 else x
            runs[f"ours/x{yb}/y{yb}"] = (_session([node], inits, xi.shape, lib), {"X": xi})
        conv = helper.make_node("Conv", ["X", "W"], ["Y"], group=c, kernel_shape=[3, 3], strides=[s, s], pads=[1] * 4)
        runs["ort/nchw"] = (_session([conv], [numpy_helper.from_array(w, "W")], x.shape, None), {"X": x})
        out["depthwise"][f"{c}@{hw}x{hw}/s{s}"] = _interleaved(runs, args.rounds)
        print(f"dw {c} @{hw} s{s}:", out["depthwise"][f"{c}@{hw}x{hw}/s{s}"], flush=True)
    import os

    out["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out["load_average"] = os.getloadavg()[0]
    out["rounds"] = args.rounds
    from edgesparse.kernels.dispatch import current_isa, host_cpu

    out["kernel_isa"], out["cpu"] = current_isa(), host_cpu()
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
