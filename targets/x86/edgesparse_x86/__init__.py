"""The x86 target: x86-64 Linux CPUs. One kernel library holds AVX2 and AVX-512 code and picks
one when ONNX Runtime loads it; the build verifies the package natively, in this process.

`--target x86:isa=avx2|avx512|native` names the devices the package is for (default: this
machine's). The dispatch rule, the layout rewrites and the manifest follow that ISA; the library
still picks its code at load time. Verification runs the chosen ISA's code where this machine can
(an AVX2 package built on an AVX-512 machine runs its AVX2 code: EDGESPARSE_ISA); where it cannot,
the manifest and the build output say what ran instead.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from edgesparse import EdgesparseError, Option, RunResult, Target, hookimpl
from edgesparse import kernels, runtime
from edgesparse.kernels import dispatch

ISA_CHOICES = ("native", *dispatch.X86_ISAS)


@contextlib.contextmanager
def kernel_isa(isa: str):
    """Make kernel sessions created inside run `isa`'s code (the library reads EDGESPARSE_ISA when
    a session creates its kernels). Yields what ran and what could not."""
    if not dispatch.host_supports(isa):
        ran = dispatch.current_isa()
        yield {"kernel_isa": ran, "not_verified": f"the {isa} code (this machine runs {ran}: checked with that code)"}
        return
    before = os.environ.get("EDGESPARSE_ISA")
    os.environ["EDGESPARSE_ISA"] = isa
    try:
        yield {"kernel_isa": isa}
    finally:
        if before is None:
            os.environ.pop("EDGESPARSE_ISA", None)
        else:
            os.environ["EDGESPARSE_ISA"] = before


class X86(Target):
    name = "x86"
    summary = "x86-64 Linux CPUs; AVX2 and AVX-512 kernels chosen at load time"
    backends = ("ort",)
    machine = "x86_64"
    options = (
        Option("isa", str, "native", "instruction set of the machines the package is for: native (this one's), "
               "avx2 (most laptops and desktops) or avx512; decides the dispatch table and layouts",
               choices=ISA_CHOICES),
    )

    @property
    def isa(self) -> str:
        chosen = self.config["isa"]
        return dispatch.current_isa() if chosen == "native" else chosen

    def toolchain(self):
        return kernels.X86_64

    def check_environment(self) -> None:
        compiler = self.toolchain().cxx[0]
        if shutil.which(compiler) is None:
            raise EdgesparseError(f"the x86 target needs the C++ compiler '{compiler}' (Debian: apt-get install g++)")
        if not self.runs_here():
            raise EdgesparseError("the x86 target builds on an x86-64 machine (it verifies packages natively)")

    def kernel_code(self):
        return kernel_isa(self.isa)

    def run_package(self, package_dir: Path, inputs, threads: int = 1) -> RunResult:
        package = runtime.load(package_dir)
        with self.kernel_code() as details:
            outputs, on_kernel = runtime.run_profiled(package, inputs, threads)
        return RunResult(outputs, on_kernel, details)

    def bench(self, package_dir: Path, batch, libraries, threads=(1,), rounds: int = 30) -> list[dict]:
        with self.kernel_code():
            return super().bench(package_dir, batch, libraries, threads, rounds)


@hookimpl
def register_targets(register):
    register(X86())
