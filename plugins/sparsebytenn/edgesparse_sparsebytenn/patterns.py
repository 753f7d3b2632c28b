"""Per-operator group patterns, group scores and group masks.

A *group* is what one SIMD step of the sparse kernels skips at once. Both of edgesparse's group
kernels broadcast one weight per output channel and reuse one input vector across B output
channels, so every pattern here is "B consecutive output channels x 1 input channel x all taps":

=============  ==========================  ==============  =========================================
operator       weight                      default group   kernel
=============  ==========================  ==============  =========================================
pointwise 1x1  Conv2d [O, C, 1, 1]         16 out x 1 in   BlockSparseConv (direct 1x1 path)
k x k conv     Conv2d [O, C, kh, kw], g=1  8 out x 1 in    BlockSparseConv (all kh*kw taps per group)
               (stem, full 3x3 convs)      x kh*kw taps
Linear         [O, C] (MatMul/Gemm)        16 out x 1 in   BlockSparseMatMul (16 = one AVX-512 vector)
depthwise      Conv2d groups == C          stays dense     ORT's depthwise kernel (see below)
grouped conv   1 < groups < C              stays dense     ORT
=============  ==========================  ==============  =========================================

Depthwise convolutions stay dense: each output channel reads exactly one input channel, so the
"B outputs share one input" structure the kernels exploit does not exist; the op does 9 MACs per
loaded input (memory-bound; ORT's kernel already runs at bandwidth) and it holds 2-7 % of the MACs
and parameters of MobileNet-style networks. Pruning its taps would cost accuracy and buy no time.

Default block sizes: B = 16 for 1x1 convs and Linear is one AVX-512 vector, the block docs/kernels.md
measures fastest on x86 (4x1 and 8x1 use narrower vectors and need more sparsity to break even).
B = 8 for k x k convs is a design choice, not measured here: a group already spans kh*kw taps.
The accuracy of 4/8/16 x 1 on the sample CNN is in the README. Each is an option of the pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KINDS = ("pointwise", "conv", "linear", "depthwise", "grouped")
KERNEL_OP = {"pointwise": "BlockSparseConv", "conv": "BlockSparseConv", "linear": "BlockSparseMatMul"}
DEFAULT_BLOCK = {"pointwise": 16, "conv": 8, "linear": 16}


@dataclass
class LayerInfo:
    """A torch layer the pass may prune (or must leave dense, with the reason)."""

    name: str               # module qualname
    module: object          # the nn.Module
    kind: str               # one of KINDS
    out_channels: int
    in_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    block: int | None = None
    # filled by the pass
    sparsity: float = 0.0
    reason: str | None = None  # why it stays dense, when it does
    extra: dict = field(default_factory=dict)

    @property
    def op(self) -> str | None:
        return KERNEL_OP.get(self.kind)

    @property
    def param(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def weight_count(self) -> int:
        return self.out_channels * self.in_channels * self.kernel[0] * self.kernel[1]


def classify(module) -> str | None:
    """The operator type of a module, or None when the pass does not know it."""
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if module.groups == 1:
            return "pointwise" if tuple(module.kernel_size) == (1, 1) else "conv"
        if module.groups == module.in_channels and module.out_channels % module.in_channels == 0:
            return "depthwise"
        return "grouped"
    return None


def find_layers(module, blocks: dict[str, int]) -> list[LayerInfo]:
    """Every Conv2d / Linear (and subclasses) of the module, in registration order."""
    found = []
    for name, sub in module.named_modules():
        kind = classify(sub)
        if kind is None:
            continue
        if kind == "linear":
            info = LayerInfo(name, sub, kind, sub.out_features, sub.in_features)
        else:
            info = LayerInfo(name, sub, kind, sub.out_channels, sub.in_channels // sub.groups,
                             tuple(sub.kernel_size), tuple(sub.stride))
            if isinstance(sub.padding, tuple):
                info.extra["pads"] = (sub.padding[0], sub.padding[1], sub.padding[0], sub.padding[1])
        info.block = blocks.get(kind)
        found.append(info)
    return found


def channel_norms(weight: np.ndarray, norm: str = "l2") -> np.ndarray:
    """[O, C] magnitude of each (output, input) pair over all taps: sum of squares (l2) or of |w|."""
    w = np.asarray(weight, np.float64).reshape(weight.shape[0], weight.shape[1], -1)
    return (w * w).sum(-1) if norm == "l2" else np.abs(w).sum(-1)


def group_scores(weight: np.ndarray, block: int, norm: str = "l2", remainder: str = "pad",
                 input_scale: np.ndarray | None = None) -> np.ndarray:
    """Score of every group, [NB, C] (NB = ceil(O / B)); low scores are pruned first.

    norm "l2": the group's L2 norm; "l1": its L1 norm. input_scale [C] (activation-weighted
    criterion): multiplies each input channel's scores by that channel's RMS activation on the
    calibration data, so groups that read near-silent channels go first.
    remainder: when B does not divide O, the last block row holds O % B channels. "pad" scores
    it like a full group (its norm scaled up to B channels) and packs it zero-padded; "dense"
    never prunes it (scores +inf).
    """
    o, c = weight.shape[:2]
    nb = -(-o // block)
    per = channel_norms(weight, norm)
    padded = np.zeros((nb * block, c))
    padded[:o] = per
    scores = padded.reshape(nb, block, c).sum(1)
    valid = o - (nb - 1) * block
    if valid < block:
        if remainder == "dense":
            scores[-1] = np.inf
        else:
            scores[-1] *= block / valid
    if norm == "l2":
        scores = np.sqrt(scores)
    if input_scale is not None:
        scores = scores * np.asarray(input_scale, np.float64).reshape(1, c)
    return scores


def group_mask(scores: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean [NB, C] keep-mask with round(sparsity * prunable groups) of the lowest scores
    dropped (ties broken by position; +inf scores are never dropped)."""
    flat = scores.ravel()
    prunable = np.isfinite(flat)
    drop = int(round(sparsity * prunable.sum()))
    keep = np.ones(flat.size, bool)
    if drop:
        order = np.argsort(np.where(prunable, flat, np.inf), kind="stable")[:drop]
        keep[order] = False
    return keep.reshape(scores.shape)


def expand_mask(mask: np.ndarray, block: int, weight_shape: tuple) -> np.ndarray:
    """[NB, C] group mask -> float mask of the weight's shape."""
    o, c = weight_shape[:2]
    rows = np.repeat(mask, block, axis=0)[:o]
    return rows.reshape(o, c, *([1] * (len(weight_shape) - 2))).astype(np.float32) * np.ones(weight_shape, np.float32)


def weight_group_mask(weight: np.ndarray, block: int) -> np.ndarray:
    """[NB, C] True where a group of the weight holds a non-zero."""
    o, c = weight.shape[:2]
    nb = -(-o // block)
    w = np.zeros((nb * block, c), bool)
    w[:o] = np.abs(np.asarray(weight).reshape(o, c, -1)).max(-1) != 0
    return w.reshape(nb, block, c).any(1)


def retained_mass(weight: np.ndarray, block: int, sparsity: float, remainder: str = "pad") -> float:
    """Fraction of the weight's squared magnitude kept by group pruning at `sparsity`."""
    per = channel_norms(weight, "l2")
    total = per.sum()
    if total == 0:
        return 1.0
    mask = group_mask(group_scores(weight, block, "l2", remainder), sparsity)
    kept = expand_mask(mask, block, per.shape)
    return float((per * kept).sum() / total)
