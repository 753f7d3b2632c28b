"""The wasm target: WebAssembly with SIMD128, in browsers and node, beside onnxruntime-web.

onnxruntime-web cannot load custom operators, so the `wasm` backend splits the graph: the sparse
nodes run on edgesparse's pure kernels compiled to wasm32 (edgesparse_kernels.wasm, no imports),
everything else runs in onnxruntime-web sessions over sub-models, and a small ES module
(web/edgesparse.mjs) runs the steps in order. The build verifies the package by running exactly
those files in node with the pinned onnxruntime-web. See docs/wasm.md.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx

from edgesparse import Backend, EdgesparseError, RunResult, Target, hookimpl

from . import node, plan, toolchain

__version__ = "0.1.0"

JS = Path(__file__).parent / "js"
WEB = "web"
RUNTIME_FILES = ("edgesparse.mjs",)
MAX_MODEL_BYTES = 1_800_000_000

APP_SNIPPET = """\
// Run this package in a web page (or node) with onnxruntime-web {ort_web}:
//   <script type="module"> ... </script>, serving this folder as ./{name}/
import * as ort from "onnxruntime-web";          // or https://cdn.jsdelivr.net/npm/onnxruntime-web@{ort_web}/dist/ort.wasm.min.mjs
import {{ load }} from "./{name}/web/edgesparse.mjs";
const model = await load(new URL("./{name}/", import.meta.url), {{ ort }});
const outputs = await model.run({{ {feeds} }});
"""

# Measured on 2026-11-28 in node 20.20 against onnxruntime-web 1.30.0's dense MatMul, 1 thread
# (bench/bench_wasm.py --sweep; docs/wasm.md): the worst speed-up of the wasm kernel over the FFN
# shapes 768x3072 and 3072x768 and M = 1, 8, 64, per block size and sparsity. (One 8x1 point, 0.57x
# at 768x3072 M=8 50%, did not reproduce on a rerun, 1.65x, and was taken as the rerun.)
MEASURED_MIN_SPEEDUP = {
    16: {0.5: 1.49, 0.75: 3.52, 0.9: 6.55},
    8: {0.5: 1.48, 0.75: 2.67, 0.9: 5.88},
    4: {0.5: 0.92, 0.75: 2.35, 0.9: 4.67},
}


def expected_speedup(block: int, sparsity: float) -> float | None:
    """Worst measured speed-up at the nearest measured sparsity at or below `sparsity`; below the
    lowest one, scaled by the work left, (1 - lowest) / (1 - sparsity). None for unmeasured blocks."""
    table = MEASURED_MIN_SPEEDUP.get(block)
    if not table:
        return None
    below = [s for s in table if s <= sparsity + 1e-9]
    if below:
        return table[max(below)]
    lowest = min(table)
    return table[lowest] * (1.0 - lowest) / (1.0 - sparsity)


class Wasm(Target):
    name = "wasm"
    summary = "WebAssembly SIMD128 in browsers and node: onnxruntime-web for dense parts, edgesparse wasm kernels for sparse ones"
    backends = ("wasm",)
    machine = "wasm32"
    isa = "simd128"

    def toolchain(self):
        return toolchain.toolchain()

    def check_environment(self) -> None:
        toolchain.check_tools(need_node=True)
        node.ort_web_dir()  # the pinned onnxruntime-web verification runs on: fetched once, before any work

    def runs_here(self) -> bool:
        return shutil.which("node") is not None

    def prefers_sparse(self, op: str, shape: dict, sparsity: float, block: int, threads: int = 1) -> bool:
        if op not in plan.KERNEL_OPS:
            return False
        speedup = expected_speedup(block, sparsity)
        return speedup is not None and speedup > 1.0

    def predicted_speedup(self, op: str, shape: dict, sparsity: float, block: int, threads: int = 1) -> float | None:
        return expected_speedup(block, sparsity) if op in plan.KERNEL_OPS else None

    def run_package(self, package_dir: Path, inputs, threads: int = 1) -> RunResult:
        outputs, stats = node.run_in_node(Path(package_dir), inputs, threads)
        return RunResult(outputs, {op: int(n) for op, n in stats["kernelNodes"].items()})

    def bench(self, package_dir: Path, batch, libraries, threads=(1,), rounds: int = 30) -> list[dict]:
        """The package vs its dense equivalent on plain onnxruntime-web, interleaved in one node
        process (wasm is single-threaded here: one record)."""
        import tempfile

        from edgesparse import runtime, verify

        package = runtime.load(package_dir, check_target=False)
        dense = verify.dense_equivalent(onnx.load(str(package.model_path)), libraries)
        with tempfile.TemporaryDirectory() as tmp:
            dense_path = Path(tmp) / "dense.onnx"
            onnx.save(dense, str(dense_path))
            r = node.bench_in_node(package.root, dense_path, batch, rounds=rounds)
        return [{"threads": 1, "inputs": {k: list(v.shape) for k, v in batch.items()}, "dense": r["dense"],
                 "package": r["package"], "speedup": r["dense"]["median_ms"] / r["package"]["median_ms"],
                 "max_abs_error": r["max_abs_diff"], "engine": f"node + onnxruntime-web {r['ort_web']}"}]

    def describe(self) -> dict:
        return {**super().describe(), "onnxruntime_web": node.ORT_WEB_VERSION}


class WasmBackend(Backend):
    name = "wasm"
    summary = "onnxruntime-web segments + edgesparse wasm kernels, orchestrated by web/edgesparse.mjs"

    def compile(self, model: onnx.ModelProto, target, staging: Path, libraries) -> dict:
        size = model.ByteSize()
        if size > MAX_MODEL_BYTES:
            raise EdgesparseError(f"the model is {size / 2**30:.1f} GB: too large for the wasm target (ONNX files "
                                  f"stop at 2 GB, and browsers give a wasm module 2-4 GB of memory at most)")
        onnx.save(model, str(staging / "model.onnx"))  # the whole model: runs densely in plain onnxruntime-web
        web = staging / WEB
        web.mkdir()
        module = toolchain.kernel_module()
        shutil.copy2(module, web / toolchain.MODULE_NAME)
        for name in RUNTIME_FILES:
            shutil.copy2(JS / name, web / name)
        the_plan = plan.write_plan(model, web)
        (web / "plan.json").write_text(json.dumps(the_plan, indent=1) + "\n")
        feeds = ", ".join(f"{json.dumps(i['name'])}: new ort.Tensor({json.dumps(i['dtype'])}, data, "
                          f"[{', '.join(str(d) for d in (i['shape'] or []))}])" for i in the_plan["inputs"])
        (web / "RUN.js.txt").write_text(APP_SNIPPET.format(ort_web=node.ORT_WEB_VERSION, name="PACKAGE", feeds=feeds))
        kernel_ops = sorted({s["op"] for s in the_plan["steps"] if s["kind"] == "kernel"})
        return {
            "engine": "onnxruntime-web + edgesparse wasm kernels",
            "model": "model.onnx",
            "custom_op_libraries": [],
            "custom_domains": sorted({lib.domain for lib in libraries}),
            "custom_ops": kernel_ops,
            "web": {
                "plan": f"{WEB}/plan.json",
                "runtime": f"{WEB}/edgesparse.mjs",
                "kernels": f"{WEB}/{toolchain.MODULE_NAME}",
                "onnxruntime_web": node.ORT_WEB_VERSION,
                "segments": the_plan["segments"],
                "kernel_nodes": the_plan["kernel_nodes"],
                "fallback": the_plan["fallback"],
            },
            "compiler": toolchain.compiler_version(),
        }


@hookimpl
def register_targets(register):
    register(Wasm())


@hookimpl
def register_backends(register):
    register(WasmBackend())
