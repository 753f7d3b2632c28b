"""Build what benchmarks/gpu/run_h200.sh needs on the GPU machine, here, on a CPU machine with TVM,
nvcc and the edgesparse plugins installed (nothing heavy is built on the GPU machine):

    .venv/bin/python benchmarks/gpu/prepare.py        # ~1-2 minutes, writes benchmarks/gpu/artifacts/

artifacts/
  kernels_sm90.so     the CUDA BlockSparseMatMul kernels (edgesparse_tvm.kernels.cuda_kernel) for the
                      benchmark shapes, fp32 and fp16, several launch configurations each; x86_64
                      host code + sm_90 cubins built by nvcc
  kernels.json        what each kernel is (shape, dtype, threads, unroll, default or not)
  package/            an edgesparse package built by the jetson target for host x86_64 with cubins
                      for sm_87 and sm_90 (a pruned FFN with a dense layer left for dlight)
  ops_sm90.so         the CUDA BlockSparseConv and GatheredFFN kernels (edgesparse_tvm.kernels_conv,
  ops.json            kernels_ffn) for ResNet-style convolutions and an LLM-size gated FFN
  package_ops/        a jetson package (host x86_64, sm_87 + sm_90) of a graph holding every edgesparse
                      operator (3 BlockSparseConv, 2 GatheredFFN, a BlockSparseMatMul), verified here on
                      the CPU module against ONNX Runtime's dense equivalent
  runtime/            libtvm_runtime.so, libtvm_runtime_cuda.so (+ cudart/libcudart.so.13 as a fallback)
  wheels/             apache-tvm-ffi wheels for CPython 3.10-3.13 (the GPU machine's Python is unknown)

Then, in the session that has the GPU:  run(command="bash benchmarks/gpu/run_h200.sh",
carry=["benchmarks/gpu/artifacts"]).  Everything here is git-ignored (~35 MB).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ART = HERE / "artifacts"
SHAPES = ((4096, 11008), (11008, 4096))
TOKENS = (1, 8)
DTYPES = ("float32", "float16")
THREADS = (128, 256, 512)
UNROLLS = (4, 8)
BLOCK = 16
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# BlockSparseConv cases (batch 1, padding k // 2 applied to the input beforehand, 16-channel groups):
# (C, O, H, W, k, stride): ResNet-50 stage shapes
CONV_CASES = ((64, 64, 56, 56, 3, 1), (128, 128, 28, 28, 3, 1), (256, 256, 14, 14, 3, 1), (256, 1024, 14, 14, 1, 1))
# GatheredFFN: LLaMA-7B FFN (D 4096, I 11008 = 43 experts of 256 neurons, gated SiLU), 11 experts
# active (26% of the neurons), M = 1 and 8 tokens
FFN_CASE = {"D": 4096, "I": 11008, "S": 256, "active": 11, "tokens": (1, 8), "activation": "silu"}


def kernel_name(dtype, m, k, n, threads, unroll, vec, tile):
    return f"bsmm_{dtype}_m{m}_k{k}_n{n}_t{threads}_u{unroll}_v{vec}_tt{tile}"


def variants(k, n, m, dtype):
    """The default launch configuration first, then single-parameter changes around it."""
    from edgesparse_tvm import kernels

    threads = kernels.cuda_threads(-(-n // BLOCK))
    lv = 4 if dtype == "float32" else 8
    tile = min(m, kernels.CUDA_MAX_TOKEN_TILE)
    base = {"threads": threads, "unroll": kernels.CUDA_UNROLL, "vec": lv, "tile": tile}
    out = [dict(base, default=True)]
    out += [dict(base, threads=t, default=False) for t in THREADS if t != threads]
    out += [dict(base, unroll=u, default=False) for u in UNROLLS if u != base["unroll"]]
    out += [dict(base, vec=v, default=False) for v in (2 * lv, 4 * lv) if v <= BLOCK and v * tile <= 64]
    if m > 4:
        out.append(dict(base, tile=4, default=False))
    return out


def build_kernels():
    import tvm
    from edgesparse_tvm import ModuleSpec, kernels
    from edgesparse_tvm.build import compile_ir, export

    funcs, table = {}, []
    for k, n in SHAPES:
        for m in TOKENS:
            for dtype in DTYPES:
                for v in variants(k, n, m, dtype):
                    name = kernel_name(dtype, m, k, n, v["threads"], v["unroll"], v["vec"], v["tile"])
                    f = kernels.cuda_kernel(m, k, n, BLOCK, "none", dtype, threads=v["threads"], unroll=v["unroll"],
                                            vec=v["vec"], token_tile=v["tile"])
                    funcs[name] = f.with_attr("global_symbol", name)
                    table.append({"name": name, "K": k, "N": n, "M": m, "dtype": dtype, "block": BLOCK, **v})
    spec = ModuleSpec("kernels_sm90", "cuda", "x86_64", mcpu="x86-64-v3", arches=("sm_90",))
    executable, _ = compile_ir(tvm.IRModule(funcs), spec)
    info = export(executable, spec, ART / "kernels_sm90.so")
    (ART / "kernels.json").write_text(json.dumps({"kernels": table, "cuda": info["cuda"],
                                                  "activation": "none", "bias": "zeros"}, indent=1))
    print(f"kernels: {len(funcs)} -> {ART / 'kernels_sm90.so'} ({info['cuda']})")


def build_op_kernels():
    import tvm
    from edgesparse_tvm import ModuleSpec, kernels_conv, kernels_ffn
    from edgesparse_tvm.build import compile_ir, export

    funcs, table = {}, []
    for c, o, h, w, k, stride in CONV_CASES:
        hp, wp = h + 2 * (k // 2), w + 2 * (k // 2)
        for threads in (kernels_conv.CUDA_THREADS, 256):  # the default first, then one alternative
            name = f"conv_c{c}_o{o}_h{hp}_w{wp}_k{k}_s{stride}_t{threads}"
            funcs[name] = kernels_conv.conv_cuda_kernel(1, c, hp, wp, o, (k, k), BLOCK, (stride, stride), (1, 1), "relu",
                                                        threads=threads)
            table.append({"name": name, "op": "BlockSparseConv", "N": 1, "C": c, "O": o, "H": h, "W": w, "HP": hp, "WP": wp,
                          "k": k, "stride": stride, "block": BLOCK, "activation": "relu", "threads": threads,
                          "default": threads == kernels_conv.CUDA_THREADS})
    f = FFN_CASE
    e = f["I"] // f["S"]
    for m in f["tokens"]:
        # more threads per CTA split D further (more loads in flight when few CTAs run); the
        # partial-sum buffers must stay under 48 KB of static shared memory: 1024 only at M = 1
        for threads in (kernels_ffn.CUDA_THREADS, 512) + ((1024,) if m == 1 else ()):
            up, down = f"ffn_up_m{m}_t{threads}", f"ffn_down_m{m}_t{threads}"
            funcs[up] = kernels_ffn.ffn_up_cuda(m, e, f["D"], f["S"], True, f["activation"], threads=threads)
            funcs[down] = kernels_ffn.ffn_down_cuda(m, e, f["S"], f["D"], threads=threads)
            table.append({"name": up, "down": down, "op": "GatheredFFN", "M": m, "D": f["D"], "E": e, "S": f["S"],
                          "D_out": f["D"], "active": f["active"], "gated": True, "activation": f["activation"],
                          "threads": threads, "default": threads == kernels_ffn.CUDA_THREADS})
    funcs = {n: fn.with_attr("global_symbol", n) for n, fn in funcs.items()}
    spec = ModuleSpec("ops_sm90", "cuda", "x86_64", mcpu="x86-64-v3", arches=("sm_90",))
    executable, _ = compile_ir(tvm.IRModule(funcs), spec)
    info = export(executable, spec, ART / "ops_sm90.so")
    (ART / "ops.json").write_text(json.dumps({"kernels": table, "cuda": info["cuda"]}, indent=1))
    print(f"op kernels: {len(funcs)} -> {ART / 'ops_sm90.so'} ({info['cuda']})")


def build_ops_package():
    """Every edgesparse operator in one graph through the jetson target (no pass: the graph is
    already sparse), with the inputs the reference was computed on."""
    import onnx
    from edgesparse_tvm.testing import sparse_ops_model

    model, inputs = sparse_ops_model()
    with tempfile.TemporaryDirectory() as tmp:
        src, data, out = Path(tmp) / "ops.onnx", Path(tmp) / "inputs.npz", Path(tmp) / "package_ops"
        onnx.save(model, str(src))
        np.savez(data, **inputs)
        env = {**os.environ, "EDGESPARSE_JETSON_HOST": "x86_64", "EDGESPARSE_JETSON_ARCHES": "sm_87,sm_90"}
        subprocess.run([sys.executable, "-m", "edgesparse", "build", str(src), "--target", "jetson", "--inputs", str(data),
                        "-o", str(out)], check=True, env=env)
        shutil.rmtree(ART / "package_ops", ignore_errors=True)
        shutil.copytree(out, ART / "package_ops")
    print(f"package with every operator -> {ART / 'package_ops'}")


def ffn_model(d=768, hidden=3072, seed=0):
    """x[batch, d] -> Linear+GELU -> Linear -> Linear (kept dense) -> y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = lambda a, b: numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{a}x{b}_{rng.integers(1 << 30)}")
    w1, w2, w3 = w(d, hidden), w(hidden, d), w(d, d)
    b1 = numpy_helper.from_array((0.1 * rng.standard_normal(hidden)).astype(np.float32), "b1")
    nodes = [helper.make_node("MatMul", ["x", w1.name], ["h0"], name="up"),
             helper.make_node("Add", ["h0", "b1"], ["h1"], name="up_bias"),
             helper.make_node("Gelu", ["h1"], ["h"], name="act", domain=""),
             helper.make_node("MatMul", ["h", w2.name], ["z"], name="down"),
             helper.make_node("MatMul", ["z", w3.name], ["y"], name="proj_dense")]
    graph = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])], [w1, w2, w3, b1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    return model


def build_package():
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "ffn.onnx"
        onnx.save(ffn_model(), str(src))
        env = {**os.environ, "EDGESPARSE_JETSON_HOST": "x86_64", "EDGESPARSE_JETSON_ARCHES": "sm_87,sm_90"}
        out = Path(tmp) / "package"
        subprocess.run([sys.executable, "-m", "edgesparse", "build", str(src), "--target", "jetson",
                        "--pass", "magnitude:sparsity=0.75,block=16,skip=proj_dense", "-o", str(out)],
                       check=True, env=env)
        shutil.rmtree(ART / "package", ignore_errors=True)
        shutil.copytree(out, ART / "package")
    print(f"package -> {ART / 'package'}")


def copy_runtime():
    import tvm
    import tvm_ffi

    lib = Path(tvm.__file__).parent / "lib"
    dest = ART / "runtime"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy2(lib / name, dest / name)
    cudart = next((p for p in (Path("/usr/local/cuda/lib64/libcudart.so.13"),
                               Path("/usr/local/cuda/targets/x86_64-linux/lib/libcudart.so.13")) if p.exists()), None)
    if cudart is not None:
        (dest / "cudart").mkdir(exist_ok=True)
        shutil.copy2(cudart.resolve(), dest / "cudart" / "libcudart.so.13")
    wheels = ART / "wheels"
    wheels.mkdir(exist_ok=True)
    for py in PYTHONS:
        tag = "cp" + py.replace(".", "")
        if any(wheels.glob(f"apache_tvm_ffi-{tvm_ffi.__version__}-{tag}-*.whl")):
            continue
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux_2_28_x86_64", "--python-version", py, "-d", str(wheels),
                        f"apache-tvm-ffi=={tvm_ffi.__version__}"], check=True)
    print(f"runtime -> {dest}; wheels: {sorted(p.name for p in wheels.glob('*.whl'))}")


if __name__ == "__main__":
    ART.mkdir(parents=True, exist_ok=True)
    copy_runtime()
    build_kernels()
    build_op_kernels()
    build_package()
    build_ops_package()
    size = sum(p.stat().st_size for p in ART.rglob("*") if p.is_file())
    print(f"artifacts: {size / 1e6:.1f} MB")
