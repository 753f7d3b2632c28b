"""edgesparse: sparse neural networks onto edge devices, with the speed-up measured.

The public API for plugin authors and users is what this module exports, plus
`edgesparse.kernels` (sparse operators and their packers), `edgesparse.graph` (ONNX helpers) and
`edgesparse.recovery` (masks kept while training, gradual-pruning schedules; `BuildContext.recover`) and
`edgesparse.allocation` (`sparsity=auto`: per-layer sparsities for speed within the quality budget).
"""
__version__ = "0.1.0"

from .backends import Backend, KernelLibrary
from .context import BuildContext
from .errors import EdgesparseError
from .hookspecs import hookimpl
from .passes import Option, Pass, in_range
from .plugins import Command
from .source import TorchModel
from .targets import RunResult, Target

__all__ = [
    "Backend", "BuildContext", "Command", "EdgesparseError", "KernelLibrary", "Option", "Pass", "RunResult",
    "Target", "TorchModel", "hookimpl", "in_range", "__version__",
]
