"""What the core distribution itself registers: the ONNX Runtime backend and edgesparse's kernel
library. Registered through the same entry point group as every other plugin."""
from .hookspecs import hookimpl


@hookimpl
def register_backends(register):
    from .ort_backend import OrtBackend

    register(OrtBackend())


@hookimpl
def register_kernels(register):
    from . import kernels

    register(kernels.LIBRARY)
