"""A tiny MLP, its data and its pruning, shared by the recovery tests and their torchrun worker
(run as a script: `torchrun --nproc_per_node 2 recovery_model.py OUT.pt STEPS ROWS`)."""
import sys

import numpy as np
import torch
import torch.nn as nn

from edgesparse import BuildContext, recovery


class MLP(nn.Sequential):
    """32 -> 64 -> 64 -> 10 logits, and a layer its forward never uses (as a pooler nobody reads)."""

    def __init__(self):
        super().__init__(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        for i in range(5):
            x = self[i](x)
        return x


def mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP().eval()


def batches(n=4, rows=16, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, 32)).astype(np.float32)} for _ in range(n)]


def prune(module, fraction=0.6) -> dict:
    """Zero the smallest `fraction` of each hidden Linear's weights in place; the masks of what stays."""
    masks = {}
    for m in (module[0], module[2]):
        w = m.weight.detach()
        cut = w.abs().flatten().kthvalue(int(fraction * w.numel())).values
        masks[m] = (w.abs() > cut).float()
        with torch.no_grad():
            m.weight.mul_(masks[m])
    return masks


def damaged(seed=0):
    """(pruned student, its dense teacher, masks)."""
    model = mlp(seed)
    teacher = recovery.teacher_copy(model)
    return model, teacher, prune(model)


def context(calibration, **kw) -> BuildContext:
    ctx = BuildContext(None, None, calibration=calibration, quiet=True, **kw)
    ctx.begin_pass("test")
    return ctx


def run(steps, layers=(), rows=16):
    """Recover the damaged MLP; also returns the batch sizes its forward saw while training."""
    model, teacher, masks = damaged()
    seen = set()
    hook = model.register_forward_pre_hook(lambda mod, args: seen.add(args[0].shape[0]) if torch.is_grad_enabled() else None)
    report = context(batches(rows=rows)).recover(model, teacher, steps=steps, lr=5e-3, masks=masks, layers=layers)
    hook.remove()
    return model, report, seen


if __name__ == "__main__":
    out, steps, rows = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    model, report, seen = run(steps, layers="pruned", rows=rows)
    if torch.distributed.get_rank() == 0:
        torch.save({"state": model.state_dict(), "report": report, "rows": sorted(seen)}, out)
