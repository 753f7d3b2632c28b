"""The ARM side of the Fashion-MNIST CNN package: dynamic aarch64 instruction counts of each
pruned 1x1 conv (the package's own packed weights through `es_bsconv_f32`) against a dense
register-tiled NEON loop over the same MACs, under qemu-aarch64 -cpu cortex-a76. Counts are
not timings (see docs/snapdragon.md, "Instruction counts").

    python samples/sparsebytenn/arm_counts.py out/sparsebytenn/arm-70 [--json results/arm_counts.json]

The package can be a snapdragon or an x86 build of samples/sparsebytenn/model.py (the packed
weights are the same format). A 1x1 conv on one image is the matmul x[H*W, C] @ w[C, O]: the
dense reference is the snapdragon driver's dense loop on that matmul (4 positions x 16 outputs
per register tile), a stand-in for ORT's MLAS, which cannot be isolated in a qemu trace.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class _Tensors:
    """What kernel_check.count_instructions wants: .tensors() and .repeat."""

    repeat = 1

    def __init__(self, tensors):
        self._tensors = tensors

    def tensors(self, *_):
        return self._tensors


def input_shapes(layer_names) -> dict:
    """Input [C, H, W] of each named layer of the sample CNN for one 28x28 image."""
    import cnn

    model = cnn.FashionMobileNet().eval()
    mods = dict(model.named_modules())
    shapes, hooks = {}, []
    for name in layer_names:
        hooks.append(mods[name].register_forward_pre_hook(
            lambda m, a, name=name: shapes.__setitem__(name, tuple(a[0].shape[1:]))))
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    for h in hooks:
        h.remove()
    return shapes


def main(argv=None) -> list[dict]:
    from edgesparse_snapdragon.kernel_check import ACTIVATIONS, NONE, Case, count_instructions

    ap = argparse.ArgumentParser()
    ap.add_argument("package")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    root = Path(args.package)
    manifest = json.loads((root / "manifest.json").read_text())
    replaced = manifest["passes"][0]["report"]["onnx"]["replaced"]
    model = onnx.load(str(root / manifest["runtime"]["model"]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node if n.op_type == "BlockSparseConv"}
    shapes = input_shapes([r["layer"] for r in replaced])
    rng = np.random.default_rng(0)
    rows = []
    for rec in replaced:
        node = nodes.get(f"{rec['onnx_node']}_sparse")
        if node is None or rec["kind"] != "pointwise":
            continue
        values, c_index, row_ptr = (inits[n] for n in node.input[1:4])
        bias = inits[node.input[4]] if len(node.input) > 4 and node.input[4] else NONE
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        act = attrs.get("activation", b"none")
        act = act.decode() if isinstance(act, bytes) else act
        c, h, w = shapes[rec["layer"]]
        o, block = int(attrs["out_channels"]), int(rec["block"])
        x = rng.standard_normal((1, c, h, w)).astype(np.float32)
        meta = np.array([1, 5, 1, c, h, w, o, 1, 1, 1, 1, 1, 1, 0, 0, h, w, block, ACTIVATIONS[act]], np.int64)
        sparse = count_instructions(_Tensors([("meta", meta), ("x", x), ("values", values), ("c_index", c_index),
                                              ("row_ptr", row_ptr), ("bias", bias)]), "sparse")
        dense = count_instructions(Case(h * w, c, o, 16, sparsity=0.0, activation="none", seed=1), "dense")
        kept = int(c_index.size)
        row = {"layer": rec["layer"], "C": c, "O": o, "HW": h * w, "block": block,
               "group_sparsity": round(1 - kept / ((len(row_ptr) - 1) * c), 4),
               "dense_instructions": dense["total"], "sparse_instructions": sparse["total"],
               "dense_vector_fma": dense.get("vector FMA", 0), "sparse_vector_fma": sparse.get("vector FMA", 0),
               "ratio": round(sparse["total"] / dense["total"], 3)}
        rows.append(row)
        print(f"{row['layer']:20s} {c:4d}->{o:4d} @{h}x{w}: dense {row['dense_instructions']:>10,} "
              f"sparse {row['sparse_instructions']:>10,} ratio {row['ratio']:.3f}", flush=True)
    total_d = sum(r["dense_instructions"] for r in rows)
    total_s = sum(r["sparse_instructions"] for r in rows)
    print(f"all pruned 1x1 convs: dense {total_d:,} sparse {total_s:,} ratio {total_s / total_d:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"package": str(root), "target": manifest["target"]["name"],
                                               "qemu_cpu": "cortex-a76", "rows": rows,
                                               "total_dense": total_d, "total_sparse": total_s,
                                               "ratio": round(total_s / total_d, 3)}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
