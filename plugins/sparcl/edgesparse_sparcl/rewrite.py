"""The `sparcl` pass: keep the masks a model learned (with the SparCL trainer, or any other
training that left block-structured zeros) and run those layers on edgesparse's block-sparse
operators. It prunes nothing itself: a layer whose weights are already zero in groups of B output
channels x 1 input channel (x all taps) becomes a BlockSparseConv / BlockSparseMatMul holding the
same weights, so the package computes exactly what the trained model computes.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir  # noqa: F401  (the graph type passes receive)

from edgesparse import EdgesparseError, Option, Pass, graph, in_range
from edgesparse import kernels


def group_sparsity(weight: np.ndarray, kind: str, block: int) -> float:
    """Fraction of all-zero groups of `block` outputs x 1 input (x taps) in a Conv weight
    [O, C, kh, kw] or a MatMul weight [K, N]."""
    w = np.asarray(weight)
    if kind == "conv":
        o, c = w.shape[:2]
        groups = np.zeros((-(-o // block) * block, c), bool)
        groups[:o] = np.any(w.reshape(o, c, -1) != 0, axis=2)
        nz = groups.reshape(-1, block, c).any(axis=1)
    else:
        k, n = w.shape
        padded = np.zeros((k, -(-n // block) * block), bool)
        padded[:, :n] = w != 0
        nz = padded.reshape(k, -1, block).any(axis=2)
    return 1.0 - float(nz.mean()) if nz.size else 0.0


def best_block(weight: np.ndarray, kind: str, blocks=(16, 8, 4)) -> tuple[int, float]:
    """The largest block size whose group sparsity is (within 2%) the best one available."""
    found = {b: group_sparsity(weight, kind, b) for b in blocks}
    top = max(found.values())
    for b in blocks:
        if found[b] >= top - 0.02:
            return b, found[b]
    return blocks[-1], found[blocks[-1]]  # pragma: no cover


class Sparcl(Pass):
    name = "sparcl"
    summary = "keep a model's learned block-sparse masks: layers already zero in kernel-sized groups become block-sparse operators"
    options = (
        Option("block", int, 0, "group size B (output channels per group); 0: the largest B the zeros fit",
               choices=(0, 4, 8, 16)),
        Option("min_sparsity", float, 0.3, "layers with a smaller fraction of zero groups stay dense",
               check=in_range(0.0, 1.0, hi_open=True)),
        Option("dispatch", bool, True, "ask the target's measured dispatch rule and keep layers dense where the "
               "sparse kernel would be slower (false: every block-sparse layer becomes a sparse operator)"),
        Option("skip", tuple, (), "layers to leave dense: node-name substrings, ';'-separated"),
    )
    needs = "none"
    emits = (f"{kernels.DOMAIN}::{graph.BLOCK_SPARSE_MATMUL}", f"{kernels.DOMAIN}::{graph.BLOCK_SPARSE_CONV}")

    def rewrite_graph(self, model: ir.Model, ctx) -> None:
        layers = list(graph.layers(model, kinds=("matmul", "conv")))
        if not layers:
            raise EdgesparseError("sparcl: the model has no MatMul/Gemm/Conv with a constant weight")
        sparse_layers, dense = [], []
        for layer in ctx.progress(layers, "sparcl: learned masks"):
            shape = list(layer.weight.shape)
            weight = layer.weight.astype(np.float32) if layer.weight.dtype != np.float32 else layer.weight
            if self.block:
                block, sparsity = self.block, group_sparsity(weight, layer.kind, self.block)
            else:
                block, sparsity = best_block(weight, layer.kind)
            reason = self._keep_dense_reason(layer, block, sparsity, ctx)
            if reason:
                dense.append({"layer": layer.name, "shape": shape, "group_sparsity": round(sparsity, 4), "reason": reason})
                continue
            if layer.kind == "conv":
                graph.replace_with_block_sparse_conv(model, layer, weight, block)
            else:
                graph.replace_with_block_sparse_matmul(model, layer, weight, block)
            sparse_layers.append({"layer": layer.name, "op": layer.kind, "shape": shape, "block": block,
                                  "sparsity": round(sparsity, 4)})
        if not sparse_layers:
            ctx.warn("no layer holds block-sparse weights the target runs faster sparse: the package is dense "
                     "(see kept_dense in the report)")
        ctx.report("sparse", sparse_layers)
        ctx.report("kept_dense", dense)

    def _keep_dense_reason(self, layer, block: int, sparsity: float, ctx) -> str | None:
        if any(s and s in layer.name for s in self.skip):
            return "skipped by option"
        if layer.weight.dtype != np.float32:
            return f"weights are {layer.weight.dtype}, kernels take float32"
        if sparsity < self.min_sparsity:
            return f"only {sparsity:.0%} of its {block}x1 groups are zero (min_sparsity {self.min_sparsity:.0%})"
        if layer.kind == "conv":
            attrs = graph.attributes(layer.node)
            if attrs.get("group", 1) != 1:
                return "grouped or depthwise conv"
            o, c, kh, kw = layer.weight.shape
            op = graph.BLOCK_SPARSE_CONV
            # the dispatch table matches square kernels given as one int ([kh, kw] finds no entry)
            shape = {"C": c, "O": o, "kernel": kh if kh == kw else [kh, kw],
                     "stride": list(attrs.get("strides", [1, 1]))[0]}
        else:
            k, n = layer.weight.shape
            op, shape = graph.BLOCK_SPARSE_MATMUL, {"K": k, "N": n}
        if self.dispatch and not ctx.target.prefers_sparse(op, shape, sparsity, block, ctx.threads):
            return f"the sparse kernel would be slower than dense on {ctx.target.name} (dispatch rule; dispatch=false overrides)"
        return None
