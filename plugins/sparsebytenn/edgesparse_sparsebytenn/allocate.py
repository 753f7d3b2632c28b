"""Calibration statistics and sparsity allocation.

Global target -> per-layer sparsity, either
- "uniform": every layer the pass may prune gets the target, or
- "sensitivity": each layer is pruned alone at a ladder of sparsities on calibration inputs and the
  change of the model's output is measured (KL divergence of the softmax for logits, relative MSE
  otherwise); then, starting from all-dense, the step with the smallest loss increase per pruned
  weight is taken until the weighted mean sparsity reaches the target.

In both, a layer only takes sparsities at which the target's dispatch rule says the sparse kernel
beats the dense one; where none qualifies it stays dense.
"""
from __future__ import annotations

import numpy as np

from edgesparse.recovery import tensors

LADDER = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def to_args(batch: dict) -> tuple:
    """A calibration batch (input name -> numpy array, in forward() order) as torch arguments."""
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in batch.values())


def outputs(module, batch: dict) -> list:
    """The module's outputs on a batch, flattened to a list of tensors."""
    import torch

    with torch.no_grad():
        out = module(*to_args(batch))
    return list(tensors(out))


def collect_stats(module, layers: list, batches: list[dict]) -> None:
    """Per layer: input shape (extra["input_shape"]) and per-input-channel RMS activation
    (extra["input_rms"]) over the calibration batches."""
    import torch

    sums, counts, hooks = {}, {}, []

    def hook_for(info):
        def hook(mod, args):
            x = args[0].detach()
            info.extra.setdefault("input_shape", tuple(x.shape))
            if info.kind == "linear":
                flat = x.reshape(-1, x.shape[-1]).double()
            else:
                flat = x.transpose(0, 1).reshape(x.shape[1], -1).T.double()
            sums[info.name] = sums.get(info.name, 0) + (flat * flat).sum(0)
            counts[info.name] = counts.get(info.name, 0) + flat.shape[0]
        return hook

    for info in layers:
        hooks.append(info.module.register_forward_pre_hook(hook_for(info)))
    try:
        with torch.no_grad():
            for b in batches:
                module(*to_args(b))
    finally:
        for h in hooks:
            h.remove()
    for info in layers:
        if info.name in sums:
            rms = torch.sqrt(sums[info.name] / counts[info.name]).numpy()
            if info.kind != "linear" and rms.size != info.in_channels:
                rms = None
            info.extra["input_rms"] = rms


def dispatch_shape(info) -> dict:
    """The shape keys of edgesparse.kernels.dispatch for this layer."""
    shape = info.extra.get("input_shape")
    if info.kind == "linear":
        keys = {"K": info.in_channels, "N": info.out_channels}
        if shape:
            keys["M"] = int(np.prod(shape[:-1]))
        return keys
    keys = {"C": info.in_channels, "O": info.out_channels, "kernel": info.kernel[0] if info.kernel[0] == info.kernel[1] else list(info.kernel),
            "stride": info.stride[0]}
    if shape and len(shape) == 4:
        keys["H"], keys["W"] = int(shape[2]), int(shape[3])
    return keys


def output_distance(ref: list, got: list) -> float:
    """KL(softmax(ref) || softmax(got)) for 2-D float outputs (logits), relative MSE otherwise."""
    import torch

    total = 0.0
    for r, g in zip(ref, got):
        if not r.is_floating_point():
            continue
        if r.dim() == 2 and r.shape[1] > 1:
            lr, lg = torch.log_softmax(r.double(), 1), torch.log_softmax(g.double(), 1)
            total += float((lr.exp() * (lr - lg)).sum(1).mean())
        else:
            total += float(((r.double() - g.double()) ** 2).mean() / ((r.double() ** 2).mean() + 1e-12))
    return total


def sensitivity(module, layers: list, batches: list[dict], levels: dict, masks_for) -> dict:
    """{layer name: {sparsity: output distance}} with each layer pruned alone.

    levels: {layer name: sparsities to try}; masks_for(info, sparsity) -> float weight mask."""
    import torch

    refs = [outputs(module, b) for b in batches]
    curves = {}
    for info in layers:
        w = info.module.weight
        saved = w.data.clone()
        curve = {0.0: 0.0}
        for s in levels.get(info.name, ()):
            with torch.no_grad():
                w.data = saved * torch.from_numpy(masks_for(info, s)).to(saved.dtype)
            curve[s] = float(np.mean([output_distance(r, outputs(module, b)) for r, b in zip(refs, batches)]))
        w.data = saved
        curves[info.name] = curve
    return curves


def allocate(layers: list, curves: dict, target: float) -> dict:
    """Greedy: from all-dense, repeatedly take the layer step with the least loss per pruned weight
    until the weight-weighted mean sparsity reaches `target`. Returns {layer name: sparsity}."""
    sizes = {i.name: i.weight_count for i in layers}
    total = sum(sizes.values())
    current = {i.name: 0.0 for i in layers}
    need = target * total
    pruned = 0.0
    while pruned < need - 1e-9:
        remaining = need - pruned
        best = best_fit = None
        for name, curve in curves.items():
            levels = sorted(s for s in curve if s > current[name])
            for s in levels:  # look at every higher level: curves need not be convex
                gain = (s - current[name]) * sizes[name]
                cost = max(curve[s] - curve[current[name]], 0.0) / gain
                if best is None or cost < best[0]:
                    best = (cost, name, s)
                if gain <= remaining * 1.05 and (best_fit is None or cost < best_fit[0]):
                    best_fit = (cost, name, s)
        if best is None:
            break
        _, name, s = best_fit or best  # avoid overshooting the target with the last step
        pruned += (s - current[name]) * sizes[name]
        current[name] = s
    return current
