"""The GPU check of the tvm backend's CUDA kernels, run by run_h200.sh on a machine with an NVIDIA
GPU (written for an H200, sm_90), torch and nvcc, but no TVM: only TVM's runtime libraries and the
prebuilt artifacts (see prepare.py). Builds nothing.

1. package: the jetson-target package built for host x86_64 with sm_87+sm_90 cubins runs on the
   GPU through its runtime-only runner; max abs error vs the reference recorded at build time.
2. kernel: BlockSparseMatMul (16x1 blocks, 75% of blocks dropped) vs cuBLAS (torch.matmul on the
   dense pruned weights, TF32 off) at K x N = 4096 x 11008 and 11008 x 4096, M = 1 and 8, fp32 and
   fp16; max abs error vs an fp32 dense reference; interleaved rounds, medians, each side timed as
   a CUDA graph of back-to-back calls (launch overhead excluded for both) and as plain launches.
3. bar: fp32 default kernel >= 3x cuBLAS at M=1 and >= 2.5x at M=8 on both shapes.

Writes $OUT/h200_results.json. `--cpu-check` runs the parts that need no GPU (used by the tests
of this script on CPU machines).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SPARSITY = 0.75
BAR = {1: 3.0, 8: 2.5}


def load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pruned_weight(k: int, n: int, block: int, seed: int) -> np.ndarray:
    """W [K, N] with exactly SPARSITY of its block x 1 blocks zero, chosen at random."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    nb = n // block
    keep = np.zeros(k * nb, bool)
    keep[rng.permutation(k * nb)[: int(round((1 - SPARSITY) * k * nb))]] = True
    return w * np.repeat(keep.reshape(k, nb), block, axis=1)


def quantiles(samples: list[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_us": q[1], "p25_us": q[0], "p75_us": q[2], "n": len(samples)}


def cubin_arches(path: Path) -> list[str]:
    blob = path.read_bytes()
    found, start = set(), 0
    while (i := blob.find(b"\x7fELF", start)) >= 0:
        start = i + 4
        if blob[i + 4] == 2 and int.from_bytes(blob[i + 18:i + 20], "little") == 190:
            flags = int.from_bytes(blob[i + 48:i + 52], "little")
            found.add(f"sm_{(flags >> 8) & 0xFF if blob[i + 8] >= 8 else flags & 0xFF}")
    return sorted(found)


def check_package(runner, package: Path, module: str, libdir: Path) -> dict:
    data = np.load(package / "verification.npz")
    inputs = {k.split(":", 1)[1]: data[k] for k in data.files if k.startswith("input:")}
    expected = [data[k] for k in data.files if k.startswith("output:")]
    model = runner.load(package, module=module, libdir=str(libdir))
    got = model.run(inputs)
    error = max(float(np.abs(g.astype(np.float64) - e).max()) for g, e in zip(got, expected))
    tolerance = json.loads((package / "manifest.json").read_text())["verification"]["tolerance"]
    return {"module": module, "max_abs_error": error, "tolerance": tolerance, "passed": error <= tolerance}


def cpu_check(args, runner, blocksparse) -> dict:
    art = args.artifacts
    table = json.loads((art / "kernels.json").read_text())["kernels"]
    blob = (art / "kernels_sm90.so").read_bytes()
    missing = [k["name"] for k in table if f"__tvm_ffi_{k['name']}".encode() not in blob]
    t = time.perf_counter()
    w = pruned_weight(4096, 11008, 16, 0)
    packed = blocksparse.pack_block_sparse(w, 16)
    pack_s = time.perf_counter() - t
    return {
        "package": check_package(runner, art / "package", f"cpu_{platform.machine()}", art / "runtime"),
        "kernel_symbols_missing": missing,
        "kernel_cubins": cubin_arches(art / "kernels_sm90.so"),
        "package_cubins": cubin_arches(art / "package" / "tvm" / "cuda_x86_64.so"),
        "pack_4096x11008_s": pack_s,
        "kept_fraction": float(len(packed["k_index"]) / (4096 * 11008 // 16)),
    }


def gpu_run(args, runner, blocksparse) -> dict:
    import torch
    import tvm_ffi

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda:0")
    torch.cuda.init()
    art = args.artifacts
    result = {"gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
              "torch": torch.__version__, "torch_cuda": torch.version.cuda, "tvm_ffi": tvm_ffi.__version__}
    runner.load_runtime("cuda", libdir=str(art / "runtime"))
    try:  # a failure here must not cost the kernel measurements
        result["package"] = check_package(runner, art / "package", "cuda_x86_64", art / "runtime")
    except Exception as exc:
        result["package"] = {"passed": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"}
    print(f"package on GPU: {result['package']}", flush=True)

    kmod = tvm_ffi.load_module(str(art / "kernels_sm90.so"))
    table = json.loads((art / "kernels.json").read_text())["kernels"]
    tdev = tvm_ffi.device("cuda", 0)

    def stream_ctx():
        return tvm_ffi.use_raw_stream(tdev, torch.cuda.current_stream().cuda_stream)

    def plain_time(fn, calls):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) * 1000.0 / calls

    def make_graph(fn, calls):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        return graph

    def graph_time(graph, calls):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) * 1000.0 / calls

    records = []
    shapes = sorted({(k["K"], k["N"]) for k in table})
    for si, (K, N) in enumerate(shapes):
        t0 = time.perf_counter()
        w = pruned_weight(K, N, 16, seed=si)
        packed = blocksparse.pack_block_sparse(w, 16)
        print(f"{K}x{N}: weights and packing {time.perf_counter() - t0:.1f} s, kept {len(packed['k_index'])} blocks", flush=True)
        w32 = torch.from_numpy(w).to(dev)
        k_index = torch.from_numpy(packed["k_index"]).to(dev)
        row_ptr = torch.from_numpy(packed["row_ptr"]).to(dev)
        for dtype_name in sorted({k["dtype"] for k in table}):
            dt = getattr(torch, dtype_name)
            values = torch.from_numpy(packed["values"]).to(dev).to(dt)
            w_dense = w32.to(dt)
            bias = torch.zeros(N, dtype=dt, device=dev)
            for M in sorted({k["M"] for k in table}):
                x = (torch.randn(M, K, device=dev)).to(dt)
                ref = x.float() @ w_dense.float()  # the weights as the kernel sees them (fp16-rounded for fp16)
                scale = float(ref.abs().max())
                y_blas = torch.empty(M, N, dtype=dt, device=dev)
                variants = [k for k in table if (k["K"], k["N"], k["M"], k["dtype"]) == (K, N, M, dtype_name)]
                ys = {v["name"]: torch.empty(M, N, dtype=dt, device=dev) for v in variants}
                fns = {"cublas": lambda: torch.matmul(x, w_dense, out=y_blas)}
                for v in variants:
                    f = kmod[v["name"]]
                    args_ = [tvm_ffi.from_dlpack(t) for t in (x, values, k_index, row_ptr, bias, ys[v["name"]])]

                    def call(f=f, a=args_):
                        with stream_ctx():
                            f(*a)
                    fns[v["name"]] = call
                errors = {}
                for name in list(fns):
                    try:
                        fns[name]()
                        torch.cuda.synchronize()
                    except Exception as exc:
                        print(f"  {name} failed: {str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}", flush=True)
                        if name == "cublas":
                            raise
                        del fns[name]
                variants = [v for v in variants if v["name"] in fns]
                if not variants:
                    continue
                errors["cublas"] = float((y_blas.float() - ref).abs().max())
                for v in variants:
                    errors[v["name"]] = float((ys[v["name"]].float() - ref).abs().max())
                graphs = {}
                for name, fn in fns.items():
                    try:
                        graphs[name] = make_graph(fn, args.calls)
                    except Exception as exc:  # capture not possible: plain timing only
                        graphs[name] = None
                        print(f"  graph capture failed for {name}: {str(exc).splitlines()[0][:200]}", flush=True)
                plain = {n: [] for n in fns}
                graph = {n: [] for n in fns}
                for _ in range(args.rounds):  # interleaved: every side once per round
                    for name, fn in fns.items():
                        plain[name].append(plain_time(fn, args.calls))
                        if graphs[name] is not None:
                            graph[name].append(graph_time(graphs[name], args.calls))
                blas_p = quantiles(plain["cublas"])
                blas_g = quantiles(graph["cublas"]) if graph["cublas"] else None
                for v in variants:
                    name = v["name"]
                    kp = quantiles(plain[name])
                    kg = quantiles(graph[name]) if graph[name] else None
                    use_graph = kg is not None and blas_g is not None
                    k_med = kg["median_us"] if use_graph else kp["median_us"]
                    b_med = blas_g["median_us"] if use_graph else blas_p["median_us"]
                    bytes_read = values.numel() * values.element_size() + k_index.numel() * 4
                    tol = (2e-3 if dtype_name == "float32" else 2e-2) * max(1.0, scale)
                    rec = {**v, "sparsity": SPARSITY, "max_abs_error": errors[name], "cublas_max_abs_error": errors["cublas"],
                           "error_ok": errors[name] <= tol, "tolerance": tol,
                           "kernel_plain": kp, "cublas_plain": blas_p, "kernel_graph": kg, "cublas_graph": blas_g,
                           "timing": "cuda graph" if use_graph else "plain launches",
                           "speedup": b_med / k_med, "kernel_GBps": bytes_read / (k_med * 1e-6) / 1e9}
                    records.append(rec)
                mine = [r for r in records if (r["K"], r["N"], r["M"], r["dtype"]) == (K, N, M, dtype_name)]
                best = max([r for r in mine if r["error_ok"]] or mine, key=lambda r: r["speedup"])
                default = next((r for r in records if (r["K"], r["N"], r["M"], r["dtype"]) == (K, N, M, dtype_name) and r["default"]), None)
                line = f"  {dtype_name} M={M}: cuBLAS {b_med:.1f} us; best {best['name']} {best['speedup']:.2f}x"
                if default is not None:
                    line += (f"; default {default['speedup']:.2f}x ({default['kernel_GBps']:.0f} GB/s, "
                             f"err {default['max_abs_error']:.2e}, ok {default['error_ok']})")
                print(line, flush=True)
    result["kernels"] = records
    bar = []
    for (K, N) in shapes:
        for M, need in BAR.items():
            d = next((r for r in records if (r["K"], r["N"], r["M"], r["dtype"]) == (K, N, M, "float32") and r["default"]), None)
            if d is not None:
                bar.append({"K": K, "N": N, "M": M, "need": need, "speedup": d["speedup"], "passed": d["speedup"] >= need and d["error_ok"]})
    result["bar"] = {"checks": bar, "passed": bool(bar) and all(b["passed"] for b in bar)}
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", type=Path, default=HERE / "artifacts")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--cpu-check", action="store_true")
    args = parser.parse_args()
    runner = load_file("edgesparse_package_runner", args.artifacts / "package" / "tvm" / "run.py")
    blocksparse = load_file("edgesparse_blocksparse", ROOT / "edgesparse" / "kernels" / "blocksparse.py")
    started = time.time()
    result = {"host": platform.node(), "python": platform.python_version()}
    result.update(cpu_check(args, runner, blocksparse) if args.cpu_check else gpu_run(args, runner, blocksparse))
    result["wall_s"] = time.time() - started
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / ("cpu_check.json" if args.cpu_check else "h200_results.json")
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "kernels"}, indent=1))
    print(f"wrote {out}")
    if not args.cpu_check and not result["package"]["passed"]:
        sys.exit(3)


if __name__ == "__main__":
    main()
