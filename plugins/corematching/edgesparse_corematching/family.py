"""What differs between decoder families, for the engine's and the ONNX graphs' own layer loops.

Read from the modules and the config, not from the class name:
  * Q/K/V: separate q_proj/k_proj/v_proj (biased or not: Qwen2) or one fused qkv_proj (Phi-3);
    QK-norm (q_norm/k_norm on each head before RoPE: Qwen3, Gemma 3);
  * FFN: gate_proj/up_proj or one fused gate_up_proj (Phi-3); the activation is the model's own;
  * norms: pre-norm (Llama) or sandwich (Gemma 2/3: post-attention and pre/post-feedforward);
  * attention: the layer's own scaling, logit soft-capping (Gemma 2), a sliding window per
    layer (Mistral, Gemma local layers); final logit soft-capping (Gemma 2);
  * RoPE per layer type (Gemma 3's local layers have their own base).
The build checks the engine against transformers on the calibration prompt (engine.check_exact),
so a family with something else still fails with one line instead of a wrong package.
"""
from __future__ import annotations

import inspect

import torch

from edgesparse import EdgesparseError


def decoder_parts(model):
    """(inner model, its layers) of a causal LM; one line for models without decoder layers and FFNs."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(l, "mlp") and hasattr(l, "self_attn") for l in layers):
        raise EdgesparseError("corematching: the model is not a decoder LM (model.layers[i].self_attn and .mlp)")
    for i, layer in enumerate(layers):
        mlp, attn = layer.mlp, layer.self_attn
        if not (hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj") or hasattr(mlp, "gate_up_proj")) \
                or not hasattr(mlp, "down_proj"):
            raise EdgesparseError(f"corematching: layer {i}'s FFN is not gated (gate_proj/up_proj or gate_up_proj, "
                                  f"and down_proj): {type(mlp).__name__}")
        if not (hasattr(attn, "q_proj") or hasattr(attn, "qkv_proj")):
            raise EdgesparseError(f"corematching: layer {i}'s attention has neither q_proj/k_proj/v_proj nor qkv_proj: "
                                  f"{type(attn).__name__}")
    return inner, layers


class Family:
    def __init__(self, model):
        self.model = model
        self.inner, self.layers = decoder_parts(model)
        cfg = model.config
        self.config = cfg
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.inter = cfg.intermediate_size
        self.softcap = float(getattr(cfg, "attn_logit_softcapping", None) or 0.0)
        self.final_softcap = float(getattr(cfg, "final_logit_softcapping", None) or 0.0)
        self.layer_types = getattr(cfg, "layer_types", None)
        params = inspect.signature(self.inner.rotary_emb.forward).parameters
        self.rope_by_type = "layer_type" in params and self.layer_types is not None

    # ------------------------------------------------------------ attention
    def scaling(self, i: int) -> float:
        return float(getattr(self.layers[i].self_attn, "scaling", self.head_dim ** -0.5))

    def window(self, i: int) -> int:
        """Layer i's sliding window in keys (0: none)."""
        attn = self.layers[i].self_attn
        if hasattr(attn, "sliding_window"):
            return int(attn.sliding_window or 0)
        if self.layer_types is not None and self.layer_types[i] != "sliding_attention":
            return 0
        return int(getattr(self.config, "sliding_window", None) or 0)

    def qkv(self, i: int, x: torch.Tensor, positions: torch.Tensor):
        """q [B, H, T, hd], k, v [B, Hkv, T, hd] after QK-norm and RoPE."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        attn = self.layers[i].self_attn
        b, t, _ = x.shape
        if hasattr(attn, "qkv_proj"):
            q, k, v = attn.qkv_proj(x).split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                                              self.kv_heads * self.head_dim], -1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.rope_by_type:
            cos, sin = self.inner.rotary_emb(x, positions, self.layer_types[i])
        else:
            cos, sin = self.inner.rotary_emb(x, positions)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def attend(self, i: int, q, keys, values, allowed) -> torch.Tensor:
        """Attention output [B, T, D] after o_proj; allowed [B, T, N] bool (or None: all keys)."""
        b, _, t, _ = q.shape
        rep = self.heads // self.kv_heads
        kk = keys[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, self.heads, -1, self.head_dim)
        vv = values[:, :, None].expand(-1, -1, rep, -1, -1).reshape(b, self.heads, -1, self.head_dim)
        scores = (q @ kk.transpose(-1, -2)) * self.scaling(i)
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = torch.softmax(scores, -1) @ vv
        return self.layers[i].self_attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def allowed(self, i: int, qpos, kpos, kvalid=None):
        """[B, T, N]: key positions each query may see (causal, within layer i's window)."""
        ok = kpos[:, None, :] <= qpos[:, :, None]
        w = self.window(i)
        if w:
            ok = ok & (kpos[:, None, :] > qpos[:, :, None] - w)
        if kvalid is not None:
            ok = ok & kvalid[:, None, :]
        return ok

    # ------------------------------------------------------------ residual blocks
    def attn_in(self, i: int, h):
        return self.layers[i].input_layernorm(h)

    def attn_out(self, i: int, h, out):
        layer = self.layers[i]
        if hasattr(layer, "pre_feedforward_layernorm"):  # sandwich norms (Gemma 2/3)
            out = layer.post_attention_layernorm(out)
        return h + out

    def ffn_in(self, i: int, h):
        layer = self.layers[i]
        if hasattr(layer, "pre_feedforward_layernorm"):
            return layer.pre_feedforward_layernorm(h)
        return layer.post_attention_layernorm(h)

    def ffn_out(self, i: int, h, y):
        layer = self.layers[i]
        if hasattr(layer, "post_feedforward_layernorm"):
            y = layer.post_feedforward_layernorm(y)
        return h + y

    # ------------------------------------------------------------ FFN
    @staticmethod
    def act_fn(mlp):
        return getattr(mlp, "act_fn", None) or mlp.activation_fn

    def gate_up(self, mlp, x):
        if hasattr(mlp, "gate_up_proj"):
            return mlp.gate_up_proj(x).chunk(2, -1)
        return mlp.gate_proj(x), mlp.up_proj(x)

    def activation(self, mlp, x):
        """The FFN's intermediate activation act(gate) * up [.., I] (what selects core neurons)."""
        gate, up = self.gate_up(mlp, x)
        return self.act_fn(mlp)(gate) * up

    def weights(self, mlp):
        """(W_gate [I, D], W_up [I, D], W_down^T [I, D])."""
        if hasattr(mlp, "gate_up_proj"):
            wg, wu = mlp.gate_up_proj.weight.chunk(2, 0)
        else:
            wg, wu = mlp.gate_proj.weight, mlp.up_proj.weight
        return wg, wu, mlp.down_proj.weight.t()

    # ------------------------------------------------------------ head
    def logits(self, h):
        out = self.model.lm_head(self.inner.norm(h))
        if self.final_softcap:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out
