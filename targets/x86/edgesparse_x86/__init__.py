"""The x86 target: x86-64 Linux CPUs. One kernel library holds AVX2 and AVX-512 code and picks
one when ONNX Runtime loads it; the build verifies the package natively, in this process."""
from __future__ import annotations

import shutil
from pathlib import Path

from edgesparse import EdgesparseError, RunResult, Target, hookimpl
from edgesparse import kernels, runtime


def _host_isa() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "avx2"
    return "avx512" if " avx512f" in flags else "avx2"


class X86(Target):
    name = "x86"
    summary = "x86-64 Linux CPUs; AVX2 and AVX-512 kernels chosen at load time"
    backends = ("ort",)
    machine = "x86_64"
    isa = _host_isa()

    def toolchain(self):
        return kernels.X86_64

    def check_environment(self) -> None:
        compiler = self.toolchain().cxx[0]
        if shutil.which(compiler) is None:
            raise EdgesparseError(f"the x86 target needs the C++ compiler '{compiler}' (Debian: apt-get install g++)")
        if not self.runs_here():
            raise EdgesparseError("the x86 target builds on an x86-64 machine (it verifies packages natively)")

    def run_package(self, package_dir: Path, inputs, threads: int = 1) -> RunResult:
        package = runtime.load(package_dir)
        outputs, on_kernel = runtime.run_profiled(package, inputs, threads)
        return RunResult(outputs, on_kernel)


@hookimpl
def register_targets(register):
    register(X86())
