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
               Verification and benchmarks compare with it.
    """

    name: str
    domain: str
    ops: tuple[str, ...]
    build: Callable
    functions: Callable
    describe: Callable
    densify: Callable


class Backend:
    """Base class of a compile backend."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""

    def compile(self, model, target, staging: Path, libraries: list[KernelLibrary]) -> dict:
        """Write the runnable files of a package into `staging` (the model is an onnx.ModelProto
        whose custom nodes belong to `libraries`). Return the manifest's "runtime" section, with
        "files" listing what was written, relative to `staging`."""
        raise NotImplementedError
