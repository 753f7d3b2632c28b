"""A BlockFFN language model in PyTorch, as the authors release it (MiniCPM-style decoder with
multi-head latent attention and BlockFFN feed-forward blocks), written for deployment: one
forward serves prefill and decode with a KV cache, and exports to ONNX.

Semantics follow the released Hugging Face format (see checkpoint.py for the names and shapes):
- embedding x scale_emb; every residual branch x scale_depth / sqrt(layers); the lm_head reads
  the final norm's output divided by hidden_size / dim_model_base;
- BlockFFN: r = norm(ReLU(W_r x)) (norm "rms": RMSNorm with a learnable per-expert gain, the
  paper's router; "sum" and "none" also exist in the format), h = act(W_up x) viewed as
  [E, S] experts, expert e scaled by r_e, y = W_down h. Experts are not gated;
- MLA: q = W_qb RMSNorm(W_qa x); [c, k_rope] = W_kva x; c = RMSNorm(c); per head
  [k_nope, v] = W_kvb c; RoPE (rotate-half form) on the q and k rope parts, k_rope shared by all
  heads; softmax scale (nope + rope)^-1/2.

The cache holds MLA's latent (normalised c) and the rotated k_rope per token, not per-head keys
and values ((kv_lora_rank + rope) floats per token and layer instead of heads x (nope + rope + v)):
what makes MLA worth having on a phone. Attention runs in the "absorbed" form (the per-head W_kvb
blocks multiply the query and the attention output instead of every cached token), which is the
same function; tests check it against the per-head form. Those blocks, RoPE's rotate-half, the
softmax scale and the residual scale are folded into the projections (merged_weights), and every
head's query meets the cache in one matrix product: a decode step is a few larger ops instead of
many small per-head ones. At this package's sizes ONNX Runtime's per-node cost is much of a small
model's step (the 6-layer, 256-wide twin: 522 -> ~280 nodes per decode step; README has the timings).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .block import ACTIVATIONS, scale_experts


@dataclass(frozen=True)
class Config:
    vocab_size: int
    hidden_size: int
    layers: int
    heads: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    experts: int
    expert_size: int
    hidden_act: str = "silu"
    norm_after_router: str = "rms"   # "rms" | "sum" | "none"
    norm_scale: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0  # rope_scaling {"type": "linear", "factor": f}
    scale_emb: float = 1.0
    scale_depth: float = 1.0
    dim_model_base: float = 1.0
    tie_word_embeddings: bool = True
    attention_bias: bool = False

    @property
    def residual_scale(self) -> float:
        return self.scale_depth / math.sqrt(self.layers)

    @property
    def logit_divisor(self) -> float:
        return self.hidden_size / self.dim_model_base


LATENT_NORM_EPS = 1e-6  # the released code builds MLA's q_a/kv_a norms with the default eps, not rms_norm_eps


class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):
        # written as x / sqrt(...) (not x * rsqrt(...)): ONNX Runtime fuses this spelling into one
        # SimplifiedLayerNormalization node instead of running six small ops per norm
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Router(nn.Module):
    """r = norm(ReLU(W x)); the same attributes as block.Router (bias None here), so the ONNX
    rewrite emits either."""

    bias = None

    def __init__(self, d: int, experts: int, norm: str, eps: float, norm_scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, d))
        self.gain = nn.Parameter(torch.ones(experts))  # router_norm.weight; used by norm "rms" only
        self.norm, self.eps, self.norm_scale = norm, eps, norm_scale

    def logits(self, x):
        return F.linear(x, self.weight)

    def routes(self, z):
        a = torch.relu(z)
        if self.norm == "rms":
            return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + self.eps) * self.gain
        if self.norm == "sum":
            return a / (a.sum(-1, keepdim=True) * self.norm_scale + 1e-5)
        return a

    def forward(self, x):
        return self.routes(self.logits(x))


class BlockMLP(nn.Module):
    """A trained BlockFFN block. up: [E*S, D] (expert e = rows e*S..), down: [D, E*S]."""

    def __init__(self, cfg: Config):
        super().__init__()
        inter = cfg.experts * cfg.expert_size
        self.router = Router(cfg.hidden_size, cfg.experts, cfg.norm_after_router, cfg.rms_norm_eps, cfg.norm_scale)
        self.up = nn.Linear(cfg.hidden_size, inter, bias=False)
        self.down = nn.Linear(inter, cfg.hidden_size, bias=False)
        self.activation = cfg.hidden_act
        self.record = None  # a list to append router outputs to (the pass's sparsity report), or None
        self.trace = None   # a list to append (logits, routes) with their gradients to (training losses), or None

    def forward(self, x):
        z = self.router.logits(x)
        r = self.router.routes(z)
        if self.record is not None:
            self.record.append(r.detach())
        if self.trace is not None:
            self.trace.append((z, r))
        return self.down(scale_experts(ACTIVATIONS[self.activation](self.up(x)), r))


def rotate_half_matrix(n: int) -> torch.Tensor:
    """R with x @ R == cat(-x[n/2:], x[:n/2]) (RoPE's rotate-half): one MatMul in the graph instead
    of a Split, a Neg and a Concat."""
    h = n // 2
    r = torch.zeros(n, n)
    r[torch.arange(h) + h, torch.arange(h)] = -1.0
    r[torch.arange(h), torch.arange(h) + h] = 1.0
    return r


class LatentAttention(nn.Module):
    """MLA with a latent cache. Cache tensors: latent [B, P, kv_lora_rank], rope [B, P, rope]."""

    def __init__(self, cfg: Config):
        super().__init__()
        h, nope, rope, v = cfg.heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.heads, self.nope, self.rope, self.v, self.latent = h, nope, rope, v, cfg.kv_lora_rank
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * (nope + rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (nope + v), bias=False)
        self.o_proj = nn.Linear(h * v, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = (nope + rope) ** -0.5
        self.out_scale = cfg.residual_scale  # the residual branch's scale, folded into w_o and the bias
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (torch.arange(0, rope, 2).float() / rope),
                             persistent=False)
        self.register_buffer("rotation", rotate_half_matrix(rope), persistent=False)
        self.rope_factor = cfg.rope_linear_factor

    def rotary(self, past, t):
        """cos, sin [T, rope] for positions past .. past + t - 1 (past and t stay symbolic in the export)."""
        pos = torch.arange(past, past + t, dtype=torch.float32) / self.rope_factor
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    def absorbed_weights(self):
        """kv_b_proj split per head: w_uk [H, nope, C] (keys), w_uv [H, v, C] (values)."""
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v, -1)
        return w[:, :self.nope], w[:, self.nope:]

    def merged_weights(self):
        """The projections of the absorbed form, folded together (computed from the parameters:
        training sees the same function; the export folds them into constants):
        w_q [Q, H*C + 2*H*rope]: q_b_proj's no-rope rows times w_uk per head (the query in latent
        space), its rope rows, and those rows rotated (x @ R), all times the softmax scale;
        w_kv, b_kv: kv_a_proj_with_mqa with its rope rows rotated appended (k_rope and k_rope @ R
        from one product); w_o [H*C, D]: w_uv per head times o_proj, times the residual branch's
        scale (the layer adds the output as it is)."""
        h, nope, rope, c = self.heads, self.nope, self.rope, self.latent
        w_uk, w_uv = self.absorbed_weights()
        w_qb = self.q_b_proj.weight.view(h, nope + rope, -1)                         # [H, nope + rope, Q]
        q_latent = (w_qb[:, :nope].transpose(1, 2) @ w_uk).transpose(0, 1)           # [Q, H, C]
        q_rope = w_qb[:, nope:].permute(2, 0, 1)                                      # [Q, H, rope]
        w_q = torch.cat([q_latent.flatten(1), q_rope.flatten(1), (q_rope @ self.rotation).flatten(1)], dim=1)
        w_kva, b_kva = self.kv_a_proj_with_mqa.weight, self.kv_a_proj_with_mqa.bias
        w_kv = torch.cat([w_kva, self.rotation.T @ w_kva[c:]])                       # [C + 2*rope, D]
        b_kv = None if b_kva is None else torch.cat([b_kva, b_kva[c:] @ self.rotation])
        w_out = self.o_proj.weight.view(-1, h, self.v).permute(1, 2, 0)              # [H, v, D]
        w_o = (w_uv.transpose(1, 2) @ w_out).flatten(0, 1)                            # [H*C, D]
        return w_q * self.scale, w_kv, b_kv, w_o * self.out_scale

    def forward(self, x, past_latent, past_rope):
        """x [B, T, D], caches [B, P, C] and [B, P, rope] -> output [B, T, D] (times the residual
        scale), and the caches extended to P + T."""
        b, t, _ = x.shape
        h, c, rope = self.heads, self.latent, self.rope
        past = past_latent.shape[1]
        w_q, w_kv, b_kv, w_o = self.merged_weights()
        cos, sin = self.rotary(past, t)                                           # [T, rope]
        q = self.q_a_layernorm(self.q_a_proj(x)) @ w_q                            # [B, T, H*C + 2*H*rope]
        q_latent = q[..., :h * c].reshape(b, t * h, c)                            # rows: (token, head)
        q_rope = q[..., h * c:h * (c + rope)] * cos.repeat(1, h) + q[..., h * (c + rope):] * sin.repeat(1, h)
        q_rope = q_rope.reshape(b, t * h, rope)
        kv = F.linear(x, w_kv, b_kv)                                              # [c, k_rope, k_rope @ R]
        latent = torch.cat([past_latent, self.kv_a_layernorm(kv[..., :c])], dim=1)           # [B, P + T, C]
        keys_rope = torch.cat([past_rope, kv[..., c:c + rope] * cos + kv[..., c + rope:] * sin], dim=1)
        scores = q_latent @ latent.transpose(1, 2) + q_rope @ keys_rope.transpose(1, 2)  # scaled through w_q
        total = latent.shape[1]
        visible = torch.arange(total)[None, :] <= torch.arange(past, past + t)[:, None]  # causal, after the cache
        visible = visible[:, None, :].expand(t, h, total).reshape(t * h, total)
        attn = torch.softmax(scores.masked_fill(~visible, torch.finfo(scores.dtype).min), dim=-1)
        out = (attn @ latent).reshape(b, t, h * c) @ w_o                          # [B, T, D]
        if self.o_proj.bias is not None:
            out = out + self.o_proj.bias * self.out_scale
        return out, latent, keys_rope


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LatentAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = BlockMLP(cfg)
        self.residual_scale = cfg.residual_scale

    def forward(self, x, past_latent, past_rope):
        a, latent, rope = self.self_attn(self.input_layernorm(x), past_latent, past_rope)
        x = x + a  # scaled inside (folded into the output projection)
        x = x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale
        return x, latent, rope


class BlockFFNForCausalLM(nn.Module):
    """forward(input_ids [B, T], past_latent [L, B, P, C], past_rope [L, B, P, rope])
    -> logits [B, T, V], present_latent [L, B, P + T, C], present_rope [L, B, P + T, rope]."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def empty_cache(self, batch: int = 1, past: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        return (torch.zeros(c.layers, batch, past, c.kv_lora_rank), torch.zeros(c.layers, batch, past, c.qk_rope_head_dim))

    def forward(self, input_ids, past_latent, past_rope):
        logits, latents, ropes = self.step(input_ids, list(past_latent), list(past_rope))
        return logits, torch.stack(latents), torch.stack(ropes)

    def step(self, input_ids, latents: list, ropes: list) -> tuple:
        """forward with one cache tensor per layer: lists of [B, P, C] and [B, P, rope] -> logits and
        the lists' successors [B, P + T, .] (the exported packages' form: LayerCaches below)."""
        x = self.embed_tokens(input_ids) * self.config.scale_emb
        new_latents, new_ropes = [], []
        for layer, past_latent, past_rope in zip(self.layers, latents, ropes):
            x, latent, rope = layer(x, past_latent, past_rope)
            new_latents.append(latent)
            new_ropes.append(rope)
        return self.lm_head(self.norm(x) / self.config.logit_divisor), new_latents, new_ropes


def cache_names(layers: int, kind: str = "past") -> list[str]:
    """The packages' cache inputs (kind "past") or outputs ("present"), one per layer and kind:
    past_latent.0, past_rope.0, past_latent.1, ..."""
    return [f"{kind}_{c}.{i}" for i in range(layers) for c in ("latent", "rope")]


def layer_order(latents: list, ropes: list) -> list:
    """Per-layer caches in cache_names' order."""
    return [t for pair in zip(latents, ropes) for t in pair]


class LayerCaches(nn.Module):
    """The exported form of a model with BlockFFNForCausalLM's step(): inputs input_ids and
    cache_names(L) ([1, P, kv_lora_rank] / [1, P, qk_rope_head_dim]), outputs logits and
    cache_names(L, "present"), as LLM exports for ONNX Runtime do. A stacked [L, ...] cache costs a
    copy of the whole cache into the layers and another out of them every step (the from-scratch
    BlockFFN model's decode step runs 9-10 % faster without)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, *caches, **named):
        if named:  # the export passes the caches by position; the pass's calibration runs by name
            caches = tuple(named[n] for n in cache_names(self.config.layers))
        logits, latents, ropes = self.model.step(input_ids, list(caches[0::2]), list(caches[1::2]))
        return (logits, *layer_order(latents, ropes))

