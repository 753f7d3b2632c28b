"""A MobileNetV2-style CNN for Fashion-MNIST, sized for an edge CPU, and its training.

3x3 stem, then inverted-residual blocks (1x1 expand -> 3x3 depthwise -> 1x1 project, residual add
when the shape allows), ReLU6, BatchNorm, a 1x1 head conv, global average pooling, a Linear
classifier. Widths 64..512, so that the 1x1 convs carry ~90 % of the MACs (as in MobileNets) and
are wide enough for the sparse kernels.

    python samples/sparsebytenn/cnn.py [--epochs 3]    # trains and caches the weights
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import data  # noqa: E402

# (expansion, output channels, stride) per inverted-residual block; input 28x28
BLOCKS = ((2, 64, 1), (2, 128, 2), (2, 128, 1), (2, 256, 2), (2, 256, 1))
STEM, HEAD = 64, 512


def conv_bn(cin, cout, k=1, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU6()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expansion, stride):
        super().__init__()
        hidden = cin * expansion
        self.expand = conv_bn(cin, hidden)
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn(hidden, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class FashionMobileNet(nn.Module):
    def __init__(self, blocks=BLOCKS, stem=STEM, head=HEAD, classes=10):
        super().__init__()
        self.stem = conv_bn(1, stem, 3)
        layers, cin = [], stem
        for expansion, cout, stride in blocks:
            layers.append(InvertedResidual(cin, cout, expansion, stride))
            cin = cout
        self.blocks = nn.Sequential(*layers)
        self.head = conv_bn(cin, head)
        self.classifier = nn.Linear(head, classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(x.mean((2, 3)))


def weights_path(tag: str = "fashion_mobilenet") -> Path:
    return data.cache_dir().parent.parent / "sparsebytenn" / f"{tag}.pt"


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, (dy, dx), (2, 3))


def train_steps(model, x, y, steps, *, lr=2e-3, batch=128, seed=0, weight_decay=1e-4, log=None, schedule=True,
                teacher=None, alpha=0.5, temperature=4.0):
    """`steps` AdamW steps with a cosine schedule on (x, y) numpy arrays; BatchNorm in train mode.
    With a `teacher` (a trained model, run in eval mode on the same augmented batch): the loss is
    (1 - alpha) x cross-entropy + alpha x T^2 x KL of the temperature-softened outputs (Hinton et al.)."""
    gen = torch.Generator().manual_seed(seed)
    model.to(memory_format=torch.channels_last)  # ~25 % faster depthwise convs on CPU
    if teacher is not None:
        teacher.to(memory_format=torch.channels_last).eval()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1)) if schedule else None
    model.train()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(xt), (batch,), generator=gen)
        batch_x = augment(xt[idx], gen).contiguous(memory_format=torch.channels_last)
        logits = model(batch_x)
        loss = F.cross_entropy(logits, yt[idx])
        if teacher is not None:
            with torch.no_grad():
                soft = F.log_softmax(teacher(batch_x) / temperature, 1)
            kd = F.kl_div(F.log_softmax(logits / temperature, 1), soft, log_target=True, reduction="batchmean")
            loss = (1 - alpha) * loss + alpha * temperature ** 2 * kd
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched:
            sched.step()
        if log and (step % 200 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {float(loss.detach()):.4f} ({time.time() - t0:.0f} s)")
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    return model


def accuracy(model, x, y, batch=1000) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def trained(epochs: float = 3, log=print) -> FashionMobileNet:
    """The trained model, from the cache or trained now (and cached)."""
    path = weights_path()
    model = FashionMobileNet()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    x, y = data.load("train")
    steps = int(epochs * len(x) / 128)
    log(f"training FashionMobileNet for {epochs} epochs ({steps} steps) on {torch.get_num_threads()} thread(s)")
    train_steps(model, x, y, steps, log=log)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model.eval()


def macs(model: nn.Module, shape=(1, 1, 28, 28)) -> dict:
    """Multiply-accumulates per conv/linear kind for one image."""
    out = {}

    def hook(mod, args, res):
        if isinstance(mod, nn.Conv2d):
            kind = "depthwise" if mod.groups > 1 else ("pointwise" if mod.kernel_size == (1, 1) else "conv")
            n = res[0].numel() * mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            kind, n = "linear", mod.in_features * mod.out_features
        out[kind] = out.get(kind, 0) + n

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in hooks:
        h.remove()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=3)
    args = ap.parse_args()
    m = trained(args.epochs)
    print("MACs per image:", macs(m))
    xt, yt = data.load("test")
    print(f"test accuracy {accuracy(m, xt, yt):.4f}")
