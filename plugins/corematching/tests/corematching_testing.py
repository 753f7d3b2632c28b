"""Helpers for the corematching tests: a tiny random Llama built in the test (2 layers, SmolLM2's
attention geometry scaled down) and prompts from real English text (byte values)."""
from __future__ import annotations

import numpy as np
import torch

TEXT = (b"Anarchism is a political philosophy and movement that is skeptical of all justifications for "
        b"authority and seeks to abolish the institutions it claims maintain unnecessary coercion and "
        b"hierarchy, typically including the state and capitalism. ")


def tiny_llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


def tokens(length: int, offset: int = 0) -> torch.Tensor:
    data = np.frombuffer(TEXT * (1 + (length + offset) // len(TEXT)), np.uint8).astype(np.int64)
    return torch.tensor(data[offset:offset + length])
