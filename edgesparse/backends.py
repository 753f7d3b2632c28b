"""The compile-backend API and the kernel-library declaration that backends build."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar


@dataclass(frozen=True)
class KernelLibrary:
    """A library of custom operators in one ONNX domain.

    build:     Toolchain -> path of the compiled library (cached by the library itself).
    functions: () -> list of onnx.FunctionProto, the dense meaning of each op; attached to every
               model that uses the domain so that a runtime without the library still computes the
               right answer.
    describe:  (onnx.NodeProto, {initializer name: np.ndarray}) -> dict with at least
               "sparsity" (fraction of weights that are zero and skipped) and "shape".
    """

    name: str
    domain: str
    ops: tuple[str, ...]
    build: Callable
    functions: Callable
    describe: Callable


class Backend:
    """Base class of a compile backend."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""

    def compile(self, model, target, staging: Path, libraries: list[KernelLibrary]) -> dict:
        """Write the runnable files of a package into `staging` (the model is an onnx.ModelProto
        whose custom nodes belong to `libraries`). Return the manifest's "runtime" section, with
        "files" listing what was written, relative to `staging`."""
        raise NotImplementedError
