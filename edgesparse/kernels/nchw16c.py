"""The NCHW16c layout of BlockSparseConv(Add) and DepthwiseConv tensors.

A tensor [N, C, H, W] in NCHW16c is stored as [N, C/16, H, W, 16]: 16 channels interleaved at
every pixel (ONNX Runtime's NCHWc layout on AVX-512). The ops take the layouts from the attributes
``x_channel_block`` and ``y_channel_block`` (1, the default: NCHW; 16: NCHW16c; DepthwiseConv: the
same for both); BlockSparseConvAdd's residual has Y's layout. X's rank must agree (4-D NCHW, 5-D
NCHW16c): the dense functions read the layout from it. Chains of these ops then pass tensors
between them without layout changes (docs/kernels.md, "NCHW16c").

The pass blocks only tensors between these ops, never a graph input or output, so the model's
dense equivalent (every op replaced by its standard ops) is NCHW throughout and ignores the layout
attributes.

Contract of the kernels: C (and O for an NCHW16c Y) a multiple of 16; BlockSparseConv on either
side in NCHW16c needs a 1x1 kernel, stride 1, no padding and 16 x 1 blocks.
"""

from __future__ import annotations

import numpy as np

CHANNEL_BLOCK = 16


def to_nchw16c(x: np.ndarray) -> np.ndarray:
    """[N, C, H, W] -> [N, C/16, H, W, 16] (C a multiple of 16)."""
    n, c, h, w = x.shape
    if c % CHANNEL_BLOCK:
        raise ValueError(f"NCHW16c needs channels a multiple of {CHANNEL_BLOCK}, got {c}")
    return np.ascontiguousarray(x.reshape(n, c // CHANNEL_BLOCK, CHANNEL_BLOCK, h, w).transpose(0, 1, 3, 4, 2))


def to_nchw(x: np.ndarray) -> np.ndarray:
    """A 4-D NCHW tensor as is; a 5-D NCHW16c one back to [N, C, H, W]."""
    x = np.asarray(x)
    if x.ndim == 4:
        return x
    n, cb, h, w, b = x.shape
    return np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w))


def in_layout(y: np.ndarray, channel_block: int) -> np.ndarray:
    """An NCHW tensor in the layout named by a y_channel_block value (1 or 16)."""
    if channel_block not in (1, CHANNEL_BLOCK):
        raise ValueError(f"y_channel_block must be 1 or {CHANNEL_BLOCK}, got {channel_block}")
    return to_nchw16c(y) if channel_block == CHANNEL_BLOCK else y

