"""Bad input: one-line EdgesparseErrors, dense fallbacks that are reported."""
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from sbnn_testing import StubTarget, run_torch_stage

from edgesparse import EdgesparseError
from edgesparse_sparsebytenn import SparseByteNN, patterns


def _calib(shape=(2, 64, 4, 4)):
    return [{"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}]


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, "half"])
def test_sparsity_outside_0_1_is_rejected(value):
    with pytest.raises(EdgesparseError, match="sparsity"):
        SparseByteNN(sparsity=value)


def test_unknown_option_and_bad_block_are_rejected():
    with pytest.raises(EdgesparseError, match="no option 'blocks'"):
        SparseByteNN(blocks=16)
    with pytest.raises(EdgesparseError, match="block_pointwise=5"):
        SparseByteNN(block_pointwise=5)


class NoWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.act(x))


def test_model_without_prunable_layer():
    with pytest.raises(EdgesparseError, match="no layer this pass can prune") as err:
        run_torch_stage(NoWeights().eval(), [{"x": np.ones((2, 4), np.float32)}])
    assert "\n" not in str(err.value)


def test_model_with_only_depthwise_convs_has_nothing_to_prune():
    model = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1, groups=64), nn.ReLU()).eval()
    with pytest.raises(EdgesparseError, match="found: 1 depthwise"):
        run_torch_stage(model, _calib(), sparsity=0.5, dispatch="off")


def test_depthwise_stays_dense_with_reason():
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64)).eval()
    p, ctx, out = run_torch_stage(model, _calib(), sparsity=0.5, dispatch="off")
    layers = {l["layer"]: l for l in ctx.reports["sparsebytenn"]["layers"]}
    assert layers["1"]["kind"] == "depthwise" and "dense by design" in layers["1"]["kept_dense"]
    assert (out[1].weight != 0).all()
    assert list(p._plan) == ["0.weight"]


def test_dispatch_rule_keeps_slow_layers_dense():
    """The target's rule is asked per layer with the conv shape keys of edgesparse.kernels.dispatch;
    where it says no, the layer stays dense and unpruned."""
    model = nn.Sequential(nn.Conv2d(64, 128, 1), nn.ReLU(), nn.Conv2d(128, 64, 3, padding=1)).eval()
    before = [m.weight.detach().clone() for m in (model[0], model[2])]
    target = StubTarget(lambda op, shape, s, b, t: shape["kernel"] == 1)
    p, ctx, out = run_torch_stage(model, _calib((1, 64, 14, 14)), target=target, sparsity=0.7)
    op, shape, s, block, threads = target.calls[0]
    assert op == "BlockSparseConv" and shape == {"C": 64, "O": 128, "kernel": 1, "stride": 1, "H": 14, "W": 14}
    assert (s, block) == (0.7, 16)
    layers = {l["layer"]: l for l in ctx.reports["sparsebytenn"]["layers"]}
    assert layers["0"]["sparsity"] == 0.7
    assert layers["2"]["sparsity"] == 0 and "would not beat dense" in layers["2"]["kept_dense"]
    # unpruned; its input channels follow the rearrangement of layer 0's outputs
    assert torch.equal(out[2].weight.flatten().sort().values, before[1].flatten().sort().values)
    assert patterns.weight_group_mask(out[0].weight.detach().numpy(), 16).mean() == pytest.approx(0.3, abs=0.01)


def test_skip_and_min_channels():
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.Conv2d(64, 16, 1), nn.Conv2d(16, 64, 1)).eval()
    p, ctx, out = run_torch_stage(model, _calib(), sparsity=0.5, dispatch="off", skip=("0",), min_channels=32)
    layers = {l["layer"]: l.get("kept_dense") for l in ctx.reports["sparsebytenn"]["layers"]}
    assert layers["0"] == "skipped by option"
    assert "fewer than 32 channels" in layers["1"] and "fewer than 32 channels" in layers["2"]


def test_recovery_train_needs_a_training_loop():
    model = nn.Sequential(nn.Conv2d(64, 64, 1)).eval()
    with pytest.raises(EdgesparseError, match="needs a training loop"):
        run_torch_stage(model, _calib(), sparsity=0.5, dispatch="off", recovery="train")


def test_recovery_keeps_masks_with_any_training_loop():
    """A training loop that writes every weight (here: adds noise and steps Adam) cannot revive
    pruned groups."""
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1)).eval()
    seen = {}

    def train(module, steps):
        opt = torch.optim.Adam(module.parameters(), lr=1e-2, weight_decay=0.1)
        x = torch.randn(4, 64, 4, 4)
        for _ in range(steps):
            loss = module(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        seen["steps"] = seen.get("steps", 0) + steps

    p, ctx, out = run_torch_stage(model, _calib(), sparsity=0.5, dispatch="off", recovery="train",
                                  recovery_steps=10, train=train)
    assert seen["steps"] == 10
    rec = ctx.reports["sparsebytenn"]["recovery"]
    assert rec["mode"] == "train" and rec["steps"] == 10
    for m in (out[0], out[2]):
        assert not hasattr(m, "parametrizations")
        assert patterns.weight_group_mask(m.weight.detach().numpy(), 16).mean() == pytest.approx(0.5)


def _sleepy_loop(calls):
    def train(module, steps):
        calls.append(steps)
        time.sleep(0.05 * steps)  # a training loop at 50 ms per step
    return train


def test_recovery_time_budget_cut_is_reported():
    """recovery_seconds stops a long recovery early: the report and a warning give steps done vs
    requested, never silently."""
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1)).eval()
    calls = []
    p, ctx, out = run_torch_stage(model, _calib(), sparsity=0.5, dispatch="off", recovery="train",
                                  recovery_steps=40, recovery_seconds=0.5, train=_sleepy_loop(calls))
    rec = ctx.reports["sparsebytenn"]["recovery"]
    assert rec["steps_requested"] == 40 and rec["steps"] == sum(calls) < 40
    assert calls[0] == 4 and len(calls) <= 2  # a timing call, then what fits, in one call
    assert rec["cut_by_budget"] and rec["seconds"] < 1.5
    assert any(f"{rec['steps']} of 40 steps" in w and "time budget" in w for w in ctx.warnings)


def test_recovery_without_budget_calls_the_loop_once():
    """recovery_seconds=0: one call with every step (a schedule inside the loop runs whole)."""
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1)).eval()
    calls = []
    p, ctx, out = run_torch_stage(model, _calib(), sparsity=0.5, dispatch="off", recovery="train",
                                  recovery_steps=12, recovery_seconds=0, train=_sleepy_loop(calls))
    rec = ctx.reports["sparsebytenn"]["recovery"]
    assert calls == [12] and rec["steps"] == rec["steps_requested"] == 12 and "cut_by_budget" not in rec
    assert not any("time budget" in w for w in ctx.warnings)


def test_gradual_pruning_raises_the_sparsity_by_stages_and_keeps_earlier_groups_pruned():
    """prune_stages=4: the loop is called once per stage with a quarter of the steps; the weights it
    sees are pruned to the cubic schedule's fractions of the target, each stage's pruned groups a
    superset of the one before."""
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1)).eval()
    seen = []

    def train(module, steps):
        seen.append((steps, patterns.weight_group_mask(module[0].weight.detach().numpy(), 16)))
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        x = torch.randn(4, 64, 4, 4)
        for _ in range(steps):  # moves every kept weight, so later stages score trained weights
            loss = module(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    p, ctx, out = run_torch_stage(model, _calib(), sparsity=0.6, dispatch="off", recovery="train",
                                  recovery_steps=14, recovery_seconds=0, prune_stages=4, train=train)
    assert [steps for steps, _ in seen] == [4, 4, 3, 3]
    want = [0.6 * (1 - (1 - k / 4) ** 3) for k in (1, 2, 3, 4)]
    kept = [mask.mean() for _, mask in seen]
    assert [1 - k for k in kept] == pytest.approx(want, abs=1 / 256)  # 256 groups of 16x1
    for (_, before), (_, after) in zip(seen, seen[1:]):
        assert not (after & ~before).any()
    rec = ctx.reports["sparsebytenn"]["recovery"]
    assert rec["steps"] == rec["steps_requested"] == 14 and rec["calls"] == [4, 4, 3, 3]
    assert [s["sparsity"] for s in rec["stages"]] == pytest.approx(want, abs=1e-4)
    assert patterns.weight_group_mask(out[0].weight.detach().numpy(), 16).mean() == pytest.approx(0.4, abs=1 / 256)


def test_gradual_pruning_shares_one_time_budget_and_reaches_the_target():
    model = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 64, 1)).eval()
    calls = []
    p, ctx, out = run_torch_stage(model, _calib(), sparsity=0.5, dispatch="off", recovery="train",
                                  recovery_steps=80, recovery_seconds=0.6, prune_stages=3, train=_sleepy_loop(calls))
    rec = ctx.reports["sparsebytenn"]["recovery"]
    assert rec["steps"] == sum(calls) < 80 and rec["cut_by_budget"].endswith(f"{rec['steps']} of 80 steps")
    assert rec["seconds"] < 2.5 and len(rec["stages"]) == 3
    assert patterns.weight_group_mask(out[0].weight.detach().numpy(), 16).mean() == pytest.approx(0.5, abs=1 / 256)
    assert sum("time budget" in w for w in ctx.warnings) == 1


def test_prune_stages_without_recovery_is_reported_and_prunes_once():
    model = nn.Sequential(nn.Conv2d(64, 64, 1)).eval()
    p, ctx, out = run_torch_stage(model, _calib(), sparsity=0.5, dispatch="off", prune_stages=4)
    assert any("prune_stages is ignored" in w for w in ctx.warnings)
    assert patterns.weight_group_mask(out[0].weight.detach().numpy(), 16).mean() == pytest.approx(0.5, abs=1 / 256)


def test_dispatch_measure_times_the_layer_here():
    model = nn.Sequential(nn.Conv2d(128, 128, 1), nn.ReLU(), nn.Conv2d(128, 128, 1)).eval()
    p, ctx, out = run_torch_stage(model, _calib((1, 128, 14, 14)), sparsity=0.9, dispatch="measure")
    records = ctx.reports["sparsebytenn"]["dispatch_measurements"]
    assert len(records) == 1  # both layers have the same shape: measured once
    r = records[0]
    assert r["sparsity"] == 0.9 and r["block"] == 16 and r["dense_ms"] > 0 and r["sparse_ms"] > 0
    layers = ctx.reports["sparsebytenn"]["layers"]
    from edgesparse_sparsebytenn.measure import MARGIN

    assert all((l["sparsity"] == 0.9) == (r["speedup"] >= MARGIN) for l in layers if l["kind"] == "pointwise")


@pytest.mark.parametrize("nchw16c", [True, False])
def test_dispatch_measure_times_the_layer_in_the_layout_it_will_run_in(nchw16c):
    """Where the target asks for NCHW16c, a blockable 1x1 conv is timed between depthwise convs in
    that layout (as the layout rewrite will build it); elsewhere in NCHW between ORT's."""
    from edgesparse.plugins import registry

    class LayoutRule:  # the x86 target, with the NCHW16c answer fixed
        def __init__(self, base):
            self.base = base

        def __getattr__(self, name):
            return getattr(self.base, name)

        def prefers_sparse(self, op, *args, **kw):
            return nchw16c if op == "NCHW16c" else self.base.prefers_sparse(op, *args, **kw)

    target = LayoutRule(registry().get("targets", "x86"))
    model = nn.Sequential(nn.Conv2d(128, 128, 1), nn.ReLU(), nn.Conv2d(128, 64, 3, padding=1)).eval()
    p, ctx, out = run_torch_stage(model, _calib((1, 128, 14, 14)), target=target, sparsity=0.7, dispatch="measure")
    layouts = {r["layer"]: r["layout"] for r in ctx.reports["sparsebytenn"]["dispatch_measurements"]}
    assert layouts["0"] == ("NCHW16c" if nchw16c else "NCHW") and layouts["2"] == "NCHW"  # a 3x3 conv stays NCHW


def test_dispatch_measure_needs_a_target_that_runs_here():
    class Elsewhere(StubTarget):
        def runs_here(self):
            return False

    model = nn.Sequential(nn.Conv2d(64, 64, 1)).eval()
    with pytest.raises(EdgesparseError, match="runs elsewhere"):
        run_torch_stage(model, _calib(), target=Elsewhere(), sparsity=0.5, dispatch="measure")


@pytest.mark.parametrize("remainder", ["pad", "dense"])
def test_group_that_does_not_divide_the_channels_is_reported(remainder):
    """40 output channels, groups of 16: the last 8 channels are padded or kept dense, and the
    report and a warning say which."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(64, 40, 1), nn.ReLU(), nn.Conv2d(40, 64, 1)).eval()
    p, ctx, out = run_torch_stage(model, _calib(), sparsity=0.5, dispatch="off", remainder=remainder,
                                  min_channels=8)
    layer = {l["layer"]: l for l in ctx.reports["sparsebytenn"]["layers"]}["0"]
    assert "last 8 of 40" in layer["partial_group"]
    assert ("zero-padded" if remainder == "pad" else "kept dense") in layer["partial_group"]
    assert any("group size does not divide" in w and f"remainder={remainder}" in w for w in ctx.warnings)
    kept = patterns.weight_group_mask(out[0].weight.detach().numpy(), 16)
    assert kept[-1].all() == (remainder == "dense")


@pytest.mark.parametrize("margin", [0.0, 1e6])
def test_whole_model_check_keeps_or_drops_the_sparse_layers(monkeypatch, margin):
    """dispatch=measure times the rewritten model whole against the dense one; when it is not
    MARGIN faster, the graph stays dense, with a warning and the reason per layer."""
    from sbnn_testing import export_and_rewrite

    from edgesparse_sparsebytenn import measure

    model = nn.Sequential(nn.Conv2d(128, 128, 1), nn.ReLU(), nn.Conv2d(128, 128, 1)).eval()
    # the per-layer timings keep both layers sparse whatever this machine measures (margin 0), so
    # that the whole-model check below has something to decide
    monkeypatch.setattr(measure, "MARGIN", 0.0)
    p, ctx, out = run_torch_stage(model, _calib((1, 128, 14, 14)), sparsity=0.9, dispatch="measure")
    monkeypatch.setattr(measure, "MARGIN", margin)
    dense, sparse = export_and_rewrite(p, ctx, out, {"x": torch.zeros(1, 128, 14, 14)})
    report = ctx.reports["sparsebytenn"]
    check = report["whole_model_check"]
    assert check["dense_ms"] > 0 and check["sparse_ms"] > 0 and check["kept_sparse"] == (margin == 0.0)
    ops = [n.op_type for n in sparse.graph.node]
    if margin == 0.0:
        assert ops.count("BlockSparseConv") == 2 and len(report["onnx"]["replaced"]) == 2
    else:
        assert "BlockSparseConv" not in ops and ops.count("Conv") == 2
        assert all("whole-model check" in r["reason"] for r in report["onnx"]["not_replaced"])
        assert any("whole-model check" in w for w in ctx.warnings)


@pytest.mark.parametrize("veto", [0.0, 1e6])
def test_dispatch_target_is_checked_on_the_whole_model_where_the_package_runs(monkeypatch, veto):
    """dispatch=target on a target that runs here: the table chose the layers, then the whole
    model is timed against dense and ships dense when it is slower (VETO forces either outcome)."""
    from sbnn_testing import export_and_rewrite

    from edgesparse.plugins import registry
    from edgesparse_sparsebytenn import measure

    from edgesparse.kernels import dispatch

    target = registry().get("targets", "x86").configure({"isa": dispatch.best_isa()})  # also with EDGESPARSE_ISA forced
    assert target.times_here()
    always = type("Always", (), {"__getattr__": lambda self, n: getattr(target, n),
                                 "prefers_sparse": lambda self, *a, **k: True})()  # the table: every layer sparse
    monkeypatch.setattr(measure, "VETO", veto)
    model = nn.Sequential(nn.Conv2d(128, 128, 1), nn.ReLU(), nn.Conv2d(128, 128, 1)).eval()
    p, ctx, out = run_torch_stage(model, _calib((1, 128, 14, 14)), target=always, sparsity=0.9)
    dense, sparse = export_and_rewrite(p, ctx, out, {"x": torch.zeros(1, 128, 14, 14)})
    check = ctx.reports["sparsebytenn"]["whole_model_check"]
    assert check["dense_ms"] > 0 and check["sparse_ms"] > 0 and check["kept_sparse"] == (veto == 0.0)
    ops = [n.op_type for n in sparse.graph.node]
    assert ("BlockSparseConv" in ops) == (veto == 0.0)
    assert any("whole-model check" in w for w in ctx.warnings) == (veto != 0.0)
    layout = ctx.reports["sparsebytenn"].get("nchw_layout", {})
    assert ("reverted" in layout) == (veto != 0.0 and bool(layout))  # no layout left claimed on a dense graph


def test_dispatch_target_for_other_machines_keeps_the_tables_decisions():
    """A package for the ISA this machine does not run natively cannot be timed here: the table's
    decisions stand and the report says why nothing was timed."""
    from sbnn_testing import export_and_rewrite

    from edgesparse.kernels import dispatch
    from edgesparse.plugins import registry

    other = "avx2" if dispatch.best_isa() == "avx512" else "avx512"
    target = registry().get("targets", "x86").configure({"isa": other})
    assert not target.times_here()
    always = type("Always", (), {"__getattr__": lambda self, n: getattr(target, n),
                                 "prefers_sparse": lambda self, *a, **k: True})()
    model = nn.Sequential(nn.Conv2d(128, 128, 1), nn.ReLU(), nn.Conv2d(128, 128, 1)).eval()
    p, ctx, out = run_torch_stage(model, _calib((1, 128, 14, 14)), target=always, sparsity=0.9)
    dense, sparse = export_and_rewrite(p, ctx, out, {"x": torch.zeros(1, 128, 14, 14)})
    check = ctx.reports["sparsebytenn"]["whole_model_check"]
    assert "does not run here natively" in check["skipped"] and other in check["skipped"]
    assert [n.op_type for n in sparse.graph.node].count("BlockSparseConv") == 2
