"""The wasm package against the same model run densely by onnxruntime-web's WASM backend, in node.

For each FFN shape (K x N = 768x3072, 3072x768, and the whole FFN 768 -> 3072 -> GELU -> 768) and
each (block, sparsity), the model is built with the real pipeline (`--target wasm --pass
magnitude:...`); the package (web/edgesparse.mjs: wasm kernels, plus onnxruntime-web for the rest)
and plain onnxruntime-web on the dense-weight model run interleaved in one node process, 1 thread,
for M = 1, 8, 64 tokens. Figures are medians with the 25-75% spread.

    .venv/bin/python targets/wasm/bench/bench_wasm.py                 # the docs table (75%, 16x1)
    .venv/bin/python targets/wasm/bench/bench_wasm.py --sweep         # blocks 4/8/16 x 50/75/90%
    .venv/bin/python targets/wasm/bench/bench_wasm.py --json out.json

Run it on a quiet machine (`nice -n 19` if others need the CPUs, then expect more spread).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"768x3072": [(768, 3072)], "3072x768": [(3072, 768)], "ffn": [(768, 3072), (3072, 768)]}
TOKENS = (1, 8, 64)


def ffn_model(layers: list[tuple[int, int]], seed: int = 0) -> onnx.ModelProto:
    """MatMul + bias layers; between two layers the erf GELU as exporters write it."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i, (k, n) in enumerate(layers):
        w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(rng.standard_normal(n).astype(np.float32) * 0.1, f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}_bias")]
        x = f"h{i}"
        if i + 1 < len(layers):
            inits += [numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), f"sqrt2_{i}"),
                      numpy_helper.from_array(np.array(1.0, np.float32), f"one_{i}"),
                      numpy_helper.from_array(np.array(0.5, np.float32), f"half_{i}")]
            nodes += [helper.make_node("Div", [x, f"sqrt2_{i}"], [f"d{i}"]),
                      helper.make_node("Erf", [f"d{i}"], [f"e{i}"]),
                      helper.make_node("Add", [f"e{i}", f"one_{i}"], [f"a{i}"]),
                      helper.make_node("Mul", [f"half_{i}", f"a{i}"], [f"g{i}"]),
                      helper.make_node("Mul", [x, f"g{i}"], [f"act{i}"])]
            x = f"act{i}"
    graph = helper.make_graph(
        nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", layers[0][0]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["m", layers[-1][1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def build_package(model: onnx.ModelProto, folder: Path, sparsity: float, block: int) -> Path:
    from edgesparse.pipeline import BuildRequest, build

    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    out = folder / "pkg"
    build(BuildRequest(model=str(folder / "model.onnx"), target="wasm", output=out, force=True, quiet=True,
                       passes=[("magnitude", {"sparsity": sparsity, "block": block})]))
    return out


def dense_model(package: Path, folder: Path) -> Path:
    """The package's model with each sparse node back on dense weights (what a user would deploy)."""
    from edgesparse import verify
    from edgesparse.plugins import registry

    model = onnx.load(str(package / "model.onnx"))
    libraries = [lib for lib in registry().kernels.values() if lib.domain in {n.domain for n in model.graph.node}]
    path = folder / "dense.onnx"
    onnx.save(verify.dense_equivalent(model, libraries), str(path))
    return path


def run(shapes, blocks, sparsities, tokens, rounds, budget, functions: bool) -> list[dict]:
    from edgesparse_wasm import node

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgesparse-wasm-bench-") as tmp:
        for shape in shapes:
            layers = SHAPES[shape]
            for block in blocks:
                for sparsity in sparsities:
                    folder = Path(tmp) / f"{shape}-{block}-{sparsity}"
                    package = build_package(ffn_model(layers), folder, sparsity, block)
                    dense = dense_model(package, folder)
                    manifest = json.loads((package / "manifest.json").read_text())
                    for m in tokens:
                        x = np.random.default_rng(m).standard_normal((m, layers[0][0])).astype(np.float32)
                        r = node.bench_in_node(package, dense, {"x": x}, rounds=rounds, budget_s=budget,
                                               functions=functions)
                        row = {"shape": shape, "M": m, "block": block, "sparsity": sparsity,
                               "package_ms": r["package"], "dense_ms": r["dense"],
                               "speedup": r["dense"]["median_ms"] / r["package"]["median_ms"],
                               "max_abs_diff": r["max_abs_diff"], "kernel_nodes": r["kernel_nodes"],
                               "sparse_nodes": manifest["verification"]["sparse_nodes"],
                               "ort_web": r["ort_web"], "node": r["node"]}
                        if functions:
                            row["functions_ms"] = r["functions"]
                        rows.append(row)
                        print(line(row), flush=True)
    return rows


def spread(s: dict) -> str:
    return f"{s['median_ms']:.3f} [{s['p25_ms']:.3f}-{s['p75_ms']:.3f}]"


def line(r: dict) -> str:
    extra = f" {spread(r['functions_ms'])} |" if "functions_ms" in r else ""
    return (f"| {r['shape']} | {r['M']} | {r['block']}x1 | {r['sparsity']:.0%} | {spread(r['dense_ms'])} | "
            f"{spread(r['package_ms'])} | {r['speedup']:.2f}x |{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="blocks 4, 8, 16 x sparsity 50, 75, 90%% (single layers)")
    ap.add_argument("--shapes", default=None, help="comma-separated: 768x3072, 3072x768, ffn")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--budget", type=float, default=8.0, help="seconds per (shape, M) at most")
    ap.add_argument("--functions", action="store_true", help="also time model.onnx itself in onnxruntime-web")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.sweep:
        shapes, blocks, sparsities = ["768x3072", "3072x768"], (4, 8, 16), (0.5, 0.75, 0.9)
    else:
        shapes, blocks, sparsities = ["768x3072", "3072x768", "ffn"], (16,), (0.75,)
    if args.shapes:
        shapes = args.shapes.split(",")
    from edgesparse_wasm import node

    print(f"# {datetime.date.today()} node {node.check_node()}, onnxruntime-web {node.ORT_WEB_VERSION}, "
          f"{platform.machine()}, 1 thread; times in ms, median [p25-p75]")
    head = "| shape | M | block | sparsity | ort-web dense | edgesparse wasm | speed-up |"
    print(head + (" model.onnx in ort-web |" if args.functions else ""))
    print("|---" * (8 if args.functions else 7) + "|")
    rows = run(shapes, blocks, sparsities, TOKENS, args.rounds, args.budget, args.functions)
    if args.json:
        args.json.write_text(json.dumps({"date": str(datetime.date.today()), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
