"""Greedy decoding with a BlockFFN package: what an app runs, with numpy and onnxruntime only.

The package's inputs are input_ids and one cache tensor per layer and kind (model.cache_names:
past_latent.i, past_rope.i); a call returns logits and the caches for the next call (present_*).

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library("pkg/lib/libedgesparse_kernels.so")
    session = onnxruntime.InferenceSession("pkg/model.onnx", so)
    tokens = generate(session, prompt_ids, max_new_tokens=32)
"""
from __future__ import annotations

import numpy as np


def empty_caches(session) -> dict:
    """The cache inputs of a prompt's call: [1, 0, width] per layer and kind."""
    return {i.name: np.zeros((1, 0, i.shape[2]), np.float32) for i in session.get_inputs() if i.name.startswith("past_")}


def caches_after(session, outputs: list) -> dict:
    """The next call's cache inputs from a call's outputs (present_* -> past_*)."""
    names = [o.name for o in session.get_outputs()]
    return {n.replace("present_", "past_", 1): v for n, v in zip(names, outputs) if n.startswith("present_")}


def generate(session, prompt_ids, max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """One call for the prompt, then one per new token (greedy); stops after eos_token_id."""
    feeds = {"input_ids": np.asarray(prompt_ids, np.int64).reshape(1, -1), **empty_caches(session)}
    out: list[int] = []
    for _ in range(max_new_tokens):
        outputs = session.run(None, feeds)
        token = int(outputs[0][0, -1].argmax())
        out.append(token)
        if token == eos_token_id:
            break
        feeds = {"input_ids": np.array([[token]], np.int64), **caches_after(session, outputs)}
    return out
