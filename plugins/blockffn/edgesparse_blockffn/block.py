"""BlockFFN in PyTorch: the router, the converted FFN modules, the two CLS-aware losses and the
sparsity metrics (papers.md section 2).

Router: r = RMSNorm(ReLU(W_r x + b)) * g, one entry per expert, no top-k: an expert is skipped
for a token where its ReLU output is zero. The bias b is our addition to the paper's router (which
is pre-trained with the model): converting a dense model, it is the per-expert threshold that the
sparsity controller moves. The FFN's activated intermediate h (E experts of S
consecutive neurons) is multiplied expert-wise by r before the down projection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6
LOCALITY_SHARPNESS = 100.0  # k in the activation-locality loss


class Router(nn.Module):
    def __init__(self, d: int, experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(experts, d))
        self.bias = nn.Parameter(torch.zeros(experts))
        self.gain = nn.Parameter(torch.ones(experts))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def routes(self, z: torch.Tensor) -> torch.Tensor:
        a = torch.relu(z)
        return a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + EPS) * self.gain

    def forward(self, x):
        return self.routes(self.logits(x))


def scale_experts(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """h [..., E*S] times r [..., E] expert-wise."""
    e = r.shape[-1]
    return (h.unflatten(-1, (e, h.shape[-1] // e)) * r.unsqueeze(-1)).flatten(-2)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class BlockGatedMLP(nn.Module):
    """Replaces a Llama-style MLP: down((act(gate x) * up x) * r)."""

    def __init__(self, site, router: Router):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = site.gate, site.up, site.down
        self.activation = site.activation
        self.router = router
        self.record = None  # a list to append router outputs to (metrics), or None

    def forward(self, x):
        r = self.router(x)
        if self.record is not None:
            self.record.append(r.detach())
        h = ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(scale_experts(h, r))


class BlockIntermediate(nn.Module):
    """Replaces BERT's intermediate block: act(up x) * r (BERT's output.dense is the down projection)."""

    def __init__(self, site, router: Router):
        super().__init__()
        self.dense = site.up
        self.activation = site.activation
        self.router = router
        self.record = None

    def forward(self, x):
        r = self.router(x)
        if self.record is not None:
            self.record.append(r.detach())
        return scale_experts(ACTIVATIONS[self.activation](self.dense(x)), r)


# -- losses (on [B, T, E] tensors: T consecutive tokens of one text) ------------------------------

def locality_loss(z: torch.Tensor) -> torch.Tensor:
    """Activation locality: BCE(k z_{t-1}, sigmoid(k z_t)) on the pre-ReLU router logits, so that
    consecutive tokens switch the same experts on."""
    k = LOCALITY_SHARPNESS
    return F.binary_cross_entropy_with_logits(k * z[:, :-1], torch.sigmoid(k * z[:, 1:]))


def chunk_sparsification_loss(r: torch.Tensor, chunk: int) -> torch.Tensor:
    """mean over chunks and experts of 1 - prod_i (1 - p_i), p = r / sum(r) per token: the
    (soft) probability that an expert is needed by some token of the chunk."""
    b, t, e = r.shape
    t = t // chunk * chunk
    p = r[:, :t] / (r[:, :t].sum(-1, keepdim=True) + EPS)
    p = p.reshape(b, t // chunk, chunk, e)
    return (1 - torch.exp(torch.log1p(-p.clamp(max=1 - 1e-6)).sum(2))).mean()


# -- metrics ----------------------------------------------------------------------------------------

def tls(r: torch.Tensor) -> float:
    """Token-level sparsity: 1 - nonzero router entries / all entries."""
    return float(1 - (r != 0).float().mean())


def cls(r: torch.Tensor, s: int) -> float:
    """Chunk-level sparsity over chunks of s consecutive tokens (within each sequence of [B, T, E];
    a last partial chunk counts as a chunk): 1 - mean over chunks and experts of
    [expert active for any token of the chunk]."""
    b, t, e = r.shape
    active = r != 0
    pad = (-t) % s
    if pad:
        active = torch.cat([active, active[:, -1:].expand(b, pad, e)], 1)  # repeats the last token: no new experts
    return float(1 - active.reshape(b, -1, s, e).any(2).float().mean())
