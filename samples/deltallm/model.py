"""SmolLM2-135M-Instruct as an edgesparse model factory, exported with its KV cache so that one
ONNX graph serves prefill (past length 0) and decode (one token, past length P).

    edgesparse build samples/deltallm/model.py:build --target x86 \\
        --pass deltallm:sparsity=0.6 --tolerance 0.05 -o out/smollm2-deltallm

Inputs:  input_ids int64 [1, T], attention_mask int64 [1, P + T] (all ones),
         past_keys / past_values float [30, 1, 3, P, 64] (every layer's cache, stacked)
Outputs: logits [1, T, 49152], present_keys / present_values [30, 1, 3, P + T, 64]
Calibration: windows of the real Wikipedia text shipped with gensim (articles never used by the
evaluation scripts).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

CALIBRATION_TOKENS = 256
CALIBRATION_BATCHES = 4


class CachedLM:
    """forward(input_ids, attention_mask, past_keys, past_values) -> logits, present_keys, present_values."""

    def __new__(cls, model):
        import torch
        from transformers import DynamicCache

        class _CachedLM(torch.nn.Module):
            def __init__(self, lm):
                super().__init__()
                self.lm = lm
                self.layers = lm.config.num_hidden_layers

            def forward(self, input_ids, attention_mask, past_keys, past_values):
                cache = DynamicCache(ddp_cache_data=[(past_keys[i], past_values[i]) for i in range(self.layers)])
                out = self.lm(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
                layers = out.cache.layers
                return out.logits, torch.stack([l.keys for l in layers]), torch.stack([l.values for l in layers])

        return _CachedLM(model)


def empty_cache(config, past: int = 0) -> tuple[np.ndarray, np.ndarray]:
    shape = (config.num_hidden_layers, 1, config.num_key_value_heads, past, config.head_dim)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)


def build():
    import torch

    from edgesparse import TorchModel
    from common import load_smollm2, wiki_tokens, windows

    tok, lm = load_smollm2()
    module = CachedLM(lm).eval()
    cfg = lm.config
    ids = wiki_tokens(tok, "calibration")
    pk, pv = empty_cache(cfg, 0)
    # export with a non-empty cache: a zero-length example would pin the past axis to 0
    ek, ev = (np.random.default_rng(0).standard_normal(a.shape[:3] + (3,) + a.shape[4:]).astype(np.float32) for a in (pk, pv))
    example = {
        "input_ids": torch.tensor(ids[None, :16]),
        "attention_mask": torch.ones(1, 19, dtype=torch.int64),
        "past_keys": torch.tensor(ek),
        "past_values": torch.tensor(ev),
    }

    def calibration():
        for w in windows(ids, CALIBRATION_TOKENS, CALIBRATION_BATCHES):
            yield {"input_ids": w[None].astype(np.int64), "attention_mask": np.ones((1, len(w)), np.int64),
                   "past_keys": pk, "past_values": pv}

    return TorchModel(
        module=module,
        example_inputs=example,
        output_names=["logits", "present_keys", "present_values"],
        dynamic_axes={"input_ids": {1: "sequence"}, "attention_mask": {1: "total"},
                      "past_keys": {3: "past"}, "past_values": {3: "past"}},
        calibration=calibration,
    )
