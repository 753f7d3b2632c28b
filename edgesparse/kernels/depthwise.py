"""DepthwiseConv: numpy reference and ONNX node builder.

Operator ``com.edgesparse::DepthwiseConv`` is an NCHW depthwise Conv2d (group = C, one kh x kw
filter per channel) with dense weights, fused bias and activation. It exists for layout, not
sparsity: in ONNX Runtime a depthwise conv is fast only in its blocked NCHWc layout, so one that
sits between two of our NCHW sparse convs costs two layout reorders; this op keeps the block NCHW.

- input 0 ``X`` float [N, C, H, W]
- input 1 ``W`` float [C, 1, kh, kw] (ONNX Conv's depthwise weight, unchanged)
- input 2 ``B`` float [C], optional
- attributes ``group`` (int, required, = C: the dense function's Conv needs it), ``kernel_shape``
  [kh, kw] (must match W), ``strides`` [2] = (1, 1), ``pads`` [4] = (top, left, bottom, right) = 0,
  ``dilations`` [2] = (1, 1), ``activation`` ("none" | "relu" | "relu6" | "silu")
- output 0 ``Y`` float [N, C, OH, OW] (ONNX Conv output size, explicit pads)
- layout: attributes ``x_channel_block`` = ``y_channel_block`` = 16 put X and Y in NCHW16c ([N, C/16, H, W, 16], see
  nchw16c), where the kernel works on full vectors of 16 channels and beats ORT's own depthwise conv
"""

from __future__ import annotations

import numpy as np

from edgesparse.kernels.blocksparse import DOMAIN

DEPTHWISE_ACTIVATIONS = ("none", "relu", "relu6", "silu")


def depthwise_conv_reference(x, w, bias=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                             activation="none", y_channel_block=1) -> np.ndarray:
    """What DepthwiseConv computes, in float64 numpy (float32 result); X's layout by its rank."""
    from edgesparse.kernels.conv import conv2d_reference
    from edgesparse.kernels.nchw16c import in_layout, to_nchw

    y = conv2d_reference(to_nchw(x), w, bias, strides, pads, dilations, activation, depthwise=True)
    return in_layout(y, y_channel_block)


def make_depthwise_conv(x: str, y: str, w: np.ndarray, *, name: str, strides=(1, 1), pads=(0, 0, 0, 0),
                        dilations=(1, 1), bias: np.ndarray | None = None, activation: str = "none",
                        prefix: str | None = None, y_channel_block: int = 1):
    """Node + initializers (``<prefix>.weight``, ``<prefix>.bias``) for a depthwise weight [C, 1, kh, kw].
    `y_channel_block` 16: X and Y in NCHW16c."""
    import onnx
    from onnx import numpy_helper

    if activation not in DEPTHWISE_ACTIVATIONS:
        raise ValueError(f"activation must be one of {DEPTHWISE_ACTIVATIONS}, got {activation!r}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 4 or w.shape[1] != 1:
        raise ValueError(f"w must be [C, 1, kh, kw], got shape {w.shape}")
    c, _, kh, kw = w.shape
    prefix = prefix or name
    inits = [numpy_helper.from_array(w, f"{prefix}.weight")]
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        if bias.shape != (c,):
            raise ValueError(f"bias must have C={c} elements, got {bias.shape}")
        inits.append(numpy_helper.from_array(bias, f"{prefix}.bias"))
    node = onnx.helper.make_node(
        "DepthwiseConv", [x, *(t.name for t in inits)], [y], name=name, domain=DOMAIN, group=int(c),
        kernel_shape=[int(kh), int(kw)], strides=[int(s) for s in strides], pads=[int(p) for p in pads],
        dilations=[int(d) for d in dilations], activation=activation,
        **({} if y_channel_block == 1 else {"x_channel_block": int(y_channel_block),
                                            "y_channel_block": int(y_channel_block)}),
    )  # fmt: skip
    return node, inits
