"""Continual learning with DER++ and SparCL's three components.

DER++ (the rehearsal base): loss = CE(current batch) + alpha * MSE(buffer logits) + beta * CE(buffer
labels), with a reservoir buffer. The current batch and two buffer samples go through the model
in one forward pass.

SparCL on top, each component switchable:
  TDM  task-aware dynamic masking: the network is sparse from the first step. At scheduled epochs
       of every task each prunable layer is pruned to a lower density bound by importance
       |w| + lambda * |grad| (grad of the DER++ loss on current + buffered data, at the first step
       of the epoch) and random zero units are regrown (at zero) to the upper bound; the last
       updates of a task do not regrow.
  DDR  dynamic data removal: at scheduled epochs, drop the current task's examples with the fewest
       forgetting events (correct -> wrong between presentations); ties go by the largest
       classification margin. 30% of the task's data in total by default.
  DGM  dynamic gradient masking: every `dgm_refresh` batches all kept gradients are computed; per
       layer only the largest ones (by |grad|) are kept so that `gradient_sparsity` of the layer's
       weights get no gradient, until the next refresh. Block layers keep gradient units of one
       output channel x one input channel (all taps) so the dW kernel skips the rest.

The paper's schedules are for 50 epochs per task (mask update every 5 epochs with bounds
(s, s-d) before epoch 5, (s+d, s) until epoch 45, (s, s) after, d = 0.01 at s = 0.75; data
removal at epochs 5, 10, 15, 20); `Schedule.for_epochs` scales them to the epochs given. A
removal needs forgetting statistics: the paper's first removal comes after 5 presentations of the
task's data, and the scaled removals keep that minimum (removing after one presentation made
3-epoch runs collapse, after two it cost accuracy in the 5-epoch runs: README), so tasks of fewer
than 13 epochs remove nothing unless `ddr_epochs` asks.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgesparse import EdgesparseError

from . import sparse
from .buffer import ReservoirBuffer
from .data import TaskStream

METHODS = ("sparcl", "derpp")
CHECKPOINT = "checkpoint.pt"
RESULTS = "results.json"
FORMAT = 1
DDR_FIRST = 5  # no data removal before this epoch: forgetting statistics over 5 presentations (the paper's first)


@dataclass
class ContinualConfig:
    method: str = "sparcl"          # "sparcl" or "derpp" (dense DER++)
    epochs: int = 50                # per task
    batch_size: int = 32
    buffer_size: int = 500
    lr: float = 0.03                # plain SGD, no momentum or weight decay (the paper's CL setting)
    alpha: float = 0.1              # DER++ logit (MSE) weight
    beta: float = 0.5               # DER++ label (CE) weight
    mask_old_classes: bool = True   # current-batch CE over the current task's classes only
    sparsity: float = 0.9           # zero fraction of each pruned layer; 90%: where training gets faster (README)
    pattern: str = "block"          # "block" (runs on the kernels) or "unstructured" (the paper)
    block: int = 16                 # block = B output channels x 1 input channel (x taps)
    tdm: bool = True
    ddr: bool = True
    dgm: bool = True
    kernels: bool = True            # block pattern: run pruned layers on the sparse kernels
    importance_lambda: float = 0.5
    mask_every: int = 0             # epochs between mask updates; 0: the paper's schedule scaled
    ddr_fraction: float = 0.3
    ddr_epochs: tuple[int, ...] | None = None  # epochs that start with a removal; None: the paper's, scaled
    gradient_sparsity: float = 0.8
    dgm_refresh: int = 30
    bn_from_buffer: bool = True     # after each task: batch norm statistics re-estimated over the buffer (README)
    prune_first_last: bool = False  # the first layer and the classifier stay dense by default
    prune_1x1: bool = False         # 1x1 convolutions (projection shortcuts) stay dense by default
    seed: int = 0

    def check(self) -> None:
        def bad(name, why):
            raise EdgesparseError(f"option {name}={getattr(self, name)!r}: {why}")

        if self.method not in METHODS:
            bad("method", f"must be one of {', '.join(METHODS)}")
        if self.pattern not in sparse.PATTERNS:
            bad("pattern", f"must be one of {', '.join(sparse.PATTERNS)}")
        if self.pattern == "block" and self.block not in sparse.BLOCKS:
            bad("block", f"must be one of {sparse.BLOCKS}")
        if self.epochs < 1:
            bad("epochs", "must be at least 1")
        if self.batch_size < 2:
            bad("batch_size", "must be at least 2 (batch norm needs two examples)")
        if self.buffer_size < 0:
            bad("buffer_size", "must be >= 0")
        if not 0.0 <= self.sparsity < 1.0:
            bad("sparsity", "must be in [0, 1)")
        for name in ("ddr_fraction", "gradient_sparsity"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "must be in [0, 1)")
        if self.lr <= 0:
            bad("lr", "must be positive")
        if self.mask_every < 0:
            bad("mask_every", "must be >= 0")
        if self.dgm_refresh < 1:
            bad("dgm_refresh", "must be at least 1")
        if self.ddr_epochs is not None:
            self.ddr_epochs = tuple(int(e) for e in self.ddr_epochs)
            if any(not 1 <= e < self.epochs for e in self.ddr_epochs) or len(set(self.ddr_epochs)) != len(self.ddr_epochs):
                bad("ddr_epochs", f"must be distinct epochs in 1..{self.epochs - 1} (epoch 0 has no statistics yet)")

    def options(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Schedule:
    """When TDM and DDR act within a task of `epochs` epochs."""

    epochs: int
    mask_every: int
    phase1_from: int
    phase2_from: int
    ddr_epochs: tuple[int, ...]

    @staticmethod
    def for_epochs(epochs: int, mask_every: int = 0, ddr_epochs: tuple[int, ...] | None = None) -> "Schedule":
        every = mask_every or max(1, (5 * epochs) // 50)
        phase1 = max(1, (5 * epochs) // 50)
        phase2 = max(phase1, (45 * epochs) // 50)
        until = (20 * epochs) // 50
        if ddr_epochs is None:  # the paper's first removal follows 5 presentations: none earlier
            ddr_epochs = tuple(e for e in range(DDR_FIRST, epochs) if e % every == 0 and e <= until)
        return Schedule(epochs, every, phase1, phase2, tuple(sorted(ddr_epochs)))

    def updates_mask(self, epoch: int) -> bool:
        return epoch % self.mask_every == 0

    def bounds(self, epoch: int, sparsity: float) -> tuple[float, float]:
        """(prune-to sparsity, grow-to sparsity) at this epoch. The paper's 75% schedule moves 1%
        of the weights (0.75/0.74, then 0.76/0.75), i.e. 4% of the kept ones; the same 4% of the
        kept weights is moved at any sparsity (0.004 of the weights at 90%)."""
        delta = 0.04 * (1.0 - sparsity)
        if epoch < self.phase1_from:
            prune, grow = sparsity, sparsity - delta
        elif epoch < self.phase2_from:
            prune, grow = sparsity + delta, sparsity
        else:
            prune, grow = sparsity, sparsity
        clip = lambda v: min(max(v, 0.0), 0.999)
        return clip(prune), clip(min(grow, prune))


@dataclass
class LayerInfo:
    name: str
    module: nn.Module
    positions: int        # output positions per example (H*W of the output; rows for a Linear)
    weights: int
    input_grad: bool      # backward computes dX for this layer
    pruned: sparse.PrunableLayer | None = None
    on_kernel: bool = False
    dense_reason: str = ""


def _find_layers(model: nn.Module, example: torch.Tensor) -> list[LayerInfo]:
    """Conv2d/Linear layers in the order a forward pass runs them."""
    found: list[LayerInfo] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def hook(module, inputs, output):
        if any(l.module is module for l in found):
            return
        out = output if isinstance(output, torch.Tensor) else output[0]
        per_example = out[0].numel() // module.weight.shape[0] if out.dim() > 1 else 1
        found.append(LayerInfo(names[module], module, int(per_example), module.weight.numel(),
                               bool(inputs[0].requires_grad)))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return found


class FlopCounter:
    """Training FLOPs of Conv2d/Linear layers (2 per multiply-add): forward, dX and dW, with
    sparse layers counted at their kept weights and DGM-restricted gradients."""

    def __init__(self):
        self.forward = self.backward_input = self.backward_weight = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward_input + self.backward_weight

    def as_dict(self) -> dict:
        return {"forward": self.forward, "backward_input": self.backward_input,
                "backward_weight": self.backward_weight, "total": self.total}


class ContinualTrainer:
    """Trains `model` on the tasks of `stream` one after the other.

    out_dir: where checkpoints (after every task, atomic) and results.json go; a run started
    there before resumes from its last finished task, and only with the same options and data.
    """

    def __init__(self, model: nn.Module, stream: TaskStream, config: ContinualConfig, out_dir: Path | str | None = None,
                 progress: bool = True, log=None, eval_batch: int = 500, meta: dict | None = None):
        config.check()
        self.meta = dict(meta or {})
        if config.buffer_size > stream.train_size():
            raise EdgesparseError(
                f"buffer of {config.buffer_size} examples is larger than the {stream.train_size()} training examples "
                "of all tasks together")
        self.model, self.stream, self.config = model, stream, config
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.eval_batch = eval_batch
        self.schedule = Schedule.for_epochs(config.epochs, config.mask_every, config.ddr_epochs)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.layers = _find_layers(model, stream.x_train[:1])
        if not self.layers:
            raise EdgesparseError("the model has no Conv2d or Linear layer")
        self.outputs = self._check_outputs()
        self.buffer = ReservoirBuffer(config.buffer_size, tuple(stream.x_train.shape[1:]), self.outputs,
                                      seed=config.seed + 1)
        self._choose_pruned()
        self.results = {"acc_class_il": [], "acc_task_il": [], "acc_class_il_running_bn": [], "acc_task_il_running_bn": [],
                        "train_seconds": [], "train_cpu_seconds": [],
                        "flops": [], "steps": [],
                        "examples": [], "removed": [], "density": [], "completed_tasks": 0}
        self.flops = FlopCounter()
        self._dgm_masks: dict[str, torch.Tensor] = {}  # masked-dense layers: per-weight gradient masks
        self._weight_masks: dict[str, torch.Tensor] = {}
        self._kept: dict[str, float] = {}
        self._dgm_due = False

    # -- setup ---------------------------------------------------------------------
    def _check_outputs(self) -> int:
        self.model.eval()
        with torch.no_grad():
            out = self.model(self.stream.x_train[:2])
        self.model.train()
        if out.dim() != 2 or out.shape[1] < self.stream.num_classes:
            raise EdgesparseError(f"the model returns shape {tuple(out.shape)}; it needs [batch, >= "
                                  f"{self.stream.num_classes}] logits for the stream's classes")
        return int(out.shape[1])

    def _choose_pruned(self) -> None:
        c = self.config
        if c.method != "sparcl":
            return
        last = len(self.layers) - 1
        for i, info in enumerate(self.layers):
            m = info.module
            if not c.prune_first_last and i in (0, last):
                info.dense_reason = "first layer" if i == 0 else "last layer (classifier)"
            elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and not c.prune_1x1:
                info.dense_reason = "1x1 convolution"
            elif c.pattern == "block" and isinstance(m, nn.Conv2d) and m.groups != 1:
                info.dense_reason = "grouped convolution (block pattern needs groups=1)"
            if info.dense_reason:
                continue
            info.pruned = sparse.PrunableLayer(info.name, m, c.pattern, c.block)
        if not any(l.pruned for l in self.layers):
            raise EdgesparseError("no layer of the model can be pruned (all are first/last, 1x1 or grouped)")

    def pruned_layers(self) -> list[sparse.PrunableLayer]:
        return [l.pruned for l in self.layers if l.pruned is not None]

    def _init_masks(self) -> None:
        """Magnitude pruning of the initial weights to the target (SparCL trains sparse from step one)."""
        for layer in self.pruned_layers():
            scores = layer.unit_scores(layer.module.weight.detach().abs())
            layer.set_mask(_top_units(scores, 1.0 - self.config.sparsity))
            layer.apply_mask()
        self._refresh_layers()

    def _refresh_layers(self) -> None:
        c = self.config
        self._weight_masks, self._kept = {}, {}
        for info in self.layers:
            layer = info.pruned
            if layer is None:
                continue
            self._weight_masks[layer.name] = layer.weight_mask().float()
            self._kept[layer.name] = float(self._weight_masks[layer.name].sum())
            want_kernel = c.pattern == "block" and c.kernels
            reason = sparse.kernel_supported(layer.module) if want_kernel else "kernels off"
            if want_kernel and reason is None:
                sparse.attach_kernels(layer)
                info.on_kernel = True
            else:
                info.on_kernel = False
                if want_kernel:
                    info.dense_reason = f"runs masked-dense: {reason}"

    # -- the run ---------------------------------------------------------------------
    def run(self) -> dict:
        start_task = self._resume()
        if start_task == 0 and self.config.method == "sparcl":
            self._init_masks()
        if self.config.method == "sparcl" and self.config.ddr and not self.schedule.ddr_epochs:
            self.log(f"DDR removes nothing: a task of {self.config.epochs} epochs has no removal epoch (removals start "
                     f"at epoch {DDR_FIRST}, after {DDR_FIRST} presentations as in the paper; set ddr_epochs to force one)")
        for t in range(start_task, len(self.stream.tasks)):
            cpu = time.process_time()
            seconds, steps, examples, removed = self._train_task(t)
            cpu = time.process_time() - cpu
            # accuracy with the running statistics, then (the trained model's) with batch norm re-estimated
            running_cil, running_til = self.evaluate(t)
            begin, cpu_begin = time.perf_counter(), time.process_time()
            if self._recalibrate_bn(t):
                seconds += time.perf_counter() - begin
                cpu += time.process_time() - cpu_begin
                acc_cil, acc_til = self.evaluate(t)
            else:
                acc_cil, acc_til = running_cil, running_til
            r = self.results
            r["acc_class_il"].append(acc_cil)
            r["acc_task_il"].append(acc_til)
            r["acc_class_il_running_bn"].append(running_cil)
            r["acc_task_il_running_bn"].append(running_til)
            r["train_seconds"].append(seconds)
            r["train_cpu_seconds"].append(cpu)
            r["flops"].append(self.flops.as_dict())
            r["steps"].append(steps)
            r["examples"].append(examples)
            r["removed"].append(removed)
            r["density"].append({l.name: l.density() for l in self.pruned_layers()})
            r["completed_tasks"] = t + 1
            self.log(f"task {t + 1}/{len(self.stream.tasks)} classes {list(self.stream.tasks[t])}: "
                     f"class-IL {np.mean(acc_cil):.2f}% task-IL {np.mean(acc_til):.2f}% "
                     f"train {seconds:.1f} s, {steps} steps, {examples} examples"
                     + (f", {removed} removed by DDR" if removed else ""))
            self._checkpoint()
        return self.summary()

    def summary(self) -> dict:
        r = self.results
        done = r["completed_tasks"]
        out = {"options": self.config.options(), "meta": self.meta, "data": self.stream.name, "tasks": [list(t) for t in self.stream.tasks],
               "completed_tasks": done, "per_task": {k: r.get(k, []) for k in (
                   "acc_class_il", "acc_task_il", "acc_class_il_running_bn", "acc_task_il_running_bn", "train_seconds", "train_cpu_seconds", "steps", "examples", "removed",
                   "density")}}
        if done:
            out["class_il"] = float(np.mean(r["acc_class_il"][-1]))
            out["task_il"] = float(np.mean(r["acc_task_il"][-1]))
            out["forgetting"] = forgetting(r["acc_class_il"])
            out["forgetting_task_il"] = forgetting(r["acc_task_il"])
            if r.get("acc_class_il_running_bn"):
                out["class_il_running_bn"] = float(np.mean(r["acc_class_il_running_bn"][-1]))
                out["task_il_running_bn"] = float(np.mean(r["acc_task_il_running_bn"][-1]))
                out["forgetting_running_bn"] = forgetting(r["acc_class_il_running_bn"])
            out["train_seconds"] = float(sum(r["train_seconds"]))
            out["train_cpu_seconds"] = float(sum(r["train_cpu_seconds"]))
            out["threads"] = torch.get_num_threads()
            out["train_flops"] = r["flops"][-1]
        out["layers"] = [{"layer": l.name, "pruned": l.pruned is not None, "on_kernel": l.on_kernel,
                          "density": l.pruned.density() if l.pruned else 1.0,
                          **({"dense_reason": l.dense_reason} if l.dense_reason else {})} for l in self.layers]
        return out

    # -- one task --------------------------------------------------------------------
    def _train_task(self, t: int) -> tuple[float, int, int, int]:
        c, s = self.config, self.schedule
        sparcl = c.method == "sparcl"
        task_idx = self.stream.task_indices(t, "train")
        n_task = len(task_idx)
        if n_task < c.batch_size:
            raise EdgesparseError(f"task {t} has {n_task} training examples, fewer than one batch of {c.batch_size}")
        active = torch.arange(n_task)
        stats = _ForgettingStats(n_task)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=c.lr)
        classes = torch.tensor(self.stream.tasks[t])
        other = torch.ones(self.outputs, dtype=torch.bool)
        other[classes] = False
        removal_plan = self._removal_plan(n_task) if sparcl and c.ddr else {}
        total_steps = self._planned_steps(n_task, removal_plan)
        seconds, steps, examples, removed = 0.0, 0, 0, 0
        self.model.train()
        bar = self._bar(total_steps, f"task {t + 1}/{len(self.stream.tasks)}")
        try:
            for epoch in range(c.epochs):
                begin = time.perf_counter()
                if epoch in removal_plan:
                    drop = stats.least_forgotten(active, removal_plan[epoch])
                    keep = torch.ones(n_task, dtype=torch.bool)
                    keep[drop] = False
                    active = active[keep[active]]
                    removed += len(drop)
                update_mask = sparcl and c.tdm and s.updates_mask(epoch)
                order = active[torch.randperm(len(active), generator=self.generator)]
                batches = len(order) // c.batch_size
                seconds += time.perf_counter() - begin
                for b in range(batches):
                    begin = time.perf_counter()
                    local = order[b * c.batch_size:(b + 1) * c.batch_size]
                    full_grad = ((update_mask and b == 0) or self._dgm_due
                                 or (sparcl and c.dgm and steps % c.dgm_refresh == 0))
                    self._dgm_due = False
                    self._step(optimizer, task_idx[local], local, t, other, stats, full_grad)
                    if update_mask and b == 0:
                        self._update_masks(epoch)
                    steps += 1
                    examples += len(local)
                    seconds += time.perf_counter() - begin
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.render_finish()
        return seconds, steps, examples, removed

    def _removal_plan(self, n_task: int) -> dict[int, int]:
        epochs = self.schedule.ddr_epochs
        if not epochs:
            return {}
        total = int(round(self.config.ddr_fraction * n_task))
        plan, done = {}, 0
        for i, e in enumerate(epochs):
            upto = int(round(total * (i + 1) / len(epochs)))
            plan[e] = upto - done
            done = upto
        return plan

    def _planned_steps(self, n_task: int, plan: dict[int, int]) -> int:
        steps, left = 0, n_task
        for e in range(self.config.epochs):
            left -= plan.get(e, 0)
            steps += left // self.config.batch_size
        return steps

    def _bar(self, length: int, label: str):
        if not self.progress:
            return None
        import click

        bar = click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True, show_eta=True)
        bar.__enter__()
        return bar

    def _step(self, optimizer, idx, local, task, other, stats, full_grad: bool) -> None:
        c = self.config
        x, y = self.stream.x_train[idx], self.stream.y_train[idx]
        n = len(x)
        parts = [x]
        if len(self.buffer) > 0:
            bx1, _, blogits = self.buffer.sample(c.batch_size)
            bx2, by2, _ = self.buffer.sample(c.batch_size)
            parts += [bx1, bx2]
        self._set_grad_units(full_grad)
        out = self.model(torch.cat(parts) if len(parts) > 1 else x)
        logits = out[:n]
        current = logits.masked_fill(other, float("-inf")) if c.mask_old_classes else logits
        loss = F.cross_entropy(current, y)
        if len(parts) > 1:
            k1 = len(parts[1])
            loss = loss + c.alpha * F.mse_loss(out[n:n + k1], blogits) + c.beta * F.cross_entropy(out[n + k1:], by2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        stats.record(local, logits.detach(), y)
        self._count_flops(n + sum(len(p) for p in parts[1:]), full_grad)
        if c.method == "sparcl":
            self._mask_gradients(full_grad)
        optimizer.step()
        if c.method == "sparcl":
            with torch.no_grad():
                for layer in self.pruned_layers():
                    layer.module.weight.mul_(self._weight_masks[layer.name])
        self.buffer.add(x, y, logits, task)

    # -- sparsity ----------------------------------------------------------------------
    def _set_grad_units(self, full_grad: bool) -> None:
        for layer in self.pruned_layers():
            if full_grad or not self.config.dgm:
                layer.grad_units = None
            else:
                layer.grad_units = getattr(layer, "_dgm_units", None)

    def _mask_gradients(self, full_grad: bool) -> None:
        c = self.config
        for info in self.layers:
            layer = info.pruned
            if layer is None or layer.module.weight.grad is None:
                continue
            grad = layer.module.weight.grad
            if not info.on_kernel:
                grad.mul_(self._weight_masks[layer.name])
            if not c.dgm:
                continue
            if full_grad:
                self._refresh_dgm(info)
            if not info.on_kernel and layer.name in self._dgm_masks:
                grad.mul_(self._dgm_masks[layer.name])

    def _refresh_dgm(self, info: LayerInfo) -> None:
        """Keep the largest gradients so that `gradient_sparsity` of the layer's weights get none."""
        layer, c = info.pruned, self.config
        grad = layer.module.weight.grad.detach().abs()
        budget = (1.0 - c.gradient_sparsity) * grad.numel()  # weights allowed a gradient
        if info.on_kernel:
            idx = layer.index()
            taps, b = layer.taps, layer.block
            # gradient units of the kept blocks: (block p, lane b) = output channel x input channel
            per_pair = grad.reshape(layer.out_features, layer.in_features, taps).sum(-1)
            out_ch = idx["blk_row"].long()[:, None] * b + torch.arange(b)[None, :]
            valid = out_ch < layer.out_features
            cols = idx["c_index"].long()[:, None].expand_as(out_ch)
            score = torch.where(valid, per_pair[out_ch.clamp(max=layer.out_features - 1), cols], torch.tensor(-1.0))
            n_valid = int(valid.sum())
            k = int(budget // taps)
            if k >= n_valid:
                layer._dgm_units = None
                return
            top = torch.topk(score.reshape(-1), k).indices
            layer._dgm_units = torch.sort(top).values.to(torch.int32).contiguous()
        else:
            kept = self._weight_masks[layer.name].bool()
            n_kept = int(kept.sum())
            k = int(budget)
            if k >= n_kept:
                self._dgm_masks.pop(layer.name, None)
                return
            scores = torch.where(kept, grad, torch.tensor(-1.0)).reshape(-1)
            mask = torch.zeros(grad.numel())
            mask[torch.topk(scores, k).indices] = 1.0
            self._dgm_masks[layer.name] = mask.reshape(grad.shape)

    def _update_masks(self, epoch: int) -> None:
        """TDM: prune by |w| + lambda |grad| to the lower bound, regrow random units to the upper bound."""
        c = self.config
        prune_to, grow_to = self.schedule.bounds(epoch, c.sparsity)
        for layer in self.pruned_layers():
            w = layer.module.weight.detach()
            g = layer.module.weight.grad
            importance = w.abs() + (c.importance_lambda * g.detach().abs() if g is not None else 0.0)
            scores = layer.unit_scores(importance).masked_fill(~layer.mask, float("-inf"))
            keep = _top_units(scores, 1.0 - prune_to)
            n_grow = _unit_count(layer.units, 1.0 - grow_to) - int(keep.sum())
            if n_grow > 0:
                zeros = torch.nonzero(~keep.reshape(-1), as_tuple=False).flatten()
                pick = zeros[torch.randperm(len(zeros), generator=self.generator)[:n_grow]]
                flat = keep.reshape(-1).clone()
                flat[pick] = True
                keep = flat.reshape(keep.shape)
            layer.set_mask(keep)
            layer.apply_mask()
            layer._dgm_units = None
        self._dgm_masks.clear()
        self._refresh_layers()
        # the gradient masks follow the new weight masks: the next step computes every kept gradient
        self._dgm_due = bool(c.dgm)

    def _count_forward(self, n: int) -> None:
        for info in self.layers:
            active = info.weights if info.pruned is None else self._kept[info.pruned.name]
            self.flops.forward += 2.0 * n * info.positions * active

    def _count_flops(self, n: int, full_grad: bool) -> None:
        c = self.config
        for info in self.layers:
            layer = info.pruned
            if layer is None:
                active = grads = info.weights
            else:
                active = self._kept[layer.name]
                grads = active
                if c.dgm and not full_grad:
                    if info.on_kernel and getattr(layer, "_dgm_units", None) is not None:
                        grads = layer._dgm_units.numel() * layer.taps
                    elif not info.on_kernel and layer.name in self._dgm_masks:
                        grads = float(self._dgm_masks[layer.name].sum())
            per = 2.0 * n * info.positions
            self.flops.forward += per * active
            if info.input_grad:
                self.flops.backward_input += per * active
            self.flops.backward_weight += per * grads

    # -- batch norm statistics ------------------------------------------------------------
    @torch.no_grad()
    def _recalibrate_bn(self, t: int) -> bool:
        """Replace every batch norm's running statistics by their average over the rehearsal
        buffer (the current task's data while the buffer is empty): forward passes in training
        mode, no gradient, in a fixed order, so that no random stream moves and training is
        unchanged (training normalises with batch statistics). The running averages lag behind
        the weights; at 90% sparsity channels with few kept inputs have small variances, and the
        lag alone turned a trained first task (97% in training mode) into a constant prediction."""
        if not self.config.bn_from_buffer:
            return False
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms:
            return False
        x = self.buffer.x[:len(self.buffer)] if len(self.buffer) else self.stream.x_train[self.stream.task_indices(t, "train")]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the chunks
        chunks = max(1, min(len(x) // 2, math.ceil(len(x) / (3 * self.config.batch_size))))  # ~ a training forward
        try:
            self.model.train()
            for part in torch.tensor_split(x, chunks):  # near-equal sizes: the average weighs chunks equally
                self.model(part)
                self._count_forward(len(part))
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum
        return True

    # -- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, upto: int) -> tuple[list[float], list[float]]:
        """Class-IL and task-IL accuracy (%) on the test data of tasks 0..upto."""
        self.model.eval()
        cil, til = [], []
        for j in range(upto + 1):
            idx = self.stream.task_indices(j, "test")
            classes = torch.tensor(self.stream.tasks[j])
            right_c = right_t = 0
            for s in range(0, len(idx), self.eval_batch):
                part = idx[s:s + self.eval_batch]
                out = self.model(self.stream.x_test[part])[:, :self.stream.num_classes]
                y = self.stream.y_test[part]
                right_c += int((out.argmax(1) == y).sum())
                right_t += int((classes[out[:, classes].argmax(1)] == y).sum())
            cil.append(100.0 * right_c / len(idx))
            til.append(100.0 * right_t / len(idx))
        self.model.train()
        return cil, til

    # -- checkpoints -------------------------------------------------------------------
    def _checkpoint(self) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "format": FORMAT,
            "options": self.config.options(),
            "meta": self.meta,
            "data": self.stream.fingerprint(),
            "tasks": [list(t) for t in self.stream.tasks],
            "model": self.model.state_dict(),
            "masks": {l.name: l.mask.clone() for l in self.pruned_layers()},
            "dgm_units": {l.name: getattr(l, "_dgm_units", None) for l in self.pruned_layers()},
            "dgm_masks": dict(self._dgm_masks),
            "buffer": self.buffer.state_dict(),
            "generator": self.generator.get_state(),
            "flops": self.flops.as_dict(),
            "results": self.results,
        }
        _atomic_write(self.out_dir / CHECKPOINT, lambda f: torch.save(state, f))
        summary = json.dumps(self.summary(), indent=2).encode()
        _atomic_write(self.out_dir / RESULTS, lambda f: f.write(summary))

    def _resume(self) -> int:
        if self.out_dir is None or not (self.out_dir / CHECKPOINT).exists():
            return 0
        path = self.out_dir / CHECKPOINT
        try:
            state = torch.load(path, weights_only=False)
        except Exception as exc:
            raise EdgesparseError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
        if state.get("format") != FORMAT:
            raise EdgesparseError(f"checkpoint {path} has format {state.get('format')}, this version reads {FORMAT}")
        old, new = {**state.get("meta", {}), **state["options"]}, {**self.meta, **self.config.options()}
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise EdgesparseError(
                    f"cannot resume {self.out_dir}: it was started with {key}={old.get(key)!r}, this run asks for "
                    f"{key}={new.get(key)!r} (use the same options, or another output folder)")
        if state["data"] != self.stream.fingerprint() or state["tasks"] != [list(t) for t in self.stream.tasks]:
            raise EdgesparseError(f"cannot resume {self.out_dir}: it was started on different data or tasks")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise EdgesparseError(f"cannot resume {self.out_dir}: the model does not match the checkpoint "
                                  f"({str(exc).splitlines()[0]})") from exc
        for layer in self.pruned_layers():
            layer.set_mask(state["masks"][layer.name])
            layer._dgm_units = state["dgm_units"].get(layer.name)
        self._dgm_masks = dict(state["dgm_masks"])
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["generator"])
        self.flops.__dict__.update({k: v for k, v in state["flops"].items() if k != "total"})
        self.results = state["results"]
        if self.config.method == "sparcl":
            self._refresh_layers()
        done = self.results["completed_tasks"]
        self.log(f"resuming {self.out_dir}: {done}/{len(self.stream.tasks)} tasks already trained")
        return done


class _ForgettingStats:
    """Per-example record over presentations of the current task: forgetting events
    (correct -> wrong), whether it was ever classified correctly, and the summed margin."""

    def __init__(self, n: int):
        self.last = torch.zeros(n, dtype=torch.bool)
        self.seen = torch.zeros(n, dtype=torch.long)
        self.forgotten = torch.zeros(n, dtype=torch.long)
        self.learned = torch.zeros(n, dtype=torch.bool)
        self.margin = torch.zeros(n)

    def record(self, local: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        correct = logits.argmax(1) == y
        right = logits.gather(1, y[:, None]).squeeze(1)
        wrong = logits.scatter(1, y[:, None], float("-inf")).max(1).values
        self.forgotten[local] += (self.last[local] & ~correct).long()
        self.last[local] = correct
        self.learned[local] |= correct
        self.seen[local] += 1
        self.margin[local] += right - wrong

    def least_forgotten(self, active: torch.Tensor, n: int) -> torch.Tensor:
        """The n active examples least likely to be forgotten: fewest forgetting events (never
        learned counts as forgotten at every presentation), then largest mean margin."""
        if n <= 0:
            return active[:0]
        events = torch.where(self.learned[active], self.forgotten[active], self.seen[active]).double()
        mean_margin = (self.margin[active] / self.seen[active].clamp(min=1)).double()
        # lexicographic: events ascending, margin descending (margins are bounded well below 1e6)
        key = events * 1e6 - mean_margin.clamp(-1e5, 1e5)
        order = torch.argsort(key, stable=True)
        return active[order[:n]]


def _unit_count(units: int, density: float) -> int:
    return int(round(density * units))


def _top_units(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask keeping the round(density * n) highest scores (ties broken by position)."""
    k = _unit_count(scores.numel(), density)
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(-flat.double(), stable=True)[:k]
        mask[order] = True
    return mask.reshape(scores.shape)


def forgetting(acc: list[list[float]]) -> float:
    """Mean over all but the last task of (best accuracy on it before the last task - accuracy at the end)."""
    if len(acc) < 2:
        return 0.0
    final = acc[-1]
    drops = [max(acc[l][j] for l in range(j, len(acc) - 1)) - final[j] for j in range(len(acc) - 1)]
    return float(np.mean(drops))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
