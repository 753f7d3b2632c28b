"""Whole-network rearrangement: channel permutations that leave the network's function unchanged
and make the group pruning lose less.

A group is B consecutive *output* channels x 1 input channel, so what a permutation can improve is
which output channels share a group: channels whose important inputs are the same input channels
should sit together, so that whole groups are either important or negligible. Permuting the output
channels of a layer forces the same permutation on everything that reads or is added to that
tensor. The model is traced with torch.fx and its tensors are tied into *channel spaces*: all the
tensors that must share one channel order (a conv's output, the BatchNorm and activation after it,
the depthwise conv that reads it, the residual adds it joins, the LayerNorm of a transformer's
residual stream...). Each space gets one permutation, applied to every parameter that touches it:

- producers (Conv2d/Linear writing the space): weight and bias rows;
- channel-wise layers (BatchNorm, LayerNorm, depthwise conv with multiplier 1): their per-channel
  parameters (and BatchNorm's running statistics);
- consumers (Conv2d/Linear reading the space): weight columns;
- concatenations along the channel axis: the consumer sees the segments' permutations side by side.

A space is *fixed* (identity) when it reaches a model input or output, an op that mixes channels in
a way the tracer does not model (reshape into heads, channel slicing, grouped convs, unknown ops),
or a constant tensor with a channel extent. Fixed spaces are reported with the reason: that part of
the network is pruned without rearrangement. Every permutation is checked numerically on
calibration inputs before pruning; a space whose permutation changes the output is rolled back and
reported too.

The permutation of a free space maximises sum over its producers p, groups g and input channels c
of (sum_{o in g} S_p[o, c])^2, S_p[o, c] = the (normalised) squared norm of W_p[o, c, :]: grouping
output channels whose weight mass sits on the same input channels concentrates each group's mass,
so the pruned low-score groups hold less of it. Greedy seeded clustering, then pairwise swaps
between groups while they improve the objective. A space keeps its permutation only when it
raises the magnitude mass retained by group pruning at the layers' target sparsities.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field

import numpy as np

from .patterns import channel_norms, group_mask, group_scores, expand_mask


# -- channel spaces -------------------------------------------------------------------------------

@dataclass
class Space:
    size: int
    fixed: list[str] = field(default_factory=list)
    producers: list = field(default_factory=list)   # (module name, module)
    params: list = field(default_factory=list)      # (module name, module, attr, dim)


@dataclass
class Member:
    """A parameter dimension indexed by a channel descriptor (one or more space segments)."""

    name: str
    module: object
    attr: str
    dim: int
    segments: tuple  # ((space id, size), ...)


class Spaces:
    def __init__(self):
        self.parent: list[int] = []
        self.info: list[Space] = []
        self.members: list[Member] = []

    def new(self, size: int, fixed: str | None = None) -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.info.append(Space(size, [fixed] if fixed else []))
        return i

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        self.parent[rb] = ra
        self.info[ra].fixed += self.info[rb].fixed
        self.info[ra].producers += self.info[rb].producers
        return ra

    def fix(self, segments, reason: str) -> None:
        for s, _ in segments:
            self.info[self.find(s)].fixed.append(reason)

    def root_info(self, i: int) -> Space:
        return self.info[self.find(i)]


@dataclass
class Chan:
    """What is known of a traced tensor's channel axis: its position and its channel segments."""

    dim: int
    segments: tuple  # ((space id, size), ...)

    @property
    def size(self) -> int:
        return sum(n for _, n in self.segments)


_UNARY_MODULES = (
    "ReLU", "ReLU6", "SiLU", "Hardswish", "Hardsigmoid", "Sigmoid", "Tanh", "GELU", "Dropout",
    "Dropout2d", "Identity", "Hardtanh", "LeakyReLU", "ELU", "Softplus", "Mish", "PReLU_",
    "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "ZeroPad2d",
    "ConstantPad2d", "Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d",
)
_UNARY_FUNCTIONS = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "gelu", "sigmoid", "tanh", "dropout",
    "hardswish", "hardsigmoid", "leaky_relu", "elu", "softplus", "mish", "adaptive_avg_pool2d",
    "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "interpolate", "contiguous", "clone",
    "float", "to", "sigmoid_", "detach", "abs", "neg", "exp", "sqrt", "rsqrt",
}
_BINARY = {"add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "add_", "mul_", "sub_", "div_"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_RESHAPE = {"view", "reshape", "flatten", "squeeze", "unsqueeze"}
_SHAPE_ONLY = {"size", "dim", "numel", "shape"}


def _fn_name(target) -> str:
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _shape(node):
    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class Tracer:
    """torch.fx tracer that keeps every Conv2d / Linear / norm subclass a leaf (their forward may
    pad or reshape, but their parameters mean what nn.Conv2d's and nn.Linear's mean)."""

    @staticmethod
    def make():
        import torch.fx as fx
        import torch.nn as nn

        class _T(fx.Tracer):
            def is_leaf_module(self, m, qualname):
                if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                    return True
                return super().is_leaf_module(m, qualname)

        return _T()


def trace(module, args: tuple):
    """Symbolic trace + shape propagation. Returns the GraphModule (sharing `module`'s submodules)."""
    import torch
    import torch.fx as fx
    from torch.fx.passes.shape_prop import ShapeProp

    tracer = Tracer.make()
    graph = tracer.trace(module)
    gm = fx.GraphModule(tracer.root, graph)
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    return gm


def batchnorm_after(gm) -> dict:
    """{conv/linear module name: the BatchNorm module that alone consumes its output}."""
    import torch.nn as nn

    modules = dict(gm.named_modules())
    found = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], (nn.Conv2d, nn.Linear)):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module":
            bn = modules[users[0].target]
            if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) and bn.track_running_stats and bn.running_var is not None:
                found[node.target] = bn
    return found


def build_spaces(gm, prunable: dict) -> tuple[Spaces, list[str]]:
    """Tie the traced graph's tensors into channel spaces. `prunable`: {module name: LayerInfo}."""
    import torch.nn as nn

    sp = Spaces()
    chan: dict = {}  # fx node -> Chan
    notes: list[str] = []
    modules = dict(gm.named_modules())

    def fixed_out(node, reason):
        shape = _shape(node)
        if shape is not None and len(shape) >= 2:
            chan[node] = Chan(1 if len(shape) == 4 else len(shape) - 1, ((sp.new(shape[1 if len(shape) == 4 else -1], reason), shape[1 if len(shape) == 4 else -1]),))

    def barrier(node, reason):
        for a in _tensor_args(node):
            if a in chan:
                sp.fix(chan[a].segments, reason)
        fixed_out(node, reason)

    def unify(a: Chan, b: Chan, why: str) -> bool:
        if [n for _, n in a.segments] == [n for _, n in b.segments]:
            for (x, _), (y, _) in zip(a.segments, b.segments):
                sp.union(x, y)
            return True
        sp.fix(a.segments + b.segments, why)
        return False

    def member(name, mod, attr, dim, c: Chan):
        if getattr(mod, attr, None) is not None:
            sp.members.append(Member(name, mod, attr, dim, c.segments))

    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    for node in gm.graph.nodes:
        shape = _shape(node)
        op = node.op
        if op == "call_module" and calls[node.target] > 1 and any(
                p.dim() > 0 for p in modules[node.target].parameters(recurse=False)):
            barrier(node, f"module {node.target} is called {calls[node.target]} times (shared weights)")
            continue
        if op == "placeholder":
            fixed_out(node, "model input")
            continue
        if op == "output":
            for a in _flatten(node.args):
                if a in chan:
                    sp.fix(chan[a].segments, "model output")
            continue
        if op == "get_attr":
            if shape is not None and int(np.prod(shape)) > 1:
                chan[node] = None  # a constant tensor: only safe when it has no channel extent
            continue
        ins = [a for a in _tensor_args(node) if a in chan and chan[a] is not None]
        consts = [a for a in _tensor_args(node) if a in chan and chan[a] is None]
        if op == "call_module":
            mod = modules[node.target]
            kind = type(mod).__name__
            x = chan.get(node.args[0]) if node.args else None
            if isinstance(mod, nn.Conv2d) and x is not None and x.dim == 1:
                if mod.groups == 1:
                    member(node.target, mod, "weight", 1, x)
                    s = sp.new(mod.out_channels)
                    sp.info[s].producers.append((node.target, mod))
                    out = Chan(1, ((s, mod.out_channels),))
                    member(node.target, mod, "weight", 0, out)
                    member(node.target, mod, "bias", 0, out)
                    chan[node] = out
                elif mod.groups == mod.in_channels == mod.out_channels:
                    member(node.target, mod, "weight", 0, x)
                    member(node.target, mod, "bias", 0, x)
                    chan[node] = x
                else:
                    barrier(node, f"grouped conv {node.target} (groups={mod.groups})")
                continue
            if isinstance(mod, nn.Linear) and x is not None and shape is not None and x.dim == len(_shape(node.args[0])) - 1:
                member(node.target, mod, "weight", 1, x)
                s = sp.new(mod.out_features)
                sp.info[s].producers.append((node.target, mod))
                out = Chan(len(shape) - 1, ((s, mod.out_features),))
                member(node.target, mod, "weight", 0, out)
                member(node.target, mod, "bias", 0, out)
                chan[node] = out
                continue
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) and x is not None and x.dim == 1:
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    member(node.target, mod, attr, 0, x)
                chan[node] = x
                continue
            if isinstance(mod, nn.LayerNorm) and x is not None and tuple(mod.normalized_shape) == (x.size,) \
                    and x.dim == len(_shape(node.args[0])) - 1:
                member(node.target, mod, "weight", 0, x)
                member(node.target, mod, "bias", 0, x)
                chan[node] = x
                continue
            if kind in _UNARY_MODULES and x is not None and len(node.args) == 1:
                chan[node] = x
                continue
            if isinstance(mod, nn.Embedding) and shape is not None:
                s = sp.new(mod.embedding_dim)
                out = Chan(len(shape) - 1, ((s, mod.embedding_dim),))
                member(node.target, mod, "weight", 1, out)
                chan[node] = out
                continue
            if isinstance(mod, nn.Flatten) and x is not None:
                _reshape(node, x, chan, barrier)
                continue
            barrier(node, f"module {node.target} ({kind}) is not modelled")
            continue
        # call_function / call_method
        name = _fn_name(node.target)
        if name in _SHAPE_ONLY or shape is None:
            if name not in _SHAPE_ONLY and ins:
                barrier(node, f"{name} returns a non-tensor")
            continue
        if name == "getitem":
            barrier(node, "indexing")
            continue
        if name in _UNARY_FUNCTIONS and ins:
            if len(ins) == 1 and not consts:
                chan[node] = chan[ins[0]]
            else:
                barrier(node, f"{name} with several tensor arguments")
            continue
        if name in _BINARY:
            out_chan = None
            ok = True
            for a in ins:
                c = chan[a]
                a_shape = _shape(a)
                offset = len(shape) - len(a_shape)  # broadcasting aligns axes from the right
                if a_shape[c.dim] == 1:
                    continue  # broadcast over channels: no constraint
                cand = Chan(c.dim + offset, c.segments)
                if out_chan is None:
                    out_chan = cand
                elif out_chan.dim != cand.dim or not unify(out_chan, cand, f"{name} joins tensors of different channel layouts"):
                    ok = False
            # any other tensor operand (a constant, or a tensor the tracer does not follow) must
            # not vary along the channel axis
            for a in _tensor_args(node):
                if a in ins or out_chan is None:
                    continue
                a_shape = _shape(a)
                axis = out_chan.dim - (len(shape) - len(a_shape)) if a_shape is not None else -1
                if a_shape is None or (0 <= axis < len(a_shape) and a_shape[axis] != 1):
                    ok = False
            if not ok:
                barrier(node, f"{name} with an operand of another channel layout (or a per-channel constant)")
            elif out_chan is not None:
                chan[node] = out_chan
            elif _tensor_args(node):
                barrier(node, f"{name} of tensors without a tracked channel axis")
            continue
        if name in ("cat", "concat"):
            tensors = list(node.args[0]) if node.args else []
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            cs = [chan.get(t) for t in tensors]
            if any(c is None for c in cs) or len({c.dim for c in cs}) != 1:
                barrier(node, "concatenation of tensors without a known channel axis")
                continue
            cdim = cs[0].dim
            if dim < 0:
                dim += len(shape)
            if dim == cdim:
                chan[node] = Chan(cdim, tuple(seg for c in cs for seg in c.segments))
            else:
                first = cs[0]
                if all(unify(first, c, "concatenation of different channel layouts") for c in cs[1:]):
                    chan[node] = first
                else:
                    barrier(node, "concatenation of different channel layouts")
            continue
        if name in _REDUCE and ins:
            c = chan[ins[0]]
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            if dims is None:
                barrier(node, f"{name} over all axes")
                continue
            in_rank = len(_shape(ins[0]))
            dims = [d % in_rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
            if c.dim in dims:
                barrier(node, f"{name} over the channel axis")
                continue
            chan[node] = Chan(c.dim if keep else c.dim - sum(d < c.dim for d in dims), c.segments)
            continue
        if name in ("pad",) and ins:
            pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
            c = chan[ins[0]]
            in_rank = len(_shape(ins[0]))
            if pads is not None and len(pads) // 2 <= in_rank - 1 - c.dim:
                chan[node] = c
            else:
                barrier(node, "padding of the channel axis")
            continue
        if name in _RESHAPE and ins:
            _reshape(node, chan[ins[0]], chan, barrier)
            continue
        if name in ("transpose", "permute") and ins:
            c = chan[ins[0]]
            rank = len(_shape(ins[0]))
            if name == "transpose":
                a, b = (d % rank for d in node.args[1:3])
                new = b if c.dim == a else a if c.dim == b else c.dim
            else:
                order = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
                new = [d % rank for d in order].index(c.dim)
            chan[node] = Chan(new, c.segments)
            continue
        barrier(node, f"{name} is not modelled")
    return sp, notes


def _reshape(node, c: Chan, chan: dict, barrier) -> None:
    """A reshape keeps the channel order when some output axis has the channel size and the
    element counts before and after it are unchanged (the channel stride is the same)."""
    src, dst = _shape(node.args[0]), _shape(node)
    before, after = int(np.prod(src[:c.dim])), int(np.prod(src[c.dim + 1:]))
    for d, n in enumerate(dst):
        if n == c.size and int(np.prod(dst[:d])) == before and int(np.prod(dst[d + 1:])) == after:
            chan[node] = Chan(d, c.segments)
            return
    barrier(node, "reshape that splits or merges the channel axis")


def _tensor_args(node):
    import torch.fx as fx

    return [a for a in _flatten((node.args, node.kwargs)) if isinstance(a, fx.Node)]


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _flatten(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flatten(v)
    else:
        yield x


# -- choosing a permutation ----------------------------------------------------------------------

def cluster(profiles: list[np.ndarray], block: int, iterations: int = 200, seconds: float = 20.0) -> np.ndarray:
    """Order of N rows so that consecutive runs of `block` rows have similar profiles.

    profiles: one [N, C_p] non-negative matrix per producer (squared norms, normalised).
    Returns perm with new row i = old row perm[i].
    """
    n = profiles[0].shape[0]
    gram = sum(p @ p.T for p in profiles).astype(np.float64)
    np.fill_diagonal(gram, 0.0)
    n_groups = -(-n // block)
    sizes = [block] * (n_groups - 1) + [n - block * (n_groups - 1)]
    # greedy seeded clustering: heaviest free row seeds a group, then the rows most similar to it
    strength = sum((p * p).sum(1) for p in profiles)
    free = np.ones(n, bool)
    groups = []
    for size in sizes:
        seed = int(np.argmax(np.where(free, strength, -np.inf)))
        free[seed] = False
        members = [seed]
        affinity = gram[seed].copy()
        for _ in range(size - 1):
            j = int(np.argmax(np.where(free, affinity, -np.inf)))
            free[j] = False
            members.append(j)
            affinity += gram[j]
        groups.append(members)
    grp = np.empty(n, np.int64)
    for g, members in enumerate(groups):
        grp[members] = g
    # pairwise swaps between groups (disjoint group pairs per round keep the gains exact)
    onehot = np.zeros((n, n_groups))
    onehot[np.arange(n), grp] = 1.0
    aff = gram @ onehot  # aff[i, g]: similarity of row i to the members of group g
    deadline = time.monotonic() + seconds
    for _ in range(iterations):
        own = aff[np.arange(n), grp]
        gain = aff[:, grp].T + aff[:, grp] - 2 * gram - own[:, None] - own[None, :]
        gain[grp[:, None] == grp[None, :]] = -np.inf
        best_b = np.argmax(gain, axis=1)
        best = gain[np.arange(n), best_b]
        order = np.argsort(-best)
        used = set()
        applied = 0
        for a in order:
            if best[a] <= 1e-12 * max(1.0, abs(own).max()):
                break
            b = int(best_b[a])
            ga, gb = int(grp[a]), int(grp[b])
            if ga in used or gb in used:
                continue
            used.update((ga, gb))
            aff[:, ga] += gram[:, b] - gram[:, a]
            aff[:, gb] += gram[:, a] - gram[:, b]
            grp[a], grp[b] = gb, ga
            applied += 1
        if not applied or time.monotonic() > deadline:
            break
    return np.concatenate([np.flatnonzero(grp == g) for g in range(n_groups)])


def retained(weights: list[tuple[np.ndarray, int, float, np.ndarray | None]], remainder: str) -> float:
    """Magnitude mass kept by group pruning, summed over producers (each normalised to 1)."""
    total = 0.0
    for w, block, sparsity, scale in weights:
        per = channel_norms(w, "l2")
        if scale is not None:
            per = per * np.asarray(scale, np.float64).reshape(1, -1) ** 2
        if per.sum() == 0:
            total += 1.0
            continue
        mask = group_mask(group_scores(w, block, "l2", remainder, scale), sparsity)
        total += float((per * expand_mask(mask, block, per.shape)).sum() / per.sum())
    return total


def apply(spaces: Spaces, perms: dict[int, np.ndarray]) -> None:
    """Permute every parameter dimension whose channel descriptor touches a permuted space."""
    import torch

    for m in spaces.members:
        roots = [(spaces.find(s), n) for s, n in m.segments]
        if not any(r in perms for r, _ in roots):
            continue
        index, offset = [], 0
        for r, n in roots:
            p = perms.get(r)
            index.append((p if p is not None else np.arange(n)) + offset)
            offset += n
        idx = torch.as_tensor(np.concatenate(index), dtype=torch.long)
        t = getattr(m.module, m.attr)
        with torch.no_grad():
            t.data = t.data.index_select(m.dim, idx.to(t.device)).contiguous()


def inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv
