"""Delta attention, the readable reference (PyTorch). The C++ kernel computes the same thing
row by row; this file computes it with whole-matrix operations so that it is easy to check.

For one head, query row t sits at absolute position p_t = N - T + t (N keys, T query rows;
the first N - T keys come from the KV cache). Row t attends keys j <= p_t:

* near keys, j > p_t - window or j < sinks: exact scores q_t . k_j;
* far keys, the rest: approximate scores q^_t . k_j, where q^ is the query as the
  delta network last transmitted it. Per dimension d, q^[d] is refreshed to q_t[d] only when
  |q_t[d] - q^[d]| > theta_q[d] (compared with the last *transmitted* value, not with q_{t-1}:
  the error stays below theta_q and never drifts). A far score changes only through the
  refreshed dimensions, so the kernel updates it with |active dims| MACs instead of D.
* far keys enter the output with the weight they had when last applied, kept in the running
  accumulator U = sum_j w^_j v_j. Each row re-applies (64 MACs on the value side each) only
  the keys whose current weight exp(s^_tj) deviates most from w^_j: the refresh threshold
  starts at the previous row's (twice that when the previous row found that the doubled one
  would have kept within budget; never above the budget theta_v * Z) and halves until the
  deviations left stale add up to at most theta_v * Z, Z being the previous row's softmax
  denominator (known before the row starts). A budget on the total, not a per-key threshold:
  hundreds of far keys each drifting a little below a per-key threshold would add up to a
  large error. Usually one pass: the threshold carries over from row to row.

    o_t = (sum_far w^_j v_j + sum_near w_j v_j) / (sum_far w^_j + sum_near w_j)

The computation is causal and sequential in t, so a prompt processed in one prefill call and
the same tokens fed one by one through decode give the same outputs; `state` carries what the
next call needs (q^ and, per far key, the score at which its weight was last applied).

MACs are counted as the kernel spends them; the dense count is causal attention,
2 * D * (p_t + 1) per row and head (QK^T and PV), so the sparsity is not inflated by the
masked upper triangle that ONNX Runtime's dense graph computes and throws away.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_HALVINGS = 16  # value-side threshold halvings in one row before every deviation is refreshed


@dataclass
class DeltaState:
    """What one attention layer carries from one call to the next (per batch row and head)."""

    q_hat: torch.Tensor          # [B, H, D] the transmitted query
    s_ref: torch.Tensor          # [B, H, N] score (scaled) at which each far key was last applied; -inf: not far yet
    log_den: torch.Tensor        # [B, H] log of the last row's softmax denominator
    ratio: torch.Tensor          # [B, H, 1] the last row's value-side threshold / budget
    grow: torch.Tensor           # [B, H, 1] whether the next row may try twice that threshold


@dataclass
class DeltaStats:
    dense_macs: int = 0
    macs: int = 0                # MACs the kernel spends (QK + PV)
    qk_macs: int = 0
    pv_macs: int = 0
    rows: int = 0
    far_fraction: list = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.macs / self.dense_macs if self.dense_macs else 0.0

    def add(self, other: "DeltaStats") -> None:
        self.dense_macs += other.dense_macs
        self.macs += other.macs
        self.qk_macs += other.qk_macs
        self.pv_macs += other.pv_macs
        self.rows += other.rows


def _per_head(theta, heads: int, like: torch.Tensor, dims: int = 1) -> torch.Tensor:
    """A threshold as [1, heads, dims]: from one value, one per head, or (dims > 1) one per head
    and dimension."""
    t = torch.as_tensor(theta, dtype=like.dtype, device=like.device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(heads)
    if t.numel() == heads:
        return t.view(1, heads, 1).expand(1, heads, dims)
    if t.numel() == heads * dims:
        return t.view(1, heads, dims)
    raise ValueError(f"threshold has {t.numel()} values for {heads} heads of {dims} dims")


def transmitted_queries(q: torch.Tensor, theta_q, q_hat: torch.Tensor | None):
    """The delta network on the query rows. q: [B, H, T, D]. Returns (q^ per row [B, H, T, D],
    active dims per row [B, H, T], final q^). A missing q_hat (fresh sequence) starts from q_0."""
    b, h, t_len, d = q.shape
    theta = _per_head(theta_q, h, q, d)
    rows, active = [], []
    for t in range(t_len):
        q_t = q[:, :, t]
        if q_hat is None:
            q_hat = q_t.clone()
            act = torch.full((b, h), d, dtype=torch.int64, device=q.device)
        else:
            change = (q_t - q_hat).abs() > theta
            q_hat = torch.where(change, q_t, q_hat)
            act = change.sum(-1)
        rows.append(q_hat)
        active.append(act)
    return torch.stack(rows, 2), torch.stack(active, 2), q_hat


def delta_attention(q, k, v, *, scale: float, window: int, sinks: int, theta_q, theta_v,
                    state: DeltaState | None = None, softcap: float = 0.0, span: int = 0):
    """q: [B, H, T, D] (after RoPE), k, v: [B, Hkv, N, D] (cache + new). Returns
    (out [B, H, T, D], new state, DeltaStats).

    softcap > 0: logits softcap * tanh(scale q.k / softcap) (the far scores are kept raw and
    capped where they become weights). span > 0: a sliding window, row p sees only keys
    p - span < j <= p; inside it the near/far split is the same (near: j > p - window; sinks do
    not apply), and a far key that leaves the sliding window leaves the running sums (the kernel
    subtracts its applied weight and value: D MACs)."""
    if span > 0:
        sinks = 0
    b, h, t_len, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads do not share {hkv} key/value heads evenly")
    past = n - t_len
    g = h // hkv
    kx = k.repeat_interleave(g, dim=1)
    vx = v.repeat_interleave(g, dim=1)

    q_hat0 = state.q_hat if state is not None else None
    q_rows, active, q_hat_last = transmitted_queries(q, theta_q, q_hat0)

    pos = torch.arange(past, n, device=q.device).view(t_len, 1)      # p_t
    key = torch.arange(n, device=q.device).view(1, n)
    causal = key <= pos
    if span > 0:
        causal = causal & (key > pos - span)
    near = causal & ((key > pos - window) | (key < sinks))
    far = causal & ~near
    new_far = far & (key == pos - window)                            # becomes far at this row
    if t_len:
        # keys already far at the start of this call but unknown to the state are new too
        known = state.s_ref.shape[-1] if state is not None else 0
        first_far = far[0] & (key[0] >= known)
        new_far[0] |= first_far

    s_exact = torch.matmul(q, kx.transpose(-1, -2)) * scale          # [B, H, T, N]
    s_far = torch.matmul(q_rows, kx.transpose(-1, -2)) * scale
    if softcap > 0:
        s_exact = softcap * torch.tanh(s_exact / softcap)
    cap = (lambda s: softcap * torch.tanh(s / softcap)) if softcap > 0 else (lambda s: s)  # noqa: E731

    theta = _per_head(theta_v, h, q)[..., 0]                        # [1, H]
    s_ref = torch.full((b, h, n), float("-inf"), dtype=q.dtype, device=q.device)
    if state is not None:
        s_ref[..., : state.s_ref.shape[-1]] = state.s_ref
    log_den = state.log_den.clone() if state is not None else torch.full((b, h), float("-inf"), dtype=q.dtype, device=q.device)
    ratio_prev = state.ratio.clone() if state is not None else torch.ones((b, h, 1), dtype=q.dtype, device=q.device)
    grow_prev = state.grow.clone() if state is not None else torch.zeros((b, h, 1), dtype=torch.bool, device=q.device)
    weights = torch.zeros(b, h, t_len, n, dtype=q.dtype, device=q.device)
    updated = torch.zeros(b, h, t_len, dtype=torch.int64, device=q.device)
    for t in range(t_len):
        nr, fr, nf = near[t], far[t], new_far[t]
        cur = torch.where(fr, cap(s_far[:, :, t]), s_exact[:, :, t])
        cur = torch.where(nr | fr, cur, torch.full_like(cur, float("-inf")))
        held = cap(s_ref)                                                # the far keys' applied logits
        # any common reference c gives the same decisions; this one keeps every weight <= 1
        c = torch.maximum(cur.amax(-1, keepdim=True), held.amax(-1, keepdim=True))
        w_now = torch.exp(cur - c)
        w_hat = torch.exp(held - c)
        budget = (theta * torch.exp(log_den - c[..., 0])).unsqueeze(-1)      # theta_v * Z_{t-1}
        old = fr & ~nf
        dev = torch.where(old, (w_now - w_hat).abs(), torch.zeros_like(w_now))
        # threshold: the last row's (twice that when the last row found the doubled one would
        # have kept within budget; at most the budget), halved until the deviations left stale
        # add up to at most the budget (after MAX_HALVINGS halvings: every deviation)
        ratio = torch.where(grow_prev, torch.clamp(ratio_prev * 2.0, max=1.0), ratio_prev)
        up = torch.where(old & (dev < 2.0 * ratio * budget), dev, torch.zeros_like(dev)).sum(-1, keepdim=True)
        grow_prev = (up <= budget) & (ratio < 1.0)
        moved = torch.zeros_like(dev, dtype=torch.bool)
        for level in range(MAX_HALVINGS + 2):
            if level:
                busy = kept > budget
                if not bool(busy.any()):
                    break
                smaller = ratio * 0.5 if level <= MAX_HALVINGS else torch.zeros_like(ratio)
                ratio = torch.where(busy, smaller, ratio)
                grow_prev = grow_prev & ~busy
            else:
                busy = torch.ones_like(ratio, dtype=torch.bool)
            moved |= busy & old & (dev >= ratio * budget) & (dev > 0)
            kept = torch.where(old & ~moved, dev, torch.zeros_like(dev)).sum(-1, keepdim=True)
        ratio_prev = ratio
        apply = fr & (nf | moved)
        s_ref = torch.where(apply, s_far[:, :, t], s_ref)
        s_ref = torch.where(fr, s_ref, torch.full_like(s_ref, float("-inf")))
        updated[:, :, t] = (apply & ~nf).sum(-1)
        row = torch.where(fr, torch.exp(cap(s_ref) - c), torch.where(nr, w_now, torch.zeros_like(w_now)))
        weights[:, :, t] = row
        log_den = c[..., 0] + torch.log(row.sum(-1))
    out = torch.matmul(weights / weights.sum(-1, keepdim=True), vx)

    # MAC accounting, per row and head, as the kernel spends them
    n_near = near.sum(-1).view(1, 1, t_len)
    n_new = new_far.sum(-1).view(1, 1, t_len)
    n_old_far = (far.sum(-1) - new_far.sum(-1)).view(1, 1, t_len)
    qk = (n_near + n_new) * d + active * n_old_far
    pv = (n_near + n_new) * d + updated * d
    if span > 0:  # far keys leaving the sliding window are subtracted from the running sums
        was_far = (key == pos - span) & (key <= pos - 1 - window) & (key >= 0)
        if state is None:   # a fresh call holds nothing before its first row
            was_far[0] = False
        else:
            was_far[0] &= key[0] < state.s_ref.shape[-1]
        pv = pv + was_far.sum(-1).view(1, 1, t_len) * d
    stats = DeltaStats(
        dense_macs=int(2 * d * causal.sum().item() * b * h),
        qk_macs=int(qk.sum().item()),
        pv_macs=int(pv.sum().item()),
        rows=t_len,
    )
    stats.macs = stats.qk_macs + stats.pv_macs
    new_state = DeltaState(q_hat=q_hat_last, s_ref=s_ref, log_den=log_den, ratio=ratio_prev, grow=grow_prev)
    return out, new_state, stats


def exact_attention(q, k, v, *, scale: float):
    """Causal grouped-query attention, the dense baseline (q [B,H,T,D], k/v [B,Hkv,N,D])."""
    h, hkv = q.shape[1], k.shape[1]
    kx = k.repeat_interleave(h // hkv, dim=1)
    vx = v.repeat_interleave(h // hkv, dim=1)
    t_len, n = q.shape[2], k.shape[2]
    s = torch.matmul(q, kx.transpose(-1, -2)) * scale
    pos = torch.arange(n - t_len, n, device=q.device).view(t_len, 1)
    s = s.masked_fill(torch.arange(n, device=q.device).view(1, n) > pos, float("-inf"))
    return torch.matmul(torch.softmax(s, -1), vx)
