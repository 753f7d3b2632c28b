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
4. every operator: a second jetson package (3 BlockSparseConv, 2 GatheredFFN, 1 BlockSparseMatMul)
   on the GPU against its reference; the conv kernel vs cuDNN on ResNet-50 stage shapes at 75%
   and the gathered FFN (LLaMA-7B size, 11 of 43 experts) vs the dense FFN on cuBLAS, each with
   its max abs error (informational timings: no bar for these two).

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


def plain_time(fn, calls):
    """us per call of `calls` back-to-back launches (CUDA events)."""
    import torch

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) * 1000.0 / calls


def make_graph(fn, calls):
    """A CUDA graph of `calls` calls of fn (warmed up on a side stream first)."""
    import torch

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
    import torch

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) * 1000.0 / calls


def interleaved(fns: dict, rounds: int, calls: int) -> dict:
    """{name: {"plain": quantiles, "graph": quantiles or None}}: every function once per round."""
    graphs = {}
    for name, fn in fns.items():
        try:
            graphs[name] = make_graph(fn, calls)
        except Exception as exc:  # capture not possible: plain timing only
            graphs[name] = None
            print(f"  graph capture failed for {name}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}", flush=True)
    plain = {n: [] for n in fns}
    graph = {n: [] for n in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            plain[name].append(plain_time(fn, calls))
            if graphs[name] is not None:
                graph[name].append(graph_time(graphs[name], calls))
    return {n: {"plain": quantiles(plain[n]), "graph": quantiles(graph[n]) if graph[n] else None} for n in fns}


def speedup(times: dict, ours: str, theirs: str) -> tuple[float, str]:
    """theirs / ours on CUDA-graph medians when both captured, else on plain launches."""
    a, b = times[ours], times[theirs]
    kind = "graph" if a["graph"] and b["graph"] else "plain"
    return b[kind]["median_us"] / a[kind]["median_us"], kind


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
    ops = json.loads((art / "ops.json").read_text())["kernels"]
    ops_blob = (art / "ops_sm90.so").read_bytes()
    names = [k["name"] for k in ops] + [k["down"] for k in ops if "down" in k]
    try:  # the bench's own conv packer against edgesparse's (needs the edgesparse package)
        from edgesparse.kernels import pack_block_sparse_conv

        wc = pruned_conv_weight(40, 24, 3, 16, seed=1)
        mine, theirs = pack_conv(wc, 16), pack_block_sparse_conv(wc, 16)
        packer_ok = all(np.array_equal(mine[k], theirs[k]) for k in theirs)
    except ImportError:
        packer_ok = None
    return {
        "package": check_package(runner, art / "package", f"cpu_{platform.machine()}", art / "runtime"),
        "package_ops": check_package(runner, art / "package_ops", f"cpu_{platform.machine()}", art / "runtime"),
        "package_ops_cubins": cubin_arches(art / "package_ops" / "tvm" / "cuda_x86_64.so"),
        "op_symbols_missing": [n for n in names if f"__tvm_ffi_{n}".encode() not in ops_blob],
        "op_cubins": cubin_arches(art / "ops_sm90.so"),
        "conv_packer_matches_edgesparse": packer_ok,
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
    try:
        result["package_ops"] = check_package(runner, art / "package_ops", "cuda_x86_64", art / "runtime")
    except Exception as exc:
        result["package_ops"] = {"passed": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"}
    print(f"package with every operator on GPU: {result['package_ops']}", flush=True)

    kmod = tvm_ffi.load_module(str(art / "kernels_sm90.so"))
    table = json.loads((art / "kernels.json").read_text())["kernels"]
    tdev = tvm_ffi.device("cuda", 0)

    def stream_ctx():
        return tvm_ffi.use_raw_stream(tdev, torch.cuda.current_stream().cuda_stream)

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
                times = interleaved(fns, args.rounds, args.calls)
                blas_p, blas_g = times["cublas"]["plain"], times["cublas"]["graph"]
                for v in variants:
                    name = v["name"]
                    kp, kg = times[name]["plain"], times[name]["graph"]
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
    try:  # informational: conv and gathered-FFN kernels vs cuDNN / cuBLAS
        result["ops"] = ops_run(args, stream_ctx)
    except Exception as exc:
        result["ops"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"}
        print(f"op kernels failed: {result['ops']['error']}", flush=True)
    return result


def pack_conv(w: np.ndarray, block: int) -> dict:
    """BlockSparseConv packing (as edgesparse.kernels.pack_block_sparse_conv, which needs the
    edgesparse package; --cpu-check compares the two)."""
    o, c, kh, kw = w.shape
    nb = -(-o // block)
    padded = np.zeros((nb * block, c, kh * kw), np.float32)
    padded[:o] = w.reshape(o, c, kh * kw)
    groups = padded.reshape(nb, block, c, kh * kw).transpose(0, 2, 3, 1)
    keep = np.any(groups != 0, axis=(2, 3))
    rows, cs = np.nonzero(keep)
    row_ptr = np.zeros(nb + 1, np.int32)
    np.cumsum(keep.sum(axis=1), out=row_ptr[1:])
    return {"values": np.ascontiguousarray(groups[rows, cs]).reshape(-1, kh * kw, block),
            "c_index": cs.astype(np.int32), "row_ptr": row_ptr}


def pruned_conv_weight(o: int, c: int, k: int, block: int, seed: int) -> np.ndarray:
    """W [O, C, k, k] with exactly SPARSITY of its (block output channels x 1 input channel) groups zero."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)).astype(np.float32)
    nb = -(-o // block)
    keep = np.zeros(nb * c, bool)
    keep[rng.permutation(nb * c)[: int(round((1 - SPARSITY) * nb * c))]] = True
    return w * np.repeat(keep.reshape(nb, c), block, axis=0)[:o, :, None, None]


def ops_run(args, stream_ctx) -> dict:
    """BlockSparseConv vs cuDNN (F.conv2d on the dense pruned weights, same padded input, TF32
    off) and GatheredFFN vs the dense FFN on cuBLAS; max abs error vs the dense fp32 result."""
    import torch
    import torch.nn.functional as F
    import tvm_ffi

    dev = torch.device("cuda:0")
    art = args.artifacts
    kmod = tvm_ffi.load_module(str(art / "ops_sm90.so"))
    table = json.loads((art / "ops.json").read_text())["kernels"]
    wrap = lambda *ts: [tvm_ffi.from_dlpack(t) for t in ts]
    records = []
    convs = [k for k in table if k["op"] == "BlockSparseConv"]
    shapes = sorted({(k["C"], k["O"], k["HP"], k["WP"], k["k"], k["stride"]) for k in convs})
    for i, (C, O, HP, WP, K, stride) in enumerate(shapes):
        variants = [k for k in convs if (k["C"], k["O"], k["HP"], k["WP"], k["k"], k["stride"]) == (C, O, HP, WP, K, stride)]
        w = pruned_conv_weight(O, C, K, variants[0]["block"], seed=100 + i)
        packed = pack_conv(w, variants[0]["block"])
        x = torch.randn(1, C, HP, WP, device=dev)
        wt = torch.from_numpy(w).to(dev)
        vals, cidx, rptr = (torch.from_numpy(packed[n]).to(dev) for n in ("values", "c_index", "row_ptr"))
        bias = torch.zeros(O, device=dev)
        ref = torch.relu(F.conv2d(x, wt, stride=stride))
        tol = 2e-3 * max(1.0, float(ref.abs().max()))
        fns, outs = {"cudnn": lambda x=x, wt=wt, stride=stride: F.conv2d(x, wt, stride=stride)}, {}
        for v in variants:
            outs[v["name"]] = torch.empty_like(ref)
            f, a = kmod[v["name"]], wrap(x, vals, cidx, rptr, bias, outs[v["name"]])

            def ours(f=f, a=a):
                with stream_ctx():
                    f(*a)
            fns[v["name"]] = ours
            ours()
        torch.cuda.synchronize()
        times = interleaved(fns, args.rounds, args.calls)
        for v in variants:
            error = float((outs[v["name"]] - ref).abs().max())
            ratio, kind = speedup(times, v["name"], "cudnn")
            records.append({**v, "sparsity": SPARSITY, "max_abs_error": error, "tolerance": tol, "error_ok": error <= tol,
                            "times": {"cudnn": times["cudnn"], "tir": times[v["name"]]}, "timing": kind,
                            "speedup_vs_cudnn": ratio})
            print(f"  conv {v['name']}: {ratio:.2f}x cuDNN ({kind}), err {error:.2e}", flush=True)

    ffn = [k for k in table if k["op"] == "GatheredFFN"]
    if ffn:
        c = ffn[0]
        e, d, s, d_out = c["E"], c["D"], c["S"], c["D_out"]
        gen = torch.Generator(device=dev).manual_seed(7)
        rand = lambda *shape, scale=1.0: torch.randn(*shape, device=dev, generator=gen) * scale
        w_up, w_gate = rand(e, d, s, scale=d ** -0.5), rand(e, d, s, scale=d ** -0.5)
        w_down = rand(e, s, d_out, scale=(e * s) ** -0.5)
        b_up, b_gate, b_down = rand(e, s, scale=0.1), rand(e, s, scale=0.1), rand(d_out, scale=0.1)
        experts = torch.randperm(e, device=dev, generator=gen)[: c["active"]].to(torch.int32)
        sel = experts.long()
        # the dense FFN a user runs without edgesparse: all I neurons, three cuBLAS matmuls
        wu_full, wg_full = (t.permute(1, 0, 2).reshape(d, e * s).contiguous() for t in (w_up, w_gate))
        wd_full = w_down.reshape(e * s, d_out).contiguous()
        bu_full, bg_full = b_up.reshape(-1), b_gate.reshape(-1)
        act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}.get(c["activation"], lambda v: v)
        weight_bytes = 3 * len(sel) * d * s * 4
        for m in sorted({k["M"] for k in ffn}):
            variants = [k for k in ffn if k["M"] == m]
            x = rand(m, d)
            hs = act(torch.einsum("md,ads->mas", x, w_gate[sel]) + b_gate[sel]) * (torch.einsum("md,ads->mas", x, w_up[sel]) + b_up[sel])
            ref = torch.einsum("mas,aso->mo", hs, w_down[sel]) + b_down
            tol = 2e-3 * max(1.0, float(ref.abs().max()))

            def dense(x=x):
                return (act(x @ wg_full + bg_full) * (x @ wu_full + bu_full)) @ wd_full + b_down
            fns, outs = {"dense": dense}, {}
            for v in variants:
                h = torch.empty(m, len(sel) * s, device=dev)
                outs[v["name"]] = torch.empty(m, d_out, device=dev)
                up, down = kmod[v["name"]], kmod[v["down"]]
                a_up = wrap(x, experts, w_up, w_gate, b_up, b_gate, h)
                a_down = wrap(h, experts, w_down, b_down, outs[v["name"]])

                def ours(up=up, down=down, a_up=a_up, a_down=a_down):
                    with stream_ctx():
                        up(*a_up)
                        down(*a_down)
                fns[v["name"]] = ours
                ours()
            torch.cuda.synchronize()
            times = interleaved(fns, args.rounds, args.calls)
            for v in variants:
                error = float((outs[v["name"]] - ref).abs().max())
                ratio, kind = speedup(times, v["name"], "dense")
                t_us = times[v["name"]][kind]["median_us"]
                records.append({**v, "max_abs_error": error, "tolerance": tol, "error_ok": error <= tol,
                                "times": {"dense": times["dense"], "tir": times[v["name"]]}, "timing": kind,
                                "speedup_vs_dense_ffn": ratio, "active_fraction": len(sel) / e,
                                "weight_GBps": weight_bytes / (t_us * 1e-6) / 1e9})
                print(f"  gathered FFN {v['name']}: {ratio:.2f}x the dense FFN ({kind}), "
                      f"{weight_bytes / (t_us * 1e-6) / 1e9:.0f} GB/s of expert weights, err {error:.2e}", flush=True)
    return {"records": records, "correct": bool(records) and all(r["error_ok"] for r in records)}


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
    summary = {k: v for k, v in result.items() if k not in ("kernels", "ops")}
    if isinstance(result.get("ops"), dict):  # one line per conv / FFN case
        summary["ops"] = result["ops"].get("error") or [
            {k: r.get(k) for k in ("name", "max_abs_error", "error_ok", "speedup_vs_cudnn", "speedup_vs_dense_ffn") if k in r}
            for r in result["ops"]["records"]]
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    if not args.cpu_check and not (result["package"]["passed"] and result["package_ops"]["passed"]):
        sys.exit(3)


if __name__ == "__main__":
    main()
