"""The continual trainer end to end on a tiny real run, its schedules, and resume."""
import json

import numpy as np
import pytest
import torch

from edgesparse import EdgesparseError
from edgesparse_sparcl.models import SmallResNet
from edgesparse_sparcl.trainer import CHECKPOINT, RESULTS, ContinualConfig, ContinualTrainer, Schedule, forgetting

# two epochs are too few for the scaled DDR schedule, so the tiny runs ask for a removal at epoch 1
TINY = dict(epochs=2, batch_size=16, buffer_size=32, sparsity=0.9, pattern="block", block=8, lr=0.05, ddr_epochs=(1,))


def _trainer(stream, out=None, **options):
    torch.manual_seed(0)
    config = ContinualConfig(**{**TINY, **options})
    return ContinualTrainer(SmallResNet(width=8), stream, config, out_dir=out, progress=False, log=lambda m: None)


def test_paper_schedule_and_its_scaling():
    paper = Schedule.for_epochs(50)
    assert paper.mask_every == 5 and paper.ddr_epochs == (5, 10, 15, 20)
    assert paper.bounds(0, 0.75) == pytest.approx((0.75, 0.74))
    assert paper.bounds(5, 0.75) == pytest.approx((0.76, 0.75))
    assert paper.bounds(45, 0.75) == (0.75, 0.75)
    short = Schedule.for_epochs(5)
    assert short.mask_every == 1 and short.ddr_epochs == ()  # removals need 5 presentations, as the paper's first
    assert short.bounds(4, 0.9) == (0.9, 0.9)
    assert Schedule.for_epochs(10).ddr_epochs == ()
    assert Schedule.for_epochs(13).ddr_epochs == (5,)
    assert Schedule.for_epochs(20).ddr_epochs == (6, 8)
    assert Schedule.for_epochs(3).ddr_epochs == ()
    assert Schedule.for_epochs(3, ddr_epochs=(2, 1)).ddr_epochs == (1, 2)


def test_ddr_epochs_outside_the_task_are_refused(fmnist_two_tasks):
    with pytest.raises(EdgesparseError, match=r"option ddr_epochs=\(2,\): must be distinct epochs in 1..1"):
        _trainer(fmnist_two_tasks, ddr_epochs=(2,))


@pytest.fixture(scope="module")
def reference(fmnist_two_tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    trainer = _trainer(fmnist_two_tasks, out)
    return trainer, trainer.run(), out


def test_tiny_sparcl_run_on_kernels(reference):
    trainer, result, out = reference
    assert result["completed_tasks"] == 2
    on_kernel = [l for l in result["layers"] if l["on_kernel"]]
    assert len(on_kernel) == 6  # the 3x3 convs of the blocks; stem, 1x1 shortcuts and classifier stay dense
    for l in on_kernel:
        assert abs(l["density"] - 0.1) < 0.03
    # the trained weights are exactly as sparse as the masks say
    for layer in trainer.pruned_layers():
        assert torch.all(layer.module.weight[~layer.weight_mask()] == 0)
    # DDR removed 30% of each task's data after the first epoch
    assert result["per_task"]["removed"] == [29, 29]
    assert result["per_task"]["steps"] == [96 // 16 + (96 - 29) // 16] * 2
    assert (out / CHECKPOINT).is_file()
    saved = json.loads((out / RESULTS).read_text())
    assert saved["class_il"] == result["class_il"]
    assert 0 <= result["class_il"] <= 100 and 0 <= result["task_il"] <= 100


def test_sparcl_counts_fewer_flops_than_dense(fmnist_two_tasks, reference):
    dense = _trainer(fmnist_two_tasks, method="derpp", epochs=1, ddr_epochs=None).run()
    sparcl = reference[1]
    dense["train_flops"]["total"] *= 2  # two epochs per task in the reference run
    assert dense["per_task"]["removed"] == [0, 0]
    ratio = dense["train_flops"]["total"] / sparcl["train_flops"]["total"]
    assert ratio > 3.0, ratio
    assert all(not l["pruned"] for l in dense["layers"])


def test_dgm_limits_weight_gradients(fmnist_two_tasks):
    trainer = _trainer(fmnist_two_tasks, sparsity=0.5, gradient_sparsity=0.9, dgm_refresh=1000, epochs=1,
                       tdm=False, ddr=False, ddr_epochs=None)
    trainer.run()
    for layer in trainer.pruned_layers():
        units = layer._dgm_units
        assert units is not None
        kept_weights = units.numel() * layer.taps
        assert kept_weights <= 0.1 * layer.module.weight.numel() + layer.taps


def test_buffer_larger_than_data_is_refused(fmnist_two_tasks):
    with pytest.raises(EdgesparseError, match="buffer of 1000 examples is larger than the 192 training examples"):
        _trainer(fmnist_two_tasks, buffer_size=1000)


def test_bad_options_are_refused(fmnist_two_tasks):
    with pytest.raises(EdgesparseError, match="option sparsity=1.0"):
        _trainer(fmnist_two_tasks, sparsity=1.0)
    with pytest.raises(EdgesparseError, match="option block=5"):
        _trainer(fmnist_two_tasks, block=5)


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_keeps_finished_task(fmnist_two_tasks, reference, tmp_path):
    out = tmp_path / "run"
    reference = reference[1]

    first = _trainer(fmnist_two_tasks, out)
    calls = {"n": 0}
    step = first._step

    def crash_in_second_task(*args, **kwargs):
        if args[3] == 1:  # task index
            calls["n"] += 1
            if calls["n"] == 3:
                raise _Interrupt()
        return step(*args, **kwargs)

    first._step = crash_in_second_task
    with pytest.raises(_Interrupt):
        first.run()
    state = torch.load(out / CHECKPOINT, weights_only=False)
    assert state["results"]["completed_tasks"] == 1

    resumed = _trainer(fmnist_two_tasks, out)
    trained = []
    orig = resumed._train_task
    resumed._train_task = lambda t: (trained.append(t), orig(t))[1]
    result = resumed.run()
    assert trained == [1]  # the finished task is not trained again
    assert result["per_task"]["acc_class_il"] == reference["per_task"]["acc_class_il"]
    assert result["per_task"]["acc_task_il"] == reference["per_task"]["acc_task_il"]


def test_resume_with_other_options_is_refused(fmnist_two_tasks, tmp_path):
    out = tmp_path / "run"
    _trainer(fmnist_two_tasks, out, epochs=1, ddr_epochs=None).run()
    with pytest.raises(EdgesparseError, match="started with sparsity=0.9, this run asks for sparsity=0.75"):
        _trainer(fmnist_two_tasks, out, epochs=1, ddr_epochs=None, sparsity=0.75).run()


def test_forgetting_metric():
    acc = [[90.0], [70.0, 80.0], [60.0, 85.0, 70.0]]
    # task 0: best 90 before the end, 60 at the end; task 1: best 80, 85 at the end
    assert forgetting(acc) == pytest.approx(np.mean([30.0, -5.0]))


def test_any_model_with_linear_layers(fmnist_two_tasks):
    """An MLP: the hidden Linear layers train on the block-sparse kernels too."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                              torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    config = ContinualConfig(**{**TINY, "epochs": 1, "ddr_epochs": None, "block": 4, "sparsity": 0.75})
    trainer = ContinualTrainer(mlp, fmnist_two_tasks, config, progress=False, log=lambda m: None)
    result = trainer.run()
    layers = {l["layer"]: l for l in result["layers"]}
    assert [n for n, l in layers.items() if l["on_kernel"]] == ["3", "5"]
    assert not layers["1"]["pruned"] and not layers["7"]["pruned"]
    for name in ("3", "5"):
        assert abs(layers[name]["density"] - 0.25) < 0.02
        w = dict(mlp.named_modules())[name].weight
        assert (w == 0).float().mean() > 0.7



def _assert_same_weights(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name

def test_batch_norm_statistics_come_from_the_buffer_without_changing_training(fmnist_two_tasks, reference):
    trainer, result, _ = reference
    plain = _trainer(fmnist_two_tasks, bn_from_buffer=False)
    plain_result = plain.run()
    # re-estimating the statistics leaves training alone: same weights, same first-task accuracy
    # with the running statistics
    _assert_same_weights(trainer.model, plain.model)
    assert result["per_task"]["acc_class_il_running_bn"][0] == plain_result["per_task"]["acc_class_il"][0]
    assert plain_result["class_il_running_bn"] == plain_result["class_il"]  # nothing re-estimated
    # each batch norm's statistics are its input's over the buffer
    norms = {n: m for n, m in trainer.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0])) for n, m in norms.items()]
    trainer.model.train()
    with torch.no_grad():
        trainer.model(trainer.buffer.x[:len(trainer.buffer)])
    for h in hooks:
        h.remove()
    for n, m in norms.items():
        assert torch.allclose(m.running_mean, seen[n].mean((0, 2, 3)), atol=1e-4), n
        assert torch.allclose(m.running_var, seen[n].var((0, 2, 3)), rtol=0.05, atol=1e-4), n


def test_dgm_changes_nothing_at_90_percent_weight_sparsity(fmnist_two_tasks, reference):
    # DGM's budget is 80% of *all* of a layer's weights without a gradient; at 90% weight sparsity
    # only 10% have one, so every kept gradient stays (as in the paper's code: the |grad|
    # percentile over the whole layer is 0 there) and training is identical without DGM
    trainer, result, _ = reference
    plain = _trainer(fmnist_two_tasks, dgm=False)
    plain_result = plain.run()
    _assert_same_weights(trainer.model, plain.model)
    assert plain_result["train_flops"] == result["train_flops"]
