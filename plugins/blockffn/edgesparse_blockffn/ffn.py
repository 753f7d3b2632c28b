"""Finding the FFN blocks of a PyTorch transformer.

Two families are recognised:
- gated (Llama, SmolLM2, Mistral, Qwen): a module with `gate_proj`, `up_proj`, `down_proj`
  Linear layers and an `act_fn`; y = down(act(gate(x)) * up(x));
- plain (BERT, MiniLM): a layer with `intermediate.dense` (+ `intermediate_act_fn`) and
  `output.dense`; y = output.dense(act(intermediate.dense(x))), before BERT's dropout, residual
  and LayerNorm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgesparse import EdgesparseError

LOOKED_FOR = ("modules with gate_proj/up_proj/down_proj Linear layers and act_fn (Llama, SmolLM2) or "
              "intermediate.dense + output.dense (BERT, MiniLM)")


@dataclass
class FfnSite:
    """One FFN: where it lives and its Linear layers (gate is None for a plain FFN)."""

    name: str            # module path of the owner (the MLP, or the BERT layer)
    owner: nn.Module
    attr: str            # the attribute of owner that BlockFFN replaces ("mlp" part or "intermediate")
    up: nn.Linear
    gate: nn.Linear | None
    down: nn.Linear
    activation: str      # "silu", "gelu", "relu"

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def hidden(self) -> int:
        return self.up.out_features


def activation_name(fn) -> str:
    kind = type(fn).__name__.lower()
    if isinstance(fn, nn.SiLU) or "silu" in kind or "swish" in kind:
        return "silu"
    if isinstance(fn, nn.ReLU) or kind == "relu":
        return "relu"
    if isinstance(fn, nn.GELU) and fn.approximate == "none" or kind == "geluactivation":
        return "gelu"  # transformers' GELUActivation is the exact (erf) GELU
    raise EdgesparseError(f"blockffn: FFN activation {type(fn).__name__} is not supported (silu, gelu, relu)")


def find_ffns(module: nn.Module) -> list[FfnSite]:
    sites = []
    for name, m in module.named_modules():
        if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")) \
                and hasattr(m, "act_fn"):
            sites.append(FfnSite(name, m, "", m.up_proj, m.gate_proj, m.down_proj, activation_name(m.act_fn)))
        elif isinstance(getattr(getattr(m, "intermediate", None), "dense", None), nn.Linear) \
                and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear):
            inter = m.intermediate
            act = getattr(inter, "intermediate_act_fn", None)
            if act is None:
                continue
            sites.append(FfnSite(name, m, "intermediate", inter.dense, None, m.output.dense, activation_name(act)))
    if not sites:
        raise EdgesparseError(f"blockffn: no FFN block found in {type(module).__name__}: looked for {LOOKED_FOR}")
    return sites


def permute_neurons(site: FfnSite, order: torch.Tensor) -> None:
    """Reorder the intermediate neurons (rows of up/gate, columns of down) in place: the FFN's
    function is unchanged, and expert e becomes the slice [e*S, (e+1)*S)."""
    with torch.no_grad():
        for lin in (site.up, site.gate):
            if lin is None:
                continue
            lin.weight.copy_(lin.weight[order])
            if lin.bias is not None:
                lin.bias.copy_(lin.bias[order])
        site.down.weight.copy_(site.down.weight[:, order])
