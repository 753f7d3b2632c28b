"""Model factory for `edgesparse build`: the MobileNetV2-style Fashion-MNIST CNN (cnn.py), trained
here on the real Fashion-MNIST training set (cached after the first run).

    edgesparse build samples/sparsebytenn/model.py:build --target x86 \
        --pass sparsebytenn:sparsity=0.7,recovery=train -o out/fashion-sbnn

calibration: one image, then 7 batches of 128 real training images; train: the user's loop (AdamW on the real
labelled training set, augmentation as in the original training, a cosine learning-rate schedule over the steps
of each call), used by recovery=train. One epoch is 469 steps of 128 images. evaluation: the 10,000 test images
in 20 batches of 500 (the build reads 16 of them for its quality section and sparsity=auto's sensitivities);
evaluate: top-1 accuracy on all 10,000, so that `--min-quality accuracy_drop=0.01` holds the package to 1 point.
Environment: SBNN_BATCH (calibration batch size, default 128), SBNN_LR (fine-tuning peak learning rate, 1e-3),
SBNN_TEACHER (a state dict of this CNN to distill from while fine-tuning, with the labels), SBNN_SEED
(the fine-tuning loop's batch order and augmentation; default: its step count).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import cnn  # noqa: E402
import data  # noqa: E402

from edgesparse import TorchModel  # noqa: E402


def calibration_batches(n_batches: int = 8, batch: int | None = None, seed: int = 1):
    """One single image first (a build records its first calibration batch for verification, and
    `edgesparse bench` times that batch: single-image latency, the edge case), then batches of
    `batch` real training images (897 images in the 8 batches a build reads)."""
    batch = batch or int(os.environ.get("SBNN_BATCH", "128"))
    x, _ = data.load("train")
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(x), 1 + (n_batches - 1) * batch, replace=False)
    return [{"x": np.ascontiguousarray(x[idx[:1]])}] + [
        {"x": np.ascontiguousarray(x[idx[1 + i * batch:1 + (i + 1) * batch]])} for i in range(n_batches - 1)]


def train_loop(module, steps: int) -> None:
    """The user's training loop: real labels, AdamW, the learning rate annealed from SBNN_LR to 0
    over the `steps` of this call (a pass that splits its budget into chunks restarts it). With
    SBNN_TEACHER (a saved state dict of this CNN), the labels are mixed with distillation from it."""
    x, y = data.load("train")
    lr = float(os.environ.get("SBNN_LR", "1e-3"))
    seed = int(os.environ.get("SBNN_SEED", steps))
    cnn.train_steps(module, x, y, steps, lr=lr, seed=seed, teacher=teacher())


def teacher() -> cnn.FashionMobileNet | None:
    path = os.environ.get("SBNN_TEACHER")
    if not path:
        return None
    model = cnn.FashionMobileNet()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def evaluation(batch: int = 500):
    """The Fashion-MNIST test images (never trained on), in batches."""
    xt, _ = data.load("test")
    return [{"x": np.ascontiguousarray(xt[i:i + batch])} for i in range(0, len(xt), batch)]


def evaluate(run) -> dict:
    """Top-1 accuracy on the 10,000 test images; `run` maps input batches to output dicts."""
    _, yt = data.load("test")
    logits = np.concatenate([o["logits"] for o in run(evaluation())])
    return {"accuracy": float((logits.argmax(1) == yt).mean())}


def build() -> TorchModel:
    model = cnn.trained()
    return TorchModel(
        module=model,
        example_inputs={"x": torch.zeros(1, 1, 28, 28)},
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        calibration=calibration_batches,
        train=train_loop,
        evaluation=evaluation,
        evaluate=evaluate,
    )
