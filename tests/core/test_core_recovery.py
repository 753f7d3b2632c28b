"""The recovery service (edgesparse.recovery, ctx.recover) on a tiny real MLP: masks kept, loss
lowered, budgets kept, bad options refused in one line, and data-parallel under torchrun equal to
one process."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgesparse import EdgesparseError, recovery
from recovery_model import batches, context, damaged, run

HERE = Path(__file__).resolve().parent


def test_distillation_lowers_the_loss_and_keeps_the_pruned_weights_zero():
    model, teacher, masks = damaged()
    report = context(batches()).recover(model, teacher, steps=60, lr=5e-3, masks=masks)
    assert report["mode"] == "distill" and report["steps"] == report["steps_requested"] == 60
    assert report["loss_after"] < 0.5 * report["loss_before"], report
    assert report["loss_last"] < report["loss_first"]
    for m, mask in masks.items():
        assert not hasattr(m, "parametrizations")  # plain modules again
        assert bool((m.weight[mask == 0] == 0).all()) and bool((m.weight[mask == 1] != 0).all())
    assert "cut_by_budget" not in report


def test_hidden_state_distillation_of_the_pruned_layers():
    model, report, _ = run(40, layers="pruned")
    assert report["distilled_layers"] == 2 and report["loss_after"] < report["loss_before"]


def test_default_masks_are_the_zeros_already_there():
    model, teacher, masks = damaged()
    zeros = {m: (m.weight == 0).clone() for m in masks}
    context(batches()).recover(model, teacher, steps=20, lr=5e-2)  # no masks= given
    for m, z in zeros.items():
        assert bool((m.weight[z] == 0).all())


def test_held_out_batches_measure_the_loss_and_are_never_trained_on():
    """A context with evaluation inputs (held out from the passes): the loss before and after is
    measured on them, and training sees the calibration rows only."""
    from edgesparse import BuildContext

    class HeldOut(BuildContext):
        def evaluation_inputs(self):
            return batches(n=2, rows=5, seed=9)

    model, teacher, masks = damaged()
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append((torch.is_grad_enabled(), args[0].shape[0])))
    ctx = HeldOut(None, None, calibration=batches(), quiet=True)
    report = ctx.recover(model, teacher, steps=10, lr=5e-3, masks=masks)
    assert report["loss_measured_on"] == "2 evaluation batches" and report["loss_after"] < report["loss_before"]
    assert {rows for grad, rows in seen if grad} == {16} and {rows for grad, rows in seen if not grad} == {5}


def test_the_users_training_loop_cannot_revive_pruned_weights():
    model, teacher, masks = damaged()
    calls = []

    def train(module, steps):  # writes every weight: weight decay and noise
        calls.append(steps)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.1)
        for _ in range(steps):
            loss = module(torch.randn(8, 32)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    report = context(batches(), train=train).recover(model, teacher, steps=7, mode="train", masks=masks)
    assert calls == [7] and report["mode"] == "train" and report["steps"] == 7
    assert "loss_before" in report and "loss_after" in report
    for m, mask in masks.items():
        assert bool((m.weight[mask == 0] == 0).all())


def test_the_time_budget_cuts_the_steps_and_says_so():
    model, teacher, masks = damaged()
    model[0].register_forward_hook(lambda *a: time.sleep(0.02))  # a step of at least 20 ms
    t0 = time.monotonic()
    report = context(batches()).recover(model, teacher, steps=10_000, seconds=0.4, masks=masks)
    # it stops at the first step past the budget: at >= 20 ms a step, at most 0.4 / 0.02 + 1 steps
    assert 1 <= report["steps"] <= 21 and report["steps_requested"] == 10_000 and report["seconds"] >= 0.4
    assert report["cut_by_budget"].endswith(f"{report['steps']} of 10000 steps")
    assert time.monotonic() - t0 < 30


def test_zero_steps_changes_nothing():
    model, teacher, masks = damaged()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = context(batches()).recover(model, teacher, steps=0, masks=masks)
    assert report["steps"] == 0 and report["loss_after"] == pytest.approx(report["loss_before"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("options, message", [
    ({"steps": -1}, "recovery steps must be a whole number >= 0 (got -1)"),
    ({"steps": 5, "seconds": -2.0}, "recovery seconds must be >= 0"),
    ({"steps": 5, "lr": 0.0}, "learning rate must be in (0, 1]"),
    ({"steps": 5, "mode": "finetune"}, "recovery mode 'finetune' is not one of distill, train"),
    ({"steps": 5, "layers": ("9",)}, "the model has no submodule '9' to distil"),
    ({"steps": 5, "output_loss": "l1"}, "output loss 'l1' is not one of auto, kl, mse"),
])
def test_bad_options_are_one_line_errors(options, message):
    model, teacher, masks = damaged()
    with pytest.raises(EdgesparseError) as err:
        context(batches()).recover(model, teacher, masks=masks, **options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_train_mode_without_a_loop_is_a_one_line_error():
    model, teacher, masks = damaged()
    with pytest.raises(EdgesparseError, match="needs a training loop"):
        context(batches()).recover(model, teacher, steps=3, mode="train", masks=masks)


def test_gradual_schedule_and_merged_report():
    assert recovery.stage_fractions(4)[-1] == 1.0 and recovery.split_steps(10, 4) == [3, 3, 2, 2]
    # one time budget over the stages, shared by the steps left: a slow first stage cannot starve the last
    assert recovery.stage_seconds(100, 0, 25, 100) == 25 and recovery.stage_seconds(100, 70, 25, 25) == 30
    assert recovery.stage_seconds(0, 10, 5, 10) == 0.0 and recovery.stage_seconds(10, 20, 5, 5) == 1e-3
    a = {"mode": "distill", "steps": 3, "steps_requested": 3, "seconds": 1.0, "seconds_budget": 5.0,
         "loss_before": 2.0, "loss_after": 1.0, "loss_curve": [[1, 2.0]]}
    b = a | {"steps": 1, "loss_before": 1.5, "loss_after": 0.5, "loss_curve": [[1, 1.5]]}
    merged = recovery.merge(recovery.merge({"mode": "none"}, a, 0.3, 2), b, 0.6, 2)
    assert merged["steps"] == 4 and merged["steps_requested"] == 6 and merged["seconds"] == 2.0
    assert merged["loss_before"] == 2.0 and merged["loss_after"] == 0.5
    assert merged["loss_curve"] == [[1, 2.0], [4, 1.5]]  # step numbers run on over the stages
    assert merged["cut_by_budget"].endswith("4 of 6 steps") and [s["sparsity"] for s in merged["stages"]] == [0.3, 0.6]


def test_two_processes_under_torchrun_match_one_process(tmp_path):
    """torchrun, 2 CPU processes (gloo): each takes its share of every batch (15 rows: 7 and 8); the
    global batch is the same, so the loss curve and the weights are those of one process on the
    same data."""
    out = tmp_path / "ddp.pt"
    steps, rows = 12, 15
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(HERE / "recovery_model.py"), str(out), str(steps), str(rows)],
                            capture_output=True, text=True, timeout=120, cwd=HERE,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)})
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(out)
    model, report, seen = run(steps, layers="pruned", rows=rows)
    assert seen == {15} and ddp["rows"] == [7]  # rank 0 trained on its share of the rows only
    assert ddp["report"]["world_size"] == 2 and ddp["report"]["steps"] == steps
    curve_1 = [loss for _, loss in report["loss_curve"]]
    curve_2 = [loss for _, loss in ddp["report"]["loss_curve"]]
    assert curve_2 == pytest.approx(curve_1, rel=1e-4)
    assert ddp["report"]["loss_after"] == pytest.approx(report["loss_after"], rel=1e-4)
    assert ddp["report"]["loss_after"] < ddp["report"]["loss_before"]
    for k, v in model.state_dict().items():
        assert torch.allclose(ddp["state"][k], v, atol=1e-5), k
