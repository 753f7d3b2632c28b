"""Tiny random models for the blockffn tests, as edgesparse model factories: a Llama-style
decoder (gated SiLU FFN) and a BERT-style encoder (GELU FFN). Tokens are bytes of English text."""
from __future__ import annotations

import numpy as np

TEXT = (b"Anarchism is a political philosophy and movement that is skeptical of all justifications for "
        b"authority and seeks to abolish the institutions it claims maintain unnecessary coercion and "
        b"hierarchy, typically including the state and capitalism. Anarchism advocates for the replacement "
        b"of the state with stateless societies and voluntary free associations. ")


BUILT: list = []


def tokens(length: int, offset: int = 0) -> np.ndarray:
    data = np.frombuffer(TEXT * (2 + (length + offset) // len(TEXT)), np.uint8).astype(np.int64)
    return data[offset:offset + length]


def llama(seed=0, intermediate=256):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def bert(seed=0):
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=512)
    return BertModel(cfg, add_pooling_layer=False).eval()


def factory(kind: str, seq: int = 64, batches: int = 4, seed: int = 0):
    import torch

    from edgesparse import TorchModel

    lm = llama(seed) if kind == "llama" else bert(seed)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            out = self.lm(input_ids=input_ids)
            return out.logits if kind == "llama" else out.last_hidden_state

    def calibration():
        for b in range(batches):
            yield {"input_ids": tokens(seq, 37 * b)[None]}

    model = TorchModel(module=Wrapped().eval(), example_inputs={"input_ids": torch.tensor(tokens(16)[None])},
                      output_names=["output"], dynamic_axes={"input_ids": {1: "tokens"}, "output": {1: "tokens"}},
                      calibration=calibration)
    BUILT.append(model)  # lets a test reach the module a build converted
    return model


def build_llama():
    return factory("llama")


def build_bert():
    return factory("bert")
