"""Compile a Relax module for one device and export it as a deployable shared library.

A `ModuleSpec` names one library of a package: the device it computes on ("cpu" or "cuda"), the
machine its host code runs on ("x86_64", "aarch64"), the LLVM CPU, and for CUDA the GPU
architectures it carries cubins for. Host code for another machine is cross-compiled (e.g.
aarch64-linux-gnu-g++ on x86); CUDA kernels are compiled with nvcc into one fatbin that is
embedded in the library, so the device needs TVM's runtime libraries only.
"""
from __future__ import annotations

import contextlib
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgesparse import EdgesparseError

from . import cuda, frontend

TRIPLES = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}
CROSS_CXX = {"x86_64": "x86_64-linux-gnu-g++", "aarch64": "aarch64-linux-gnu-g++"}
APT = {"aarch64": "g++-aarch64-linux-gnu", "x86_64": "g++-x86-64-linux-gnu"}


@dataclass(frozen=True)
class ModuleSpec:
    name: str                       # file stem inside the package's tvm/ folder
    device: str                     # "cpu" or "cuda"
    machine: str                    # platform.machine() of the host code
    mcpu: str | None = None         # LLVM CPU of the host code
    arches: tuple[str, ...] = ()    # CUDA: sm_XX cubins to embed
    role: str = "deploy"            # "deploy": for the device; "verify": build-host check of the same graph
    nvcc: str | None = None
    notes: dict = field(default_factory=dict, compare=False)

    @property
    def file(self) -> str:
        return f"tvm/{self.name}.so"


def cxx_for(machine: str) -> str:
    """The C++ compiler that links host code for `machine` on this build machine."""
    if machine not in TRIPLES:
        raise EdgesparseError(f"the tvm backend has no host toolchain for machine '{machine}' (supports: {', '.join(TRIPLES)})")
    compiler = "g++" if machine == platform.machine() else CROSS_CXX[machine]
    if shutil.which(compiler) is None:
        raise EdgesparseError(f"the C++ compiler '{compiler}' is missing (Debian: apt-get install {APT.get(machine, 'g++') if compiler != 'g++' else 'g++'})")
    return compiler


def check_spec(spec: ModuleSpec) -> None:
    """Fail before any work when the toolchain for this module is missing."""
    if spec.device not in ("cpu", "cuda"):
        raise EdgesparseError(f"unknown device '{spec.device}' for the tvm backend (supports: cpu, cuda)")
    cxx_for(spec.machine)
    if spec.device == "cuda":
        cuda.check_arches(spec.arches, cuda.find_nvcc(spec.nvcc))


def tvm_target(spec: ModuleSpec):
    import tvm

    host = {"kind": "llvm", "mtriple": TRIPLES[spec.machine]}
    if spec.mcpu:
        host["mcpu"] = spec.mcpu
    if spec.device == "cpu":
        return tvm.target.Target(host)
    # generate code for the oldest architecture: the same source is compiled for all of them
    oldest = min(spec.arches, key=cuda.arch_number)
    return tvm.target.Target({"kind": "cuda", "arch": oldest}, host=host)


@contextlib.contextmanager
def _nvcc_callback(nvcc: str, arches):
    """If this machine has a GPU and TVM's CUDA runtime, TVM compiles CUDA at build time through a
    Python callback (NVRTC by default, which needs the cuda-bindings package): use nvcc instead."""
    import tvm_ffi

    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)
    tvm_ffi.register_global_func(name, lambda code, *_: bytearray(cuda.compile_fatbin(code, arches, nvcc)), override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)


def _fpack_imports(spec: ModuleSpec, nvcc: str, record: dict):
    """export_library hook: pack the imported modules (VM bytecode and constants, CUDA kernels)
    like TVM does, with each CUDA module's source replaced by an nvcc-built fatbin, and link the
    blob in through an assembler .incbin (fast for large weights, same for every target)."""
    def pack(module, is_system_lib, prefix, workspace_dir):
        import tvm_ffi

        if is_system_lib or prefix:
            raise EdgesparseError("the tvm backend exports shared libraries, not system libraries")
        tensor = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(module)
        blob = bytes(memoryview(tensor.numpy()))
        blob, binaries = cuda.rewrite_cuda_imports(blob, lambda src: cuda.compile_fatbin(src, spec.arches, nvcc))
        record["device_binaries"] = binaries
        bin_path = Path(workspace_dir) / "edgesparse_imports.bin"
        bin_path.write_bytes(blob)
        asm = Path(workspace_dir) / "edgesparse_imports.S"
        asm.write_text(
            "\t.section .rodata\n\t.balign 16\n\t.globl __tvm_ffi__library_bin\n"
            "\t.type __tvm_ffi__library_bin, %object\n"
            f"__tvm_ffi__library_bin:\n\t.incbin \"{bin_path}\"\n"
            "\t.size __tvm_ffi__library_bin, .-__tvm_ffi__library_bin\n"
            "\t.section .note.GNU-stack,\"\",%progbits\n")
        return str(asm)
    return pack


def export(executable, spec: ModuleSpec, out: Path) -> dict:
    """Write a compiled TVM executable as a shared library for spec.machine; for CUDA, with an
    nvcc-built fatbin. Returns {"cuda": {...}} describing the cubins (empty for CPU)."""
    from tvm.support import cc

    compiler = cxx_for(spec.machine)
    fcompile = cc.create_shared if compiler == "g++" else cc.cross_compiler(compiler)
    nvcc = cuda.find_nvcc(spec.nvcc) if spec.device == "cuda" else None
    record: dict = {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgesparse-tvm-") as work:
        kwargs = {"fpack_imports": _fpack_imports(spec, nvcc, record)} if nvcc else {}
        executable.export_library(str(out), fcompile=fcompile, workspace_dir=work, **kwargs)
    if not nvcc:
        return {}
    binaries = record.get("device_binaries", [])
    cubins: dict[str, int] = {}
    for b in binaries:
        cubins.update(cuda.cubins_in(b))
    missing = [a for a in spec.arches if a not in cubins]
    if not binaries or missing:
        raise EdgesparseError(f"the exported CUDA module lacks cubins for {', '.join(missing or spec.arches)}")
    release, _ = cuda.nvcc_info(nvcc)
    return {"cuda": {"arches": list(spec.arches), "cubins": cubins, "nvcc": release,
                     "fatbin_bytes": sum(len(b) for b in binaries)}}


def compile_ir(mod, spec: ModuleSpec):
    """tvm.compile for the spec's target (nvcc standing in for NVRTC where TVM compiles CUDA)."""
    import tvm

    target = tvm_target(spec)
    if spec.device != "cuda":
        return tvm.compile(mod, target=target), target
    with _nvcc_callback(cuda.find_nvcc(spec.nvcc), spec.arches):
        return tvm.compile(mod, target=target), target


def compile_module(model, spec: ModuleSpec, staging: Path) -> dict:
    """Import, compile and export one module into staging/spec.file; return its manifest entry."""
    check_spec(spec)
    mod, sparse_calls = frontend.import_model(model, spec.device)
    try:
        executable, target = compile_ir(mod, spec)
        extra = export(executable, spec, staging / spec.file)
    except EdgesparseError:
        raise
    except Exception as exc:
        first = next((l.strip() for l in str(exc).splitlines() if l.strip()), type(exc).__name__)
        raise EdgesparseError(f"TVM failed to compile the model for {spec.device} ({spec.machine}): {first[:300]}") from exc
    return {
        "name": spec.name, "file": spec.file, "device": spec.device, "machine": spec.machine,
        "role": spec.role, "target": str(target), "sparse_kernel_calls": sparse_calls, **extra,
    }
