"""The `sparcl` pass: a model with learned block-sparse masks goes through `edgesparse build`."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgesparse_sparcl.rewrite import best_block, group_sparsity

FACTORY = '''
import torch, edgesparse
from edgesparse_sparcl.models import SmallResNet
from edgesparse_sparcl import sparse

def build():
    torch.manual_seed(0)
    model = SmallResNet(width=16).eval()
    g = torch.Generator().manual_seed(1)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and name != "stem":
            layer = sparse.PrunableLayer(name, m, "block", 8)
            layer.set_mask(torch.rand(layer.unit_shape, generator=g) < 0.2)
            layer.apply_mask()
    x = torch.randn(4, 1, 28, 28, generator=g)
    torch.save({"x": x, "y": model(x).detach()}, __file__ + ".ref.pt")
    return edgesparse.TorchModel(model, {"image": x[:1]}, ["logits"], {"image": {0: "batch"}, "logits": {0: "batch"}},
                                 calibration=lambda: iter([{"image": x}]))
'''


def test_group_sparsity_and_block_choice():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 8, 3, 3)).astype(np.float32)
    keep = rng.random((4, 8)) < 0.25  # B=8 groups
    w *= np.repeat(keep, 8, axis=0)[:, :, None, None]
    assert group_sparsity(w, "conv", 8) == pytest.approx(1 - keep.mean())
    assert group_sparsity(w, "conv", 4) == pytest.approx(1 - keep.mean())
    assert group_sparsity(w, "conv", 16) < group_sparsity(w, "conv", 8)
    assert best_block(w, "conv") == (8, pytest.approx(1 - keep.mean()))
    mm = np.zeros((6, 20), np.float32)
    mm[2, 4:8] = 1.0  # one 4-wide group of outputs for input 2
    assert group_sparsity(mm, "matmul", 4) == pytest.approx(1 - 1 / 30)


def test_build_keeps_learned_masks(tmp_path):
    factory = tmp_path / "model.py"
    factory.write_text(FACTORY)
    out = tmp_path / "pkg"
    cmd = [sys.executable, "-m", "edgesparse", "build", f"{factory}:build", "--target", "x86",
           "--pass", "sparcl:dispatch=false", "-o", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    assert manifest["verification"]["passed"]
    report = manifest["passes"][0]["report"]
    assert len(report["sparse"]) == 6  # the 3x3 convs of the residual blocks
    assert all(l["block"] == 8 and l["sparsity"] > 0.6 for l in report["sparse"])
    assert {l["layer"] for l in report["kept_dense"]} and all("only" in l["reason"] for l in report["kept_dense"])
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("BlockSparseConv") == 6
    assert manifest["verification"]["fraction_on_sparse_kernels"] == 1.0
    # the package computes what the trained torch model computes
    import onnxruntime as ort

    ref = torch.load(str(factory) + ".ref.pt")
    options = ort.SessionOptions()
    for lib in manifest["runtime"]["custom_op_libraries"]:
        options.register_custom_ops_library(str(out / lib))
    session = ort.InferenceSession(str(out / manifest["runtime"]["model"]), options)
    got = session.run(None, {"image": ref["x"].numpy()})[0]
    assert np.abs(got - ref["y"].numpy()).max() < 1e-4
