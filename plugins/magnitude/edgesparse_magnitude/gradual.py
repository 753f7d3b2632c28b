"""The torch stage of `magnitude` (model factories, recover_steps > 0): the layers the ONNX stage
would make sparse are pruned in PyTorch, gradually (a cubic schedule from 0 to the target sparsity),
each step followed by recovery with the core service (distillation from the unpruned module, or
the user's training loop), the pruned blocks kept at zero. The ONNX stage then finds exactly these
weights in the exported graph, zeros included, and packs them (identified by content, see `digest`).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np

from edgesparse import recovery


@dataclass
class TorchLayer:
    """An nn.Linear or nn.Conv2d as the ONNX stage will see it: weight [K, N] for a matmul (the
    transpose of the Linear's [N, K]), [O, C, kh, kw] for a conv."""

    name: str
    module: object
    kind: str  # "matmul" | "conv"

    def onnx_weight(self) -> np.ndarray:
        w = self.module.weight.detach().cpu().numpy()
        return np.ascontiguousarray(w.T if self.kind == "matmul" else w)

    @property
    def group(self) -> int:
        return getattr(self.module, "groups", 1)

    @property
    def stride(self) -> int:
        return int(self.module.stride[0]) if self.kind == "conv" else 1


def torch_layers(module, batch: dict) -> list[TorchLayer]:
    """The nn.Linear and nn.Conv2d layers whose weights reach the outputs on `batch` (one the model
    holds but the outputs do not use, e.g. a pooler nobody reads, is not in the exported graph)."""
    import torch
    import torch.nn as nn

    found = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            found.append(TorchLayer(name, m, "matmul"))
        elif isinstance(m, nn.Conv2d):
            found.append(TorchLayer(name, m, "conv"))
    if not found:
        return []
    weights = [l.module.weight for l in found]
    frozen = [w for w in weights if not w.requires_grad]
    device = weights[0].device
    try:
        for w in frozen:
            w.requires_grad_(True)
        with torch.enable_grad():
            out = module(*(torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in batch.values()))
            total = sum(t.float().sum() for t in recovery.tensors(out) if t.is_floating_point() and t.requires_grad)
            grads = torch.autograd.grad(total, weights, allow_unused=True) if torch.is_tensor(total) else [None] * len(weights)
    finally:
        for w in frozen:
            w.requires_grad_(False)
    return [l for l, g in zip(found, grads) if g is not None]


def digest(weight: np.ndarray) -> str:
    """The identity of a weight across export: its shape and bytes as float32."""
    w = np.ascontiguousarray(weight, np.float32)
    return f"{w.shape}:{hashlib.blake2b(w.tobytes(), digest_size=16).hexdigest()}"


def prune_gradually(module, layers: list[TorchLayer], keep_mask, p, ctx) -> dict:
    """Prune `layers` of `module` in place to `p.sparsity` in `p.prune_stages` steps, recovering
    after each; `keep_mask(weight, sparsity)` gives the blocks to keep of an ONNX-layout weight.
    Returns the report of the recovery (with the loss that pruning once would have cost)."""
    teacher = recovery.teacher_copy(module)
    layer_names = recovery.PRUNED if p.distill_layers else ()
    one_shot = None
    if p.recovery == "distill":  # what pruning once costs, for the report, then the weights back
        _apply(layers, keep_mask, p.sparsity)
        one_shot = recovery.distillation_loss(module, teacher, ctx, layers=[l.name for l in layers] if p.distill_layers else (),
                                              output_loss=p.distill_loss)
        module.load_state_dict(teacher.state_dict())
    stages = recovery.stage_fractions(p.prune_stages)
    shares = recovery.split_steps(p.recover_steps, len(stages))
    report, t0, steps_left = {"mode": "none"}, time.monotonic(), p.recover_steps
    for k, (fraction, steps) in enumerate(zip(stages, shares)):
        masks = _apply(layers, keep_mask, p.sparsity * fraction)  # zeroed blocks score 0: they stay pruned
        seconds = recovery.stage_seconds(p.recover_seconds, time.monotonic() - t0, steps, steps_left)
        steps_left -= steps
        measure = (("before",) if k == 0 else ()) + (("after",) if k == len(stages) - 1 else ())
        done = ctx.recover(module, teacher, steps=steps, seconds=seconds, mode=p.recovery, lr=p.lr, masks=masks,
                           layers=layer_names, output_loss=p.distill_loss, measure=measure)
        report = recovery.merge(report, done, p.sparsity * fraction, len(stages), p.recover_seconds)
    module.eval()
    if one_shot is not None:
        report["loss_one_shot"] = one_shot
    return report


def _apply(layers: list[TorchLayer], keep_mask, sparsity: float) -> dict:
    import torch

    masks = {}
    for layer in layers:
        keep = keep_mask(layer.onnx_weight(), sparsity)
        mask = torch.from_numpy(np.ascontiguousarray(keep.T if layer.kind == "matmul" else keep))
        mask = mask.to(layer.module.weight)
        with torch.no_grad():
            layer.module.weight.mul_(mask)
        masks[layer.module] = mask
    return masks
