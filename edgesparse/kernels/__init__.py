"""edgesparse sparse kernels: C++ ONNX Runtime custom operators and their Python helpers.

Operators (domain ``com.edgesparse``, version 1), contracts in docs/kernels.md:

- ``BlockSparseMatMul``: Y = act(X @ W + bias), W in B x 1 blocks (see blocksparse)
- ``BlockSparseConv``: NCHW Conv2d, groups of B output channels x 1 input channel (see conv)
- ``BlockSparseConvAdd``: the same followed by a residual add, in one node (see conv)
- ``DepthwiseConv``: dense NCHW depthwise Conv2d, keeps MobileNet blocks out of ORT's NCHWc
  layout between sparse convs (see depthwise)
- ``GatheredFFN``: FFN computing only the selected experts (see gathered_ffn)
- ``RoutedFFN``: FFN scaled per token and expert by router outputs, computing per chunk only the
  experts some token routes to (see gathered_ffn)

Build and load::

    lib = build_library(X86_64)
    so = onnxruntime.SessionOptions(); so.register_custom_ops_library(str(lib))

Every op also carries its dense meaning as a model-local ONNX function
(``function_protos`` / ``attach_functions``), so models still run without the library.
"""

from edgesparse.kernels.blocksparse import (
    BLOCK_SIZES,
    DOMAIN,
    block_sparse_matmul_reference,
    block_sparsity,
    make_block_sparse_matmul,
    pack_block_sparse,
    unpack_block_sparse,
)
from edgesparse.kernels.build import X86_64, Toolchain, build_kernel_archive, build_library
from edgesparse.kernels.conv import (
    block_sparse_conv_reference,
    conv2d_reference,
    make_block_sparse_conv,
    pack_block_sparse_conv,
    unpack_block_sparse_conv,
)
from edgesparse.kernels.depthwise import depthwise_conv_reference, make_depthwise_conv
from edgesparse.kernels.dispatch import prefers_sparse
from edgesparse.kernels.gathered_ffn import (
    gathered_ffn_reference,
    make_gathered_ffn,
    make_routed_ffn,
    pack_gathered_ffn,
    routed_ffn_reference,
)
from edgesparse.kernels.onnx_functions import attach_functions, function_protos
from edgesparse.kernels.ort_headers import ort_include_dir

__all__ = [
    "BLOCK_SIZES",
    "DOMAIN",
    "X86_64",
    "Toolchain",
    "attach_functions",
    "block_sparse_conv_reference",
    "block_sparse_matmul_reference",
    "block_sparsity",
    "build_kernel_archive",
    "build_library",
    "conv2d_reference",
    "depthwise_conv_reference",
    "function_protos",
    "gathered_ffn_reference",
    "make_block_sparse_conv",
    "make_block_sparse_matmul",
    "make_depthwise_conv",
    "make_gathered_ffn",
    "make_routed_ffn",
    "ort_include_dir",
    "pack_block_sparse",
    "pack_block_sparse_conv",
    "pack_gathered_ffn",
    "prefers_sparse",
    "routed_ffn_reference",
    "unpack_block_sparse",
    "unpack_block_sparse_conv",
]
