"""BlockSparseConv (and BlockSparseConvAdd): packing, numpy reference and ONNX node builder.

Operator ``com.edgesparse::BlockSparseConv`` is an NCHW Conv2d (group = 1) whose
weights W [O, C, kh, kw] are kept or dropped in groups of B consecutive output
channels x 1 input channel x all kh*kw taps (B in {4, 8, 16}), NB = ceil(O / B):

- input 0 ``X`` float [N, C, H, W]
- input 1 ``values`` float [nnzb, kh*kw, B]: values[p, t, b] = W[j*B + b, c_index[p], t // kw, t % kw]
  for block p of block row j (zero padded past O)
- input 2 ``c_index`` int32 [nnzb]: input channel of each block, strictly ascending in a block row
- input 3 ``row_ptr`` int32 [NB + 1]: as in BlockSparseMatMul
- input 4 ``bias`` float [O], optional
- attributes ``out_channels`` (int, required), ``kernel_shape`` [kh, kw] (required),
  ``strides`` [2] = (1, 1), ``pads`` [4] = (top, left, bottom, right) = 0,
  ``dilations`` [2] = (1, 1), ``activation`` ("none" | "relu" | "relu6" | "silu")
- output 0 ``Y`` float [N, O, OH, OW] (ONNX Conv output size, explicit pads)
- layouts: attributes ``x_channel_block`` / ``y_channel_block`` = 16 put X / Y (and the residual)
  in NCHW16c [N, C/16, H, W, 16] (see nchw16c: 1x1, stride 1, no padding, B = 16 only)

``com.edgesparse::BlockSparseConvAdd`` is the same plus a required input 5 ``residual`` float
[N, O, OH, OW], Y = act(conv(X) + bias) + residual: a conv and the residual Add after it in one
node. A separate op, not an optional input of BlockSparseConv, because an ONNX function body (every
op's dense meaning) cannot test whether an optional input is present.
"""

from __future__ import annotations

import numpy as np

from edgesparse.kernels.blocksparse import BLOCK_SIZES, DOMAIN

CONV_ACTIVATIONS = ("none", "relu", "relu6", "silu")


def pack_block_sparse_conv(w: np.ndarray, block: int) -> dict[str, np.ndarray]:
    """Dense W [O, C, kh, kw] (zeros where pruned) -> {"values", "c_index", "row_ptr"}."""
    if block not in BLOCK_SIZES:
        raise ValueError(f"block must be one of {BLOCK_SIZES}, got {block}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 4:
        raise ValueError(f"w must be 4-D [O, C, kh, kw], got shape {w.shape}")
    o, c, kh, kw = w.shape
    nb = -(-o // block)
    padded = np.zeros((nb * block, c, kh * kw), dtype=np.float32)
    padded[:o] = w.reshape(o, c, kh * kw)
    groups = padded.reshape(nb, block, c, kh * kw).transpose(0, 2, 3, 1)  # [NB, C, taps, B]
    keep = np.any(groups != 0, axis=(2, 3))  # [NB, C]
    rows, cs = np.nonzero(keep)
    row_ptr = np.zeros(nb + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=row_ptr[1:])
    return {
        "values": np.ascontiguousarray(groups[rows, cs], dtype=np.float32).reshape(-1, kh * kw, block),
        "c_index": cs.astype(np.int32),
        "row_ptr": row_ptr,
    }


def unpack_block_sparse_conv(packed: dict[str, np.ndarray], out_channels: int, in_channels: int,
                             kernel_shape: tuple[int, int]) -> np.ndarray:
    """Packed groups -> dense W [O, C, kh, kw]."""
    values = np.asarray(packed["values"], dtype=np.float32)
    c_index = np.asarray(packed["c_index"]).astype(np.int64)
    row_ptr = np.asarray(packed["row_ptr"]).astype(np.int64)
    nb, block = len(row_ptr) - 1, values.shape[2]
    kh, kw = kernel_shape
    dense = np.zeros((nb, in_channels, kh * kw, block), dtype=np.float32)
    dense[np.repeat(np.arange(nb), np.diff(row_ptr)), c_index] = values
    dense = dense.transpose(0, 3, 1, 2).reshape(nb * block, in_channels, kh, kw)
    return dense[:out_channels]


def conv2d_reference(x, w, bias=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                     activation="none", depthwise: bool = False) -> np.ndarray:
    """Dense NCHW conv2d in float64 numpy, then the activation: group 1, or one filter per channel
    (`depthwise`, weight [C, 1, kh, kw])."""
    from edgesparse.kernels.reference import apply_activation

    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = strides, dilations, pads
    xp = np.zeros((n, c, h + pt + pb, wd + pl + pr))
    xp[:, :, pt : pt + h, pl : pl + wd] = x
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + pl + pr - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n, o, oh, ow))
    for ky in range(kh):
        for kx in range(kw):
            patch = xp[:, :, ky * dh : ky * dh + sh * (oh - 1) + 1 : sh, kx * dw : kx * dw + sw * (ow - 1) + 1 : sw]
            if depthwise:
                y += patch * w[:, 0, ky, kx].reshape(1, c, 1, 1)
            else:
                y += np.einsum("nchw,oc->nohw", patch, w[:, :, ky, kx])
    if bias is not None:
        y += np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    return apply_activation(y, activation)


def block_sparse_conv_reference(x, packed, out_channels, kernel_shape, bias=None, strides=(1, 1),
                                pads=(0, 0, 0, 0), dilations=(1, 1), activation="none",
                                residual=None, y_channel_block=1) -> np.ndarray:
    """What BlockSparseConv computes (BlockSparseConvAdd when `residual` is given), in numpy. X may
    be NCHW or NCHW16c (by its rank); Y and the residual are in the layout of `y_channel_block`."""
    from edgesparse.kernels.nchw16c import in_layout, to_nchw

    x = to_nchw(x)
    w = unpack_block_sparse_conv(packed, out_channels, x.shape[1], kernel_shape)
    y = conv2d_reference(x, w, bias, strides, pads, dilations, activation)
    if residual is not None:
        y = (y.astype(np.float64) + to_nchw(np.asarray(residual, np.float64))).astype(np.float32)
    return in_layout(y, y_channel_block)


def make_block_sparse_conv(
    x: str,
    y: str,
    packed: dict[str, np.ndarray],
    out_channels: int,
    kernel_shape: tuple[int, int],
    *,
    name: str,
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
    bias: np.ndarray | None = None,
    activation: str = "none",
    prefix: str | None = None,
    in_channels: int | None = None,
    residual: str | None = None,
    x_channel_block: int = 1,
    y_channel_block: int = 1,
):
    """Node + initializers (``<prefix>.values``, ``.c_index``, ``.row_ptr``, ``.bias``).
    `in_channels` (optional, recommended) records C for tools that read the node without shape
    information: the packed groups cannot tell it when the last input channels are all pruned.
    `residual` (a value name): a BlockSparseConvAdd node, Y = act(conv(X) + bias) + residual.
    `x_channel_block` / `y_channel_block` 16: X / Y in NCHW16c (see nchw16c)."""
    import onnx
    from onnx import numpy_helper

    if activation not in CONV_ACTIVATIONS:
        raise ValueError(f"activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
    values = np.asarray(packed["values"], dtype=np.float32)
    kh, kw = (int(v) for v in kernel_shape)
    if values.ndim != 3 or values.shape[1] != kh * kw or values.shape[2] not in BLOCK_SIZES:
        raise ValueError(f"values must be [nnzb, kh*kw={kh * kw}, B], got {values.shape}")
    prefix = prefix or name
    inits = [
        numpy_helper.from_array(values, f"{prefix}.values"),
        numpy_helper.from_array(np.asarray(packed["c_index"], dtype=np.int32), f"{prefix}.c_index"),
        numpy_helper.from_array(np.asarray(packed["row_ptr"], dtype=np.int32), f"{prefix}.row_ptr"),
    ]
    inputs = [x, *(t.name for t in inits)]
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32).reshape(-1)
        if bias.shape != (out_channels,):
            raise ValueError(f"bias must have out_channels={out_channels} elements, got {bias.shape}")
        inits.append(numpy_helper.from_array(bias, f"{prefix}.bias"))
        inputs.append(f"{prefix}.bias")
    if residual is not None:
        inputs += [""] * (5 - len(inputs)) + [residual]
    node = onnx.helper.make_node(
        "BlockSparseConv" if residual is None else "BlockSparseConvAdd", inputs, [y], name=name, domain=DOMAIN,
        out_channels=int(out_channels),
        kernel_shape=[kh, kw], strides=[int(s) for s in strides], pads=[int(p) for p in pads],
        dilations=[int(d) for d in dilations], activation=activation,
        **({} if in_channels is None else {"in_channels": int(in_channels)}),
        **({} if x_channel_block == 1 else {"x_channel_block": int(x_channel_block)}),
        **({} if y_channel_block == 1 else {"y_channel_block": int(y_channel_block)}),
    )  # fmt: skip
    return node, inits


def random_block_sparse_conv(rng, o: int, c: int, kh: int, kw: int, block: int, sparsity: float) -> np.ndarray:
    """W [O, C, kh, kw] with exactly round(sparsity * groups) groups zeroed."""
    nb = -(-o // block)
    total = nb * c
    keep = np.zeros(total, bool)
    keep[rng.choice(total, int(round(total * (1 - sparsity))), replace=False)] = True
    w = rng.standard_normal((nb * block, c, kh, kw)).astype(np.float32) / np.sqrt(c * kh * kw)
    w *= np.repeat(keep.reshape(nb, 1, c), block, axis=1).reshape(nb * block, c)[:, :, None, None]
    return np.ascontiguousarray(w[:o], dtype=np.float32)


def conv_benchmark_models(rng, c: int, o: int, hw: int, kernel: int, stride: int, sparsity: float, block: int,
                          opset: int = 18):
    """(dense Conv model, BlockSparseConv model, input, output shape) with identical weights."""
    from onnx import TensorProto, helper, numpy_helper

    from edgesparse.kernels.onnx_functions import attach_functions

    w = random_block_sparse_conv(rng, o, c, kernel, kernel, block, sparsity)
    bias = rng.standard_normal(o).astype(np.float32)
    pad = kernel // 2
    oh = (hw + 2 * pad - kernel) // stride + 1
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    xi = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, hw, hw])
    yi = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, o, oh, oh])
    attrs = dict(kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4)
    dense = helper.make_model(
        helper.make_graph([helper.make_node("Conv", ["X", "W", "B"], ["Y"], **attrs)], "dense", [xi], [yi],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "B")]),
        opset_imports=[helper.make_opsetid("", opset)],
    )  # fmt: skip
    node, inits = make_block_sparse_conv("X", "Y", pack_block_sparse_conv(w, block), o, (kernel, kernel),
                                         name="sparse", strides=(stride, stride), pads=(pad,) * 4, bias=bias)
    sparse = helper.make_model(helper.make_graph([node], "sparse", [xi], [yi], inits),
                               opset_imports=[helper.make_opsetid("", opset)])  # fmt: skip
    attach_functions(sparse)
    return dense, sparse, x, (1, o, oh, oh)
