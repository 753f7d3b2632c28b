"""The distillation loop behind the recovery service (edgesparse.recovery, which is the API):
the loss of a pruned student against its teacher, over outputs and tapped hidden states, its
Adam training loop with a time budget, and the data-parallel share of every batch under torchrun."""
from __future__ import annotations

import time

import numpy as np

from . import distributed
from .errors import EdgesparseError

CACHE_BYTES = 256 << 20     # the teacher's targets are kept between steps up to this size
CURVE_POINTS = 20           # losses listed in the report's loss_curve
SCALE_BATCHES = 4           # batches the teacher's mean squares (the MSE's scales) are taken from


def device(module):
    import torch

    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def to_torch(batch: dict, device) -> dict:
    import torch

    return {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else torch.as_tensor(v)).to(device)
            for k, v in batch.items()}


def tensors(out):
    import torch

    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict) or hasattr(out, "values") and callable(out.values):
        for v in out.values():
            yield from tensors(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from tensors(v)


class Taps:
    """Forward hooks that keep the outputs of named submodules, in the order of `names`."""

    def __init__(self, module, names: list[str]):
        self.module, self.names, self.seen, self.hooks = module, names, {}, []

    def __enter__(self):
        if self.module is None:
            return self
        named = dict(self.module.named_modules())
        for name in self.names:
            def hook(mod, args, out, name=name):
                self.seen[name] = next(tensors(out))
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


def shard(batch: dict, rank: int, world: int) -> tuple[dict, float]:
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


class Distillation:
    """The loss of student against teacher on one batch, its training loop and its evaluation."""

    def __init__(self, module, teacher, s_taps, t_taps, batches, temperature, world, output_loss="auto"):
        self.module, self.teacher, self.s_taps, self.t_taps = module, teacher, s_taps, t_taps
        self.temperature, self.world, self.output_loss = temperature, world, output_loss
        self.rank = distributed.rank() if world > 1 else 0
        self.batches = [shard(b, self.rank, world) for b in batches]
        self.cache: dict[int, list] | None = {}
        self.scales = self._scales()

    def _teacher(self, i: int, args: dict) -> list:
        import torch

        if self.cache is not None and i in self.cache:
            return self.cache[i]
        with torch.no_grad():
            want = list(tensors(self.teacher(*args.values()))) + self.t_taps.take()
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

        dist = distributed.process_group(device(self.module))
        t = torch.tensor(values, dtype=torch.float64, device=device(self.module))
        dist.all_reduce(t)
        return t.tolist()

    def loss(self, net, i: int, args: dict):
        import torch.nn.functional as F

        want = self._teacher(i, args)
        got = list(tensors(net(*args.values()))) + self.s_taps.take()
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

        shards = self.batches if batches is None else [shard(b, self.rank, self.world) for b in batches]
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
            dev = device(self.module)
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


def sync_teacher(teacher, module) -> None:
    """Every rank distils from rank 0's teacher (DDP already starts every student from rank 0's)."""
    if teacher is None:
        return
    dist = distributed.process_group(device(module))
    for t in teacher.state_dict().values():
        dist.broadcast(t, 0)
