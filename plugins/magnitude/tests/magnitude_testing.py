"""A tiny MLP model factory for the magnitude tests: real torch, real inputs drawn once."""
import textwrap
from pathlib import Path

FACTORY = '''
import numpy as np
import torch
import torch.nn as nn

from edgesparse import TorchModel


def module():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 16)).eval()


def inputs(seed, batches=8, rows=32):
    rng = np.random.default_rng(seed)
    return [{{"x": rng.standard_normal((rows, 128)).astype(np.float32)}} for _ in range(batches)]


def train(module, steps):
    """The user's loop: its own data, its own optimizer (weight decay touches every weight)."""
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.from_numpy(inputs(7, 1, 64)[0]["x"])
    for _ in range(steps):
        loss = module(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def build():
    return TorchModel(module(), {{"x": torch.zeros(2, 128)}}, ["y"], {{"x": {{0: "batch"}}, "y": {{0: "batch"}}}},
                      calibration=lambda: inputs(1), train={train})
'''


def write_factory(folder: Path, train: bool = False) -> str:
    path = folder / "factory.py"
    path.write_text(textwrap.dedent(FACTORY.format(train="train" if train else "None")))
    return f"{path}:build"
