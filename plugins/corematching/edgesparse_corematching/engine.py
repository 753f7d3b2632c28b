"""Torch reference of CoreInfer / CoreMatching on a Llama-family decoder (transformers'
LlamaForCausalLM and models with the same layer layout, e.g. SmolLM2).

The engine runs the model's own weights with its own loop so that it can do what the authors' code
does not: tokens are *removed* (the hidden states, positions and the KV cache of the following
layers no longer hold them), image/text token ranges come from the caller per sequence, and the
batch may hold several sequences of different lengths with different tokens and neurons kept.

    engine = Engine(hf_model, Settings(keep=0.4, token_layers=(2, 8)))
    state = engine.prefill(embeds, lengths, prunable)   # picks core neurons (and core tokens)
    logits = engine.decode(state, next_ids)             # FFNs on the core neurons only
    engine.report(state)                                # tokens / neurons kept, MACs vs dense
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import selection
from .family import Family, decoder_parts
from .settings import Settings


@dataclass
class LayerCache:
    keys: torch.Tensor      # [B, Hkv, N, hd]
    values: torch.Tensor
    valid: torch.Tensor     # [B, N] bool
    positions: torch.Tensor  # [B, N] int64


@dataclass
class State:
    caches: list[LayerCache]
    neurons: list[torch.Tensor | None]   # per layer: [B, k] core neurons, None where the FFN stays dense
    sliced: list[tuple | None]           # per layer: (w_gate [B,k,D], w_up [B,k,D], w_down [B,k,D])
    next_position: torch.Tensor          # [B]
    stats: dict = field(default_factory=lambda: {"prefill": {}, "decode": {}})
    notes: list[str] = field(default_factory=list)


llama_parts = decoder_parts  # the name earlier code imported


class Engine:
    def __init__(self, model, settings: Settings):
        self.model = model.eval()
        self.family = Family(model)
        self.inner, self.layers = self.family.inner, self.family.layers
        cfg = model.config
        self.settings = settings.check(len(self.layers))
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.hidden, self.inter, self.vocab = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
        self.keep = max(1, int(round(settings.keep * self.inter)))

    # ---------------------------------------------------------------- building blocks
    def _attention(self, i, x, positions, cache: LayerCache | None, valid_q):
        """x [B, T, D]; attends the cache (if any) and the new tokens; returns output, new cache."""
        q, k, v = self.family.qkv(i, x, positions)
        if cache is not None:
            keys = torch.cat([cache.keys, k], 2)
            values = torch.cat([cache.values, v], 2)
            kvalid = torch.cat([cache.valid, valid_q], 1)
            kpos = torch.cat([cache.positions, positions], 1)
        else:
            keys, values, kvalid, kpos = k, v, valid_q, positions
        allowed = self.family.allowed(i, positions, kpos, kvalid)   # [B, T, N]
        allowed = allowed | ~valid_q[:, :, None]   # padded query rows: anything finite, discarded
        return self.family.attend(i, q, keys, values, allowed), LayerCache(keys, values, kvalid, kpos)

    def _ffn_activation(self, mlp, x):
        return self.family.activation(mlp, x)

    def _slice(self, mlp, neurons):
        """Per sequence, the rows of gate/up and the columns of down for its core neurons."""
        wg, wu, wd = self.family.weights(mlp)
        return wg[neurons], wu[neurons], wd[neurons]   # [B, k, D] each

    @staticmethod
    def _count(stats: dict, layer: int, **macs):
        row = stats.setdefault(layer, {})
        for key, value in macs.items():
            row[key] = row.get(key, 0) + int(value)

    def _attn_macs(self, tokens: int, keys: int) -> int:
        proj = tokens * self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + tokens * self.heads * self.head_dim * self.hidden
        return proj + 2 * self.heads * self.head_dim * keys

    # ---------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, lengths=None, prunable=None, keep_logits: bool = False):
        """embeds [B, T, D] (right-padded), lengths [B], prunable [B, T] bool (image tokens the
        model declares; None or all False: neuron-only). Returns (state, logits of each
        sequence's last token [B, V], or of every position [B, T, V] with keep_logits)."""
        b, t, _ = embeds.shape
        lengths = torch.full((b,), t) if lengths is None else torch.as_tensor(lengths)
        valid = torch.arange(t)[None, :] < lengths[:, None]
        positions = torch.arange(t).expand(b, t).clone()
        prunable = torch.zeros(b, t, dtype=torch.bool) if prunable is None else torch.as_tensor(prunable).bool() & valid
        state = State([], [], [], lengths.clone())
        if self.settings.token_layers is not None and not bool(prunable.any()):
            state.notes.append("no image tokens in the prompt: token pruning skipped, neurons only")
        h = embeds
        for i, layer in enumerate(self.layers):
            n_valid = int(valid.sum())
            keys_valid = int((valid[:, :, None] & valid[:, None, :] & (positions[:, None, :] <= positions[:, :, None])).sum())
            x = self.family.attn_in(i, h)
            out, cache = self._attention(i, x, positions, None, valid)
            h = self.family.attn_out(i, h, out)
            act = self._ffn_activation(layer.mlp, self.family.ffn_in(i, h))
            h = self.family.ffn_out(i, h, layer.mlp.down_proj(act))
            state.caches.append(cache)
            self._count(state.stats["prefill"], i, tokens=n_valid,
                        macs=n_valid * 3 * self.hidden * self.inter + self._attn_macs(n_valid, 0) + keys_valid * 2 * self.heads * self.head_dim)
            need_neurons = self.settings.prunes_neurons(i) and self.keep < self.inter
            prune_tokens = self.settings.prunes_tokens(i) and bool(prunable.any())
            if not (need_neurons or prune_tokens):
                state.neurons.append(None)
                state.sliced.append(None)
                continue
            core = selection.token_core_neurons(act, self.settings.rho)
            neurons = selection.sentence_core_neurons(core, act, valid, self.keep)
            state.neurons.append(neurons if need_neurons else None)
            state.sliced.append(self._slice(layer.mlp, neurons) if need_neurons else None)
            if prune_tokens:
                keep = selection.elbow_keep(selection.token_scores(core, neurons), prunable)
                keep = self._floor(keep, prunable, selection.token_scores(core, neurons))
                h, positions, valid, prunable = self._compact(keep & valid, h, positions, valid, prunable)
        last = (valid.long().cumsum(1) * valid).argmax(1)   # index of each sequence's last valid token
        self._count(state.stats["prefill"], "lm_head", macs=b * self.hidden * self.vocab)
        if keep_logits:
            if self.settings.token_layers is not None:
                raise ValueError("keep_logits needs every position: use it without token pruning")
            return state, self.family.logits(h)
        return state, self.family.logits(h[torch.arange(b), last])

    def _floor(self, keep, prunable, scores):
        """Keep at least min_tokens of each sequence's prunable tokens (the best-scored ones)."""
        if self.settings.min_tokens <= 0:
            return keep
        need = torch.ceil(prunable.sum(1).float() * self.settings.min_tokens).long()
        ranked = torch.where(prunable, scores, torch.full_like(scores, -1.0))
        order = torch.argsort(ranked, 1, descending=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        return keep | (prunable & (rank < need[:, None]))

    @staticmethod
    def _compact(keep, h, positions, valid, prunable):
        """Remove the dropped tokens: gather each sequence's kept tokens to the front, pad right."""
        b, t = keep.shape
        new_t = int(keep.sum(1).max())
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :new_t]   # kept first, in order
        gather = lambda a: a.gather(1, order if a.dim() == 2 else order[..., None].expand(-1, -1, a.shape[-1]))
        new_valid = torch.arange(new_t)[None, :] < keep.sum(1, keepdim=True)
        return gather(h), gather(positions), new_valid, gather(prunable) & new_valid

    # ---------------------------------------------------------------- decode
    @torch.no_grad()
    def decode(self, state: State, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] new tokens (T >= 1; the core neurons stay fixed, so T tokens at once equal T
        single steps). Appends to the caches; returns logits [B, T, V]."""
        b, t = ids.shape
        positions = state.next_position[:, None] + torch.arange(t)[None, :]
        valid = torch.ones(b, t, dtype=torch.bool)
        h = self.inner.embed_tokens(ids)
        for i, layer in enumerate(self.layers):
            cache = state.caches[i]
            n_keys = int(cache.valid.sum())
            x = self.family.attn_in(i, h)
            out, state.caches[i] = self._attention(i, x, positions, cache, valid)
            h = self.family.attn_out(i, h, out)
            x = self.family.ffn_in(i, h)
            sliced = state.sliced[i]
            if sliced is None:
                h = self.family.ffn_out(i, h, layer.mlp.down_proj(self._ffn_activation(layer.mlp, x)))
                neurons = self.inter
            else:
                wg, wu, wd = sliced
                act = self.family.act_fn(layer.mlp)(x @ wg.transpose(1, 2)) * (x @ wu.transpose(1, 2))
                h = self.family.ffn_out(i, h, act @ wd)
                neurons = wg.shape[1]
            keys = t * n_keys + b * t * (t + 1) // 2
            self._count(state.stats["decode"], i, tokens=b * t, neurons=neurons * b * t,
                        macs=b * t * 3 * self.hidden * neurons + self._attn_macs(b * t, 0) + keys * 2 * self.heads * self.head_dim)
        state.next_position = state.next_position + t
        self._count(state.stats["decode"], "lm_head", macs=b * t * self.hidden * self.vocab)
        return self.family.logits(h)

    # ---------------------------------------------------------------- report
    def report(self, state: State, dense: "State") -> dict:
        """Per layer: tokens entering it, core neurons, MACs executed vs the dense run `dense`
        (the same inputs through Engine(model, Settings(keep=1.0)))."""
        rows, totals = [], {}
        for stage in ("prefill", "decode"):
            done = state.stats[stage]
            ref = dense.stats[stage]
            totals[stage] = {"macs": sum(r["macs"] for r in done.values()), "dense_macs": sum(r["macs"] for r in ref.values())}
        for i in range(len(self.layers)):
            p, pd = state.stats["prefill"].get(i, {}), dense.stats["prefill"].get(i, {})
            d, dd = state.stats["decode"].get(i, {}), dense.stats["decode"].get(i, {})
            rows.append({
                "layer": i,
                "tokens_kept": round(p.get("tokens", 0) / max(1, pd.get("tokens", 1)), 4),
                "neurons_kept": round(d["neurons"] / d["tokens"] / self.inter, 4) if d.get("tokens") else None,
                "prefill_macs_vs_dense": round(p.get("macs", 0) / max(1, pd.get("macs", 1)), 4),
                "decode_macs_vs_dense": round(d["macs"] / dd["macs"], 4) if d.get("macs") else None,
            })
        both = sum(t["macs"] for t in totals.values())
        both_dense = sum(t["dense_macs"] for t in totals.values())
        return {"layers": rows, "totals": totals,
                "flops_reduction": {s: round(t["dense_macs"] / t["macs"], 3) if t["macs"] else None for s, t in totals.items()}
                | {"overall": round(both_dense / both, 3) if both else None},
                "notes": state.notes}
