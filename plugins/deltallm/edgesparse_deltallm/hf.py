"""Delta attention inside a transformers model (Llama-family attention: LlamaAttention and the
models that share its attention interface). `enable(model, settings)` registers an attention
implementation "deltallm" and switches the model to it; each attention module then runs
`reference.delta_attention` with its layer's thresholds, carries the delta state from one
forward call to the next (decode with a KV cache) and counts MACs per layer and stage.

    settings = Settings.uniform(layers=30, window=64, sinks=4, theta_q=0.3, theta_v=2e-3)
    enable(model, settings)
    model(ids)                # counted as prefill (the call starts a sequence)
    model.generate(...)       # the prompt is prefill, every later call decode
    report = statistics(model)
    disable(model)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import reference

NAME = "deltallm"


@dataclass
class Settings:
    """Per-layer knobs. theta_q / theta_v: one float per layer, or one list (per head) per layer."""

    window: int
    sinks: int
    theta_q: list
    theta_v: list

    @classmethod
    def uniform(cls, layers: int, window: int, sinks: int, theta_q, theta_v) -> "Settings":
        return cls(window, sinks, [theta_q] * layers, [theta_v] * layers)

    def layer(self, i: int) -> dict:
        return {"window": self.window, "sinks": self.sinks, "theta_q": self.theta_q[i], "theta_v": self.theta_v[i]}


@dataclass
class _LayerRun:
    state: reference.DeltaState | None = None
    stats: dict = field(default_factory=lambda: {"prefill": reference.DeltaStats(), "decode": reference.DeltaStats()})


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cfg = getattr(module, "_deltallm", None)
    if cfg is None:
        raise RuntimeError(f"attention layer {getattr(module, 'layer_idx', '?')} has no delta settings")
    run: _LayerRun = module._deltallm_run
    t_len, n = query.shape[2], key.shape[2]
    if n == t_len:  # no cache before this call: a new sequence starts
        run.state = None
    stage = "prefill" if run.state is None else "decode"
    # sliding-window layers (Mistral, Gemma 2/3 local layers) and soft-capped logits (Gemma 2):
    # what transformers hands every attention implementation
    span = int(kwargs.get("sliding_window") or 0)
    softcap = float(kwargs.get("softcap") or 0.0)
    _check_mask(attention_mask, query.shape[0], span)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, run.state, stats = reference.delta_attention(
        query, key, value, scale=scale, window=cfg["window"], sinks=cfg["sinks"],
        theta_q=cfg["theta_q"], theta_v=cfg["theta_v"], state=run.state, softcap=softcap, span=span)
    run.stats[stage].add(stats)
    return out.transpose(1, 2).contiguous(), None


def _check_mask(mask, batch, span=0):
    """Delta attention is causal attention over the whole cache (or its last `span` keys); a
    padding mask would be ignored."""
    if mask is None or mask.dtype != torch.bool:
        if mask is not None and torch.isinf(mask).any() and mask.shape[-2] == 1 and batch > 1:
            raise RuntimeError("deltallm: padded batches are not supported (use batch size 1)")
        return
    if not bool(mask[..., -1, -span if span else 0:].all()):
        raise RuntimeError("deltallm: padded batches are not supported (use batch size 1)")


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def attention_modules(model):
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj") and hasattr(m, "k_proj")]
    if not found:
        raise ValueError("deltallm: no Llama-style attention modules (q_proj/k_proj with layer_idx) in this model")
    return found


def enable(model, settings: Settings) -> None:
    _register()
    for m in attention_modules(model):
        m._deltallm = settings.layer(m.layer_idx)
        m._deltallm_run = _LayerRun()
    model._deltallm_previous = model.config._attn_implementation
    model.config._attn_implementation = NAME
    for sub in model.modules():
        if hasattr(sub, "config") and sub.config is not model.config and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = NAME


def disable(model) -> None:
    previous = getattr(model, "_deltallm_previous", "sdpa")
    model.config._attn_implementation = previous
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = previous
    for m in attention_modules(model):
        for attr in ("_deltallm", "_deltallm_run"):
            if hasattr(m, attr):
                delattr(m, attr)


def reset(model) -> None:
    """Forget delta states and counters (a new sequence or a new measurement)."""
    for m in attention_modules(model):
        m._deltallm_run = _LayerRun()


def statistics(model) -> dict:
    """Sparsity (skipped MACs / dense causal attention MACs) per layer and stage, and overall."""
    layers = []
    total = {"prefill": reference.DeltaStats(), "decode": reference.DeltaStats()}
    for m in sorted(attention_modules(model), key=lambda m: m.layer_idx):
        row = {"layer": m.layer_idx}
        for stage, s in m._deltallm_run.stats.items():
            row[stage] = round(s.sparsity, 4) if s.dense_macs else None
            total[stage].add(s)
        layers.append(row)
    both = reference.DeltaStats()
    for s in total.values():
        both.add(s)
    return {
        "layers": layers,
        "prefill": total["prefill"].sparsity if total["prefill"].dense_macs else None,
        "decode": total["decode"].sparsity if total["decode"].dense_macs else None,
        "overall": both.sparsity if both.dense_macs else None,
        "dense_macs": both.dense_macs,
        "macs": both.macs,
    }
