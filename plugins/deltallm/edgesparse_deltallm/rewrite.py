"""Find each attention block of an exported decoder LLM and replace it with DeltaAttention.

What the matcher accepts (ONNX standard domain), read from the Softmax outwards:

    scores = MatMul(q', kT')              q' = q * c1 (optional scalar Mul/Div)
                                          kT' = layout(k) * c2: Transpose / Reshape / Expand /
                                          Unsqueeze (the GQA repeat) and scalar Mul/Div
    logits = scores * c3, or cap * Tanh(scores * c3 / cap) (logit soft-capping, Gemma 2)
    logits = logits [+ mask | Where(mask, logits, -inf) | Where(mask, -inf, logits)]
    p = Softmax(logits, axis=-1) [then Where(IsNaN(p), 0, p), Cast, Identity, Dropout]
    out = MatMul(p, layout(v))

This is what torch.onnx.export(dynamo=True) makes of transformers' sdpa and eager attention in
the Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 families (QK-norm, biased or fused
QKV projections all sit upstream of q and k). q must be [B, H, T, D] after RoPE, k and v
[B, Hkv, N, D] (the cache concatenated with the new keys). The operator does not read the mask:
masks.py reads what it means (causal, or a sliding window of S keys) from the dense model, and
the node gets the window as its `span`. Whether the match is right is checked numerically
by the pass, which runs the rewritten model with an exact window against the original.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from edgesparse import EdgesparseError, graph

DOMAIN = "com.edgesparse.deltallm"
OP = "DeltaAttention"
LAYOUT = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Identity"}
PASS_THROUGH = {"Cast", "Identity", "Dropout"}
FUSED = {"Attention", "GroupQueryAttention", "MultiHeadAttention", "PackedAttention"}  # ORT contrib / opset 23


@dataclass
class Attention:
    softmax: ir.Node
    pv: ir.Node                 # the MatMul(p, v) whose output the new node takes over
    q: ir.Value
    k: ir.Value
    v: ir.Value
    scale: float
    removed: list = field(default_factory=list)   # nodes of the dense attention (for profiling)
    softcap: float = 0.0        # logits = softcap * tanh(scale * q.k / softcap); 0: none
    mask: ir.Value | None = None
    mask_keeps: bool = False    # mask is a boolean "attend here" (Where); else additive (0 / -inf)
    span: int = 0               # sliding window read from the mask (masks.py); 0: causal over the cache

    @property
    def name(self) -> str:
        return self.pv.name or self.pv.outputs[0].name


def _standard(node) -> bool:
    return node is not None and node.domain in ("", "ai.onnx")


def _scalar(value: ir.Value) -> float | None:
    array = graph.constant(value)
    if array is None or array.size != 1:
        return None
    return float(np.asarray(array, np.float64).reshape(()))


def _peel_scale(value: ir.Value, seen: list) -> tuple[ir.Value, float]:
    """Strip Mul/Div by scalar constants; returns (inner value, product of the factors)."""
    factor = 1.0
    while True:
        node = value.producer()
        if not _standard(node) or node.op_type not in ("Mul", "Div"):
            return value, factor
        a, b = node.inputs[0], node.inputs[1]
        cb, ca = _scalar(b), _scalar(a)
        if cb is not None:
            factor = factor * cb if node.op_type == "Mul" else factor / cb
            value = a
        elif ca is not None and node.op_type == "Mul":
            factor *= ca
            value = b
        else:
            return value, factor
        seen.append(node)


def _peel_layout(value: ir.Value, seen: list) -> tuple[ir.Value, float]:
    factor = 1.0
    while True:
        value, f = _peel_scale(value, seen)
        factor *= f
        node = value.producer()
        if not _standard(node) or node.op_type not in LAYOUT:
            return value, factor
        seen.append(node)
        value = node.inputs[0]


def _single_consumer(value: ir.Value):
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    use = uses[0]
    return use.node if hasattr(use, "node") else use[0]


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _dim(value: ir.Value, axis: int):
    if value.shape is None:
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


class Unmatched(Exception):
    """Why a Softmax is not an attention block this pass understands (one line). `attention`: it
    had a Q.K^T MatMul before it, so it is attention in a form the pass does not take."""

    def __init__(self, why: str, attention: bool = False):
        super().__init__(why)
        self.attention = attention


def _match(softmax: ir.Node) -> Attention:
    axis = softmax.attributes.get("axis")
    axis = axis.value if axis is not None else -1
    x = softmax.inputs[0]
    if axis not in (-1, (_rank(x) or 0) - 1):
        raise Unmatched(f"Softmax over axis {axis}, not the key axis")
    seen: list = []
    mask, keeps = None, False
    # input side: optional mask, scale, soft-capping, the scores MatMul
    node = x.producer()
    if _standard(node) and node.op_type == "Add":
        seen.append(node)
        a, b = node.inputs
        scores = a if _is_scores(a) else b if _is_scores(b) else None
        if scores is None:
            raise Unmatched("Add before the Softmax has no Q.K^T MatMul on either side")
        x, mask = scores, (b if scores is a else a)
    elif _standard(node) and node.op_type == "Where":
        seen.append(node)
        cond, a, b = node.inputs
        if _is_scores(a):
            x, mask, keeps = a, cond, True
        elif _is_scores(b):
            x, mask, keeps = b, cond, False
        else:
            raise Unmatched("Where before the Softmax has no Q.K^T MatMul on either branch")
    x, c3 = _peel_scale(x, seen)
    softcap, c_in = 0.0, 1.0
    tanh = x.producer()
    if _standard(tanh) and tanh.op_type == "Tanh":
        seen.append(tanh)
        x, c_in = _peel_scale(tanh.inputs[0], seen)
        softcap = c3
        if not softcap > 0:
            raise Unmatched(f"soft-capping Tanh with a non-positive cap ({softcap})")
    mm = x.producer()
    if not _standard(mm) or mm.op_type != "MatMul":
        what = mm.op_type if mm is not None else "a graph input"
        raise Unmatched(f"the Softmax's scores come from {what}, not from a Q.K^T MatMul "
                        "(through scalar scales, soft-capping and a mask)")
    seen.append(mm)
    q, c1 = _peel_scale(mm.inputs[0], seen)
    k, c2 = _peel_layout(mm.inputs[1], seen)
    # output side
    p = softmax.outputs[0]
    consumer = _single_after_guard(p, seen)
    if consumer is None or not _standard(consumer) or consumer.op_type != "MatMul":
        raise Unmatched("the probabilities do not feed one P.V MatMul", True)
    v, c4 = _peel_layout(consumer.inputs[1], seen)
    if c4 != 1.0:
        raise Unmatched("the values are scaled before P.V", True)
    if _rank(q) != 4 or _rank(k) != 4 or _rank(v) != 4:
        raise Unmatched(f"q, k, v of ranks {_rank(q)}, {_rank(k)}, {_rank(v)}; needs [B, H, T, D] and [B, Hkv, N, D]", True)
    d = _dim(q, 3)
    if d is not None and (_dim(k, 3) not in (None, d) or _dim(v, 3) not in (None, d)):
        raise Unmatched("q, k and v head dims differ", True)
    h, hkv = _dim(q, 1), _dim(k, 1)
    if h is not None and hkv is not None and h % hkv:
        raise Unmatched(f"{h} query heads do not group over {hkv} key/value heads", True)
    scale = c1 * c2 * c_in * c3  # soft-capped: cap * tanh(c1 c2 c_in q.k) = cap * tanh(scale q.k / cap), cap = c3
    if not scale > 0:
        raise Unmatched(f"non-positive attention scale {scale}", True)
    seen.append(softmax)
    seen.append(consumer)
    return Attention(softmax, consumer, q, k, v, scale, seen, softcap, mask, keeps)


def _is_scores(value: ir.Value) -> bool:
    inner, _ = _peel_scale(value, [])
    node = inner.producer()
    if _standard(node) and node.op_type == "Tanh":
        inner, _ = _peel_scale(node.inputs[0], [])
        node = inner.producer()
    return _standard(node) and node.op_type == "MatMul"


def _single_after_guard(p: ir.Value, seen: list):
    """Follow the softmax output through NaN guards and casts to its one real consumer."""
    while True:
        uses = [u.node if hasattr(u, "node") else u[0] for u in p.uses()]
        if p.is_graph_output() or not uses:
            return None
        isnan = [n for n in uses if _standard(n) and n.op_type == "IsNaN"]
        rest = [n for n in uses if n not in isnan]
        if isnan and len(rest) == 1 and _standard(rest[0]) and rest[0].op_type == "Where" and rest[0].inputs[2] is p:
            seen.extend(isnan)
            seen.append(rest[0])
            p = rest[0].outputs[0]
            continue
        if len(uses) != 1:
            return None
        node = uses[0]
        if _standard(node) and node.op_type in PASS_THROUGH:
            seen.append(node)
            p = node.outputs[0]
            continue
        return node


def find_attention(model: ir.Model, misses: list | None = None) -> list[Attention]:
    """Every attention block; Softmax nodes that are not one go to `misses` as (node name, why)."""
    found = []
    for node in model.graph:
        if _standard(node) and node.op_type == "Softmax":
            try:
                found.append(_match(node))
            except Unmatched as why:
                if misses is not None:
                    misses.append((node.name or node.outputs[0].name, str(why), why.attention))
    return found


def replace(model: ir.Model, att: Attention, index: int, *, window: int, sinks: int,
            theta_q: np.ndarray, theta_v: np.ndarray, carry: bool = True,
            macs_output: bool = False) -> ir.Node:
    """Swap one attention block for a DeltaAttention node (thresholds as initializers)."""
    base = f"deltallm.layer{index}"
    tq = graph.initializer(model, f"{base}.theta_q", np.asarray(theta_q, np.float32))
    tv = graph.initializer(model, f"{base}.theta_v", np.asarray(theta_v, np.float32).reshape(-1))
    outputs = 3 if macs_output else 1
    attributes = {"scale": float(att.scale), "window": int(window), "sinks": int(sinks), "carry": int(carry)}
    if att.softcap:
        attributes["softcap"] = float(att.softcap)
    if att.span:
        attributes["span"] = int(att.span)
    node = ir.node(OP, [att.q, att.k, att.v, tq, tv], attributes,
                   domain=DOMAIN, num_outputs=outputs, name=graph.node_name(model, f"{base}.DeltaAttention"))
    if macs_output:
        node.outputs[1].name = f"{base}.state"
        node.outputs[2].name = f"{base}.macs"
        node.outputs[2].dtype = ir.DataType.INT64
    old = att.pv.outputs[0]
    new = node.outputs[0]
    new.shape, new.type = old.shape, old.type
    model.graph.insert_before(att.pv, node)
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    new.name = name
    if macs_output:
        model.graph.outputs.append(node.outputs[2])
    return node


def remove_dead(model: ir.Model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    for name, value in list(model.graph.initializers.items()):
        if not list(value.uses()) and not value.is_graph_output() and not value.is_graph_input():
            del model.graph.initializers[name]


def not_found_error(model: ir.Model) -> EdgesparseError:
    misses: list = []
    find_attention(model, misses)
    fused = sorted({n.op_type for n in model.graph if n.op_type in FUSED})
    if fused:
        detail = (f"fused {'/'.join(fused)} node(s): it needs attention as MatMul/Softmax ops, i.e. an export at "
                  "opset <= 22 without ONNX Runtime's attention fusion, as edgesparse build's own export")
    elif misses:
        name, why, _ = next((m for m in misses if m[2]), misses[0])
        detail = f"{len(misses)} Softmax node(s); the first, '{name}': {why}"
    else:
        detail = "no Softmax node"
    return EdgesparseError(f"deltallm: no attention block found ({detail}); it needs a decoder LLM exported "
                           "with plain attention ops (torch.onnx.export(..., dynamo=True), as edgesparse build does)")


def partial_error(misses: list, found: int) -> EdgesparseError | None:
    """Some attention blocks matched and others not: name the first layer that did not."""
    attention = [m for m in misses if m[2]]
    if not attention or not found:
        return None
    name, why, _ = attention[0]
    return EdgesparseError(f"deltallm: {found} attention block(s) understood, but Softmax '{name}' "
                           f"looks like attention and is not: {why}")


def apply(model: ir.Model, *, window: int, sinks: int, theta_q=0.0, theta_v=0.0, carry: bool = True,
          spans=None) -> list[Attention]:
    """Replace every attention block; theta_q / theta_v: a float, or one value (or per-head list)
    per layer; spans: the sliding window of each layer (0: none), as masks.read_spans finds them.
    Returns the matches (their `removed` nodes name the dense attention)."""
    misses: list = []
    found = find_attention(model, misses)
    if not found:
        raise not_found_error(model)
    partial = partial_error(misses, len(found))
    if partial is not None:
        raise partial
    for i, att in enumerate(found):
        att.span = int(spans[i]) if spans is not None else 0
        heads, dims = _dim(att.q, 1) or 1, _dim(att.q, 3) or 1
        tq = np.asarray(theta_q[i] if np.ndim(theta_q) else theta_q, np.float32)
        tq = np.broadcast_to(tq.reshape(tq.shape + (1,) * (2 - tq.ndim)) if tq.ndim < 2 else tq, (heads, dims))
        tv = np.broadcast_to(np.asarray(theta_v[i] if np.ndim(theta_v) else theta_v, np.float32), (heads,))
        replace(model, att, i, window=window, sinks=sinks, theta_q=tq, theta_v=tv, carry=carry)
    remove_dead(model)
    return found
