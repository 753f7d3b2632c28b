"""Recovery after pruning, a service any torch-stage pass calls: `ctx.recover(module, teacher, ...)`.

Two modes:
- "distill": distillation from `teacher` (the module as it was before the pass pruned it: the pass
  takes `teacher_copy(module)` first) on the calibration inputs: KL of temperature-softened outputs
  for logits, MSE normalised by the teacher's mean square otherwise, plus, with `layers`, the same
  MSE on the outputs of those submodules (layer-wise distillation of hidden states). Adam; the
  module stays in eval mode (BatchNorm statistics and dropout as the teacher has them).
- "train": the user's training loop (`TorchModel.train(module, steps)`). Without a time budget it is
  called once with every step, so a learning-rate schedule inside it runs whole; with one, a first
  call of a tenth of the steps times a step and a second call gets what fits in the rest.

Either way the pruned weights stay zero: masks are torch parametrizations (weight = original * mask)
while recovery runs, so no optimizer, weight decay or momentum can revive them; they are baked in at
the end. Budgets: `steps`, and `seconds` (0: no limit) that may cut it short, never silently: the
returned report has steps done against asked, seconds, and the distillation loss against the
teacher before and after, measured on held-out batches when the context has them (`evaluation_inputs`,
which recovery never trains on), else on the calibration batches.

Launched under `torchrun` (WORLD_SIZE > 1), distillation trains data-parallel (DDP): every batch is
split by rows across the ranks, so the global batch, the loss curve and the weights are those of a
single process on the same data; the user's loop gets the DDP-wrapped module and must shard its own
data. The loop itself lives in distillation.py.
"""
from __future__ import annotations

import copy
import time

import numpy as np

from . import distributed
from .distillation import Distillation, Taps, device, sync_teacher, tensors, to_torch  # noqa: F401 (tensors: public)
from .errors import EdgesparseError

MODES = ("distill", "train")
OUTPUT_LOSSES = ("auto", "kl", "mse")
PRUNED = "pruned"           # layers=PRUNED: distil the outputs of every masked module


# -- masks ----------------------------------------------------------------------------------------
def _mask_parametrization(mask):
    import torch

    class Mask(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.register_buffer("mask", m)

        def forward(self, w):
            return w * self.mask

    return Mask(mask)


class masks_kept:
    """Context manager: {module: mask of its weight's shape} as parametrizations for the duration,
    baked into the weights on exit (the module is plain again)."""

    def __init__(self, masks: dict):
        self.masks = masks

    def __enter__(self):
        from torch.nn.utils import parametrize

        for mod, mask in self.masks.items():
            parametrize.register_parametrization(mod, "weight", _mask_parametrization(mask.to(mod.weight)))
        return self

    def __exit__(self, *exc):
        from torch.nn.utils import parametrize

        for mod in self.masks:
            if parametrize.is_parametrized(mod, "weight"):
                parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        return False


def zero_masks(module) -> dict:
    """Masks that keep every zero weight of the module's Linear and Conv layers at zero (what a pass
    that already pruned in place wants kept)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
    return {m: (m.weight.detach() != 0).to(m.weight.dtype) for m in module.modules()
            if isinstance(m, kinds) and bool((m.weight.detach() == 0).any())}


def teacher_copy(module):
    """The module as it is now, frozen, to distil from after pruning it."""
    teacher = copy.deepcopy(module).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# -- gradual pruning ------------------------------------------------------------------------------
def stage_fractions(stages: int) -> list[float]:
    """Fractions of the target sparsity after each of `stages` pruning steps: the cubic schedule of
    Zhu & Gupta (2017), s_k = s (1 - (1 - k/K)^3), which prunes most while the network is still
    redundant and leaves the later stages, at nearly the final sparsity, for recovery."""
    return [1.0 - (1.0 - k / stages) ** 3 for k in range(1, stages + 1)]


def split_steps(steps: int, parts: int) -> list[int]:
    return [steps // parts + (1 if k < steps % parts else 0) for k in range(parts)]


def stage_seconds(budget: float, spent: float, steps: int, steps_left: int) -> float:
    """A stage's share of one time budget (0: no limit) for gradual pruning: what is left of it, in
    proportion to the stage's steps among the steps left, so that a slow first stage cannot starve
    the last one, the one at the final sparsity."""
    if budget <= 0:
        return 0.0
    return max((budget - spent) * steps / max(steps_left, 1), 1e-3)


def merge(total: dict, stage: dict, sparsity: float, stages: int, seconds_budget: float | None = None) -> dict:
    """One report over the recoveries of a gradual pruning: steps, requests and seconds add up, the
    loss before is the first stage's and the loss after the last one's, the loss curve runs on;
    each stage's sparsity and steps are listed when there is more than one. `seconds_budget`: the
    budget of all the stages (each stage gets what is left of it)."""
    if total.get("mode", "none") == "none":
        merged = total | stage
    else:
        merged = total | {k: total[k] + stage[k] for k in ("steps", "steps_requested", "seconds", "seconds_total")
                          if k in total and k in stage}
        for key in ("loss_last", "loss_after"):
            if key in stage:
                merged[key] = stage[key]
        if "calls" in stage:
            merged["calls"] = total["calls"] + stage["calls"]
        merged["loss_curve"] = total.get("loss_curve", []) + [[total["steps"] + i, loss]
                                                              for i, loss in stage.get("loss_curve", [])]
    if seconds_budget is not None:
        merged["seconds_budget"] = seconds_budget
    merged.pop("cut_by_budget", None)
    if merged["steps"] < merged["steps_requested"]:
        merged["cut_by_budget"] = (f"the time budget ({merged['seconds_budget']:g} s) allowed {merged['steps']} of "
                                   f"{merged['steps_requested']} steps")
    if stages > 1:
        merged["stages"] = merged.get("stages", []) + [{"sparsity": round(sparsity, 4), "steps": stage["steps"]}]
    return merged


# -- the service ----------------------------------------------------------------------------------
def recover(module, teacher, ctx, *, steps: int, seconds: float = 0.0, mode: str = "distill", lr: float = 1e-4,
            masks: dict | None = None, layers=(), temperature: float = 2.0, output_loss: str = "auto",
            measure=("before", "after"), label: str = "recovery") -> dict:
    """Recover `module` (pruned in place) towards `teacher`; returns the report of what ran.

    masks:  {submodule: 0/1 tensor of its weight's shape}; None: every zero weight of its Linear and
            Conv layers stays zero (`zero_masks`).
    layers: names of submodules (as in named_modules) whose outputs are distilled too, or "pruned"
            for every masked one; () for the outputs only.
    output_loss: "kl" (logits), "mse", or "auto": KL for 2-D outputs of more than one column, MSE
            for the rest (hidden states are always MSE).
    measure: when to measure the loss against the teacher ("before", "after" training); a pass
            that recovers in stages measures before the first and after the last only.
    """
    _check(steps, seconds, mode, lr, temperature, output_loss, measure)
    if teacher is None and (mode == "distill" or layers):
        raise EdgesparseError(f"{label}: distillation needs the model before pruning (teacher=)")
    masks = zero_masks(module) if masks is None else masks
    names = _layer_names(module, masks, layers, label)
    batches = [to_torch(b, device(module)) for b in ctx.calibration_inputs()]
    held = [to_torch(b, device(module)) for b in ctx.evaluation_inputs()]
    if not batches and mode == "distill":
        raise EdgesparseError(f"{label}: no calibration inputs to distil on")
    world = distributed.world_size()
    if world > 1:
        sync_teacher(teacher, module)
    module.eval()
    t0 = time.monotonic()
    with masks_kept(masks), Taps(module, names) as s_taps, Taps(teacher, names) as t_taps:
        loss = (Distillation(module, teacher, s_taps, t_taps, batches, temperature, world, output_loss)
                if teacher is not None else None)
        report = {"mode": mode}
        eval_set = "evaluation" if held else "calibration"
        if loss is not None and "before" in measure:
            report["loss_before"] = loss.evaluate(held or None)
        t_train = time.monotonic()
        if mode == "distill":
            report |= loss.train(ctx, steps, seconds, lr, label)
        else:
            report |= _user_training(module, ctx, steps, seconds, label, world)
        train_seconds = time.monotonic() - t_train
        if loss is not None and "after" in measure:
            report["loss_after"] = loss.evaluate(held or None)
        if loss is not None and measure:
            report["loss_measured_on"] = f"{len(held or batches)} {eval_set} batches"
    module.eval()
    report |= {"steps_requested": steps, "seconds": round(train_seconds, 2), "seconds_budget": seconds,
               "seconds_total": round(time.monotonic() - t0, 2), "masked_layers": len(masks)}
    if names:
        report["distilled_layers"] = len(names)
    if world > 1:
        report["world_size"] = world
    if report["steps"] < steps:
        report["cut_by_budget"] = f"the time budget ({seconds:g} s) allowed {report['steps']} of {steps} steps"
    before, after = report.get("loss_before"), report.get("loss_after")
    ctx.log(f"{label}: {report['steps']}/{steps} steps in {train_seconds:.1f} s"
            + (f", distillation loss before {before:.4g}" if before is not None else "")
            + (f", after {after:.4g}" if after is not None else ""))
    return report


def distillation_loss(module, teacher, ctx, layers=(), temperature: float = 2.0, output_loss: str = "auto") -> float:
    """The recovery's loss of `module` against `teacher` on the held-out (else calibration) batches,
    without training (e.g. to record what one-shot pruning cost)."""
    names = _layer_names(module, {}, layers, "distillation loss")
    batches = [to_torch(b, device(module)) for b in (ctx.evaluation_inputs() or ctx.calibration_inputs())]
    with Taps(module, names) as s_taps, Taps(teacher, names) as t_taps:
        return Distillation(module, teacher, s_taps, t_taps, batches, temperature,
                             distributed.world_size(), output_loss).evaluate()


def _check(steps, seconds, mode, lr, temperature, output_loss, measure) -> None:
    if set(measure) - {"before", "after"}:
        raise EdgesparseError(f"recovery measure= takes 'before' and/or 'after' (got {measure!r})")
    if mode not in MODES:
        raise EdgesparseError(f"recovery mode '{mode}' is not one of {', '.join(MODES)}")
    if output_loss not in OUTPUT_LOSSES:
        raise EdgesparseError(f"distillation output loss '{output_loss}' is not one of {', '.join(OUTPUT_LOSSES)}")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
        raise EdgesparseError(f"recovery steps must be a whole number >= 0 (got {steps!r})")
    if not seconds >= 0:
        raise EdgesparseError(f"recovery seconds must be >= 0, 0 for no limit (got {seconds!r})")
    if not 0 < lr <= 1:
        raise EdgesparseError(f"recovery learning rate must be in (0, 1] (got {lr!r})")
    if not temperature > 0:
        raise EdgesparseError(f"distillation temperature must be > 0 (got {temperature!r})")


def _layer_names(module, masks: dict, layers, label: str) -> list[str]:
    named = dict(module.named_modules())
    if layers == PRUNED:
        by_module = {m: n for n, m in named.items()}
        return [by_module[m] for m in masks if m in by_module]
    if isinstance(layers, str):
        layers = (layers,)
    unknown = [n for n in layers if n not in named]
    if unknown:
        raise EdgesparseError(f"{label}: the model has no submodule '{unknown[0]}' to distil")
    return list(layers)


def _user_training(module, ctx, steps: int, seconds: float, label: str, world: int) -> dict:
    net = module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        dev = device(module)
        distributed.process_group(dev)
        net = DistributedDataParallel(module, device_ids=[dev] if dev.type == "cuda" else None,
                                      find_unused_parameters=True)
    t0 = time.monotonic()
    calls = [steps if seconds <= 0 or steps <= 1 else max(1, steps // 10)]
    if steps:
        ctx.train(net, calls[0])
    if seconds > 0 and calls[0] < steps:
        spent = time.monotonic() - t0
        fit = int((seconds - spent) / max(spent / calls[0], 1e-9))
        rest = max(0, min(steps - calls[0], fit))
        if rest:
            calls.append(rest)
            ctx.log(f"{label}: {rest} more steps of the training loop "
                    f"(~{spent / calls[0] * rest:.0f} s at {spent / calls[0]:.2f} s per step)")
            ctx.train(net, rest)
    module.eval()
    return {"steps": sum(calls), "calls": calls}
