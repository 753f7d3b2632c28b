"""Recovery after pruning, with the masks kept.

- "train": the user's training loop (TorchModel.train, `ctx.train(module, steps)`). Without a time
  budget it is called once with every step, so a learning-rate schedule inside it runs whole. With
  a budget, a first call of a tenth of the steps times one step, and a second call gets the steps
  that fit in the rest of the budget at that rate (a schedule restarts once).
- "distill": a built-in knowledge-distillation loop on the unlabeled calibration inputs: the dense
  (rearranged) network is the teacher; loss = KL of temperature-softened outputs for logits, MSE
  otherwise; Adam; BatchNorm statistics frozen (the module stays in eval mode), so the exported
  network folds the same statistics the teacher had.

Masks are torch parametrizations (weight = original * mask) while recovery runs, so any optimizer,
weight decay or momentum in the user's loop cannot revive a pruned group; they are baked in
(leave_parametrized) at the end.
"""
from __future__ import annotations

import copy
import time

import numpy as np

from .allocate import _tensors, to_args


class _Mask:
    """Parametrization weight -> weight * mask (built lazily to keep torch an import-time option)."""

    @staticmethod
    def make(mask):
        import torch

        class Mask(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.register_buffer("mask", m)

            def forward(self, w):
                return w * self.mask

        return Mask(mask)


class masks_kept:
    """Context manager: masks as parametrizations for the duration, baked in on exit."""

    def __init__(self, masks: dict):
        self.masks = masks  # {module: float tensor of the weight's shape}

    def __enter__(self):
        from torch.nn.utils import parametrize

        for mod, mask in self.masks.items():
            parametrize.register_parametrization(mod, "weight", _Mask.make(mask.to(mod.weight.dtype)))
        return self

    def __exit__(self, *exc):
        from torch.nn.utils import parametrize

        for mod in self.masks:
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        return False


def user_training(module, ctx, steps: int, seconds: float) -> dict:
    t0 = time.monotonic()
    calls = []
    if seconds <= 0 or steps <= 1:
        calls.append(steps)
    else:
        calls.append(max(1, steps // 10))
    ctx.train(module, calls[0])
    if seconds > 0 and calls[0] < steps:
        spent = time.monotonic() - t0
        fit = int((seconds - spent) / max(spent / calls[0], 1e-9))
        rest = max(0, min(steps - calls[0], fit))
        if rest:
            calls.append(rest)
            ctx.log(f"sparsebytenn: recovery: {rest} more steps of the training loop "
                    f"(~{spent / calls[0] * rest:.0f} s at {spent / calls[0]:.2f} s per step)")
            ctx.train(module, rest)
    module.eval()
    return _budget({"mode": "train", "steps": sum(calls), "calls": calls}, steps, seconds, t0)


def stage_fractions(stages: int) -> list[float]:
    """Fractions of the target sparsity after each of `stages` pruning steps: the cubic schedule of
    Zhu & Gupta (2017), s_k = s (1 - (1 - k/K)^3), which prunes most while the network is still
    redundant and leaves the later stages, at nearly the final sparsity, for recovery."""
    return [1.0 - (1.0 - k / stages) ** 3 for k in range(1, stages + 1)]


def split_steps(steps: int, parts: int) -> list[int]:
    return [steps // parts + (1 if k < steps % parts else 0) for k in range(parts)]


def merge_stage(total: dict, stage: dict, sparsity: float, stages: int) -> dict:
    """One recovery report over the stages: steps, requests and seconds add up; each stage's
    sparsity and steps are listed when there is more than one."""
    if total.get("mode", "none") == "none":
        merged = total | stage
    else:
        merged = total | {k: total[k] + stage[k] for k in ("steps", "steps_requested", "seconds")}
        if "calls" in stage:
            merged["calls"] = total["calls"] + stage["calls"]
        if "loss_last" in stage:
            merged["loss_last"] = stage["loss_last"]
    merged.pop("cut_by_budget", None)
    if merged["steps"] < merged["steps_requested"]:
        merged["cut_by_budget"] = (f"recovery_seconds={merged['seconds_budget']:g} allowed {merged['steps']} of "
                                   f"{merged['steps_requested']} steps")
    if stages > 1:
        merged["stages"] = merged.get("stages", []) + [{"sparsity": round(sparsity, 4), "steps": stage["steps"]}]
    return merged


def _budget(result: dict, requested: int, seconds: float, t0: float) -> dict:
    """Steps done vs requested; `cut_by_budget` says when `recovery_seconds` stopped the recovery."""
    result |= {"steps_requested": requested, "seconds": round(time.monotonic() - t0, 2), "seconds_budget": seconds}
    if result["steps"] < requested:
        result["cut_by_budget"] = (f"recovery_seconds={seconds:g} allowed {result['steps']} of {requested} steps")
    return result


def distill(module, teacher, ctx, steps: int, seconds: float, lr: float, temperature: float = 2.0) -> dict:
    import torch

    batches = [to_args(b) for b in ctx.calibration_inputs()]
    params = [p for p in module.parameters() if p.requires_grad and p.is_floating_point()]
    opt = torch.optim.Adam(params, lr=lr)
    teacher.eval()
    module.eval()
    t0 = time.monotonic()
    losses, done = [], 0
    for step in ctx.progress(range(steps), "sparsebytenn: distilling", length=steps):
        args = batches[step % len(batches)]
        with torch.no_grad():
            want = list(_tensors(teacher(*args)))
        got = list(_tensors(module(*args)))
        loss = sum(_kd_loss(g, w, temperature) for g, w in zip(got, want) if w.is_floating_point())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        done = step + 1
        if seconds > 0 and time.monotonic() - t0 > seconds:
            break
    head = float(np.mean(losses[: max(1, len(losses) // 10)])) if losses else None
    tail = float(np.mean(losses[-max(1, len(losses) // 10):])) if losses else None
    return _budget({"mode": "distill", "steps": done, "loss_first": head, "loss_last": tail, "lr": lr,
                    "batches": len(batches)}, steps, seconds, t0)


def _kd_loss(student, teacher, t: float):
    import torch.nn.functional as F

    if student.dim() == 2 and student.shape[1] > 1:
        return F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                        reduction="batchmean") * t * t
    return F.mse_loss(student, teacher) / (teacher.pow(2).mean() + 1e-12)


def recalibrate_batchnorm(module, batches: list[dict]) -> int:
    """Re-estimate every BatchNorm's running mean/variance on the calibration inputs (cumulative
    average over all batches), with the pruned weights. Pruning shifts the statistics of every
    activation downstream; the stale statistics, not the lost weights, cause most of the accuracy
    drop right after pruning. Returns the number of BatchNorm layers updated."""
    import torch
    import torch.nn as nn

    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or not batches:
        return 0
    saved = [(m, m.momentum, m.training) for m in norms]
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for b in batches:
                module(*to_args(b))
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
    return len(norms)


def teacher_copy(module):
    return copy.deepcopy(module).eval()
