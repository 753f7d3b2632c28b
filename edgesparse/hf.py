"""Hugging Face causal LMs as build inputs, with no factory written by the user.

`edgesparse build hf:PATH ...` takes PATH = a transformers model folder (config.json, weights,
tokenizer) or a .gguf file (dequantized to float32 by transformers' GGUF loader), and exports the
model with its KV cache as inputs and outputs, so that one ONNX graph serves prefill (past
length 0) and decode (one new token, past length P):

    inputs:  input_ids int64 [B, T], attention_mask int64 [B, P + T] (ones: no padding),
             past_keys, past_values float [L, B, Hkv, P, D] (every layer's cache, stacked)
    outputs: logits float [B, T, V], present_keys, present_values float [L, B, Hkv, P + T, D]

Batch, sequence and past length are dynamic. Calibration batches are consecutive windows of a
text file the user names (`--calibration-text`); without one, a few built-in sentences.

Python API: `load(path, calibration_text=None)` -> TorchModel (what `hf:` builds from);
`load_pretrained(path)` -> (tokenizer, float32 model), the same loading without the export;
`causal_lm(model, calibration=...)` wraps an already loaded transformers model the same way;
`empty_cache(config)` gives the past arrays of a fresh sequence; `generate(...)` is greedy
decoding of a built package with its KV cache (what an app does; see the deltallm README).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import EdgesparseError
from .source import TorchModel

PREFIX = "hf:"
CALIBRATION_TOKENS = 256
INPUTS = ("input_ids", "attention_mask", "past_keys", "past_values")
OUTPUTS = ("logits", "present_keys", "present_values")
# without --calibration-text: enough tokens for a pass to run, not enough to calibrate well
DEFAULT_TEXT = (
    "The river rises in the hills north of the town and flows south through farmland before it "
    "reaches the sea. In the nineteenth century its banks were lined with mills, and the town grew "
    "around the trade in wool and grain. Today most of the mills are gone; a few have been turned "
    "into houses, and one holds a small museum about the history of the valley. Visitors walk the "
    "old towpath, which follows the water for several miles, past locks, bridges and the ruins of "
    "a castle that once guarded the crossing."
)


def is_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def geometry(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a transformers config (its text part for multimodal ones)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return int(text.num_hidden_layers), int(kv), int(dim)


def empty_cache(config, batch: int = 1, past: int = 0) -> tuple[np.ndarray, np.ndarray]:
    layers, kv, dim = geometry(config)
    shape = (layers, batch, kv, past, dim)
    return np.zeros(shape, np.float32), np.zeros(shape, np.float32)


def _cached(lm, layers: int):
    """forward(input_ids, attention_mask, past_keys, past_values) -> logits, present_keys, present_values.
    The cache is a plain DynamicCache (full length on every layer, sliding-window layers too: their
    masks, not the cache, limit what they see), so the stacked present is past + new on every layer."""
    import torch
    from transformers import DynamicCache

    class CachedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, past_keys, past_values):
            cache = DynamicCache(ddp_cache_data=[(past_keys[i], past_values[i]) for i in range(layers)])
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True)
            kept = out.cache.layers
            return out.logits, torch.stack([l.keys for l in kept]), torch.stack([l.values for l in kept])

    return CachedLM().eval()


def calibration_batches(ids: np.ndarray, config, length: int = CALIBRATION_TOKENS) -> list[dict]:
    """Consecutive windows of `length` tokens (the last shorter one dropped unless it is all there
    is), each a fresh sequence (empty cache)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size < 2:
        raise EdgesparseError("calibration text has fewer than 2 tokens")
    windows = [ids[i:i + length] for i in range(0, max(1, ids.size - length + 1), length)] if ids.size >= length else [ids]
    pk, pv = empty_cache(config, 1, 0)
    return [{"input_ids": w[None], "attention_mask": np.ones((1, w.size), np.int64), "past_keys": pk, "past_values": pv}
            for w in windows]


def causal_lm(lm, calibration=None) -> TorchModel:
    """A loaded transformers causal LM as a TorchModel with its KV cache (see the module doc).
    calibration: a list of batches (calibration_batches) or a callable returning them."""
    import torch

    if any(p.dtype != torch.float32 for p in lm.parameters()):
        lm = lm.float()
    lm = lm.eval()
    layers, kv, dim = geometry(lm.config)
    vocab = lm.config.get_text_config().vocab_size
    gen = torch.Generator().manual_seed(0)
    # batch 2, 5 new tokens, 3 past: no axis of size 0 or 1, which the exporter would pin
    example = {
        "input_ids": torch.randint(0, vocab, (2, 5), generator=gen),
        "attention_mask": torch.ones(2, 8, dtype=torch.int64),
        "past_keys": torch.randn(layers, 2, kv, 3, dim, generator=gen),
        "past_values": torch.randn(layers, 2, kv, 3, dim, generator=gen),
    }
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
            "past_keys": {1: "batch", 3: "past"}, "past_values": {1: "batch", 3: "past"}}
    batches = calibration
    if batches is not None and not callable(batches):
        fixed = list(batches)
        batches = lambda: iter(fixed)  # noqa: E731
    return TorchModel(module=_cached(lm, layers), example_inputs=example, output_names=list(OUTPUTS),
                      dynamic_axes=axes, calibration=batches)


def load_pretrained(path: Path):
    """(tokenizer, float32 model) from a model folder or a .gguf file, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise EdgesparseError(f"hf: models need transformers and torch ({exc.name} is missing)") from None
    if path.is_file() and path.suffix == ".gguf":
        folder, options = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir() and (path / "config.json").is_file():
        folder, options = str(path), {}
    elif path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise EdgesparseError(f"hf:{path}: no config.json, and {len(ggufs)} .gguf files (name one)")
        folder, options = str(path), {"gguf_file": ggufs[0].name}
    else:
        raise EdgesparseError(f"hf:{path}: not a transformers model folder or a .gguf file")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **options)
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options)
    except Exception as exc:  # transformers raises many kinds; one line names the model and the cause
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EdgesparseError(f"hf:{path}: cannot load it as a causal LM: {first}") from exc
    if getattr(lm, "hf_quantizer", None) is not None:  # GGUF: the weights are dequantized already
        lm.hf_quantizer = None
        lm.is_quantized = False
    return tokenizer, lm.eval()


def load(path, calibration_text=None) -> TorchModel:
    """The TorchModel `edgesparse build hf:PATH` builds from."""
    path = Path(path)
    if not path.exists():
        raise EdgesparseError(f"hf:{path}: no such file or folder")
    if calibration_text is not None:
        calibration_text = Path(calibration_text)
        if not calibration_text.is_file():
            raise EdgesparseError(f"calibration text not found: {calibration_text}")
        text = calibration_text.read_text(errors="replace")
        if not text.strip():
            raise EdgesparseError(f"calibration text {calibration_text} is empty")
    else:
        text = DEFAULT_TEXT
    tokenizer, lm = load_pretrained(Path(path))
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int64)
    return causal_lm(lm, calibration_batches(ids, lm.config))


def generate(session, prompt_ids, max_new_tokens: int, config=None, eos_token_id=None, cache_shape=None) -> list[int]:
    """Greedy decoding with the package's KV cache: one prefill call, then one call per token.
    `session`: an onnxruntime.InferenceSession of the package; `cache_shape`: (layers, kv heads,
    head dim) when no transformers config is at hand."""
    layers, kv, dim = cache_shape or geometry(config)
    ids = np.asarray(prompt_ids, np.int64).reshape(1, -1)
    past_k = past_v = np.zeros((layers, 1, kv, 0, dim), np.float32)
    out: list[int] = []
    feed = ids
    for _ in range(max_new_tokens):
        total = past_k.shape[3] + feed.shape[1]
        logits, past_k, past_v = session.run(list(OUTPUTS), {
            "input_ids": feed, "attention_mask": np.ones((1, total), np.int64),
            "past_keys": past_k, "past_values": past_v})
        token = int(logits[0, -1].argmax())
        out.append(token)
        if eos_token_id is not None and token == eos_token_id:
            break
        feed = np.asarray([[token]], np.int64)
    return out
