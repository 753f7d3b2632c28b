"""The `corematching` pass: CoreInfer / CoreMatching (papers.md section 4), training-free
co-pruning of FFN neurons (and, for vision-language prompts, image tokens) chosen from the prompt.

In a build it works on the PyTorch model (a Llama-style decoder inside the factory's module) and
ships two extra graphs next to the package's dense model.onnx:

    corematching/prefill.onnx  input_ids -> logits, KV cache, each layer's core neurons and their
                               weights sliced once (standard ops: Sort/TopK/Gather/ScatterElements)
    corematching/decode.onnx   one token on the KV cache with every FFN sliced to its core neurons

Both are checked in ONNX Runtime against the torch reference engine at build time, and the
report gives neurons kept, FLOPs executed vs dense per layer and the calibration text's perplexity
dense vs CoreInfer. Design and measurements: README.md.
"""
from __future__ import annotations

import numpy as np

from edgesparse import EdgesparseError, Option, Pass, hookimpl, in_range

from .settings import Settings, parse_span

__version__ = "0.1.0"

MAX_VERIFY_TOKENS = 128
DECODE_CHECK_STEPS = 4


def _span(text):
    try:
        parse_span(text)
    except EdgesparseError as exc:
        return str(exc).split(": ", 1)[1]
    return None


def find_lm(module):
    """The decoder causal LM inside the factory's module (it may be a wrapper): Llama, Mistral,
    Qwen2/3, Gemma 2/3, Phi-3 and models laid out like them (family.py)."""
    from .family import decoder_parts

    for m in module.modules():
        inner = getattr(m, "model", None)
        if hasattr(m, "lm_head") and hasattr(inner, "layers"):
            decoder_parts(m)  # one line naming what is missing
            return m
    raise EdgesparseError("corematching: no decoder LM (model.layers[i] with self_attn and a gated mlp, and lm_head) "
                          "inside the model")


class CoreMatching(Pass):
    name = "corematching"
    summary = "core neurons (and core tokens) chosen from the prompt; decode on FFNs sliced to them (CoreInfer/CoreMatching)"
    options = (
        Option("keep", float, 0.5, "fraction of each FFN's neurons kept for decode (the core neurons)",
               check=lambda v: None if 0.0 < v <= 1.0 else "must be in (0, 1] (a keep ratio of 0 keeps no neuron)"),
        Option("rho", float, 0.2, "token-wise core neurons: top rho fraction of a token's positive activations",
               check=in_range(0.0, 1.0)),
        Option("layers", str, "all", "layers whose decode FFN is sliced, e.g. 1-28 ('all': every layer)", check=_span),
        Option("token_layers", str, "none", "VLM prompts (CoreMatching): layers after whose FFN the image tokens below "
               "the elbow are removed, e.g. 1-1; the calibration batches then hold 'inputs_embeds' and 'image_mask'",
               check=lambda v: None if v == "none" else _span(v)),
    )
    needs = "calibration"

    def transform_module(self, module, ctx):
        import torch

        from . import engine as E
        from . import onnx_graphs, verify

        lm = find_lm(module)
        layers = len(lm.model.layers)
        tokens = None if self.token_layers == "none" else parse_span(self.token_layers)
        settings = Settings(keep=self.keep, rho=self.rho, neuron_layers=parse_span(self.layers),
                            token_layers=tokens).check(layers)
        if int(round(settings.keep * lm.config.intermediate_size)) >= lm.config.intermediate_size:
            raise EdgesparseError("corematching: keep=1 slices nothing; choose keep < 1")
        if tokens is not None:
            return self._matching(module, lm, settings, ctx)
        prompts = [b["input_ids"] for b in ctx.calibration_inputs() if "input_ids" in b and np.asarray(b["input_ids"]).ndim == 2]
        if not prompts:
            raise EdgesparseError("corematching: the calibration batches have no 2-D 'input_ids' to pick core neurons from")
        ids = torch.tensor(np.asarray(prompts[0][:, :MAX_VERIFY_TOKENS], np.int64))
        if ids.shape[1] < 4:
            raise EdgesparseError("corematching: calibration prompts need at least 4 tokens")
        verify.engine_reproduces(lm, ids[:1])
        ctx.log(f"[corematching] exporting the prefill and decode graphs (keep {settings.keep}, layers {self.layers})")
        with torch.no_grad():
            prefill, decode = onnx_graphs.export(lm, settings, ids[:1, :min(16, ids.shape[1])])
        check = verify.against_engine(lm, settings, prefill, decode, ids, DECODE_CHECK_STEPS, ctx.threads)
        if check["max_abs_error"] > 1e-3 * max(1.0, check["max_abs_logit"]):
            raise EdgesparseError(f"corematching: the exported graphs differ from the reference by {check['max_abs_error']:.3g}")
        ctx.add_file("prefill.onnx", prefill.SerializeToString())
        ctx.add_file("decode.onnx", decode.SerializeToString())
        quality = verify.calibration_quality(lm, settings, [torch.tensor(np.asarray(p, np.int64)) for p in prompts[:4]])
        ctx.report("graphs", {
            "prefill": "corematching/prefill.onnx: input_ids [B, T] -> logits, present_keys, present_values, core_neurons, core_gate_up_i, core_down_i (per sliced layer i)",
            "decode": "corematching/decode.onnx: input_ids [B, 1], past_keys, past_values, core_gate_up_i, core_down_i -> logits, present_keys, present_values",
        })
        ctx.report("verification", check)
        ctx.report("layers", quality.pop("layers"))
        ctx.report("calibration", quality)
        ctx.log(f"[corematching] decode FLOPs {quality['decode_flops_reduction']}x fewer; calibration perplexity "
                f"{quality['perplexity_dense']} dense -> {quality['perplexity_coreinfer']}")
        if quality["perplexity_coreinfer"] > 1.1 * quality["perplexity_dense"]:
            ctx.warn(f"CoreInfer raises the calibration text's perplexity from {quality['perplexity_dense']} to "
                     f"{quality['perplexity_coreinfer']}: raise keep or narrow layers")
        return module

    def _matching(self, module, lm, settings: Settings, ctx):
        """VLM prompts: ship the CoreMatching graphs (embeddings + image mask in, image tokens removed
        after token_layers, decode on sliced FFNs), checked against the engine."""
        import torch

        from . import onnx_graphs, verify

        from .family import Family

        family = Family(lm)
        windowed = [i for i in range(len(family.layers)) if family.window(i)]
        if windowed:
            raise EdgesparseError(f"corematching: token pruning (token_layers) does not support sliding-window layers "
                                  f"(layer {windowed[0]} has a window of {family.window(windowed[0])} keys)")
        batches = [b for b in ctx.calibration_inputs() if "inputs_embeds" in b and "image_mask" in b]
        if not batches:
            raise EdgesparseError("corematching: token_layers needs calibration batches with 'inputs_embeds' [B, T, D] "
                                  "and 'image_mask' [B, T] (the positions the model declares as image tokens)")
        embeds = torch.tensor(np.asarray(batches[0]["inputs_embeds"][:1], np.float32))
        mask = torch.tensor(np.asarray(batches[0]["image_mask"][:1]).astype(bool))
        if embeds.ndim != 3 or mask.shape != embeds.shape[:2]:
            raise EdgesparseError(f"corematching: inputs_embeds {tuple(embeds.shape)} and image_mask {tuple(mask.shape)} "
                                  "do not match ([B, T, D] and [B, T])")
        if not bool(mask.any()):
            ctx.warn("corematching: the calibration prompt has no image tokens: token pruning is not checked, "
                     "the graphs prune neurons only for such prompts")
        ctx.log(f"[corematching] exporting the VLM prefill and decode graphs (keep {settings.keep}, "
                f"token layers {self.token_layers})")
        with torch.no_grad():
            prefill, decode = onnx_graphs.export_matching(lm, settings, embeds, mask)
        check, report = verify.matching_against_engine(lm, settings, prefill, decode, embeds, mask, ctx.threads)
        if not check["same_tokens_as_engine"] or check["max_abs_error"] > 1e-3 * max(1.0, check["max_abs_logit"]):
            raise EdgesparseError(f"corematching: the exported VLM graphs differ from the reference (max error "
                                  f"{check['max_abs_error']:.3g}, tokens per layer {check['tokens_per_layer']})")
        ctx.add_file("vlm_prefill.onnx", prefill.SerializeToString())
        ctx.add_file("vlm_decode.onnx", decode.SerializeToString())
        ctx.report("graphs", {
            "prefill": "corematching/vlm_prefill.onnx: inputs_embeds [1, T, D], image_mask bool [1, T] -> logits, "
                       "next_position, present_key_i / present_value_i (the tokens layer i keeps), core_gate_up_i, core_down_i",
            "decode": "corematching/vlm_decode.onnx: input_ids [1, 1], position, past_key_i / past_value_i, "
                      "core_gate_up_i, core_down_i -> logits, present_key_i / present_value_i",
        })
        ctx.report("verification", check)
        ctx.report("layers", report["layers"])
        ctx.report("flops_reduction", report["flops_reduction"])
        ctx.log(f"[corematching] tokens per layer {check['tokens_per_layer']}; FLOPs {report['flops_reduction']}")
        return module


@hookimpl
def register_passes(register):
    register(CoreMatching)
