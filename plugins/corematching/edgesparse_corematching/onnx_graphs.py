"""The two ONNX graphs of CoreInfer for a Llama-style decoder, exported from the model's weights
with standard ops only (Sort/TopK/Gather/ScatterElements for the selection):

prefill: input_ids [B, T] -> logits [B, T, V], present_keys / present_values [L, B, Hkv, T, hd],
         core_neurons int64 [Ls, B, k] (the sliced layers' core neurons, picked from the prompt),
         and per sliced layer i core_gate_up_i float [B, D, 2k] and core_down_i float [B, k, D]
         (those neurons' weights in MatMul layout: sliced once per prompt, inside the prefill)
decode:  input_ids [B, 1], past_keys / past_values [L, B, Hkv, P, hd], every core_gate_up_i /
         core_down_i -> logits [B, 1, V], present_keys / present_values [L, B, Hkv, P + 1, hd]

Decode's sliced FFNs are two plain GEMVs per layer on the weights the prefill produced
(k = keep x I), so the decode reads keep x the FFN weights per token, with no copy or transpose. Layers outside `neuron_layers` keep their
dense FFN. The batch holds sequences of equal length (no padding mask in the graphs; the torch
engine handles ragged batches).
"""
from __future__ import annotations

import torch

from . import selection
from .family import Family
from .settings import Settings


class _Base(torch.nn.Module):
    def __init__(self, model, settings: Settings):
        super().__init__()
        self.model = model
        self.family = Family(model)
        self.inner, self.layers = self.family.inner, self.family.layers
        cfg = model.config
        self.settings = settings.check(len(self.layers))
        self.inter = cfg.intermediate_size
        self.keep = max(1, int(round(settings.keep * self.inter)))
        self.sliced = [i for i in range(len(self.layers)) if settings.prunes_neurons(i) and self.keep < self.inter]

    def _qkv(self, i, x, positions):
        return self.family.qkv(i, x, positions)

    def _attend(self, i, q, keys, values, qpos, kpos):
        """Causal attention within layer i's window, from the query and key positions ([B, T], [B, N])."""
        return self.family.attend(i, q, keys, values, self.family.allowed(i, qpos, kpos))

    def _ffn(self, i, mlp, x):
        """(activation, layer i's FFN output) on the dense weights."""
        act = self.family.activation(mlp, x)
        return act, mlp.down_proj(act)

    def _sliced_weights(self, mlp, idx):
        wg, wu, wd = self.family.weights(mlp)
        return torch.cat([wg[idx], wu[idx]], 1).transpose(1, 2), wd[idx]

    def _decode_ffn(self, i, mlp, x, weights):
        """Layer i's FFN in decode: on the prefill's sliced weights where it is sliced, dense elsewhere."""
        if i not in self.sliced:
            return self._ffn(i, mlp, x)[1]
        s = self.sliced.index(i)
        gate, up = (x @ weights[2 * s]).split(self.keep, -1)
        return (self.family.act_fn(mlp)(gate) * up) @ weights[2 * s + 1]

    def _bind_forward(self, leading: list[str], groups: list[list[str]]):
        """forward(self, *leading, *every name in groups) calling self.run(*leading, *groups as lists):
        the exporter maps graph input names to named arguments, so each tensor needs its own."""
        names = leading + [n for g in groups for n in g]
        lists = [f"[{', '.join(g)}]" for g in groups]
        source = (f"def forward(self, {', '.join(names)}):\n"
                  f"    return self.run({', '.join(leading + lists)})\n")
        scope = {}
        exec(source, scope)
        self.forward = scope["forward"].__get__(self)


class PrefillGraph(_Base):
    def forward(self, input_ids):
        b, t = input_ids.shape
        positions = torch.arange(t).unsqueeze(0).expand(b, t)
        valid = torch.ones(b, t, dtype=torch.bool)
        h = self.inner.embed_tokens(input_ids)
        keys, values, neurons, gate_ups, downs = [], [], [], [], []
        f = self.family
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, f.attn_in(i, h), positions)
            keys.append(k)
            values.append(v)
            h = f.attn_out(i, h, self._attend(i, q, k, v, positions, positions))
            mlp = layer.mlp
            act, y = self._ffn(i, mlp, f.ffn_in(i, h))
            h = f.ffn_out(i, h, y)
            if i in self.sliced:
                core = selection.token_core_neurons(act, self.settings.rho)
                idx = selection.sentence_core_neurons(core, act, valid, self.keep)     # [B, k]
                neurons.append(idx)
                gate_up, down = self._sliced_weights(mlp, idx)
                gate_ups.append(gate_up)
                downs.append(down)
        logits = f.logits(h)
        weights = [w.contiguous() for pair in zip(gate_ups, downs) for w in pair]
        return (logits, torch.stack(keys), torch.stack(values), torch.stack(neurons), *weights)


def weight_names(sliced: list[int]) -> list[str]:
    """One graph input/output per sliced layer and matrix: indexing a stacked [Ls, ...] tensor
    inside the decode graph made ORT split (copy) all of it at every step."""
    return [f"core_{kind}_{i}" for i in sliced for kind in ("gate_up", "down")]


class DecodeGraph(_Base):
    def __init__(self, model, settings: Settings):
        super().__init__(model, settings)
        self._bind_forward(["input_ids", "past_keys", "past_values"], [weight_names(self.sliced)])

    def run(self, input_ids, past_keys, past_values, weights):
        b, t = input_ids.shape
        past = past_keys.shape[3]
        positions = (torch.arange(t) + past).unsqueeze(0).expand(b, t)
        h = self.inner.embed_tokens(input_ids)
        keys, values = [], []
        f = self.family
        kpos = torch.arange(past + t).unsqueeze(0).expand(b, past + t)
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, f.attn_in(i, h), positions)
            k = torch.cat([past_keys[i], k], 2)
            v = torch.cat([past_values[i], v], 2)
            keys.append(k)
            values.append(v)
            h = f.attn_out(i, h, self._attend(i, q, k, v, positions, kpos))
            h = f.ffn_out(i, h, self._decode_ffn(i, layer.mlp, f.ffn_in(i, h), weights))
        logits = f.logits(h)
        return logits, torch.stack(keys), torch.stack(values)


def export(model, settings: Settings, prompt_ids: torch.Tensor):
    """(prefill ModelProto, decode ModelProto) for `model`, exported with edgesparse's exporter."""
    from edgesparse import TorchModel
    from edgesparse.export import export_torch

    prefill = PrefillGraph(model, settings).eval()
    with torch.no_grad():
        out = prefill(prompt_ids)
    names = weight_names(prefill.sliced)
    pre = export_torch(TorchModel(
        module=prefill, example_inputs={"input_ids": prompt_ids},
        output_names=["logits", "present_keys", "present_values", "core_neurons", *names],
        dynamic_axes={"input_ids": {0: "batch", 1: "sequence"}}))
    decode = DecodeGraph(model, settings).eval()
    dec = export_torch(TorchModel(
        module=decode,
        example_inputs={"input_ids": prompt_ids[:, -1:], "past_keys": out[1], "past_values": out[2], **dict(zip(names, out[4:]))},
        output_names=["logits", "present_keys", "present_values"],
        dynamic_axes={"input_ids": {0: "batch"}, "past_keys": {1: "batch", 3: "past"}, "past_values": {1: "batch", 3: "past"},
                      **{n: {0: "batch"} for n in names}}))
    return pre, dec


class MatchingPrefillGraph(_Base):
    """CoreMatching prefill for one sequence given as embeddings (a VLM's prompt):

    inputs_embeds [1, T, D], image_mask bool [1, T] (the positions the model declares as image
    tokens) -> logits [1, V] (last token), next_position int64 [1], present_key_i / present_value_i
    [1, Hkv, N_i, hd] per layer (N_i: the tokens layer i still holds), and per sliced layer
    core_gate_up_i [1, D, 2k], core_down_i [1, k, D] (none when keep = 1).

    After the FFN of every layer in token_layers, image tokens whose core-neuron overlap lies below
    the elbow are removed (NonZero + Gather: later layers compute and cache only the kept ones).
    An image_mask with no True value removes nothing (neuron-only).
    """

    def forward(self, inputs_embeds, image_mask):
        t = inputs_embeds.shape[1]
        positions = torch.arange(t).unsqueeze(0)
        prunable = image_mask
        h = inputs_embeds
        caches, gate_ups, downs = [], [], []
        f = self.family
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, f.attn_in(i, h), positions)
            caches += [k, v]
            h = f.attn_out(i, h, self._attend(i, q, k, v, positions, positions))
            mlp = layer.mlp
            act, y = self._ffn(i, mlp, f.ffn_in(i, h))
            h = f.ffn_out(i, h, y)
            slice_here = i in self.sliced
            if not (slice_here or self.settings.prunes_tokens(i)):
                continue
            valid = torch.ones_like(prunable)
            core = selection.token_core_neurons(act, self.settings.rho)
            idx = selection.sentence_core_neurons(core, act, valid, self.keep)
            if slice_here:
                gate_up, down = self._sliced_weights(mlp, idx)
                gate_ups.append(gate_up)
                downs.append(down)
            if self.settings.prunes_tokens(i):
                keep = selection.elbow_keep(selection.token_scores(core, idx), prunable)
                kept = keep[0].nonzero().squeeze(1)
                # for the exporter's shape reasoning: text tokens are never removed, so at least
                # two tokens remain in any prompt with text around the image (no runtime effect)
                torch._check(kept.shape[0] > 0)
                torch._check(kept.shape[0] != 1)
                h = h.index_select(1, kept)
                positions = positions.index_select(1, kept)
                prunable = prunable.index_select(1, kept)
        logits = f.logits(h[:, -1])
        weights = [w.contiguous() for pair in zip(gate_ups, downs) for w in pair]
        return (logits, torch.full((1,), t, dtype=torch.int64), *caches, *weights)


class MatchingDecodeGraph(_Base):
    """input_ids [1, 1], position int64 [1], past_key_i / past_value_i per layer, the
    core_gate_up_i / core_down_i of the prefill -> logits [1, 1, V], present_key_i / present_value_i."""

    def __init__(self, model, settings: Settings):
        super().__init__(model, settings)
        pasts = [f"past_{kind}_{i}" for i in range(len(self.layers)) for kind in ("key", "value")]
        self._bind_forward(["input_ids", "position"], [pasts, weight_names(self.sliced)])

    def run(self, input_ids, position, pasts, weights):
        positions = position.unsqueeze(0)
        h = self.inner.embed_tokens(input_ids)
        caches = []
        f = self.family
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(i, f.attn_in(i, h), positions)
            k = torch.cat([pasts[2 * i], k], 2)
            v = torch.cat([pasts[2 * i + 1], v], 2)
            caches += [k, v]
            h = f.attn_out(i, h, f.attend(i, q, k, v, None))   # one new token: it sees every kept key
            h = f.ffn_out(i, h, self._decode_ffn(i, layer.mlp, f.ffn_in(i, h), weights))
        return (f.logits(h), *caches)


def export_matching(model, settings: Settings, embeds: torch.Tensor, image_mask: torch.Tensor):
    """(prefill, decode) ModelProtos of CoreMatching for batch 1 (see MatchingPrefillGraph)."""
    from edgesparse import TorchModel
    from edgesparse.export import export_torch

    n = len(Family(model).layers)
    cache_names = [f"{kind}_{i}" for i in range(n) for kind in ("key", "value")]
    prefill = MatchingPrefillGraph(model, settings).eval()
    with torch.no_grad():
        out = prefill(embeds, image_mask)
    pre = export_torch(TorchModel(
        module=prefill, example_inputs={"inputs_embeds": embeds, "image_mask": image_mask},
        output_names=["logits", "next_position", *[f"present_{c}" for c in cache_names], *weight_names(prefill.sliced)],
        dynamic_axes={"inputs_embeds": {1: "sequence"}, "image_mask": {1: "sequence"}}))
    decode = MatchingDecodeGraph(model, settings).eval()
    caches = out[2:2 + 2 * n]
    example = {"input_ids": torch.tensor([[1]]), "position": out[1], **{f"past_{c}": x for c, x in zip(cache_names, caches)},
               **dict(zip(weight_names(prefill.sliced), out[2 + 2 * n:]))}
    # dynamic_shapes by argument name: the exporter's dynamic_axes conversion pairs a partial
    # dynamic_axes dict with the inputs by position and fails here
    dynamic = {name: ({2: torch.export.Dim.DYNAMIC} if name.startswith("past_") else None) for name in example}
    dec = _export(decode, example, ["logits", *[f"present_{c}" for c in cache_names]], dynamic)
    return pre, dec


def _export(module, example: dict, output_names: list[str], dynamic_shapes: dict):
    import tempfile
    import warnings
    from pathlib import Path

    import onnx

    from edgesparse import EdgesparseError

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(module, tuple(example.values()), str(path), input_names=list(example), output_names=output_names,
                              dynamic_shapes=dynamic_shapes, dynamo=True, external_data=False, verbose=False)
        except Exception as exc:
            raise EdgesparseError(f"corematching: torch.onnx.export failed: {str(exc).strip().splitlines()[0]}") from exc
        return onnx.load(str(path))
