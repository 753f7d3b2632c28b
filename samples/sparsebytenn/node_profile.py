"""Where the time of a package goes: ONNX Runtime's profiled run of the package and of its dense
baseline (the same model `edgesparse bench` compares with), node time summed by op type.

    flock /tmp/edgesparse-timing.lock python samples/sparsebytenn/node_profile.py out/sparsebytenn/fashion-70 \
        [--threads 1] [--runs 200] [--json results/profile-70.json]

Prints, for each side, the total node time per run by op type (Conv, BlockSparseConv,
ReorderInput/ReorderOutput of ORT's NCHWc layout, ...), and the sparse nodes with the dense
nodes they replace.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx


def profile(session_fn, feed: dict, runs: int) -> dict:
    """{node name: (op type, mean us per run)} from ORT's profiler, over `runs` runs after warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        session = session_fn(str(Path(tmp) / "p"))
        for _ in range(20):
            session.run(None, feed)
        session.end_profiling()
        session = session_fn(str(Path(tmp) / "q"))
        for _ in range(runs + 5):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node = defaultdict(list)
    ops = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            per_node[name].append(e["dur"])
            ops[name] = e.get("args", {}).get("op_name", "?")
    # the first runs are still warming caches: keep the last `runs` samples of each node
    return {n: (ops[n], float(np.median(d[-runs:]))) for n, d in per_node.items()}


def by_op(nodes: dict) -> dict:
    out = defaultdict(lambda: [0, 0.0])
    for op, us in nodes.values():
        out[op][0] += 1
        out[op][1] += us
    return {op: {"nodes": n, "us": round(us, 1)} for op, (n, us) in sorted(out.items(), key=lambda kv: -kv[1][1])}


def main(argv=None) -> dict:
    import onnxruntime as ort

    from edgesparse import runtime, verify
    from edgesparse.plugins import registry

    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    pkg = runtime.load(Path(args.package))
    recorded = np.load(pkg.root / "verification.npz")  # the batch `edgesparse bench` times
    feed = {k[len("input:"):]: recorded[k] for k in recorded.files if k.startswith("input:")}
    domains = set(pkg.manifest["runtime"].get("custom_domains", []))
    libraries = [lib for lib in registry().kernels.values() if lib.domain in domains]
    dense_model = verify.dense_equivalent(onnx.load(str(pkg.model_path)), libraries).SerializeToString()

    def dense(prefix):
        return ort.InferenceSession(dense_model, _opts(None, args.threads, prefix), providers=["CPUExecutionProvider"])

    def sparse(prefix):
        return ort.InferenceSession(str(pkg.model_path), _opts(pkg, args.threads, prefix),
                                    providers=["CPUExecutionProvider"])

    result = {}
    for side, fn in (("dense", dense), ("package", sparse)):
        nodes = profile(fn, feed, args.runs)
        result[side] = {"total_us": round(sum(us for _, us in nodes.values()), 1), "by_op": by_op(nodes),
                        "nodes": {n: {"op": op, "us": round(us, 1)} for n, (op, us) in nodes.items()}}
        print(f"{side}: {result[side]['total_us']:.0f} us of node time per run ({args.threads} thread(s))")
        for op, v in result[side]["by_op"].items():
            print(f"  {op:24s} {v['nodes']:3d} nodes {v['us']:9.1f} us")
    result["threads"] = args.threads
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _opts(pkg, threads, prefix):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    o.log_severity_level = 3
    if prefix:
        o.enable_profiling = True
        o.profile_file_prefix = prefix
    for lib in (pkg.libraries if pkg else []):
        o.register_custom_ops_library(str(lib))
    return o


if __name__ == "__main__":
    main()
