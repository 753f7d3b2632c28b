"""The compile-backend API and the kernel-library declaration that backends build."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar


@dataclass(frozen=True)
class KernelLibrary:
    """A library of custom operators in one ONNX domain.

    build:     Toolchain -> path of the compiled library (cached by the library itself).
    functions: (the model's opset_import) -> list of onnx.FunctionProto, the dense meaning of each
               op, written for that opset; attached to every model that uses the domain so that a runtime without the library still computes the
               right answer.
    describe:  (onnx.NodeProto, {initializer name: np.ndarray}, {value name: shape list}) -> dict
               with at least "sparsity" (the fraction of weights skipped).
    densify:   (onnx.NodeProto, {initializer name: np.ndarray}, {value name: shape list}) ->
               (nodes, initializers): the same computation with standard ONNX ops on dense weights,
               the model a user would otherwise deploy; or None to use the op's ONNX function.
               Benchmarks compare with it, and so does verification unless `reference` is given.
    reference: optional, for ops whose kernel computes an approximation of their dense meaning
               (e.g. attention that skips work by thresholds): (onnx.NodeProto, [input arrays,
               None for an absent input], {initializer name: np.ndarray}) -> [output arrays, None
               for an output the node does not produce]: what the kernel is meant to compute,
               approximation included, by an implementation independent of the kernel.
               Verification then runs these nodes with it inside the otherwise dense model, so
               that it proves the kernel computes what the pass asked for; the approximation's
               cost against the original model is the quality section's business.
    """

    name: str
    domain: str
    ops: tuple[str, ...]
    build: Callable
    functions: Callable
    describe: Callable
    densify: Callable
    reference: Callable | None = None


class Backend:
    """Base class of a compile backend."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""

    def compile(self, model, target, staging: Path, libraries: list[KernelLibrary]) -> dict:
        """Write the runnable files of a package into `staging` (the model is an onnx.ModelProto
        whose custom nodes belong to `libraries`). Return the manifest's "runtime" section, with
        "files" listing what was written, relative to `staging`."""
        raise NotImplementedError
