"""GatheredFFN: activation-sparse FFN computing only selected experts; packing, reference, node builder.

The FFN's intermediate neurons are grouped in E experts of S consecutive
neurons (I = E * S). For a chunk of T tokens that share one selection
``experts`` (int32 [n_active], runtime input, e.g. from a router/top-k or a
CoreMatching predictor), operator ``com.edgesparse::GatheredFFN`` computes

    gated = 1:  Y = sum_e (act(X Wg_e + bg_e) * (X Wu_e + bu_e)) Wd_e + bd
    gated = 0:  Y = sum_e act(X Wu_e + bu_e) Wd_e + bd

- input 0 ``X`` float [..., D]
- input 1 ``experts`` int32 [n_active], values in [0, E) (duplicates count twice)
- input 2 ``w_up`` float [E, D, S]: expert e's up-projection columns, MatMul layout
- input 3 ``w_gate`` float [E, D, S]: gate projection; when gated = 0 pass ``w_up`` again
  (same initializer, no extra memory); it is then ignored by the kernel
- input 4 ``w_down`` float [E, S, D_out]: expert e's rows of the down projection
- input 5 ``b_up`` float [E, S], input 6 ``b_gate`` float [E, S], input 7 ``b_down`` float [D_out]
  (zeros when the model has none; when gated = 0 pass ``b_up`` as ``b_gate``)
- attributes ``gated`` (int 0/1, default 0), ``activation`` ("none" | "relu" | "gelu" | "silu")
- output 0 ``Y`` float [..., D_out]

S and D_out must be multiples of 4. All inputs are required (no optional
inputs) so that the dense ONNX function needs no special cases.

``com.edgesparse::RoutedFFN`` (BlockFFN-style routers) takes the same inputs
except input 1, ``routes`` float [..., E] (one row per token of X), and computes
the full FFN with expert e's activated h scaled by routes[t, e]:

    Y_t = sum_e routes[t, e] * h_e(X_t) Wd_e + bd

Tokens (the flattened leading dims) are cut into chunks of ``chunk`` tokens
(attribute, 0: one chunk); per chunk the kernel computes only the experts with
a nonzero route for some token of the chunk (the union), which is exact. It is
a separate op rather than an optional input of GatheredFFN because an ONNX
function cannot express "multiply by routes if given, else by 1".
"""

from __future__ import annotations

import numpy as np

from edgesparse.kernels.blocksparse import DOMAIN

FFN_ACTIVATIONS = ("none", "relu", "gelu", "silu")


def pack_gathered_ffn(
    w_up: np.ndarray,
    w_down: np.ndarray,
    expert_size: int,
    *,
    w_gate: np.ndarray | None = None,
    b_up: np.ndarray | None = None,
    b_gate: np.ndarray | None = None,
    b_down: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Linear-layout FFN weights -> GatheredFFN layout.

    w_up / w_gate: [I, D] (torch ``nn.Linear(D, I).weight``), w_down: [D_out, I];
    I must be a multiple of expert_size (a multiple of 4). Returns
    {"w_up", "w_gate" (only if given), "w_down", "b_up", "b_gate" (only if gated), "b_down"}.
    """
    w_up = np.asarray(w_up, np.float32)
    w_down = np.asarray(w_down, np.float32)
    inter, d = w_up.shape
    d_out = w_down.shape[0]
    s = int(expert_size)
    if s <= 0 or s % 4 or inter % s:
        raise ValueError(f"expert_size must be a multiple of 4 dividing I={inter}, got {expert_size}")
    if w_down.shape[1] != inter:
        raise ValueError(f"w_down must be [D_out, I={inter}], got {w_down.shape}")
    if d_out % 4:
        raise ValueError(f"D_out={d_out} must be a multiple of 4")
    e = inter // s

    def experts_in(w):  # [I, D] -> [E, D, S]
        return np.ascontiguousarray(np.asarray(w, np.float32).reshape(e, s, d).transpose(0, 2, 1))

    def bias(b, n):
        return np.zeros(n, np.float32) if b is None else np.asarray(b, np.float32).reshape(n)

    out = {
        "w_up": experts_in(w_up),
        "w_down": np.ascontiguousarray(w_down.T.reshape(e, s, d_out)),
        "b_up": bias(b_up, inter).reshape(e, s),
        "b_down": bias(b_down, d_out),
    }
    if w_gate is not None:
        out["w_gate"] = experts_in(w_gate)
        out["b_gate"] = bias(b_gate, inter).reshape(e, s)
    return out


def gathered_ffn_reference(x, packed: dict[str, np.ndarray], experts, activation: str = "none") -> np.ndarray:
    """What GatheredFFN computes (gated iff ``packed`` has "w_gate"), float64 numpy."""
    from edgesparse.kernels.reference import apply_activation

    x = np.asarray(x, np.float64)
    sel = np.asarray(experts, np.int64)
    xf = x.reshape(-1, x.shape[-1])
    d_out = packed["w_down"].shape[2]
    y = np.zeros((xf.shape[0], d_out)) + packed["b_down"].astype(np.float64)
    for e in sel:
        u = xf @ packed["w_up"][e].astype(np.float64) + packed["b_up"][e]
        if "w_gate" in packed:
            g = xf @ packed["w_gate"][e].astype(np.float64) + packed["b_gate"][e]
            h = apply_activation(g, activation).astype(np.float64) * u
        else:
            h = apply_activation(u, activation).astype(np.float64)
        y += h @ packed["w_down"][e].astype(np.float64)
    return y.reshape(*x.shape[:-1], d_out).astype(np.float32)


def make_gathered_ffn(x: str, experts: str, y: str, packed: dict[str, np.ndarray], *, name: str,
                      activation: str = "none", prefix: str | None = None):
    """Node + initializers (``<prefix>.w_up``, ``.w_gate``, ``.w_down``, ``.b_up``, ``.b_gate``,
    ``.b_down``; a plain FFN reuses w_up/b_up for the gate inputs). ``experts`` names an int32
    [n_active] tensor computed in the graph (or a graph input)."""
    import onnx
    from onnx import numpy_helper

    if activation not in FFN_ACTIVATIONS:
        raise ValueError(f"activation must be one of {FFN_ACTIVATIONS}, got {activation!r}")
    prefix = prefix or name
    gated = "w_gate" in packed
    keys = ["w_up", "w_down", "b_up", "b_down"] + (["w_gate", "b_gate"] if gated else [])
    inits = {k: numpy_helper.from_array(np.asarray(packed[k], np.float32), f"{prefix}.{k}") for k in keys}
    gate, b_gate = ("w_gate", "b_gate") if gated else ("w_up", "b_up")
    inputs = [x, experts, inits["w_up"].name, inits[gate].name, inits["w_down"].name, inits["b_up"].name,
              inits[b_gate].name, inits["b_down"].name]  # fmt: skip
    node = onnx.helper.make_node("GatheredFFN", inputs, [y], name=name, domain=DOMAIN, gated=int(gated),
                                 activation=activation)  # fmt: skip
    return node, list(inits.values())


def routed_ffn_reference(x, packed: dict[str, np.ndarray], routes, activation: str = "none") -> np.ndarray:
    """What RoutedFFN computes (gated iff ``packed`` has "w_gate"), float64 numpy."""
    from edgesparse.kernels.reference import apply_activation

    x = np.asarray(x, np.float64)
    xf = x.reshape(-1, x.shape[-1])
    n_exp, _, s = packed["w_up"].shape
    r = np.asarray(routes, np.float64).reshape(xf.shape[0], n_exp)
    w_up = packed["w_up"].astype(np.float64).transpose(1, 0, 2).reshape(xf.shape[1], -1)
    u = xf @ w_up + packed["b_up"].reshape(-1)
    if "w_gate" in packed:
        w_gate = packed["w_gate"].astype(np.float64).transpose(1, 0, 2).reshape(xf.shape[1], -1)
        h = apply_activation(xf @ w_gate + packed["b_gate"].reshape(-1), activation).astype(np.float64) * u
    else:
        h = apply_activation(u, activation).astype(np.float64)
    h = (h.reshape(-1, n_exp, s) * r[:, :, None]).reshape(xf.shape[0], -1)
    d_out = packed["w_down"].shape[2]
    y = h @ packed["w_down"].astype(np.float64).reshape(-1, d_out) + packed["b_down"]
    return y.reshape(*x.shape[:-1], d_out).astype(np.float32)


def active_experts_per_chunk(routes, chunk: int) -> np.ndarray:
    """bool [n_chunks, E]: the experts RoutedFFN computes for each chunk of ``chunk`` tokens
    (0: one chunk), i.e. those with a nonzero route for some token of the chunk."""
    r = np.asarray(routes)
    r = r.reshape(-1, r.shape[-1]) != 0
    step = chunk if chunk > 0 else max(1, r.shape[0])
    return np.array([r[i:i + step].any(0) for i in range(0, r.shape[0], step)], bool).reshape(-1, r.shape[1])


def make_routed_ffn(x: str, routes: str, y: str, packed: dict[str, np.ndarray], *, name: str,
                    activation: str = "none", chunk: int = 0, prefix: str | None = None):
    """RoutedFFN node + initializers (named as for ``make_gathered_ffn``). ``routes`` names a float
    [..., E] tensor computed in the graph (the router), one row per token of ``x``."""
    import onnx

    if int(chunk) < 0:
        raise ValueError(f"chunk must be >= 0, got {chunk}")
    node, inits = make_gathered_ffn(x, routes, y, packed, name=name, activation=activation, prefix=prefix)
    node.op_type = "RoutedFFN"
    node.attribute.append(onnx.helper.make_attribute("chunk", int(chunk)))
    return node, inits
