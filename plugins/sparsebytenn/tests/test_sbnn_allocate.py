"""Sparsity allocation: uniform and sensitivity-driven."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from sbnn_testing import StubTarget, run_torch_stage

from edgesparse_sparsebytenn import allocate, patterns


def _layers(sizes):
    return [patterns.LayerInfo(f"l{i}", None, "pointwise", n, 1) for i, n in enumerate(sizes)]


def test_greedy_allocation_prunes_insensitive_layers_first():
    layers = _layers([100, 100])
    curves = {"l0": {0.0: 0.0, 0.5: 0.01, 0.9: 0.02},   # robust
              "l1": {0.0: 0.0, 0.5: 1.0, 0.9: 5.0}}     # sensitive
    chosen = allocate.allocate(layers, curves, 0.45)
    assert chosen["l0"] == 0.9 and chosen["l1"] == 0.0
    mean = sum(chosen[l.name] * l.weight_count for l in layers) / 200
    assert mean == pytest.approx(0.45)


def test_allocation_reaches_the_target_by_weight_count():
    layers = _layers([300, 100])
    curves = {l.name: {0.0: 0.0, **{s: s ** 2 for s in allocate.LADDER}} for l in layers}
    chosen = allocate.allocate(layers, curves, 0.7)
    mean = sum(chosen[l.name] * l.weight_count for l in layers) / 400
    assert 0.7 - 1e-9 <= mean <= 0.75


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        with torch.no_grad():
            self.b.weight.mul_(0.01)  # a near-silent branch: pruning it changes little

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_sensitivity_allocation_in_the_pass():
    torch.manual_seed(0)
    calib = [{"x": np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)}]
    p, ctx, out = run_torch_stage(TwoBranches().eval(), calib, sparsity=0.5, allocation="sensitivity",
                                  dispatch="off", rearrange=False)
    layers = {l["layer"]: l for l in ctx.reports["sparsebytenn"]["layers"]}
    assert "0.50" in layers["a"]["sensitivity"]
    assert layers["a"]["sensitivity"]["0.50"] > 100 * layers["b"]["sensitivity"]["0.50"]
    assert layers["b"]["sparsity"] > layers["a"]["sparsity"]
    assert ctx.reports["sparsebytenn"]["achieved_sparsity_of_candidates"] >= 0.5 - 0.02


def test_sensitivity_levels_respect_the_dispatch_rule():
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1)).eval()
    target = StubTarget(lambda op, shape, s, b, t: s >= 0.7)  # sparse wins only from 70 %
    calib = [{"x": np.random.default_rng(0).standard_normal((4, 64, 8, 8)).astype(np.float32)}]
    p, ctx, out = run_torch_stage(model, calib, target=target, sparsity=0.5, allocation="sensitivity")
    for l in ctx.reports["sparsebytenn"]["layers"]:
        assert l["sparsity"] == 0 or l["sparsity"] >= 0.7
        assert all(float(k) == 0 or float(k) >= 0.7 for k in l["sensitivity"])
