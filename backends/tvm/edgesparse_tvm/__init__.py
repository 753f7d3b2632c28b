"""The `tvm` compile backend: edgesparse's ONNX output -> Apache TVM (Relax) -> shared libraries
that run with TVM's runtime libraries only.

- Import: TVM's Relax ONNX frontend, with edgesparse's BlockSparseMatMul lowered to hand-written
  TIR kernels (edgesparse_tvm.kernels) for the device: CPU (LLVM) or CUDA.
- Dense remainder: TVM's default Relax pipeline; on CUDA that schedules every remaining operator
  with dlight's GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback). On CPUs it is
  left untuned (far slower than ONNX Runtime: docs/jetson.md says where).
- Export: one library per ModuleSpec the target asks for (`target.tvm_modules()`), host code
  cross-compiled when needed, CUDA kernels built into cubins by nvcc at build time.

A target opts in by listing "tvm" in `backends` and may define `tvm_modules() -> [ModuleSpec]`;
without it an x86_64 or aarch64 target gets one CPU library for its machine.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgesparse import Backend, EdgesparseError, RunResult, hookimpl

from .build import ModuleSpec, check_spec, compile_module
from .ops import ORT_HINT

__version__ = "0.1.0"
__all__ = ["ModuleSpec", "TvmBackend", "check_spec", "compile_module", "module_specs", "run_package"]

RUNNER = Path(__file__).with_name("runner.py")


def module_specs(target) -> list[ModuleSpec]:
    if hasattr(target, "tvm_modules"):
        return list(target.tvm_modules())
    if target.machine == "x86_64":
        return [ModuleSpec("cpu_x86_64", "cpu", "x86_64", mcpu="x86-64-v4" if target.isa == "avx512" else "x86-64-v3")]
    if target.machine == "aarch64":
        return [ModuleSpec("cpu_aarch64", "cpu", "aarch64", mcpu="cortex-a76")]
    raise EdgesparseError(f"the tvm backend does not know how to compile for target '{target.name}' ({target.machine})")


def _input_order(model) -> list[str]:
    initializers = {i.name for i in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in initializers]


class TvmBackend(Backend):
    name = "tvm"
    summary = "Apache TVM (Relax): hand-written TIR sparse kernels for CPU and CUDA, runs on TVM's runtime only"

    def compile(self, model, target, staging: Path, libraries) -> dict:
        import tvm
        import tvm_ffi

        try:
            domains = {lib.domain for lib in libraries}
            if domains - {"com.edgesparse"}:
                raise EdgesparseError(f"the tvm backend has no kernels for op domain '{sorted(domains - {'com.edgesparse'})[0]}'; {ORT_HINT}")
            specs = module_specs(target)
            for spec in specs:  # every toolchain is checked before the first (slow) compile
                check_spec(spec)
            modules = [compile_module(model, spec, staging) for spec in specs]
        except EdgesparseError as exc:
            if ORT_HINT not in str(exc) or "ort" in getattr(target, "backends", ("ort",)):
                raise
            # a TVM-only target (jetson): --backend ort would be refused, say where ORT runs instead
            raise EdgesparseError(str(exc).replace(ORT_HINT, f"target '{target.name}' compiles through tvm only: build "
                                                   "this model for a target with the ORT backend (e.g. --target x86)")) from None
        runner = staging / "tvm" / "run.py"
        shutil.copy2(RUNNER, runner)
        deploy = [m for m in modules if m["role"] == "deploy"]
        return {
            "engine": "tvm",
            "tvm_version": tvm.__version__,
            "modules": modules,
            "input_order": _input_order(model),
            "runner": "tvm/run.py",
            "files": sorted({m["file"] for m in modules} | {"tvm/run.py"}),
            "deploy_files": sorted({m["file"] for m in deploy} | {"tvm/run.py"}),
            "runtime_libraries": {
                "cpu": ["libtvm_runtime.so"],
                "cuda": ["libtvm_runtime.so", "libtvm_runtime_cuda.so"],
                "python": [f"apache-tvm-ffi=={tvm_ffi.__version__}", "numpy"],
                "from": f"tvm/lib/ of the apache-tvm=={tvm.__version__} wheel for the device's architecture",
            },
            "how_to_run": "sys.path.insert(0, PKG + '/tvm'); import run; outputs = run.load(PKG).run({name: array})",
        }


def run_package(package_dir: Path, inputs: dict[str, np.ndarray], threads: int = 1, module: str | None = None) -> RunResult:
    """Run a tvm-backend package here through the runtime-only loader the package ships."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("edgesparse_tvm_package_runner", Path(package_dir) / "tvm" / "run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    try:
        model = runner.load(package_dir, module=module, threads=threads)
        return RunResult(model.run(inputs))
    except (RuntimeError, KeyError, OSError) as exc:
        raise EdgesparseError(f"cannot run the TVM package {package_dir}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


@hookimpl
def register_backends(register):
    register(TvmBackend())
