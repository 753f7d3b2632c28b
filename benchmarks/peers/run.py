#!/usr/bin/env python
"""edgesparse side by side with the peer sparse CPU runtimes (DeepSparse 1.8.0, MNN 3.6.1) and
ONNX Runtime's dense kernels, on the same models and the same pruned weights.

    .venv/bin/python benchmarks/peers/run.py                # everything, rewrites docs/peers.md + .png
    .venv/bin/python benchmarks/peers/run.py --quick        # one small case, no docs
    .venv/bin/python benchmarks/peers/run.py --cases ffn --tokens 8 --threads 1 --json out.json

Method (docs/peers.md says more): each runtime runs in a timing server in its own venv
(worker.py); ORT dense and the edgesparse package share the project venv's server. For a case,
every candidate loads its model, its outputs are checked against ORT running the same weights
densely, then the orchestrator asks the servers for one timing sample each, in rotating order,
round after round, so only one runtime works at a time and a noisy neighbour hits all of them
alike. A sample is `reps` back-to-back inferences lasting about --sample-ms; the figures are the
medians over rounds with their p25-p75 spread, and ratio = ORT dense median / candidate median.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

import cases  # noqa: E402
import envs  # noqa: E402

PEERS = ("deepsparse", "mnn")
CANDIDATES = ("ort", "edgesparse", "deepsparse", "mnn")
# diagnostic only: edgesparse with its dispatch rule bypassed, run where the rule kept layers dense
FORCED = "edgesparse_forced"
FFN_SHAPES = ((768, 3072), (3072, 768), (1024, 4096))
TOLERANCE = 1e-3  # max abs error allowed, times max(1, max |reference|)


class WorkerError(RuntimeError):
    pass


class Worker:
    """One timing server (worker.py) in a runtime's venv."""

    def __init__(self, kind: str, python: str, env: dict, log_path: Path):
        self.kind = kind
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen([python, str(HERE / "worker.py"), kind], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=str(HERE))
        self.hello = self.request({"op": "hello"})

    def request(self, req: dict) -> dict:
        if self.proc.poll() is not None:
            raise WorkerError(f"{self.kind} worker exited ({self.proc.returncode}); see {self.log.name}")
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError as exc:
            raise WorkerError(f"{self.kind} worker died; see {self.log.name}") from exc
        if not line:
            self.proc.wait(timeout=10)
            raise WorkerError(f"{self.kind} worker died ({self.proc.returncode}) on {req.get('op')}; see {self.log.name}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(reply.get("error", "unknown error"))
        return reply

    def close(self):
        try:
            if self.proc.poll() is None:
                self.request({"op": "quit"})
                self.proc.wait(timeout=10)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self.log.close()


def start_workers(work: Path, peers, log=print) -> dict[str, Worker]:
    workers = {"ort": Worker("ort", sys.executable, dict(os.environ), work / "ort.log")}
    for peer in peers:
        python = envs.ensure(peer, log=log)
        workers[peer] = Worker(peer, str(python), envs.peer_env(peer), work / f"{peer}.log")
    return workers


# --- one case ----------------------------------------------------------------------------------

def _reference(model_path: Path, inputs: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def _max_error(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[float, float]:
    """(max abs error, allowed) over all outputs; a shape mismatch or NaN disagreement is inf."""
    worst, scale = 0.0, 1.0
    for g, w in zip(got, want):
        g = np.asarray(g, np.float64)
        w = np.asarray(w, np.float64)
        scale = max(scale, float(np.abs(w).max()) if w.size else 1.0)
        if g.size != w.size:
            return float("inf"), TOLERANCE * scale
        g = g.reshape(w.shape)
        if np.isnan(g).any() != np.isnan(w).any():
            return float("inf"), TOLERANCE * scale
        if w.size:
            worst = max(worst, float(np.nanmax(np.abs(g - w))))
    if len(got) != len(want):
        worst = float("inf")
    return worst, TOLERANCE * scale


def _stats(samples: list[float]) -> dict:
    a = np.asarray(samples)
    return {"median_ms": float(np.median(a)), "p25_ms": float(np.percentile(a, 25)),
            "p75_ms": float(np.percentile(a, 75)), "rounds": int(a.size)}


def measure(candidates: dict, workers: dict, *, sample_ms: float, budget_s: float, min_rounds: int,
            max_rounds: int) -> tuple[dict, dict]:
    """Interleaved timing of the loaded candidates {name: {"worker", "id"}}: per round each one
    times one sample, the order rotating; per-inference milliseconds. Returns (stats by name,
    errors by name for candidates whose server failed while timing)."""
    names, reps, errors = list(candidates), {}, {}

    def sample(name, n):
        w, cid = workers[candidates[name]["worker"]], candidates[name]["id"]
        return w.request({"op": "time", "id": cid, "reps": n})["seconds"]

    for name in list(names):
        try:
            for _ in range(3):  # warm-up
                sample(name, 1)
            one = min(sample(name, 1) for _ in range(3)) * 1e3
        except WorkerError as exc:
            errors[name] = f"failed while timing: {exc}"
            names.remove(name)
            continue
        reps[name] = int(max(1, min(2000, round(sample_ms / max(one, 1e-4)))))
    samples = {name: [] for name in names}
    start = time.perf_counter()
    for r in range(max_rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            try:
                samples[name].append(sample(name, reps[name]) * 1e3 / reps[name])
            except WorkerError as exc:
                errors[name] = f"failed while timing: {exc}"
                names.remove(name)
                del samples[name]
        if "ort" not in names or (r + 1 >= min_rounds and time.perf_counter() - start > budget_s):
            break
    stats = {name: {**_stats(s), "reps": reps[name], "samples_ms": [round(x, 5) for x in s]}
             for name, s in samples.items() if s}
    return stats, errors


def run_case(model: cases.Model, sparsity: float, threads: int, workers: dict, work: Path, opts, log) -> dict:
    """Build, check and time one (model, sparsity, threads) case; returns its record."""
    tag = f"{model.path.stem}_s{int(round(sparsity * 100))}"
    record = {
        "kind": model.kind, "model": model.label, "shape": model.meta, "tokens": model.tokens,
        "inputs": {k: list(v.shape) for k, v in model.inputs.items()},
        "sparsity": sparsity, "block": cases.BLOCK, "threads": threads, "candidates": {},
    }
    # edgesparse's build (its dispatch rule decides per layer) and the peers' pruned copy
    package = work / "packages" / f"{tag}_t{threads}"
    t0 = time.perf_counter()
    manifest = cases.build_package(model, sparsity, threads, package)
    pruned, by_dispatch, other = cases.eligible_layers(manifest)
    verification = manifest.get("verification", {})
    record["edgesparse"] = {
        "build_s": round(time.perf_counter() - t0, 2),
        "pruned_layers": len(pruned), "kept_dense_by_dispatch": len(by_dispatch),
        "kept_dense_other": len(other),
        "dispatch_sparse": bool(pruned),
        "all_eligible_sparse": bool(pruned) and not by_dispatch,
        "fraction_on_sparse_kernels": verification.get("fraction_on_sparse_kernels"),
        "verification_max_abs_error": verification.get("max_abs_error"),
    }
    peer_path = work / "models" / f"{tag}_pruned.onnx"
    record["peer_layers_pruned"] = len(pruned) + len(by_dispatch)
    record["peer_pruned_zero_fraction"] = cases.peer_model(model, pruned + by_dispatch, sparsity, peer_path)[1]
    es_reference_path = cases.package_dense_equivalent(package, work / "models" / f"{tag}_t{threads}_es_dense.onnx")
    forced = None
    if by_dispatch and "edgesparse" in opts.candidates and not opts.no_forced:
        forced = work / "packages" / f"{tag}_t{threads}_forced"
        forced_manifest = cases.build_package(model, sparsity, threads, forced, force_sparse=True)
        record["edgesparse_forced"] = {
            "pruned_layers": len(cases.eligible_layers(forced_manifest)[0]),
            "fraction_on_sparse_kernels": forced_manifest.get("verification", {}).get("fraction_on_sparse_kernels"),
        }

    inputs_dir = work / "inputs" / model.path.stem
    inputs_dir.mkdir(parents=True, exist_ok=True)
    input_files = {}
    for name, array in model.inputs.items():
        input_files[name] = str(inputs_dir / f"{name}.npy")
        np.save(input_files[name], array)
    input_order = list(model.inputs)
    import onnx

    output_order = [o.name for o in onnx.load(str(peer_path), load_external_data=False).graph.output]

    references = {"peers": _reference(peer_path, model.inputs), "edgesparse": _reference(es_reference_path, model.inputs)}
    if forced is not None:
        references[FORCED] = _reference(cases.package_dense_equivalent(
            forced, work / "models" / f"{tag}_t{threads}_forced_dense.onnx"), model.inputs)
    record["edgesparse_reference_vs_peer_reference"] = _max_error(references["edgesparse"], references["peers"])[0]

    loads = {
        "ort": ("ort", {"model": str(peer_path)}),
        "edgesparse": ("ort", {"model": str(package / manifest["runtime"]["model"]),
                               "libraries": [str(package / p) for p in manifest["runtime"].get("custom_op_libraries", [])]}),
        "deepsparse": ("deepsparse", {"model": str(peer_path), "batch_size": next(iter(model.inputs.values())).shape[0],
                                      "input_order": input_order}),
        "mnn": ("mnn", {"model": str(cases.mnn_compatible(peer_path, peer_path.with_suffix(".mnn.onnx"))), "mnn_model": str(work / "models" / f"{tag}.mnn"),
                        "output_order": output_order, "sparse": True}),
    }
    if forced is not None:
        fm = json.loads((forced / "manifest.json").read_text())
        loads[FORCED] = ("ort", {"model": str(forced / fm["runtime"]["model"]),
                                 "libraries": [str(forced / p) for p in fm["runtime"].get("custom_op_libraries", [])]})
    loaded = {}
    (work / "outputs").mkdir(parents=True, exist_ok=True)
    for name in list(opts.candidates) + ([FORCED] if forced is not None else []):
        worker_name, extra = loads[name]
        entry = {"runtime": worker_name}
        record["candidates"][name] = entry
        if worker_name not in workers:
            entry["error"] = f"{worker_name} worker not running"
            continue
        w = workers[worker_name]
        cid = f"{tag}_t{threads}_{name}"
        try:
            reply = w.request({"op": "load", "id": cid, "threads": threads, "inputs": input_files, **extra})
            entry["load_s"] = round(reply["load_s"], 3)
            entry["info"] = reply.get("info", {})
            outs = w.request({"op": "run", "id": cid, "out": str(work / "outputs" / f"{cid}_")})["outputs"]
            got = [np.load(p) for p in outs]
            ref = references[name if name in ("edgesparse", FORCED) else "peers"]
            error, allowed = _max_error(got, ref)
            entry["max_abs_error"], entry["tolerance"] = error, allowed
            entry["outputs_match"] = bool(error <= allowed)
            if not entry["outputs_match"]:
                entry["error"] = f"outputs differ from ORT on the same weights (max abs error {error:.3g} > {allowed:.3g}): not timed"
                w.request({"op": "drop", "id": cid})
                continue
            loaded[name] = {"worker": worker_name, "id": cid}
        except WorkerError as exc:
            entry["error"] = str(exc)
            entry["outputs_match"] = False
    if "ort" in loaded:
        timing, errors = measure(loaded, workers, sample_ms=opts.sample_ms, budget_s=opts.budget_s,
                                 min_rounds=opts.min_rounds, max_rounds=opts.max_rounds)
        for name, error in errors.items():
            record["candidates"][name]["error"] = error
        dense = timing.get("ort")
        n = min((len(s["samples_ms"]) for s in timing.values()), default=0)
        for name, stats in (timing.items() if dense else ()):
            if len(stats["samples_ms"]) < n or n == 0:
                continue
            paired = np.asarray(dense["samples_ms"][:n]) / np.asarray(stats["samples_ms"][:n])
            record["candidates"][name].update(stats)
            record["candidates"][name]["ratio"] = dense["median_ms"] / stats["median_ms"]
            record["candidates"][name]["paired_ratio"] = float(np.median(paired))
    for name in loaded:
        try:
            workers[loaded[name]["worker"]].request({"op": "drop", "id": loaded[name]["id"]})
        except WorkerError:
            pass
    shutil.rmtree(work / "outputs", ignore_errors=True)
    return record


# --- the run -----------------------------------------------------------------------------------

def fma_peak(work: Path) -> dict | None:
    """One core's FMA peak in GFLOP/s, {"avx2": .., "avx512": ..} (benchmarks/avx2_host/fma_peak.c):
    the yardstick for a runtime's useful GFLOP/s. None where there is no x86-64 C compiler."""
    src = REPO / "benchmarks" / "avx2_host" / "fma_peak.c"
    exe = work / "fma_peak"
    if platform.machine() not in ("x86_64", "AMD64") or not shutil.which("cc"):
        return None
    try:
        subprocess.run(["cc", "-O2", "-o", str(exe), str(src)], check=True, capture_output=True)
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
        return json.loads(out)
    except (subprocess.CalledProcessError, json.JSONDecodeError, OSError):
        return None


def environment(workers: dict) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import edgesparse
    import onnxruntime

    try:
        from edgesparse.kernels.dispatch import current_isa
        isa = current_isa()
    except Exception:  # noqa: BLE001
        isa = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cpus": os.cpu_count(), "kernel_isa": isa, "deepsparse_isa": os.environ.get("NM_ARCH"),
        "load_avg_start": list(os.getloadavg()),
        "python": platform.python_version(), "numpy": np.__version__,
        "edgesparse": edgesparse.__version__, "onnxruntime": onnxruntime.__version__,
        "peers": {k: w.hello for k, w in workers.items() if k != "ort"},
    }


def plan(opts) -> list[tuple]:
    """(model maker, sparsity, threads) in run order."""
    out = []
    if "ffn" in opts.cases:
        for k, n in opts.shapes:
            for m in opts.tokens:
                out.append((("ffn", k, n, m), opts.sparsities, opts.threads))
    if "dwsep" in opts.cases:
        out.append((("dwsep", 1), opts.sparsities, opts.threads))
    if "minilm" in opts.cases:
        out.append((("minilm", 1), opts.sparsities, opts.threads))
    if "sbnn" in opts.cases:
        out.append((("sbnn", 1), opts.sparsities, opts.threads))
    return out


def make_model(spec, work: Path):
    kind = spec[0]
    if kind == "ffn":
        return cases.ffn_model(work, spec[1], spec[2], spec[3]), ""
    if kind == "dwsep":
        return cases.dwsep_model(work, batch=spec[1]), ""
    if kind == "minilm":
        try:
            return cases.minilm_model(work, batch=spec[1]), ""
        except Exception as exc:  # noqa: BLE001 - reported as not available
            return None, f"samples/minilm not available: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if kind == "sbnn":
        return cases.sbnn_model(work, batch=spec[1])
    raise ValueError(kind)


def run(opts, log=print) -> dict:
    work = Path(opts.work or tempfile.mkdtemp(prefix="edgesparse-peers-"))
    work.mkdir(parents=True, exist_ok=True)
    peers = [p for p in PEERS if p in opts.candidates]
    workers = start_workers(work, peers, log=log)
    result = {"environment": environment(workers) | {"fma_peak_gflops": fma_peak(work)}, "method": {
        "sample_ms": opts.sample_ms, "budget_s_per_case": opts.budget_s, "min_rounds": opts.min_rounds,
        "max_rounds": opts.max_rounds, "tolerance": TOLERANCE, "block": cases.BLOCK,
        "quick": opts.quick}, "records": [], "not_available": []}
    try:
        for spec, sparsities, threads in plan(opts):
            model, why = make_model(spec, work)
            if model is None:
                log(f"skipped {spec[0]}: {why}")
                result["not_available"].append({"model": spec[0], "reason": why})
                continue
            for s in sparsities:
                for t in threads:
                    t0 = time.perf_counter()
                    rec = run_case(model, s, t, workers, work, opts, log)
                    result["records"].append(rec)
                    log(summary_line(rec) + f"  ({time.perf_counter() - t0:.0f} s)")
    finally:
        for w in workers.values():
            w.close()
        result["environment"]["load_avg_end"] = list(os.getloadavg())
        result["environment"]["fma_peak_gflops_end"] = fma_peak(work)
        if not opts.work and not opts.keep:
            shutil.rmtree(work, ignore_errors=True)
    return result


def summary_line(rec: dict) -> str:
    parts = [f"{rec['model']:>10} M={rec['tokens']:<3} s={rec['sparsity']:.2f} t={rec['threads']}"]
    for name in (*CANDIDATES, FORCED):
        c = rec["candidates"].get(name)
        if c is None:
            continue
        if "median_ms" in c:
            parts.append(f"{name} {c['median_ms']:.3f}ms x{c['ratio']:.2f}")
        else:
            parts.append(f"{name} -- ({c.get('error', 'n/a')[:60]})")
    if not rec["edgesparse"]["dispatch_sparse"]:
        parts.append("[edgesparse kept dense]")
    return " | ".join(parts)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small case (768x3072, M=8, 90%%, 1 thread), short timing, no docs")
    ap.add_argument("--cases", default="ffn,dwsep,minilm,sbnn", help="comma list of ffn, dwsep, minilm, sbnn")
    ap.add_argument("--tokens", default="1,8,64", help="FFN M values")
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in FFN_SHAPES), help="FFN KxN list")
    ap.add_argument("--sparsities", default="0.5,0.75,0.9")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="subset of ort,edgesparse,deepsparse,mnn (ort is required)")
    ap.add_argument("--sample-ms", type=float, default=3.0, help="target length of one timing sample")
    ap.add_argument("--budget-s", type=float, default=4.0, help="timing budget per case (after min rounds)")
    ap.add_argument("--min-rounds", type=int, default=15)
    ap.add_argument("--max-rounds", type=int, default=61)
    ap.add_argument("--no-forced", action="store_true", help="skip the diagnostic dispatch-bypassed edgesparse build")
    ap.add_argument("--isa", choices=("avx2", "avx512"), help="run edgesparse's and DeepSparse's code for this ISA "
                    "(EDGESPARSE_ISA, NM_ARCH); ORT and MNN keep their best, so on a newer CPU this is pessimistic for both")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--docs", action="store_true", help="rewrite docs/peers.md and docs/peers.png from this run")
    ap.add_argument("--work", help="work folder to use and keep (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.cases, opts.tokens, opts.shapes, opts.sparsities, opts.threads = "ffn", "8", "768x3072", "0.9", "1"
        opts.budget_s, opts.min_rounds, opts.max_rounds = min(opts.budget_s, 0.5), 5, 9
    opts.cases = [c for c in opts.cases.split(",") if c]
    opts.tokens = [int(x) for x in opts.tokens.split(",")]
    opts.shapes = [tuple(int(v) for v in s.split("x")) for s in opts.shapes.split(",")]
    opts.sparsities = [float(x) for x in opts.sparsities.split(",")]
    opts.threads = [int(x) for x in opts.threads.split(",")]
    opts.candidates = [c for c in opts.candidates.split(",") if c]
    bad = [c for c in opts.candidates if c not in CANDIDATES] + [c for c in opts.cases if c not in ("ffn", "dwsep", "minilm", "sbnn")]
    if bad or "ort" not in opts.candidates:
        ap.error(f"unknown names {bad} or ort missing from --candidates")
    return opts


def main(argv=None) -> int:
    opts = parse(argv)
    if opts.isa:  # every worker inherits the environment
        os.environ.update(EDGESPARSE_ISA=opts.isa, NM_ARCH=opts.isa)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = run(opts, log=lambda m: print(m, flush=True))
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1))
    if opts.docs:
        import report

        report.write_docs(result, REPO / "docs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
