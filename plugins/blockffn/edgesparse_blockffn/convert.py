"""Dense FFN -> BlockFFN conversion: experts by co-activation clustering, router initialisation,
and router training by layer-wise distillation from the dense FFN with the paper's activation
locality and chunk sparsification losses (the FFN weights stay frozen).

Layer-wise: every FFN sees the inputs the dense model gives it on the calibration text, and its
router learns to reproduce the dense FFN's output while switching off experts. Layers are
independent, which keeps the CPU cost at one FFN forward/backward per step.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from edgesparse import EdgesparseError

from . import block
from .ffn import FfnSite, find_ffns, permute_neurons

CLS_SIZES = (1, 8, 32, 64)
CHUNK_WEIGHT = 0.05   # the paper's chunk-sparsification loss weight
CONTROL_RATE = 0.1    # step of the sparsity controller per unit of CLS error


@dataclass
class Settings:
    experts: int = 0            # 0: intermediate size / 64
    chunk: int = 8              # tokens per chunk (emitted op, chunk loss, sparsity target)
    sparsity: float = 0.7       # target CLS(chunk) on the calibration text
    steps: int = 200            # router training steps per layer
    lr: float = 3e-3
    locality: float = 2e-3      # weight of the activation-locality loss
    window: int = 64            # tokens per training window (a multiple of chunk)
    batch_windows: int = 32
    seed: int = 0
    time_budget_s: float = 0.0  # 0: no limit; else training stops early (all layers share it)


@dataclass
class Layer:
    site: FfnSite
    order: torch.Tensor
    router: block.Router
    report: dict = field(default_factory=dict)


# -- the dense model's FFN inputs -----------------------------------------------------------------

def run_module(module, batch: dict) -> None:
    with torch.no_grad():
        module(**{k: torch.as_tensor(v) for k, v in batch.items()})


def collect_inputs(module, sites: list[FfnSite], batches: list[dict]) -> list[list[torch.Tensor]]:
    """Per FFN, its input [T, D] for every sequence of every calibration batch."""
    seen: list[list[torch.Tensor]] = [[] for _ in sites]
    hooks = []
    for i, site in enumerate(sites):
        target = site.owner if site.gated else getattr(site.owner, site.attr)

        def hook(_m, args, i=i):
            x = args[0].detach()
            seen[i].extend(x.reshape(-1, x.shape[-2], x.shape[-1]).unbind(0))

        hooks.append(target.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            run_module(module, batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def windows(seqs: list[torch.Tensor], window: int) -> torch.Tensor:
    """Non-overlapping windows [N, window, D] of consecutive tokens of each sequence."""
    out = [s[i:i + window] for s in seqs for i in range(0, s.shape[0] - window + 1, window)]
    return torch.stack(out)


# -- experts ----------------------------------------------------------------------------------------

def ffn_hidden(site: FfnSite, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        up = site.up(x)
        if site.gated:
            return block.ACTIVATIONS[site.activation](site.gate(x)) * up
        return block.ACTIVATIONS[site.activation](up)


def cluster_neurons(h: torch.Tensor, experts: int, seed: int, iterations: int = 8) -> torch.Tensor:
    """Order of the I neurons such that each slice of S = I / experts holds neurons that are
    active on the same tokens: balanced k-means on the neurons' |activation| patterns (cosine),
    each cluster filled to exactly S neurons greedily by similarity."""
    n_neurons = h.shape[1]
    size = n_neurons // experts
    v = h.abs().T.double()
    v = v - v.mean(1, keepdim=True)
    v = v / (v.norm(dim=1, keepdim=True) + 1e-12)                            # [I, tokens]
    gen = torch.Generator().manual_seed(seed)
    centroids = v[torch.randperm(n_neurons, generator=gen)[:experts]]
    for _ in range(iterations):
        sim = v @ centroids.T                                                    # [I, E]
        order = torch.argsort(sim.flatten(), descending=True)
        owner = [-1] * n_neurons
        room = [size] * experts
        left = n_neurons
        for flat in order.tolist():
            i, e = divmod(flat, experts)
            if owner[i] < 0 and room[e]:
                owner[i] = e
                room[e] -= 1
                left -= 1
                if not left:
                    break
        assign = torch.tensor(owner)
        centroids = torch.stack([v[assign == e].mean(0) for e in range(experts)])
        centroids = centroids / (centroids.norm(dim=1, keepdim=True) + 1e-12)
    return torch.argsort(assign * n_neurons + torch.arange(n_neurons), stable=True)


def expert_contributions(site: FfnSite, h: torch.Tensor, experts: int) -> torch.Tensor:
    """[N, E]: norm of each expert's share of the FFN output per token."""
    size = h.shape[1] // experts
    w = site.down.weight.detach()
    with torch.no_grad():
        return torch.stack([(h[:, e * size:(e + 1) * size] @ w[:, e * size:(e + 1) * size].T).norm(dim=1)
                            for e in range(experts)], 1)


def init_router(x: torch.Tensor, contrib: torch.Tensor, sparsity: float, chunk: int, window: int) -> block.Router:
    """Least-squares router whose positive logits approximate the experts that carry most of the
    output, thresholded so that their chunk sparsity is about the target."""
    rel = (contrib / (contrib.mean(1, keepdim=True) + 1e-12)).double()
    lo, hi = 0.0, float(rel.max())
    for _ in range(30):  # the threshold whose oracle pattern has CLS(chunk) = sparsity
        tau = (lo + hi) / 2
        active = (rel > tau).reshape(-1, window, rel.shape[1]).float()
        if block.cls(active, chunk) < sparsity:
            lo = tau
        else:
            hi = tau
    tau = hi
    xd = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.double)], 1)  # last column: the bias
    target = rel - tau
    w = torch.linalg.lstsq(xd.T @ xd + 1e-3 * torch.eye(xd.shape[1], dtype=xd.dtype), xd.T @ target).solution
    router = block.Router(x.shape[1], rel.shape[1])
    with torch.no_grad():
        router.weight.copy_(w[:-1].T.float())
        router.bias.copy_(w[-1].float())
        density = float((rel > tau).float().mean())
        router.gain.fill_(math.sqrt(max(density, 1e-3)))
    return router


# -- router training ---------------------------------------------------------------------------------

def train_router(site: FfnSite, router: block.Router, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor,
                 s: Settings, deadline: float | None) -> dict:
    """Distil the dense FFN output y into down(h * r) on windows x [N, W, D], h [N, W, I]."""
    experts = router.weight.shape[0]
    w_down = site.down.weight.detach()
    opt = torch.optim.Adam(router.parameters(), lr=s.lr)
    gen = torch.Generator().manual_seed(s.seed)
    scale = float(y.pow(2).mean())
    # The paper's chunk-sparsification weight (0.05) is kept fixed; the sparsity level is held at
    # the target by a dual controller on mean(z): its weight mu rises while CLS(chunk) is below
    # the target (logits pushed down) and falls below zero while above (logits pushed up), which
    # also reaches experts whose ReLU is off for every token (no gradient from the other losses);
    # it acts mostly through the router bias.
    mu = 0.0
    n = x.shape[0]
    done = 0
    history = []
    for step in range(s.steps):
        if deadline is not None and time.monotonic() > deadline:
            break
        idx = torch.randint(0, n, (min(s.batch_windows, n),), generator=gen)
        z = router.logits(x[idx])
        r = router.routes(z)
        pred = block.scale_experts(h[idx], r) @ w_down.T
        distil = (pred - y[idx]).pow(2).mean() / scale
        chunk_loss = block.chunk_sparsification_loss(r, s.chunk)
        loss = distil + s.locality * block.locality_loss(z) + CHUNK_WEIGHT * chunk_loss + mu * z.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sparsity = block.cls(r.detach(), s.chunk)
        mu += CONTROL_RATE * (s.sparsity - sparsity)
        done = step + 1
        if step % 20 == 0 or step == s.steps - 1:
            history.append({"step": step, "distil": round(float(distil.detach()), 4), "cls": round(sparsity, 4),
                            "mu": round(mu, 5)})
    return {"steps": done, "history": history}


def calibrate_threshold(router: block.Router, x: torch.Tensor, sparsity: float, chunk: int) -> float:
    """Shift every router bias by one offset so that CLS(chunk) on x is the target (bisection):
    the controller during training only hovers around it. Returns the shift."""
    with torch.no_grad():
        z = router.logits(x)
        lo, hi = -float(z.abs().max()) - 1, float(z.abs().max()) + 1
        for _ in range(40):
            mid = (lo + hi) / 2
            if block.cls(torch.relu(z - mid), chunk) < sparsity:
                lo = mid
            else:
                hi = mid
        router.bias -= hi
    return hi


def evaluate_layer(site: FfnSite, router: block.Router, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> dict:
    with torch.no_grad():
        r = router(x)
        pred = block.scale_experts(h, r) @ site.down.weight.T
        err = float((pred - y).pow(2).mean() / y.pow(2).mean())
    return {"relative_mse": round(err, 5), **sparsity_report(r)}


def sparsity_report(r) -> dict:
    """TLS and CLS(s) of router outputs: one [B, T, E] tensor, or a list of [T, E] sequences of
    any lengths (chunks never cross sequences; every chunk counts once)."""
    seqs = _sequences(r)
    tls = 1 - sum(int((q != 0).sum()) for q in seqs) / max(1, sum(q.numel() for q in seqs))
    return {"tls": round(tls, 4), **{f"cls{s}": round(chunk_sparsity(seqs, s), 4) for s in CLS_SIZES}}


def _sequences(r) -> list[torch.Tensor]:
    return list(r.reshape(-1, r.shape[-2], r.shape[-1]).unbind(0)) if torch.is_tensor(r) else list(r)


def chunk_sparsity(r, s: int) -> float:
    """CLS(s) over sequences of any lengths ([B, T, E] or a list of [T, E]), every chunk counted once."""
    seqs = _sequences(r)
    chunks = sum(-(-q.shape[0] // s) for q in seqs)
    active = sum((1 - block.cls(q[None], s)) * -(-q.shape[0] // s) for q in seqs)
    return 1 - active / max(1, chunks)


# -- whole conversion ---------------------------------------------------------------------------------

def expert_count(site: FfnSite, requested: int) -> int:
    experts = requested or max(1, site.hidden // 64)
    if site.hidden % experts:
        raise EdgesparseError(f"blockffn: {experts} experts do not divide the intermediate size {site.hidden} "
                              f"of {site.name or 'the FFN'}")
    if (site.hidden // experts) % 4:
        raise EdgesparseError(f"blockffn: expert size {site.hidden // experts} (= {site.hidden} / {experts}) must be "
                              "a multiple of 4 for the RoutedFFN kernel")
    return experts


def check_text(seqs: list[torch.Tensor], s: Settings) -> None:
    longest = max((q.shape[0] for q in seqs), default=0)
    if longest < s.chunk:
        raise EdgesparseError(f"blockffn: the calibration sequences have at most {longest} tokens, fewer than the "
                              f"chunk length {s.chunk}: give longer calibration text or a smaller chunk")


def convert(module, batches: list[dict], s: Settings, log=print) -> list[Layer]:
    """Turn every FFN of `module` into a BlockFFN in place (modules replaced, neurons permuted)
    and train the routers; returns the layers with their reports."""
    sites = find_ffns(module)
    experts = [expert_count(site, s.experts) for site in sites]
    seqs = collect_inputs(module, sites, batches)
    check_text(seqs[0], s)
    window = min(s.window, max(q.shape[0] for q in seqs[0])) // s.chunk * s.chunk
    deadline = time.monotonic() + s.time_budget_s if s.time_budget_s > 0 else None
    layers = []
    for i, (site, e) in enumerate(zip(sites, experts)):
        start = time.monotonic()
        x = windows(seqs[i], window)                                  # [N, W, D]
        flat = x.reshape(-1, x.shape[-1])
        h = ffn_hidden(site, flat)
        order = cluster_neurons(h[:: max(1, h.shape[0] // 4096)], e, s.seed + i)
        permute_neurons(site, order)
        h = h[:, order]
        contrib = expert_contributions(site, h, e)
        router = init_router(flat, contrib, s.sparsity, s.chunk, window)
        with torch.no_grad():
            y = h @ site.down.weight.T
        h3, y3 = h.reshape(*x.shape[:2], -1), y.reshape(*x.shape[:2], -1)
        before = evaluate_layer(site, router, x, h3, y3)
        layer_deadline = None if deadline is None else \
            time.monotonic() + (deadline - time.monotonic()) / (len(sites) - i)
        trained = train_router(site, router, x, h3, y3, s, layer_deadline)
        calibrate_threshold(router, x, s.sparsity, s.chunk)
        after = evaluate_layer(site, router, x, h3, y3)
        layer = Layer(site, order, router, {"name": site.name, "experts": e, "expert_size": site.hidden // e,
                                            "windows": int(x.shape[0]), "window": window, "init": before,
                                            "trained": after, "steps": trained["steps"],
                                            "seconds": round(time.monotonic() - start, 1)})
        layers.append(layer)
        log(f"[blockffn] {site.name}: {trained['steps']} steps, relative MSE {after['relative_mse']}, "
            f"TLS {after['tls']}, CLS{s.chunk} {after.get(f'cls{s.chunk}', block.cls(router(x).detach(), s.chunk)):.3f}")
        del h, h3, y, y3
    install(module, layers)
    return layers


def install(module, layers: list[Layer]) -> None:
    """Swap the converted modules into the model."""
    for layer in layers:
        site = layer.site
        if site.gated:
            parent_name, _, attr = site.name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, block.BlockGatedMLP(site, layer.router))
        else:
            setattr(site.owner, site.attr, block.BlockIntermediate(site, layer.router))


def save(layers: list[Layer], path) -> None:
    torch.save({"format": "edgesparse-blockffn/1", "layers": [
        {"name": l.site.name, "order": l.order, "router": l.router.state_dict(), "report": l.report}
        for l in layers]}, path)


def load(module, path) -> list[Layer]:
    """Apply a saved conversion (neuron orders and routers) to a fresh dense model."""
    try:
        state = torch.load(path, weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise EdgesparseError(f"blockffn: cannot read the conversion file {path}: {exc}") from None
    sites = find_ffns(module)
    saved = state.get("layers", []) if isinstance(state, dict) else []
    same = lambda a, b: a.endswith(b) or b.endswith(a)  # the model may be wrapped (lm.model... vs model...)
    if len(saved) != len(sites) or not all(same(e["name"], site.name) for e, site in zip(saved, sites)):
        raise EdgesparseError(f"blockffn: {path} was made for another model ({len(saved)} FFNs saved, "
                              f"{len(sites)} in this model)")
    layers = []
    for site, entry in zip(sites, saved):
        permute_neurons(site, entry["order"])
        w = entry["router"]["weight"]
        router = block.Router(w.shape[1], w.shape[0])
        router.load_state_dict(entry["router"])
        layers.append(Layer(site, entry["order"], router, dict(entry.get("report", {}))))
    install(module, layers)
    return layers


def measure(module, layers: list[Layer], batches: list[dict]) -> list[list[torch.Tensor]]:
    """Router outputs per layer when the converted model runs the batches: one [T, E] tensor per
    sequence (positions where a batch's attention_mask is 0 are left out)."""
    blocks = [_block_of(module, l) for l in layers]
    records: list[list[torch.Tensor]] = [[] for _ in layers]
    for b, rec in zip(blocks, records):
        b.record = rec
    try:
        for batch in batches:
            run_module(module, batch)
    finally:
        for b in blocks:
            b.record = None
    out = []
    for rec in records:
        seqs = []
        for r, batch in zip(rec, batches):
            mask = batch.get("attention_mask")
            for i, q in enumerate(r.reshape(-1, r.shape[-2], r.shape[-1]).unbind(0)):
                keep = None if mask is None or np.shape(mask)[-1] != q.shape[0] else torch.as_tensor(mask[i]) != 0
                seqs.append(q if keep is None else q[keep])
        out.append(seqs)
    return out


def _block_of(module, layer: Layer):
    site = layer.site
    if site.gated:  # install() replaced the MLP: look it up again
        return module.get_submodule(site.name)
    if not site.attr:  # a trained checkpoint's block (checkpoint.trained_layers): the owner itself
        return site.owner
    return getattr(site.owner, site.attr)


def ffn_flops(layers: list[Layer], routes: list[torch.Tensor], chunk: int) -> dict:
    """FFN FLOPs per token (2 per multiply-add): dense, and executed by RoutedFFN with chunks of
    `chunk` tokens (router + the experts active in the chunk)."""
    dense = executed = 0.0
    for layer, r in zip(layers, routes):
        site = layer.site
        d, inter, e = site.up.in_features, site.hidden, layer.router.weight.shape[0]
        full = 2.0 * d * inter * (2 if site.gated else 1) + 2.0 * inter * site.down.out_features
        dense += full
        executed += 2.0 * d * e + (1 - sparsity_report(r)[f"cls{chunk}"]) * full
    return {"dense_per_token": dense, "executed_per_token": executed, "chunk": chunk,
            "fraction": round(executed / dense, 4) if dense else None}
