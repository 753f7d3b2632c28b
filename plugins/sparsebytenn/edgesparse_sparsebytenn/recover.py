"""BatchNorm recalibration after pruning. Recovery itself (the user's training loop or distillation
from the dense network, masks kept, budgets) is the core's service: `ctx.recover` (edgesparse.recovery).
"""
from __future__ import annotations

from .allocate import to_args


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
