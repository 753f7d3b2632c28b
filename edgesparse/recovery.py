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
data.
"""
from __future__ import annotations

import copy
import time

import numpy as np

from . import distributed
from .errors import EdgesparseError

MODES = ("distill", "train")
OUTPUT_LOSSES = ("auto", "kl", "mse")
PRUNED = "pruned"           # layers=PRUNED: distil the outputs of every masked module
CACHE_BYTES = 256 << 20     # the teacher's targets are kept between steps up to this size
CURVE_POINTS = 20           # losses listed in the report's loss_curve
SCALE_BATCHES = 4           # batches the teacher's mean squares (the MSE's scales) are taken from


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
    batches = [_to_torch(b, _device(module)) for b in ctx.calibration_inputs()]
    held_out = getattr(ctx, "evaluation_inputs", None)
    held = [_to_torch(b, _device(module)) for b in held_out()] if callable(held_out) else []
    if not batches and mode == "distill":
        raise EdgesparseError(f"{label}: no calibration inputs to distil on")
    world = distributed.world_size()
    if world > 1:
        _sync_teacher(teacher, module)
    module.eval()
    t0 = time.monotonic()
    with masks_kept(masks), _Taps(module, names) as s_taps, _Taps(teacher, names) as t_taps:
        loss = (_Distillation(module, teacher, s_taps, t_taps, batches, temperature, world, output_loss)
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
    held_out = getattr(ctx, "evaluation_inputs", None)
    batches = [_to_torch(b, _device(module)) for b in (held_out() if callable(held_out) else ctx.calibration_inputs())]
    with _Taps(module, names) as s_taps, _Taps(teacher, names) as t_taps:
        return _Distillation(module, teacher, s_taps, t_taps, batches, temperature,
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


def _device(module):
    import torch

    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _to_torch(batch: dict, device) -> dict:
    import torch

    return {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else torch.as_tensor(v)).to(device)
            for k, v in batch.items()}


def _tensors(out):
    import torch

    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict) or hasattr(out, "values") and callable(out.values):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from _tensors(v)


class _Taps:
    """Forward hooks that keep the outputs of named submodules, in the order of `names`."""

    def __init__(self, module, names: list[str]):
        self.module, self.names, self.seen, self.hooks = module, names, {}, []

    def __enter__(self):
        if self.module is None:
            return self
        named = dict(self.module.named_modules())
        for name in self.names:
            def hook(mod, args, out, name=name):
                self.seen[name] = next(_tensors(out))
            self.hooks.append(named[name].register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return False

    def take(self) -> list:
        got = [self.seen[n] for n in self.names]
        self.seen = {}
        return got


def _shard(batch: dict, rank: int, world: int) -> tuple[dict, float]:
    """This rank's rows of a batch (every input whose first axis is the batch's) and the factor that
    makes the ranks' averaged gradient that of the whole batch."""
    if world == 1:
        return batch, 1.0
    first = next(iter(batch.values()), None)
    rows = first.shape[0] if first is not None and first.dim() else 0
    if rows < world:
        raise EdgesparseError(f"recovery: a batch of {rows} rows cannot be shared by {world} processes")
    bounds = [rows * r // world for r in range(world + 1)]
    part = {k: v[bounds[rank]:bounds[rank + 1]] if v.dim() and v.shape[0] == rows else v for k, v in batch.items()}
    return part, (bounds[rank + 1] - bounds[rank]) * world / rows


class _Distillation:
    """The loss of student against teacher on one batch, its training loop and its evaluation."""

    def __init__(self, module, teacher, s_taps, t_taps, batches, temperature, world, output_loss="auto"):
        self.module, self.teacher, self.s_taps, self.t_taps = module, teacher, s_taps, t_taps
        self.temperature, self.world, self.output_loss = temperature, world, output_loss
        self.rank = distributed.rank() if world > 1 else 0
        self.batches = [_shard(b, self.rank, world) for b in batches]
        self.cache: dict[int, list] | None = {}
        self.scales = self._scales()

    def _teacher(self, i: int, args: dict) -> list:
        import torch

        if self.cache is not None and i in self.cache:
            return self.cache[i]
        with torch.no_grad():
            want = list(_tensors(self.teacher(*args.values()))) + self.t_taps.take()
        if self.cache is not None and i >= 0:
            self.cache[i] = want
            if sum(t.numel() * t.element_size() for ts in self.cache.values() for t in ts) > CACHE_BYTES:
                self.cache = None
        return want

    def _scales(self) -> list[float]:
        """Per output and tapped layer, the teacher's mean square over the first calibration batches
        (one constant, the same on every rank: the loss stays a mean over rows)."""
        sums, count = None, 0.0
        for i, (args, _) in enumerate(self.batches[:SCALE_BATCHES]):
            want = self._teacher(i, args)
            s = [float(w.double().pow(2).sum()) if w.is_floating_point() else 0.0 for w in want]
            sums = s if sums is None else [a + b for a, b in zip(sums, s)]
            count_i = [w.numel() for w in want]
            count = count_i if not count else [a + b for a, b in zip(count, count_i)]
        sums, count = self._all_sum(sums or []), self._all_sum(count or [])
        return [s / c + 1e-12 if c else 1.0 for s, c in zip(sums, count)]

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1 or not values:
            return list(values)
        import torch

        dist = distributed.process_group(_device(self.module))
        t = torch.tensor(values, dtype=torch.float64, device=_device(self.module))
        dist.all_reduce(t)
        return t.tolist()

    def loss(self, net, i: int, args: dict):
        import torch.nn.functional as F

        want = self._teacher(i, args)
        got = list(_tensors(net(*args.values()))) + self.s_taps.take()
        n_out = len(want) - len(self.s_taps.names)
        outputs, hidden = [], []
        for k, (g, w) in enumerate(zip(got, want)):
            if not w.is_floating_point():
                continue
            if k < n_out and self._logits(g):
                t = self.temperature
                outputs.append(F.kl_div(F.log_softmax(g / t, 1), F.log_softmax(w / t, 1), log_target=True,
                                        reduction="batchmean") * t * t)
            else:
                (outputs if k < n_out else hidden).append(F.mse_loss(g, w) / self.scales[k])
        if not outputs and not hidden:
            raise EdgesparseError("recovery: the model has no floating-point output to distil")
        total = sum(outputs) if outputs else 0.0
        if hidden:
            total = total + sum(hidden) / len(hidden)
        return total

    def _logits(self, out) -> bool:
        if self.output_loss == "auto":
            return out.dim() == 2 and out.shape[1] > 1
        return self.output_loss == "kl"

    def evaluate(self, batches: list[dict] | None = None) -> float:
        """The mean loss per row on `batches` (held out), or on the training batches (None; the
        teacher's cached targets serve)."""
        import torch

        shards = self.batches if batches is None else [_shard(b, self.rank, self.world) for b in batches]
        weighted, rows = 0.0, 0
        with torch.no_grad():
            for i, (args, _) in enumerate(shards):
                n = next(iter(args.values())).shape[0]
                weighted += float(self.loss(self.module, i if batches is None else -1, args)) * n
                rows += n
        total, count = self._all_sum([weighted, float(rows)]) if self.world > 1 else (weighted, rows)
        return total / max(count, 1)

    def train(self, ctx, steps: int, seconds: float, lr: float, label: str) -> dict:
        import torch

        params = [p for p in self.module.parameters() if p.requires_grad and p.is_floating_point()]
        net, frozen = self.module, []
        if self.world > 1 and steps:
            from torch.nn.parallel import DistributedDataParallel

            frozen = self._freeze_unused(params)
            dev = _device(self.module)
            distributed.process_group(dev)
            net = DistributedDataParallel(self.module, device_ids=[dev] if dev.type == "cuda" else None)
        opt = torch.optim.Adam([p for p in params if p.requires_grad], lr=lr)
        t0 = time.monotonic()
        losses, done = [], 0
        for step in ctx.progress(range(steps), label, length=steps):
            i = step % len(self.batches)
            args, factor = self.batches[i]
            loss = self.loss(net, i, args) * factor  # the ranks' mean gradient is the whole batch's
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())  # this rank's share of the whole batch's loss, times world
            done = step + 1
            if seconds > 0 and self._stop(time.monotonic() - t0 > seconds):
                break
        for p in frozen:
            p.requires_grad_(True)
        curve = self._all_sum([float(l) for l in losses]) if self.world > 1 else [float(l) for l in losses]
        curve = [c / self.world for c in curve] if self.world > 1 else curve
        del net
        tenth = max(1, len(curve) // 10)
        picks = sorted({round(j * (len(curve) - 1) / max(CURVE_POINTS - 1, 1)) for j in range(CURVE_POINTS)}) if curve else []
        return {"steps": done, "lr": lr, "batches": len(self.batches),
                "loss_first": float(np.mean(curve[:tenth])) if curve else None,
                "loss_last": float(np.mean(curve[-tenth:])) if curve else None,
                "loss_curve": [[j + 1, curve[j]] for j in picks]}

    def _freeze_unused(self, params: list) -> list:
        """Parameters the loss does not reach (e.g. a pooler whose output is not used) would keep
        DDP waiting for their gradients: found by one backward pass, frozen for the recovery."""
        args, _ = self.batches[0]
        self.loss(self.module, 0, args).backward()
        unused = [p for p in params if p.grad is None]
        for p in params:
            p.grad = None
        for p in unused:
            p.requires_grad_(False)
        return unused

    def _stop(self, mine: bool) -> bool:
        """Past the budget: every rank stops at the same step (else DDP would wait forever)."""
        if self.world == 1:
            return mine
        return max(self._all_sum([1.0 if mine else 0.0])) > 0


def _sync_teacher(teacher, module) -> None:
    """Every rank distils from rank 0's teacher (DDP already starts every student from rank 0's)."""
    if teacher is None:
        return
    dist = distributed.process_group(_device(module))
    for t in teacher.state_dict().values():
        dist.broadcast(t, 0)


def _user_training(module, ctx, steps: int, seconds: float, label: str, world: int) -> dict:
    net = module
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        dev = _device(module)
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
