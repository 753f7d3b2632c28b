"""Runs on disk: train one into a folder (resuming it), read its results, load its model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from edgesparse import EdgesparseError

from . import data as data_mod
from . import sparse
from .models import SmallResNet
from .trainer import CHECKPOINT, RESULTS, ContinualConfig, ContinualTrainer


def train_run(out: Path, config: ContinualConfig, tasks=data_mod.SPLIT_TASKS, train_per_task: int | None = None,
              test_per_task: int | None = None, width: int = 32, progress: bool = True, log=None) -> dict:
    """Split Fashion-MNIST with the small ResNet; resumes `out` when it holds an unfinished run."""
    config.check()
    if width < 4:
        raise EdgesparseError(f"--width must be at least 4, got {width}")
    stream = data_mod.split_fashion_mnist(tasks, train_per_task, test_per_task)
    torch.manual_seed(config.seed)
    model = SmallResNet(num_classes=stream.num_classes, width=width)
    meta = {"model": "SmallResNet", "width": width, "dataset": "split-fashion-mnist",
            "train_per_task": train_per_task, "test_per_task": test_per_task,
            "num_classes": stream.num_classes, "example_shape": list(stream.x_train.shape[1:])}
    trainer = ContinualTrainer(model, stream, config, out_dir=out, progress=progress, log=log, meta=meta)
    return trainer.run()


def read_results(run: Path) -> dict:
    path = Path(run) / RESULTS
    if not path.is_file():
        raise EdgesparseError(f"{run} holds no results (no {RESULTS}): train into it first")
    return json.loads(path.read_text())


def load_run(run: Path):
    """(model in eval mode, {parameter name: bool weight mask}, info) of a run trained by `train_run`."""
    path = Path(run) / CHECKPOINT
    if not path.is_file():
        raise EdgesparseError(f"{run} holds no checkpoint ({CHECKPOINT})")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as exc:
        raise EdgesparseError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    meta, options = state.get("meta", {}), state["options"]
    if meta.get("model") != "SmallResNet":
        raise EdgesparseError(f"{run} was not trained with the built-in SmallResNet; load its checkpoint yourself")
    model = SmallResNet(num_classes=meta["num_classes"], width=meta["width"])
    model.load_state_dict(state["model"])
    model.eval()
    modules = dict(model.named_modules())
    masks = {}
    for name, unit_mask in state["masks"].items():
        layer = sparse.PrunableLayer(name, modules[name], options["pattern"], options["block"])
        layer.set_mask(unit_mask)
        masks[f"{name}.weight"] = layer.weight_mask().clone()
    info = {**meta, "options": options, "completed_tasks": state["results"]["completed_tasks"],
            "tasks": state["tasks"]}
    return model, masks, info
