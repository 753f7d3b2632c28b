"""A SparCL-trained small ResNet (Split Fashion-MNIST) as an edgesparse model factory.

    edgesparse-continual train runs/sparcl90 --sparsity 0.9 --epochs 5 --train-per-task 1000
    SPARCL_RUN=runs/sparcl90 edgesparse build samples/sparcl/model.py:build --target x86 \
        --pass sparcl -o out/sparcl90

The module is the run's final model (eval mode: batch norm folds into the convolutions at export;
zeros stay zeros). Calibration batches are real Fashion-MNIST test images of every task.
"""
import os
from pathlib import Path

import torch

import edgesparse
from edgesparse_sparcl import load_run
from edgesparse_sparcl.data import split_fashion_mnist

DEFAULT_RUN = Path(__file__).parent / "runs" / "sparcl-block16-s90-noddr-seed0"


def build() -> edgesparse.TorchModel:
    run = Path(os.environ.get("SPARCL_RUN", DEFAULT_RUN))
    model, _, info = load_run(run)
    stream = split_fashion_mnist(tuple(tuple(t) for t in info["tasks"]), train_per_task=16, test_per_task=64)

    def calibration():
        for i in range(0, len(stream.x_test), 32):
            yield {"image": stream.x_test[i:i + 32]}

    return edgesparse.TorchModel(
        module=model,
        example_inputs={"image": torch.zeros(1, *info["example_shape"])},
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        calibration=calibration,
    )
