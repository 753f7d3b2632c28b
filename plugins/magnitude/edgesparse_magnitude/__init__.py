"""The `magnitude` pass: block-wise magnitude pruning of MatMul/Gemm weights, emitting
edgesparse's block-sparse MatMul. It works on any ONNX model (no PyTorch needed) and is the
baseline every other pass is compared with.

Blocks are `block` consecutive output features x 1 input feature, the shape the kernels skip.
Within each layer, the blocks with the smallest L2 norm are zeroed until `sparsity` of them are.
Layers the target's dispatch rule says would not get faster stay dense and unpruned: pruning them
would cost accuracy and buy no time.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir  # noqa: F401  (the graph type passes receive)

from edgesparse import EdgesparseError, Option, Pass, graph, hookimpl, in_range
from edgesparse import kernels

__version__ = "0.1.0"
OP = graph.BLOCK_SPARSE_MATMUL


def prune_blocks(weight: np.ndarray, sparsity: float, block: int) -> np.ndarray:
    """Zero the lowest-L2 blocks of `block` output features x 1 input. Ties break by position."""
    k, n = weight.shape
    padded = np.zeros((k, -(-n // block) * block), weight.dtype)
    padded[:, :n] = weight
    blocks = padded.reshape(k, -1, block)
    norms = np.sqrt((blocks.astype(np.float64) ** 2).sum(-1)).ravel()
    drop = int(round(sparsity * norms.size))
    order = np.argsort(norms, kind="stable")[:drop]
    mask = np.ones(norms.size, bool)
    mask[order] = False
    blocks = blocks * mask.reshape(k, -1, 1)
    return blocks.reshape(k, -1)[:, :n].copy()


class Magnitude(Pass):
    name = "magnitude"
    summary = "block-wise magnitude pruning of MatMul/Gemm weights into block-sparse operators"
    options = (
        Option("sparsity", float, 0.75, "fraction of weight blocks set to zero in each pruned layer",
               check=in_range(0.0, 1.0, hi_open=True)),
        Option("block", int, 16, "consecutive output features pruned together", choices=(4, 8, 16)),
        Option("skip", tuple, (), "layers to leave dense: node-name substrings, ';'-separated"),
        Option("min_features", int, 64, "leave layers with fewer input or output features dense",
               check=lambda v: None if v >= 1 else "must be at least 1"),
    )
    needs = "none"
    emits = (f"{kernels.DOMAIN}::{OP}",)

    def rewrite_graph(self, model: ir.Model, ctx) -> None:
        layers = list(graph.layers(model, kinds=("matmul",)))
        if not layers:
            raise EdgesparseError("magnitude: the model has no MatMul/Gemm with a constant weight to prune")
        pruned, dense = [], []
        for layer in ctx.progress(layers, "magnitude pruning"):
            k, n = layer.weight.shape
            reason = self._keep_dense_reason(layer, ctx)
            if reason:
                dense.append({"layer": layer.name, "shape": [k, n], "reason": reason})
                continue
            weight = prune_blocks(layer.weight.astype(np.float32), self.sparsity, self.block)
            graph.replace_with_block_sparse_matmul(model, layer, weight, self.block)
            pruned.append({"layer": layer.name, "shape": [k, n], "sparsity": float((weight == 0).mean())})
        if not pruned:
            ctx.warn("no layer was pruned: every candidate stays dense (see kept_dense in the report)")
        ctx.report("pruned", pruned)
        ctx.report("kept_dense", dense)

    def _keep_dense_reason(self, layer, ctx) -> str | None:
        k, n = layer.weight.shape
        if any(s and s in layer.name for s in self.skip):
            return "skipped by option"
        if min(k, n) < self.min_features:
            return f"fewer than {self.min_features} features"
        if layer.weight.dtype != np.float32:
            return f"weights are {layer.weight.dtype}, kernels take float32"
        if not ctx.target.prefers_sparse(OP, {"K": k, "N": n}, self.sparsity, self.block, ctx.threads):
            return f"the sparse kernel would be slower than dense on {ctx.target.name} at this sparsity"
        return None


@hookimpl
def register_passes(register):
    register(Magnitude)
