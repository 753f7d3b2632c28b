"""A small sample that every target builds: the first feed-forward block of the real
all-MiniLM-L6-v2 (384 -> 1536 -> GELU -> 384, pretrained weights), on token vectors.
It holds only MatMul/Add/GELU, which every backend imports, with static shapes, which the TVM
importer needs. Calibration uses the real hidden states of the sample sentences of
samples/minilm."""
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from edgesparse import TorchModel

TOKENS = 8


def _minilm():
    spec = importlib.util.spec_from_file_location("_minilm_sample", Path(__file__).parents[1] / "minilm" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FeedForward(torch.nn.Module):
    def __init__(self, up: torch.nn.Linear, down: torch.nn.Linear):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def build() -> TorchModel:
    minilm = _minilm()
    tokenizer, bert = minilm._tokenizer_and_model()
    layer = bert.encoder.layer[0]
    ffn = FeedForward(layer.intermediate.dense, layer.output.dense).eval()

    def hidden_states():
        with torch.no_grad():
            for sentence in minilm.SENTENCES:
                enc = tokenizer([sentence], padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
                h = bert(**enc, output_hidden_states=True).hidden_states[1]  # input of layer 0's FFN, roughly
                yield {"x": h[0]}

    return TorchModel(module=ffn, example_inputs={"x": torch.zeros(TOKENS, 384)}, output_names=["y"],
                      calibration=hidden_states)
