"""A 2-layer random Llama (SmolLM2's attention geometry: 9 query heads, 3 KV heads, head dim 64)
with its KV cache, as an edgesparse model factory. Tokens come from a real sentence (byte values
of English text), so that consecutive queries resemble a real sequence a little."""
from __future__ import annotations

import numpy as np

TEXT = (b"Anarchism is a political philosophy and movement that is skeptical of all justifications for "
        b"authority and seeks to abolish the institutions it claims maintain unnecessary coercion and "
        b"hierarchy, typically including the state and capitalism. Anarchism advocates for the replacement "
        b"of the state with stateless societies and voluntary free associations. ")
LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 9, 3, 64, 256


def config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=256,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                       head_dim=HEAD_DIM, max_position_embeddings=4096, rope_theta=100000.0)


def model(seed: int = 0):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config()).eval()


def tokens(length: int, offset: int = 0) -> np.ndarray:
    data = np.frombuffer(TEXT * (1 + (length + offset) // len(TEXT)), np.uint8).astype(np.int64)
    return data[offset:offset + length]


def cached(lm):
    import torch
    from transformers import DynamicCache

    class Cached(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, past_keys, past_values):
            cache = DynamicCache(ddp_cache_data=[(past_keys[i], past_values[i]) for i in range(LAYERS)])
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
            layers = out.cache.layers
            return out.logits, torch.stack([l.keys for l in layers]), torch.stack([l.values for l in layers])

    return Cached().eval()


def empty_cache(past: int = 0):
    shape = (LAYERS, 1, KV_HEADS, past, HEAD_DIM)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)


def feeds(ids: np.ndarray) -> dict:
    pk, pv = empty_cache(0)
    return {"input_ids": ids[None].astype(np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
            "past_keys": pk, "past_values": pv}


CONTEXT = 96


def build():
    import torch

    from edgesparse import TorchModel

    rng = np.random.default_rng(0)
    ek = rng.standard_normal((LAYERS, 1, KV_HEADS, 3, HEAD_DIM)).astype(np.float32)
    example = {"input_ids": torch.tensor(tokens(8)[None]), "attention_mask": torch.ones(1, 11, dtype=torch.int64),
               "past_keys": torch.tensor(ek), "past_values": torch.tensor(ek)}

    def calibration():
        for i in range(2):
            yield feeds(tokens(CONTEXT, offset=40 * i))

    return TorchModel(module=cached(model()), example_inputs=example,
                      output_names=["logits", "present_keys", "present_values"],
                      dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "total"},
                                    "past_keys": {3: "past"}, "past_values": {3: "past"}},
                      calibration=calibration)
