"""The `magnitude` pass: block-wise magnitude pruning of MatMul/Gemm and Conv weights, emitting
edgesparse's block-sparse MatMul and Conv. It works on any ONNX model (no PyTorch needed) and is
the baseline every other pass is compared with.

Blocks are `block` consecutive output features (channels) x 1 input feature (channel) x all
kernel taps, the shape the kernels skip. Within each layer, the blocks with the smallest L2 norm
are zeroed until `sparsity` of them are. Grouped and depthwise convs stay dense: each output
channel there sees few inputs, so there is nothing for a block to skip in bulk.
Layers the target's dispatch rule says would not get faster stay dense and unpruned: pruning them
would cost accuracy and buy no time. `dispatch=off` skips that question (every eligible layer is
pruned, whatever the host): the documented switch for tests and experiments.

`sparsity=auto` chooses a sparsity per layer instead (0 for layers it leaves dense): the most speed
the target's measured dispatch table predicts within the build's quality budget (`--min-quality`),
by the search of edgesparse.allocation on held-out inputs: each candidate allocation is pruned as
the pass would prune it and run densely (ONNX Runtime, the pruned weights) against the original
model with the budget's own metrics. It works on ONNX inputs and factories alike, in the ONNX stage
(with recover_steps=0).

With a model factory and `recover_steps` > 0 a torch stage runs first (gradual.py): the same layers,
the same blocks, reached gradually with recovery in between; the ONNX stage then packs the weights
it finds already pruned. ONNX inputs, and recover_steps=0, are pruned once in the ONNX graph.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir  # noqa: F401  (the graph type passes receive)

from edgesparse import EdgesparseError, Option, Pass, allocation, graph, hookimpl, in_range
from edgesparse import kernels

__version__ = "0.1.0"


def keep_blocks(weight: np.ndarray, sparsity: float, block: int) -> np.ndarray:
    """The weights to keep (bool, the weight's shape) when the lowest-L2 blocks of a MatMul weight
    [K, N] (blocks of `block` outputs x 1 input) or a Conv weight [O, C, kh, kw] (`block` output
    channels x 1 input channel x all taps) are zeroed until `sparsity` of them are. Ties break by
    position, so blocks already zero are the first to go: pruning a pruned weight again at the same
    sparsity keeps it as it is."""
    conv = weight.ndim == 4
    w = weight.reshape(weight.shape[0], weight.shape[1], -1).transpose(1, 2, 0) if conv else weight[:, None, :]
    k, taps, n = w.shape  # [inputs, taps, outputs]
    n_blocks = -(-n // block)
    padded = np.zeros((k, taps, n_blocks * block), np.float64)
    padded[:, :, :n] = w
    norms = np.sqrt((padded.reshape(k, taps, n_blocks, block) ** 2).sum(axis=(1, 3))).ravel()  # [k * n_blocks]
    drop = int(round(sparsity * norms.size))
    mask = np.ones(norms.size, bool)
    mask[np.argsort(norms, kind="stable")[:drop]] = False
    keep = np.broadcast_to(mask.reshape(k, 1, n_blocks, 1), (k, taps, n_blocks, block)).reshape(k, taps, -1)[:, :, :n]
    if conv:
        return keep.transpose(2, 0, 1).reshape(weight.shape).copy()
    return keep[:, 0, :].copy()


def prune_blocks(weight: np.ndarray, sparsity: float, block: int) -> np.ndarray:
    """`weight` with the blocks `keep_blocks` drops set to zero."""
    return np.where(keep_blocks(weight, sparsity, block), weight, 0).astype(weight.dtype)


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


class Magnitude(Pass):
    name = "magnitude"
    summary = "block-wise magnitude pruning of MatMul/Gemm/Conv weights into block-sparse operators"
    options = (
        Option("sparsity", float, 0.75, "fraction of weight blocks set to zero in each pruned layer; 'auto': per-layer "
               "sparsities chosen for the most predicted speed within the build's --min-quality budget "
               "(edgesparse.allocation)", check=in_range(0.0, 1.0, hi_open=True), words=(allocation.AUTO,)),
        Option("block", int, 16, "consecutive output features pruned together", choices=(4, 8, 16)),
        Option("skip", tuple, (), "layers to leave dense: node-name (torch stage: module-name) substrings, ';'-separated"),
        Option("min_features", int, 64, "leave layers with fewer input or output features dense",
               check=lambda v: None if v >= 1 else "must be at least 1"),
        Option("dispatch", str, "target", "target: keep a layer dense where the target's measured dispatch table "
               "says sparse is slower; off: make every eligible layer sparse (tests, experiments)",
               choices=("target", "off")),
        Option("recover_steps", int, 0, "model factories: prune in PyTorch, gradually, with this many recovery steps "
               "in all (0: prune once, in the ONNX graph; ONNX inputs are always pruned once)", check=_non_negative),
        Option("recover_seconds", float, 600.0, "time budget of the recovery (0: no limit)", check=_non_negative),
        Option("prune_stages", int, 4, "with recovery: reach the sparsity in this many steps of a cubic schedule, "
               "each followed by its share of the recovery steps", check=lambda v: None if v >= 1 else "must be at least 1"),
        Option("recovery", str, "distill", "'distill': from the unpruned model on the calibration inputs; "
               "'train': the model's own training loop (TorchModel.train)", choices=("distill", "train")),
        Option("lr", float, 1e-4, "distillation learning rate (Adam)",
               check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]"),
        Option("distill_layers", bool, False, "also distil the outputs of every pruned layer (layer-wise)"),
        Option("distill_loss", str, "auto", "on the outputs: KL of softened logits, MSE, or auto (KL for 2-D "
               "outputs of several columns)", choices=("auto", "kl", "mse")),
    )
    needs = "none"
    emits = (f"{kernels.DOMAIN}::{graph.BLOCK_SPARSE_MATMUL}", f"{kernels.DOMAIN}::{graph.BLOCK_SPARSE_CONV}")

    def __init__(self, **values):
        super().__init__(**values)
        self._pruned_in_torch: dict[str, str] | None = None  # digest of each weight the torch stage pruned -> its module

    def requires_torch(self) -> bool:
        return self.recover_steps > 0

    @property
    def auto(self) -> bool:
        return self.sparsity == allocation.AUTO

    # -- torch stage (factories with recover_steps > 0) ---------------------------------------------
    def transform_module(self, module, ctx):
        if self.recover_steps == 0:
            return module  # pruned once, in the ONNX stage
        if self.auto:
            raise EdgesparseError("magnitude: sparsity=auto searches in the ONNX stage, one-shot: it does not combine "
                                  "with recover_steps (use recover_steps=0, or a fixed sparsity)")
        from . import gradual

        module.eval()
        layers = gradual.torch_layers(module, ctx.calibration_inputs()[0])
        if not layers:
            raise EdgesparseError("magnitude: the module runs no nn.Linear or nn.Conv2d to prune")
        chosen, dense = [], []
        for layer in layers:
            reason = self._dense_reason(layer.name, layer.kind, layer.onnx_weight(), layer.group, layer.stride, ctx)
            if reason:
                dense.append({"layer": layer.name, "shape": list(layer.onnx_weight().shape), "reason": reason})
            else:
                chosen.append(layer)
        report = {"mode": "none"}
        if chosen:
            report = gradual.prune_gradually(module, chosen, lambda w, s: keep_blocks(w, s, self.block), self, ctx)
            if "cut_by_budget" in report:
                ctx.warn(f"recovery cut short by its time budget: {report['steps']} of {report['steps_requested']} "
                         f"steps in {report['seconds']:.0f} s (recover_seconds={self.recover_seconds:g}; 0 = no limit)")
        self._pruned_in_torch = {gradual.digest(l.onnx_weight()): l.name for l in chosen}
        ctx.report("torch_stage", {"pruned": [l.name for l in chosen], "kept_dense": dense})
        ctx.report("recovery", report)
        return module

    # -- ONNX stage ---------------------------------------------------------------------------------
    def rewrite_graph(self, model: ir.Model, ctx) -> None:
        layers = list(graph.layers(model, kinds=("matmul", "conv", "conv1d"), unsupported=True))
        if not layers:
            raise EdgesparseError("magnitude: the model has no MatMul/Gemm/Conv with a constant weight to prune"
                                  + _where_the_layers_are(model))
        pruned, dense = [], []
        found = set()
        chosen = self._auto(model, layers, ctx) if self.auto and self._pruned_in_torch is None else None
        for layer in ctx.progress(layers, "magnitude pruning"):
            shape = list(layer.weight.shape)
            if self._pruned_in_torch is None:
                reason = self._keep_dense_reason(layer, ctx)
            else:  # the torch stage decided, and its weights are pruned already
                from .gradual import digest

                module = self._pruned_in_torch.get(digest(layer.weight))
                found.add(module)
                reason = None if module else "left dense by the torch stage (see torch_stage.kept_dense)"
            if chosen is not None and not reason and not chosen.get(layer.name):
                reason = ("sparsity=auto left it dense (see auto in the report)" if layer.name in chosen
                          else "the sparse kernel would not be faster than dense at any sparsity sparsity=auto tries")
            if reason:
                dense.append({"layer": layer.name, "shape": shape, "reason": reason})
                continue
            sparsity = chosen[layer.name] if chosen is not None else self.sparsity
            weight = prune_blocks(layer.weight.astype(np.float32), sparsity, self.block)  # fp16 too: kernels take fp32
            if self._pruned_in_torch is not None and not np.array_equal(weight, layer.weight):
                raise EdgesparseError(f"magnitude: {layer.name} lost weights the torch stage kept (it should be pruned already)")
            if layer.kind != "matmul":
                graph.replace_with_block_sparse_conv(model, layer, weight, self.block)
            else:
                graph.replace_with_block_sparse_matmul(model, layer, weight, self.block)
            pruned.append({"layer": layer.name, "shape": shape, "sparsity": float((weight == 0).mean())}
                          | ({"weight_dtype": layer.stored_dtype} if layer.stored_dtype != "float32" else {}))
        lost = sorted(set((self._pruned_in_torch or {}).values()) - found)
        if lost:
            ctx.warn(f"{len(lost)} layer(s) pruned in PyTorch are not a MatMul/Gemm/Conv with a constant weight in the "
                     f"ONNX graph and run dense ({', '.join(lost[:3])}{', ...' if len(lost) > 3 else ''})")
        if not pruned:
            ctx.warn("no layer was pruned: every candidate stays dense (see kept_dense in the report)")
        ctx.report("pruned", pruned)
        ctx.report("kept_dense", dense)

    def _keep_dense_reason(self, layer, ctx) -> str | None:
        if layer.unsupported:
            return layer.unsupported
        attrs = graph.conv_geometry(layer) if layer.kind != "matmul" else {"group": 1, "strides": [1]}
        return self._dense_reason(layer.name, layer.kind, layer.weight, attrs["group"], attrs["strides"][-1], ctx)

    def _auto(self, model: ir.Model, layers, ctx) -> dict[str, float]:
        """sparsity=auto (edgesparse.allocation): {layer name: sparsity} for the layers that may go
        sparse, chosen within the build's quality budget."""
        import onnx

        from edgesparse import verify

        allocation.require_budget(ctx, self.name)
        proto = ir.to_proto(model)
        try:
            shapes = verify.value_shapes(onnx.shape_inference.infer_shapes(proto))
        except Exception:  # noqa: BLE001 - shapes only weigh the layers; without them every layer counts once
            shapes = {}
        candidates = []
        for layer in layers:
            if self._keep_dense_reason(layer, ctx) is not None:
                continue
            op, shape = self._dispatch_shape(layer)
            tokens = _tokens(shapes.get(layer.input.name), layer, shape)
            shape.update(tokens[1])
            entry = allocation.Layer(layer.name, op, shape, self.block, int(layer.weight.size),
                                     float(layer.weight.size) * tokens[0])
            allowed = None if self.dispatch == "target" else (lambda s: True)
            entry.levels = allocation.levels(ctx, entry, allowed)
            if entry.levels:
                candidates.append(entry)
        if not candidates:
            raise EdgesparseError(f"magnitude: sparsity=auto found no layer that the target's dispatch rule says would "
                                  f"run faster sparse on {ctx.target.name}")
        library = ctx.kernel_library(kernels.DOMAIN)

        def runner(sparsities: dict) -> object:
            """The model with these layers pruned, as the pass would prune them, run densely."""
            candidate = ir.from_proto(proto)
            found = {l.name: l for l in graph.layers(candidate, kinds=("matmul", "conv", "conv1d"), unsupported=True)}
            for name, s in sparsities.items():
                if s > 0:
                    layer = found[name]
                    weight = prune_blocks(layer.weight.astype(np.float32), s, self.block)
                    if layer.kind != "matmul":
                        graph.replace_with_block_sparse_conv(candidate, layer, weight, self.block)
                    else:
                        graph.replace_with_block_sparse_matmul(candidate, layer, weight, self.block)
            dense = verify.dense_equivalent(ir.to_proto(candidate), [library])
            return allocation.onnx_runner(dense, ctx.threads)

        def prune_alone(entry, s):
            holder["run"] = runner({entry.name: s})
            return lambda: holder.update(run=base)

        base = allocation.onnx_runner(proto, ctx.threads)
        holder = {"run": base}
        held, where = allocation.held_out(ctx)
        allocation.sensitivities(candidates, lambda b: holder["run"](b), held, prune_alone)
        chosen = allocation.search(candidates, lambda a: ctx.measure_quality(runner(a)), self.name, ctx)
        ctx.reports[self.name]["auto"]["sensitivity_inputs"] = where
        return chosen

    @staticmethod
    def _dispatch_shape(layer) -> tuple[str, dict]:
        if layer.kind == "matmul":
            k, n = layer.weight.shape
            return graph.BLOCK_SPARSE_MATMUL, {"K": int(k), "N": int(n)}
        o, c, kh, kw = layer.weight.shape
        stride = graph.conv_geometry(layer)["strides"][-1]
        return graph.BLOCK_SPARSE_CONV, {"C": int(c), "O": int(o), "kernel": [int(kh), int(kw)], "stride": int(stride)}

    def _dense_reason(self, name: str, kind: str, weight: np.ndarray, group: int, stride: int, ctx) -> str | None:
        """Why a layer stays dense, or None; one rule for both stages. `weight` as in the ONNX graph:
        [K, N] for a matmul, [O, C, kh, kw] for a conv. With sparsity=auto the dispatch question is
        left to the search (it asks it at each sparsity it tries)."""
        if any(s and s in name for s in self.skip):
            return "skipped by option"
        if weight.dtype not in (np.float32, np.float16):
            return f"weights are {weight.dtype}, kernels take float32 (float16 layers are cast around them)"
        if kind != "matmul":
            if group != 1:
                return "grouped or depthwise conv"
            o, c, kh, kw = weight.shape
            op, shape = graph.BLOCK_SPARSE_CONV, {"C": c, "O": o, "kernel": [kh, kw], "stride": stride}
            features = min(o, c)
        else:
            k, n = weight.shape
            op, shape, features = graph.BLOCK_SPARSE_MATMUL, {"K": k, "N": n}, min(k, n)
        if features < self.min_features:
            return f"fewer than {self.min_features} features"
        if self.dispatch == "target" and not self.auto and \
                not ctx.target.prefers_sparse(op, shape, self.sparsity, self.block, ctx.threads):
            return f"the sparse kernel would be slower than dense on {ctx.target.name} at this sparsity"
        return None


def _tokens(dims, layer, shape: dict) -> tuple[float, dict]:
    """(rows or output positions per run, the dispatch keys that say so) from the layer's input shape
    as shape inference gives it; a symbolic dim counts as 1 (a batch of one: the edge case)."""
    if not dims:
        return 1.0, {}
    known = [d if isinstance(d, int) and d > 0 else 1 for d in dims]
    if layer.kind == "matmul":
        m = int(np.prod(known[:-1])) if len(known) > 1 else 1
        return float(max(m, 1)), {"M": max(m, 1)}
    if len(known) == 4:
        h, w = known[2], known[3]
        return max(h * w / shape["stride"] ** 2, 1.0), {"H": h, "W": w}
    return 1.0, {}


def _where_the_layers_are(model: ir.Model) -> str:
    """Why a model with layers has none to prune: they sit in If/Loop branches or are quantized."""
    ops = {(n.op_type, n.graph is model.graph) for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    if any(op in ("MatMul", "Gemm", "Conv") and not top for op, top in ops):
        return " (its layers sit inside If/Loop branches, which magnitude leaves as they are)"
    quantized = sorted({op for op, _ in ops if op in ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLSTM")})
    if quantized:
        return f" (its layers are quantized: {', '.join(quantized)})"
    return ""


@hookimpl
def register_passes(register):
    register(Magnitude)
