"""Sparse layers for training: masks in units of the kernel library's weight groups, and
torch.autograd.Functions that run forward and backward of a block-sparse Conv2d/Linear on C++
kernels (forward: edgesparse's kernel library; dX and dW on kept blocks: this plugin's
csrc/sparcl_train.cpp).

A *unit* is what a mask keeps or drops:
  - pattern "block" (B in {4, 8, 16}): B consecutive output channels x 1 input channel x all
    kh*kw taps (the layout of BlockSparseConv / BlockSparseMatMul), mask shape [ceil(O/B), C];
  - pattern "unstructured": one weight, mask shape = weight shape. No kernel runs these: the
    layer trains as a masked dense layer (the paper's setting).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgesparse import EdgesparseError

PATTERNS = ("unstructured", "block")
BLOCKS = (4, 8, 16)

_i64, _i32, _p = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p


class _ConvArgs(ctypes.Structure):
    _fields_ = [(n, _i64) for n in ("batch", "cin", "h", "w", "cout", "kh", "kw", "sh", "sw", "dh", "dw",
                                    "pt", "pl", "oh", "ow")] + [
        ("block", _i32), ("nthreads", _i32), ("values", _p), ("c_index", _p), ("row_ptr", _p), ("nnzb", _i64),
        ("blk_row", _p), ("t_ptr", _p), ("t_blk", _p)]


@dataclass
class _Libs:
    core: ctypes.CDLL
    train: ctypes.CDLL
    table: int


@functools.lru_cache(maxsize=1)
def libraries() -> _Libs:
    """The kernel library (forward) and the training kernels (backward), loaded with ctypes."""
    from edgesparse import kernels

    from .build import build_training_library

    try:
        core = ctypes.CDLL(str(kernels.build_library(kernels.X86_64)))
    except OSError as exc:
        raise EdgesparseError(f"cannot load edgesparse's kernel library: {exc}") from exc
    train = ctypes.CDLL(str(build_training_library()))
    core.es_kernels.restype = _p
    core.es_kernels.argtypes = []
    train.sp_conv_forward.argtypes = [_p, _p, _p, _p, _p]
    train.sp_conv_backward.argtypes = [_p, _p, _p, _p, _p, _i64, _p]
    train.sp_linear_forward.argtypes = [_p, _i64, _i64, _i64, _i32, _p, _p, _p, _p, _p, _p, _i32]
    train.sp_linear_dx.argtypes = [_i64, _i64, _i64, _i32, _p, _p, _p, _p, _p, _p, _i32]
    train.sp_linear_dw.argtypes = [_i64, _i64, _i64, _i32, _i64, _p, _p, _p, _p, _p, _i32]
    for fn in (train.sp_conv_forward, train.sp_conv_backward, train.sp_linear_forward,
               train.sp_linear_dx, train.sp_linear_dw):
        fn.restype = None
    return _Libs(core, train, core.es_kernels())


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class PrunableLayer:
    """A Conv2d or Linear the trainer prunes, with its mask (in units) and kernel indices."""

    def __init__(self, name: str, module: nn.Module, pattern: str, block: int | None):
        if pattern not in PATTERNS:
            raise EdgesparseError(f"unknown sparsity pattern '{pattern}' (known: {', '.join(PATTERNS)})")
        if pattern == "block" and block not in BLOCKS:
            raise EdgesparseError(f"block must be one of {BLOCKS}, got {block}")
        self.name, self.module, self.pattern = name, module, pattern
        self.block = block if pattern == "block" else None
        w = module.weight
        self.kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.taps = int(w[0, 0].numel())
        if self.block:
            self.unit_shape = (-(-self.out_features // self.block), self.in_features)
        else:
            self.unit_shape = tuple(w.shape)
        self.mask = torch.ones(self.unit_shape, dtype=torch.bool)
        self.grad_units: torch.Tensor | None = None  # DGM: (block, lane) pairs whose gradient is computed
        self._index = None

    # -- masks -----------------------------------------------------------------
    @property
    def units(self) -> int:
        return int(np.prod(self.unit_shape))

    def unit_sizes(self) -> torch.Tensor:
        """Number of real weights in each unit (blocks past the last output channel are smaller)."""
        if not self.block:
            return torch.ones(self.unit_shape)
        rows = torch.full((self.unit_shape[0],), float(self.block))
        rows[-1] = self.out_features - self.block * (self.unit_shape[0] - 1)
        return (rows[:, None] * self.taps).expand(self.unit_shape).clone()

    def weight_mask(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Boolean mask of the weight's shape."""
        mask = self.mask if mask is None else mask
        if not self.block:
            return mask
        full = mask.repeat_interleave(self.block, dim=0)[: self.out_features]
        return full.reshape(full.shape + (1,) * (self.module.weight.dim() - 2)).expand_as(self.module.weight)

    def unit_scores(self, per_weight: torch.Tensor) -> torch.Tensor:
        """Sum of a per-weight score over each unit."""
        if not self.block:
            return per_weight
        o, c = self.out_features, self.in_features
        rows = self.unit_shape[0] * self.block
        s = per_weight.reshape(o, c, -1).sum(-1)
        padded = torch.zeros(rows, c, dtype=s.dtype)
        padded[:o] = s
        return padded.reshape(self.unit_shape[0], self.block, c).sum(1)

    def set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask.to(torch.bool).reshape(self.unit_shape).clone()
        self._index = None
        self.grad_units = None

    def density(self) -> float:
        sizes = self.unit_sizes()
        return float((sizes * self.mask).sum() / sizes.sum())

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.module.weight.mul_(self.weight_mask())

    # -- kernel indices ----------------------------------------------------------
    def index(self) -> dict:
        """c_index/row_ptr (block rows), the same blocks by input channel, and the gather index
        from the dense weight to the packed values [nnzb, taps, B]. Rebuilt after a mask change."""
        if self._index is not None:
            return self._index
        b, o, c, taps = self.block, self.out_features, self.in_features, self.taps
        m = self.mask.numpy()
        rows, cols = np.nonzero(m)
        row_ptr = np.zeros(m.shape[0] + 1, np.int32)
        np.cumsum(m.sum(1), out=row_ptr[1:])
        order = np.argsort(cols, kind="stable").astype(np.int32)
        t_ptr = np.zeros(c + 1, np.int32)
        np.cumsum(np.bincount(cols, minlength=c), out=t_ptr[1:])
        out_ch = rows[:, None] * b + np.arange(b)[None, :]  # [nnzb, B]
        flat = (out_ch[:, None, :] * c + cols[:, None, None]) * taps + np.arange(taps)[None, :, None]
        flat = np.where(out_ch[:, None, :] < o, flat, o * c * taps)  # padding lanes read a zero
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.int32))
        self._index = {
            "c_index": as_t(cols), "row_ptr": as_t(row_ptr), "blk_row": as_t(rows),
            "t_ptr": as_t(t_ptr), "t_blk": as_t(order), "nnzb": int(len(cols)),
            "gather": torch.from_numpy(flat.reshape(-1).astype(np.int64)),
        }
        return self._index

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        idx = self.index()
        flat = torch.cat([weight.detach().reshape(-1), weight.new_zeros(1)])
        return flat[idx["gather"]].reshape(idx["nnzb"], self.taps, self.block)

    def unpack_grad(self, dvalues: torch.Tensor) -> torch.Tensor:
        idx = self.index()
        n = self.module.weight.numel()
        flat = dvalues.new_zeros(n + 1)
        flat.index_put_((idx["gather"],), dvalues.reshape(-1), accumulate=True)
        return flat[:n].reshape(self.module.weight.shape)


def kernel_supported(module: nn.Module) -> str | None:
    """Why a layer cannot run on the block-sparse kernels, or None when it can."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "grouped/depthwise convolution"
        if module.padding_mode != "zeros":
            return f"padding mode {module.padding_mode!r}"
        if module.kernel_size[0] * module.kernel_size[1] > 256:
            return "kernel larger than 256 taps"
        return None
    if isinstance(module, nn.Linear):
        return None
    return f"{type(module).__name__} is not Conv2d/Linear"


def _conv_pads(module: nn.Conv2d, h: int, w: int) -> tuple[int, int, int, int]:
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return 0, 0, 0, 0
        th, tw = dh * (kh - 1), dw * (kw - 1)  # "same" (stride 1): torch puts the extra pad at the end
        return th // 2, tw // 2, th - th // 2, tw - tw // 2
    ph, pw = module.padding
    return ph, pw, ph, pw


def _conv_args(layer: PrunableLayer, x: torch.Tensor, values: torch.Tensor, threads: int):
    m = layer.module
    n, c, h, w = x.shape
    kh, kw = m.kernel_size
    sh, sw = m.stride
    dh, dw = m.dilation
    pt, pl, pb, pr = _conv_pads(m, h, w)
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    idx = layer.index()
    args = _ConvArgs(n, c, h, w, layer.out_features, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, layer.block, threads,
                     values.data_ptr(), idx["c_index"].data_ptr(), idx["row_ptr"].data_ptr(), idx["nnzb"],
                     idx["blk_row"].data_ptr(), idx["t_ptr"].data_ptr(), idx["t_blk"].data_ptr())
    return args, oh, ow


class BlockSparseConvFunction(torch.autograd.Function):
    """y = conv2d(x, weight * mask) + bias with the mask's blocks skipped in forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: PrunableLayer):
        libs = libraries()
        x = x.detach().contiguous().float()
        values = layer.pack(weight).contiguous()
        threads = torch.get_num_threads()
        args, oh, ow = _conv_args(layer, x, values, threads)
        y = torch.empty(x.shape[0], layer.out_features, oh, ow)
        b = None if bias is None else bias.detach().contiguous().float()
        libs.train.sp_conv_forward(libs.table, ctypes.byref(args), x.data_ptr(), _ptr(b), y.data_ptr())
        ctx.save_for_backward(x, values)
        ctx.layer, ctx.threads, ctx.has_bias = layer, threads, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        libs = libraries()
        x, values = ctx.saved_tensors
        layer = ctx.layer
        dy = dy.contiguous().float()
        args, _, _ = _conv_args(layer, x, values, ctx.threads)
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dvalues = torch.empty_like(values) if ctx.needs_input_grad[1] else None
        units = layer.grad_units
        libs.train.sp_conv_backward(ctypes.byref(args), x.data_ptr(), dy.data_ptr(), _ptr(dx), _ptr(units),
                                    0 if units is None else units.numel(), _ptr(dvalues))
        dw = layer.unpack_grad(dvalues) if dvalues is not None else None
        db = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None


class BlockSparseLinearFunction(torch.autograd.Function):
    """y = x @ (weight * mask).T + bias with the mask's blocks skipped in forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer: PrunableLayer):
        libs = libraries()
        shape = x.shape
        x2 = x.detach().reshape(-1, shape[-1]).contiguous().float()
        values = layer.pack(weight).reshape(-1, layer.block).contiguous()
        idx = layer.index()
        m, k, n = x2.shape[0], layer.in_features, layer.out_features
        y = torch.empty(m, n)
        b = None if bias is None else bias.detach().contiguous().float()
        threads = torch.get_num_threads()
        libs.train.sp_linear_forward(libs.table, m, k, n, layer.block, values.data_ptr(), idx["c_index"].data_ptr(),
                                     idx["row_ptr"].data_ptr(), x2.data_ptr(), _ptr(b), y.data_ptr(), threads)
        ctx.save_for_backward(x2, values)
        ctx.layer, ctx.threads, ctx.shape, ctx.has_bias = layer, threads, shape, bias is not None
        return y.reshape(*shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        libs = libraries()
        x2, values = ctx.saved_tensors
        layer = ctx.layer
        idx = layer.index()
        m, k, n = x2.shape[0], layer.in_features, layer.out_features
        dy2 = dy.reshape(m, n).contiguous().float()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty(m, k)
            libs.train.sp_linear_dx(m, k, n, layer.block, values.data_ptr(), idx["blk_row"].data_ptr(),
                                    idx["t_ptr"].data_ptr(), idx["t_blk"].data_ptr(), dy2.data_ptr(), dx.data_ptr(),
                                    ctx.threads)
            dx = dx.reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            dvalues = torch.empty_like(values)
            xt = x2.t().contiguous()
            libs.train.sp_linear_dw(m, k, n, layer.block, idx["nnzb"], idx["c_index"].data_ptr(),
                                    idx["blk_row"].data_ptr(), xt.data_ptr(), dy2.data_ptr(), dvalues.data_ptr(),
                                    ctx.threads)
            if layer.grad_units is not None:  # DGM: keep only the listed (block, lane) pairs
                keep = torch.zeros(dvalues.numel(), dtype=torch.bool)
                keep[layer.grad_units.long()] = True
                dvalues = dvalues * keep.reshape(dvalues.shape)
            dw = layer.unpack_grad(dvalues)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None


def sparse_forward(layer: PrunableLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward on the block-sparse kernels."""
    m = layer.module
    if layer.kind == "conv":
        return BlockSparseConvFunction.apply(x, m.weight, m.bias, layer)
    return BlockSparseLinearFunction.apply(x, m.weight, m.bias, layer)


def attach_kernels(layer: PrunableLayer) -> None:
    """Route the module's forward through the kernels (its parameters and state_dict are unchanged)."""
    layer.module.forward = functools.partial(sparse_forward, layer)


def detach_kernels(layer: PrunableLayer) -> None:
    if "forward" in layer.module.__dict__:
        del layer.module.forward


def masked_dense_forward(layer: PrunableLayer, x: torch.Tensor) -> torch.Tensor:
    """Reference: the same layer computed densely by torch on the masked weight."""
    m = layer.module
    w = m.weight * layer.weight_mask()
    if layer.kind == "conv":
        return m._conv_forward(x, w, m.bias)
    return F.linear(x, w, m.bias)
