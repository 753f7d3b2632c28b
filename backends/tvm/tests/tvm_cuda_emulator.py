"""Run the CUDA C++ that TVM generates for the hand-written kernels on the CPU, to check their
indexing, guards and reductions without a GPU: one std::thread per CUDA thread of a block,
blocks one after another, `__syncthreads` as a std::barrier, `__shared__` arrays static (shared
by the threads of the running block), warp shuffles through a block-wide exchange buffer (valid
because every thread of these kernels reaches each shuffle). It says nothing about speed or the
GPU's memory model; fp32 kernels only.
"""
from __future__ import annotations

import ctypes
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

PRELUDE = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>
struct es_dim3 { unsigned x, y, z; };
static thread_local es_dim3 threadIdx, blockIdx;
static std::barrier<>* es_barrier;
static float es_exchange[1024];
static inline void __syncthreads() { es_barrier->arrive_and_wait(); }
static inline unsigned __activemask() { return 0xffffffffu; }
static inline float __shfl_xor_sync(unsigned, float v, int lane_mask, int = 32) {
  unsigned t = threadIdx.x;
  es_exchange[t] = v;
  __syncthreads();
  float r = es_exchange[t ^ (unsigned)lane_mask];
  __syncthreads();
  return r;
}
struct alignas(16) float4 { float x, y, z, w; };
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
using std::max;
using std::min;
"""

KERNEL = re.compile(r'extern "C" __global__ void __launch_bounds__\((\d+)\) (\w+)\(([^)]*)\)\s*\{')


def _launcher(name: str, threads: int, params: str) -> str:
    args = ", ".join(p.split()[-1] for p in params.split(","))
    return f"""
extern "C" void es_launch_{name}(unsigned gx, unsigned gy, unsigned gz, {params}) {{
  for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y) for (unsigned x = 0; x < gx; ++x) {{
    std::barrier<> bar({threads});
    es_barrier = &bar;
    std::vector<std::thread> team;
    for (unsigned t = 0; t < {threads}u; ++t)
      team.emplace_back([=] {{ threadIdx = {{t, 0, 0}}; blockIdx = {{x, y, z}}; {name}({args}); }});
    for (auto& th : team) th.join();
  }}
}}
"""


class Emulated:
    """The kernels of one TVM IRModule of CUDA PrimFuncs, compiled for the CPU."""

    def __init__(self, funcs: dict, workdir: Path | None = None):
        import tvm

        module = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
        target = tvm.target.Target({"kind": "cuda", "arch": "sm_87"}, host={"kind": "llvm"})
        source = tvm.compile(module, target=target).mod.imports[0].inspect_source()
        self.source = source
        body = source[source.index('extern "C"'):]          # TVM's preamble includes cuda.h
        body = re.sub(r"__shared__ (alignas\(\d+\) )?", r"\1static ", body)  # one block runs at a time
        self.kernels = {}
        launchers = []
        for threads, name, params in {m.groups() for m in KERNEL.finditer(body)}:
            self.kernels[name[: -len("_kernel")]] = (name, int(threads), [p.strip() for p in params.split(",")])
            launchers.append(_launcher(name, int(threads), params))
        self._tmp = tempfile.TemporaryDirectory(prefix="es-cuda-emu-")
        src = Path(self._tmp.name) / "emu.cpp"
        src.write_text(PRELUDE + body + "".join(launchers))
        lib = src.with_suffix(".so")
        result = subprocess.run(["g++", "-std=c++20", "-O0", "-pthread", "-shared", "-fPIC", "-w", "-o", str(lib), str(src)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"the emulated CUDA source does not compile: {result.stderr[:3000]}")
        self.lib = ctypes.CDLL(str(lib))

    def launch(self, kernel: str, grid, buffers: dict[str, np.ndarray], scalars: dict[str, int] | None = None):
        """Run `kernel` (the PrimFunc's name) over grid (x[, y[, z]]); buffers by TIR buffer name
        (written in place), symbolic sizes by name."""
        name, _, params = self.kernels[kernel]
        grid = [int(g) for g in grid] + [1] * (3 - len(grid))
        args = []
        for p in params:
            ident = p.split()[-1]
            if "*" in p:
                array = buffers[ident[: -len("_ptr")]]
                assert array.flags.c_contiguous
                args.append(ctypes.c_void_p(array.ctypes.data))
            else:
                args.append(ctypes.c_int64(int((scalars or {})[ident])))
        getattr(self.lib, f"es_launch_{name}")(*[ctypes.c_uint(g) for g in grid], *args)
