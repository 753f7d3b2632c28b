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
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir  # noqa: F401  (the graph type passes receive)

from edgesparse import EdgesparseError, Option, Pass, graph, hookimpl, in_range
from edgesparse import kernels

__version__ = "0.1.0"


def prune_blocks(weight: np.ndarray, sparsity: float, block: int) -> np.ndarray:
    """Zero the lowest-L2 blocks of a MatMul weight [K, N] (blocks of `block` outputs x 1 input)
    or a Conv weight [O, C, kh, kw] (`block` output channels x 1 input channel x all taps).
    Ties break by position."""
    conv = weight.ndim == 4
    w = weight.reshape(weight.shape[0], weight.shape[1], -1).transpose(1, 2, 0) if conv else weight[:, None, :]
    k, taps, n = w.shape  # [inputs, taps, outputs]
    padded = np.zeros((k, taps, -(-n // block) * block), weight.dtype)
    padded[:, :, :n] = w
    blocks = padded.reshape(k, taps, -1, block)
    norms = np.sqrt((blocks.astype(np.float64) ** 2).sum(axis=(1, 3))).ravel()  # [k * n_blocks]
    drop = int(round(sparsity * norms.size))
    mask = np.ones(norms.size, bool)
    mask[np.argsort(norms, kind="stable")[:drop]] = False
    pruned = (blocks * mask.reshape(k, 1, -1, 1)).reshape(k, taps, -1)[:, :, :n]
    if conv:
        return pruned.transpose(2, 0, 1).reshape(weight.shape).copy()
    return pruned[:, 0, :].copy()


class Magnitude(Pass):
    name = "magnitude"
    summary = "block-wise magnitude pruning of MatMul/Gemm/Conv weights into block-sparse operators"
    options = (
        Option("sparsity", float, 0.75, "fraction of weight blocks set to zero in each pruned layer",
               check=in_range(0.0, 1.0, hi_open=True)),
        Option("block", int, 16, "consecutive output features pruned together", choices=(4, 8, 16)),
        Option("skip", tuple, (), "layers to leave dense: node-name substrings, ';'-separated"),
        Option("min_features", int, 64, "leave layers with fewer input or output features dense",
               check=lambda v: None if v >= 1 else "must be at least 1"),
        Option("dispatch", str, "target", "target: keep a layer dense where the target's measured dispatch table "
               "says sparse is slower; off: make every eligible layer sparse (tests, experiments)",
               choices=("target", "off")),
    )
    needs = "none"
    emits = (f"{kernels.DOMAIN}::{graph.BLOCK_SPARSE_MATMUL}", f"{kernels.DOMAIN}::{graph.BLOCK_SPARSE_CONV}")

    def rewrite_graph(self, model: ir.Model, ctx) -> None:
        layers = list(graph.layers(model, kinds=("matmul", "conv", "conv1d"), unsupported=True))
        if not layers:
            raise EdgesparseError("magnitude: the model has no MatMul/Gemm/Conv with a constant weight to prune"
                                  + _where_the_layers_are(model))
        pruned, dense = [], []
        for layer in ctx.progress(layers, "magnitude pruning"):
            shape = list(layer.weight.shape)
            reason = self._keep_dense_reason(layer, ctx)
            if reason:
                dense.append({"layer": layer.name, "shape": shape, "reason": reason})
                continue
            weight = prune_blocks(layer.weight.astype(np.float32), self.sparsity, self.block)  # fp16 too: kernels take fp32
            if layer.kind != "matmul":
                graph.replace_with_block_sparse_conv(model, layer, weight, self.block)
            else:
                graph.replace_with_block_sparse_matmul(model, layer, weight, self.block)
            pruned.append({"layer": layer.name, "shape": shape, "sparsity": float((weight == 0).mean())}
                          | ({"weight_dtype": layer.stored_dtype} if layer.stored_dtype != "float32" else {}))
        if not pruned:
            ctx.warn("no layer was pruned: every candidate stays dense (see kept_dense in the report)")
        ctx.report("pruned", pruned)
        ctx.report("kept_dense", dense)

    def _keep_dense_reason(self, layer, ctx) -> str | None:
        if layer.unsupported:
            return layer.unsupported
        if any(s and s in layer.name for s in self.skip):
            return "skipped by option"
        if layer.weight.dtype not in (np.float32, np.float16):
            return f"weights are {layer.weight.dtype}, kernels take float32 (float16 layers are cast around them)"
        if layer.kind != "matmul":
            attrs = graph.conv_geometry(layer)
            if attrs["group"] != 1:
                return "grouped or depthwise conv"
            o, c, kh, kw = layer.weight.shape
            op, shape = graph.BLOCK_SPARSE_CONV, {"C": c, "O": o, "kernel": [kh, kw], "stride": attrs["strides"][-1]}
            features = min(o, c)
        else:
            k, n = layer.weight.shape
            op, shape, features = graph.BLOCK_SPARSE_MATMUL, {"K": k, "N": n}, min(k, n)
        if features < self.min_features:
            return f"fewer than {self.min_features} features"
        if self.dispatch == "target" and not ctx.target.prefers_sparse(op, shape, self.sparsity, self.block, ctx.threads):
            return f"the sparse kernel would be slower than dense on {ctx.target.name} at this sparsity"
        return None


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
