"""The snapdragon target: Arm64 phones and boards with Cortex-A76/A78/X-class cores (NEON, dot
product, fp16), i.e. Snapdragon 855 and later, other recent Android SoCs, Raspberry Pi 5.

The kernel library is cross-compiled with Debian's aarch64-linux-gnu-g++, or with the Android NDK's
clang when ANDROID_NDK_HOME is set. Every build verifies the package here, under qemu-aarch64-static
(Cortex-A76 model) with ONNX Runtime's own aarch64 build, through a small C program that uses ORT's
C API as an app does (csrc/es_run.c); ORT's profiler there tells which nodes ran on sparse kernels.
See docs/snapdragon.md.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np

from edgesparse import EdgesparseError, Option, RunResult, Target, hookimpl, runtime

from . import emulator, ort_aarch64, runner, toolchains

__version__ = "0.1.0"


class Snapdragon(Target):
    name = "snapdragon"
    summary = "Arm64 phones and boards (Cortex-A76/A78/X: NEON, dot product, fp16); verified under qemu"
    backends = ("ort",)
    machine = "aarch64"
    isa = "neon"
    options = (
        Option("ndk", str, "", "Android NDK folder: build for Android (bionic). Default $ANDROID_NDK_HOME; "
                               "neither: Debian's aarch64 g++ (glibc: Linux boards)"),
        Option("api", int, 0, "Android API level for NDK builds. Default $EDGESPARSE_ANDROID_API or "
                              f"{toolchains.DEFAULT_ANDROID_API}",
               check=lambda v: None if v == 0 or 21 <= v <= 99 else "must be an Android API level (21 or above)"),
    )

    def _ndk(self) -> Path | None:
        return Path(self.config["ndk"]) if self.config["ndk"] else toolchains.ndk_home()

    def toolchain(self):
        return toolchains.selected(self._ndk(), self.config["api"] or None)

    def check_environment(self) -> None:
        missing = toolchains.missing_debian_tools()
        if missing:
            packages = " ".join(dict.fromkeys(pkg for _, pkg in missing))
            raise EdgesparseError(
                f"the snapdragon target needs {', '.join(what for what, _ in missing)}: install Debian packages "
                f"{packages} (apt-get install {packages}, or {toolchains.SETUP_COMMAND})")
        home = self._ndk()
        if home:
            toolchains.check_ndk(home, self.config["api"] or None)
        emulator.check_namespace()

    def describe(self) -> dict:
        info = super().describe()
        tc = self.toolchain()
        info["toolchain"] = tc.name
        info["cflags"] = list(tc.flags)
        info["abi"] = toolchains.ANDROID_ABI
        info["verified_on"] = f"{emulator.QEMU} -cpu {emulator.CPU}"
        info["dispatch"] = (f"measured NEON timings ({self.dispatch_table().label})" if self.dispatch_table().entries else
                            f"instruction counts under qemu (sparse if <= {RULE_MAX_RATIO} x the dense loop's); "
                            "no NEON timings in the kernel dispatch table")
        return info

    def run_package(self, package_dir: Path, inputs: dict[str, np.ndarray], threads: int = 1) -> RunResult:
        package = runtime.load(package_dir, check_target=False)
        target = package.manifest.get("target", {})
        if target.get("machine") != self.machine:
            raise EdgesparseError(f"package is for target '{target.get('name')}' ({target.get('machine')}), "
                                  f"not {self.machine}")
        libraries = _runnable_here(package)
        outputs, events = runner.run_model(package.model_path, inputs, libraries, threads, profile=True)
        rt = package.manifest["runtime"]
        return RunResult(outputs, runner.kernel_nodes(events, set(rt.get("custom_ops", [])),
                                                       set(rt.get("custom_domains", []))))

    def prefers_sparse(self, op: str, shape: dict, sparsity: float, block: int, threads: int = 1) -> bool:
        """A measured NEON dispatch table decides once there is one (shipped, or measured on a device
        and taken in with `edgesparse tune --import`); until then (no ARM device measures here) the
        instruction-count stand-in does (see instruction_rule)."""
        if self.dispatch_table().entries:
            return super().prefers_sparse(op, shape, sparsity, block, threads)
        return instruction_rule(op, sparsity, block)


# Sparse only where the kernel issues at most this fraction of the dense loop's instructions at
# every measured token count. Instruction counts flatter sparse kernels with small blocks (index
# loads and scattered input reads cost more time than instructions): on x86, 4x1 blocks at 50%
# ran at 0.4-0.7x of dense while issuing ~0.9x of its instructions here; 16x1 at 50% ran 1.3-2.1x.
RULE_MAX_RATIO = 0.7
COUNTS_FILE = Path(__file__).with_name("insn_counts.json")


@functools.lru_cache(maxsize=1)
def rule_break_even() -> dict[int, float]:
    """Per block size, the lowest measured sparsity from which the kernel stays at or under
    RULE_MAX_RATIO of the dense loop's instructions at every token count (insn_counts.json)."""
    rows = json.loads(COUNTS_FILE.read_text())["rows"]
    out = {}
    for block in sorted({r["block"] for r in rows if r["block"]}):
        ok = {}
        for r in rows:
            if r["block"] == block:
                ok[r["sparsity"]] = ok.get(r["sparsity"], True) and r["vs_dense"] <= RULE_MAX_RATIO
        levels = sorted(ok)
        winning = [s for i, s in enumerate(levels) if all(ok[t] for t in levels[i:])]
        if winning:
            out[block] = winning[0]
    return out


def instruction_rule(op: str, sparsity: float, block: int) -> bool:
    """Stand-in dispatch rule for NEON from the kernel's dynamic instruction counts under qemu
    (python -m edgesparse_snapdragon.kernel_check). Not a timing: replace with measurements on a
    device (the core's dispatch table, isa "neon") as soon as there are some."""
    if op != "BlockSparseMatMul":
        return False  # other operators have no ARM counts yet: keep dense
    be = rule_break_even().get(block)
    return be is not None and sparsity >= be


def _runnable_here(package) -> list[Path]:
    """The package's kernel libraries, or, for an Android (bionic) build, the glibc build of the same
    kernel library, which is what qemu-user can load next to ORT's Linux aarch64 build."""
    libraries = package.libraries
    for lib in libraries:
        if not ort_aarch64.is_aarch64_elf(lib):
            raise EdgesparseError(f"{lib.name} in the package is not an aarch64 library")
    toolchain = package.manifest.get("target", {}).get("toolchain", "")
    if "android" not in toolchain:
        return libraries
    from edgesparse.plugins import registry

    built = {}
    for kernel_lib in registry().kernels.values():
        path = Path(kernel_lib.build(toolchains.debian()))
        built[path.name] = path
    missing = [lib.name for lib in libraries if lib.name not in built]
    if missing:
        raise EdgesparseError(f"no glibc build of {missing[0]} to verify the Android package with under qemu")
    print(f"snapdragon: {toolchain} libraries cannot load under qemu-user; verifying with the glibc "
          f"build of the same kernel sources and flags", file=sys.stderr)
    return [built[lib.name] for lib in libraries]


@hookimpl
def register_targets(register):
    register(Snapdragon())
