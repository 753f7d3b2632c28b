"""The target API: where a package runs, how its kernels are compiled, and how the build runs a
package there to verify it (natively, under an emulator, in a browser...)."""
from __future__ import annotations

import contextlib
import copy
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .errors import EdgesparseError
from .passes import Option


@dataclass
class RunResult:
    outputs: list[np.ndarray]
    # Nodes that ran on a kernel-library kernel, by op type, when the target can observe it (ORT
    # profiling); None when it cannot, and the build then counts from the library's op list.
    kernel_nodes: dict[str, int] | None = None
    # What the run covered, recorded in the manifest's verification section, e.g. which ISA's code
    # ran; a "not_verified" entry says what could not run here (and the build warns with it).
    details: dict[str, Any] = field(default_factory=dict)


class Target:
    """Base class of a deployment target. Subclasses set the class attributes and implement
    `toolchain` and `run_package`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    backends: ClassVar[tuple[str, ...]] = ("ort",)  # the first is the default
    machine: ClassVar[str] = ""  # platform.machine() of the devices the package runs on
    isa: ClassVar[str] = ""      # instruction set the kernels' dispatch table is keyed by
    # Typed settings a user gives as `--target NAME:key=value,...` (or a recipe's target table),
    # e.g. the GPU architectures to build for. Read them from `self.config`.
    options: ClassVar[tuple[Option, ...]] = ()

    @property
    def config(self) -> dict[str, Any]:
        return self.__dict__.get("_config") or {o.name: o.default for o in self.options}

    def configure(self, values: dict[str, Any]) -> "Target":
        """A copy of this target with `values` (strings from the command line, or TOML values)
        checked against `options` and applied. The registered instance is never changed."""
        declared = {o.name: o for o in self.options}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise EdgesparseError(f"target '{self.name}' has no option '{unknown[0]}' "
                                  f"(options: {', '.join(declared) or 'none'})")
        configured = copy.copy(self)
        configured.__dict__.pop("_table", None)  # the ISA may change with the options
        configured._config = {n: (o.parse(values[n], f"target {self.name}") if n in values else o.default)
                              for n, o in declared.items()}
        return configured

    def toolchain(self):
        """The `edgesparse.kernels.Toolchain` that compiles kernel libraries for this target."""
        raise NotImplementedError

    def check_environment(self) -> None:
        """Raise EdgesparseError naming what to install when this machine cannot build for the
        target. Called before any work starts."""

    def run_package(self, package_dir: Path, inputs: dict[str, np.ndarray], threads: int = 1) -> RunResult:
        """Run the package where it runs and return its outputs."""
        raise NotImplementedError

    def bench(self, package_dir: Path, batch: dict[str, np.ndarray], libraries, threads=(1,),
              rounds: int = 30) -> list[dict]:
        """Time the package against its dense equivalent where the package runs. The default runs
        both in this process with ONNX Runtime; targets that run elsewhere (a browser engine, an
        emulator) override it. Records as edgesparse.bench.bench_package returns them."""
        from . import bench, runtime

        return bench.bench_package(runtime.load(package_dir), batch, libraries, threads=threads, rounds=rounds)

    def prefers_sparse(self, op: str, shape: dict, sparsity: float, block: int, threads: int = 1) -> bool:
        """Whether the sparse kernel beats the dense one for this layer on this target, from the
        measured dispatch table that decides for the target's ISA (`dispatch_table`)."""
        from .kernels import dispatch

        return dispatch.prefers_sparse(op, shape, sparsity, block, isa=self.isa, threads=threads,
                                       table=self.dispatch_table())

    def predicted_speedup(self, op: str, shape: dict, sparsity: float, block: int, threads: int = 1) -> float | None:
        """The speedup (dense time / sparse time) of the sparse kernel for this layer that the
        measured dispatch table predicts, or None where it has no figure (sparsity=auto uses it to
        weigh layers; see edgesparse.allocation). Targets with other measurements override it."""
        from .kernels import dispatch

        return dispatch.predicted_speedup(op, shape, sparsity, block, isa=self.isa, threads=threads,
                                          table=self.dispatch_table())

    def dispatch_table(self):
        """The `edgesparse.kernels.dispatch.Table` that decides for this target's ISA: tuned on
        this machine, imported, or shipped. Looked up once per configured target."""
        if "_table" not in self.__dict__:
            from .kernels import dispatch

            self._table = dispatch.table_for(self.isa)
        return self._table

    def runs_here(self) -> bool:
        return platform.machine() == self.machine

    def kernel_code(self):
        """A context in which kernel sessions created on this machine run the code this target's
        devices run (the x86 target: the ISA it builds for); it yields what ran ({} here: the code
        the library picks when it loads)."""
        return contextlib.nullcontext({})

    def times_here(self) -> bool:
        """Whether timing a package on this machine times what the target's devices run: it runs
        here natively, on the code its ISA names (an AVX2 package timed on an AVX-512 machine would
        time ONNX Runtime's AVX-512 dense kernels against it). Passes use it to check speed claims
        on the whole model before they ship them."""
        from .kernels import dispatch

        return self.runs_here() and self.isa == dispatch.best_isa()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "summary": self.summary,
            "backends": list(self.backends),
            "machine": self.machine,
            "isa": self.isa,
            "options": [{"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help}
                        for o in self.options],
            "config": self.config,
            "dispatch_table": self.dispatch_table().describe(),
        }
