"""The `jetson` target: NVIDIA Jetson Orin modules (Ampere GPU, sm_87), compiled with Apache TVM.

The package holds `tvm/cuda_aarch64.so`: aarch64 host code (cross-compiled on x86 build
machines) with a fatbin of cubins built by nvcc at build time for every declared GPU
architecture: sm_87 by default, more through `arches=` / $EDGESPARSE_JETSON_ARCHES (any
architecture the installed nvcc compiles for, e.g. sm_110 for Jetson Thor or sm_90 to test on an
H100/H200). On the device it needs TVM's runtime libraries only (see docs/jetson.md).

Verification: the build machine has no Jetson, so the same Relax graph is also compiled for this
machine's CPU (`tvm/cpu_<machine>.so`, role "verify") and run against the reference; the CUDA
kernels themselves are checked on a GPU by benchmarks/gpu/run_h200.sh. On a Jetson, the package
runs its CUDA module.
"""
from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

import numpy as np

from edgesparse import EdgesparseError, Option, RunResult, Target, hookimpl

__version__ = "0.1.0"

ARCHES_ENV = "EDGESPARSE_JETSON_ARCHES"
HOST_ENV = "EDGESPARSE_JETSON_HOST"   # x86_64: host code for a PC with an NVIDIA GPU (testing the kernels)
DEFAULT_ARCHES = ("sm_87",)
# GPUs of Jetson modules, for messages and docs; other architectures nvcc supports are allowed
# (to test the package on a datacenter GPU) and recorded as such.
JETSON_GPUS = {
    "sm_87": "Jetson AGX Orin, Orin NX, Orin Nano (Ampere)",
    "sm_110": "Jetson Thor (Blackwell; CUDA 13 numbering)",
}
RETIRED = {
    "sm_53": "Jetson Nano / TX1", "sm_62": "Jetson TX2", "sm_72": "Jetson AGX Xavier / Xavier NX",
}
ORIN_CPU = "cortex-a78ae"


def _arches_from_env() -> tuple[str, ...] | None:
    value = os.environ.get(ARCHES_ENV)
    if value is None:
        return None
    return tuple(a for a in (s.strip() for s in value.replace("+", ",").split(",")) if a)


class Jetson(Target):
    name = "jetson"
    summary = "NVIDIA Jetson Orin GPUs (sm_87) via Apache TVM; cubins built with nvcc, TVM runtime only on the device"
    backends = ("tvm",)
    machine = "aarch64"
    isa = "sm_87"
    options = (
        Option("arches", tuple, (), f"GPU architectures to build cubins for (default ${ARCHES_ENV} or sm_87)"),
        Option("nvcc", str, "", "nvcc to use (default $EDGESPARSE_NVCC, nvcc on PATH, /usr/local/cuda/bin/nvcc)"),
        Option("host", str, "", f"host CPU of the module: aarch64 (Jetson) or x86_64 (a PC GPU); default ${HOST_ENV} or aarch64"),
    )

    def __init__(self, arches=None, nvcc: str | None = None, host: str | None = None):
        # the same settings as the options, for Python callers
        given = {"arches": tuple(arches) if arches else None, "nvcc": nvcc, "host": host}
        if any(given.values()):
            self._config = {**self.config, **{k: v for k, v in given.items() if v}}

    # -- configuration -----------------------------------------------------------------------------
    @property
    def arches(self) -> tuple[str, ...]:
        from edgesparse_tvm import cuda

        raw = self.config["arches"] or _arches_from_env() or DEFAULT_ARCHES
        for a in raw:
            key = str(a).strip().lower()
            key = f"sm_{key}" if key.isdigit() else key
            if key in RETIRED:
                raise EdgesparseError(f"GPU architecture '{a}' ({RETIRED[key]}) is not supported: CUDA 13's nvcc dropped it")
        return cuda.check_arches(raw, self.nvcc)

    @property
    def nvcc(self) -> str:
        from edgesparse_tvm import cuda

        return cuda.find_nvcc(self.config["nvcc"] or None)

    @property
    def host(self) -> str:
        host = self.config["host"] or os.environ.get(HOST_ENV) or "aarch64"
        if host not in ("aarch64", "x86_64"):
            raise EdgesparseError(f"{HOST_ENV}: unknown host machine '{host}' (aarch64 for Jetson, x86_64 to test on a PC GPU)")
        return host

    def tvm_modules(self):
        from edgesparse_tvm import ModuleSpec

        here, host = platform.machine(), self.host
        specs = [ModuleSpec(f"cuda_{host}", "cuda", host, mcpu=ORIN_CPU if host == "aarch64" else "x86-64-v3",
                            arches=self.arches, nvcc=self.config["nvcc"] or None, role="deploy")]
        if not self.runs_here():  # the build host checks the same graph on its own CPU
            specs.append(ModuleSpec(f"cpu_{here}", "cpu", here, role="verify"))
        return specs

    # -- Target API --------------------------------------------------------------------------------
    def toolchain(self):
        raise EdgesparseError("the jetson target compiles through the tvm backend only (it has no ORT kernel library)")

    def check_environment(self) -> None:
        try:
            import tvm  # noqa: F401
        except ImportError:
            raise EdgesparseError("the jetson target needs Apache TVM: pip install apache-tvm==0.27.0.post1") from None
        from edgesparse_tvm import check_spec

        self.arches  # nvcc present, every architecture known to it
        for spec in self.tvm_modules():
            check_spec(spec)
        if platform.machine() not in ("x86_64", "aarch64"):
            raise EdgesparseError(f"the jetson target builds on x86_64 or aarch64 machines, not {platform.machine()}")
        if shutil.which("g++") is None:
            raise EdgesparseError("the jetson target needs g++ to link the build-host verification module (apt-get install g++)")

    def prefers_sparse(self, op: str, shape: dict, sparsity: float, block: int, threads: int = 1) -> bool:
        """GPU rule (a prior, not measured on Orin yet; benchmarks/gpu measures both kernels).
        BlockSparseMatMul: the CUDA kernel reads each kept weight block once per token tile, so at
        decode-like token counts its time follows the bytes it reads, while a dense GEMV reads all
        of them. Prune from 50% block sparsity on layers big enough not to be bound by launch
        latency (H200 reference: 768x3072 ran ~1.3x at any sparsity, bound by launches; 4096x11008
        ran 3.6x at 75% with a naive kernel). BlockSparseConv: compute-bound, and the direct CUDA
        kernel has none of cuDNN's data reuse, so only from 75% on layers of >= 64K weights."""
        if op == "BlockSparseMatMul":
            k, n = int(shape.get("K", 0)), int(shape.get("N", 0))
            return sparsity >= 0.5 and k * n >= 256 * 1024
        if op == "BlockSparseConv":
            kernel = shape.get("kernel", 1)
            taps = int(np.prod(kernel)) if isinstance(kernel, (list, tuple)) else int(kernel) ** 2
            return sparsity >= 0.75 and int(shape.get("C", 0)) * int(shape.get("O", 0)) * taps >= 64 * 1024
        return False

    def run_package(self, package_dir: Path, inputs, threads: int = 1) -> RunResult:
        import edgesparse_tvm

        here = platform.machine()
        module = f"cuda_{here}" if self.runs_here() else f"cpu_{here}"
        return edgesparse_tvm.run_package(package_dir, inputs, threads, module=module)

    def runs_here(self) -> bool:
        """On a Jetson (or, for host=x86_64 test builds, a PC with an NVIDIA GPU) the build runs
        the CUDA module itself."""
        if platform.machine() != self.host:
            return False
        return Path("/dev/nvhost-ctrl-gpu").exists() or Path("/dev/nvidia0").exists()

    def describe(self) -> dict:
        info = super().describe()
        try:
            arches = list(self.arches)
        except EdgesparseError:
            arches = list(self.config["arches"] or DEFAULT_ARCHES)
        info["gpu_arches"] = arches
        info["machine"] = self.host  # where the deployable module's host code runs
        info["gpus"] = {a: JETSON_GPUS.get(a, "not a Jetson GPU (test architecture)") for a in arches}
        return info


@hookimpl
def register_targets(register):
    register(Jetson())
