"""Tiny BlockFFN checkpoints in the authors' released format (config.json + model.safetensors,
their tensor names and layouts), random weights, written by the tests; and an independent
per-head MLA reference (the released code's formulation: keys and values expanded per head, no
latent cache) to check model.py's absorbed attention against."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

TINY = {
    "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm",
    "vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "attention_type": "mla", "q_lora_rank": 32, "kv_lora_rank": 16,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "ffn_type": "block", "ffn_gated": True, "expert_gated": False, "hidden_act": "silu", "router_act": "relu",
    "num_experts": 8, "expert_size": 16, "norm_after_router": "rms", "norm_scale": 1.0,
    "block_implementation": "torch", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
    "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 16, "tie_word_embeddings": False,
    "attention_bias": False, "max_position_embeddings": 512, "torch_dtype": "float32",
}


def tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the released names and shapes (std 1/sqrt(fan-in); norm gains near 1)."""
    g = torch.Generator().manual_seed(seed)
    d, h, e, s = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_experts"], cfg["expert_size"]
    nope, rope, ql, kvl = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["q_lora_rank"], cfg["kv_lora_rank"]
    v = d // h

    def w(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    def gain(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    out = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], d, generator=g) * 0.1,
           "model.norm.weight": gain(d)}
    if not cfg.get("tie_word_embeddings", True):
        out["lm_head.weight"] = w(cfg["vocab_size"], d)
    blocked = cfg["ffn_type"] == "block"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": gain(d), p + "post_attention_layernorm.weight": gain(d),
            p + "self_attn.q_a_proj.weight": w(ql, d), p + "self_attn.q_a_layernorm.weight": gain(ql),
            p + "self_attn.q_b_proj.weight": w(h * (nope + rope), ql),
            p + "self_attn.kv_a_proj_with_mqa.weight": w(kvl + rope, d), p + "self_attn.kv_a_layernorm.weight": gain(kvl),
            p + "self_attn.kv_b_proj.weight": w(h * (nope + v), kvl), p + "self_attn.o_proj.weight": w(d, h * v),
            p + "mlp.router_proj.weight": w(e, d),
            p + "mlp.up_proj": w(e, s, d) if blocked else w(e * s, d),
            p + "mlp.down_proj": (torch.randn(e, d, s, generator=g) if blocked else torch.randn(d, e * s, generator=g))
            / math.sqrt(e * s),
        }
        if cfg.get("norm_after_router", "sum") == "rms":
            out[p + "mlp.router_norm.weight"] = gain(e)
        if cfg.get("attention_bias"):
            out |= {p + "self_attn.q_a_proj.bias": 0.1 * torch.randn(ql, generator=g),
                    p + "self_attn.kv_a_proj_with_mqa.bias": 0.1 * torch.randn(kvl + rope, generator=g),
                    p + "self_attn.o_proj.bias": 0.1 * torch.randn(d, generator=g)}
    return out


def write(path: Path, cfg: dict | None = None, weights: dict | None = None, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    cfg = dict(TINY if cfg is None else cfg)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: t.contiguous() for k, t in (tensors(cfg, seed) if weights is None else weights).items()},
              str(path / "model.safetensors"))
    return path


def reference_logits(cfg: dict, t: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The released format's forward written out directly from the tensors (per-head keys and
    values, whole sequence, no cache): an independent check of model.py."""
    d, h, e, s = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_experts"], cfg["expert_size"]
    nope, rope, kvl = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["kv_lora_rank"]
    v, n_layers, eps = d // h, cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    act = {"silu": torch.nn.functional.silu, "relu": torch.relu, "gelu": torch.nn.functional.gelu}[cfg["hidden_act"]]

    def rms(x, wt, eps_=eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps_) * wt

    def rot(x, cos, sin):
        a, b = x[..., : rope // 2], x[..., rope // 2:]
        return x * cos + torch.cat((-b, a), -1) * sin

    b_, T = ids.shape
    inv = 1.0 / cfg["rope_theta"] ** (torch.arange(0, rope, 2).float() / rope)
    fr = torch.outer(torch.arange(T).float(), inv)
    cos, sin = torch.cat((fr, fr), -1).cos(), torch.cat((fr, fr), -1).sin()
    causal = torch.ones(T, T).tril().bool()
    x = t["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    scale = cfg["scale_depth"] / math.sqrt(n_layers)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        y = rms(x, t[p + "input_layernorm.weight"])
        bias = (lambda name: t.get(p + f"self_attn.{name}.bias", 0.0))
        q = rms(y @ t[p + "self_attn.q_a_proj.weight"].T + bias("q_a_proj"), t[p + "self_attn.q_a_layernorm.weight"], 1e-6)
        q = (q @ t[p + "self_attn.q_b_proj.weight"].T).view(b_, T, h, nope + rope).transpose(1, 2)
        kv = y @ t[p + "self_attn.kv_a_proj_with_mqa.weight"].T + bias("kv_a_proj_with_mqa")
        c, k_pe = kv[..., :kvl], kv[..., kvl:]
        kvh = (rms(c, t[p + "self_attn.kv_a_layernorm.weight"], 1e-6) @ t[p + "self_attn.kv_b_proj.weight"].T)
        kvh = kvh.view(b_, T, h, nope + v).transpose(1, 2)
        k = torch.cat([kvh[..., :nope], rot(k_pe, cos, sin)[:, None].expand(b_, h, T, rope)], -1)
        qq = torch.cat([q[..., :nope], rot(q[..., nope:], cos, sin)], -1)
        att = (qq @ k.transpose(-1, -2)) / math.sqrt(nope + rope)
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), -1)
        o = (att @ kvh[..., nope:]).transpose(1, 2).reshape(b_, T, h * v) @ t[p + "self_attn.o_proj.weight"].T + bias("o_proj")
        x = x + o * scale
        y = rms(x, t[p + "post_attention_layernorm.weight"])
        a = torch.relu(y @ t[p + "mlp.router_proj.weight"].T)
        norm = cfg.get("norm_after_router", "sum")
        if norm == "rms":
            r = rms(a, t[p + "mlp.router_norm.weight"])
        elif norm == "sum":
            r = a / (a.sum(-1, keepdim=True) * cfg.get("norm_scale", 1.0) + 1e-5)
        else:
            r = a
        up, down = t[p + "mlp.up_proj"], t[p + "mlp.down_proj"]
        if cfg["ffn_type"] == "block":   # [E, S, D], [E, D, S]
            hid = act(torch.einsum("btd,esd->btes", y, up)) * r[..., None]
            f = torch.einsum("btes,eds->btd", hid, down)
        else:                             # [E*S, D], [D, E*S]
            hid = act(y @ up.T).view(b_, T, e, s) * r[..., None]
            f = hid.reshape(b_, T, e * s) @ down.T
        x = x + f * scale
    x = rms(x, t["model.norm.weight"]) / (d / cfg["dim_model_base"])
    head = t["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", True) else t["lm_head.weight"]
    return x @ head.T
