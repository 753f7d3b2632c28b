"""ONNX rewrite and end-to-end builds: a tiny MobileNet-style CNN trained on real Fashion-MNIST."""
import json
import textwrap

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from sbnn_testing import SAMPLE, clone, export_and_rewrite, ort_session, run_torch_stage

from edgesparse_sparsebytenn import patterns


class EffLike(nn.Module):
    """TensorFlow-style 'same' padding as a separate ZeroPad2d (as EfficientNet exports it),
    a stride-2 kxk conv with BatchNorm + SiLU, a pointwise conv + ReLU6, and a Linear + ReLU on
    tokens (exports as MatMul)."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv = nn.Conv2d(64, 64, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.pw = nn.Conv2d(64, 128, 1)
        self.fc = nn.Linear(128, 64)

    def forward(self, x):
        x = F.silu(self.bn(self.conv(self.pad(x))))
        x = F.relu6(self.pw(x))
        tokens = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        return F.relu(self.fc(tokens))


def test_rewrite_fuses_and_matches_the_pruned_module():
    torch.manual_seed(0)
    model = EffLike().eval()
    model.bn.running_var.uniform_(0.5, 2)
    model.bn.weight.data.uniform_(0.5, 1.5)
    rng = np.random.default_rng(0)
    calib = [{"x": rng.standard_normal((2, 64, 16, 16)).astype(np.float32)}]
    p, ctx, out = run_torch_stage(model, calib, sparsity=0.6, dispatch="off")
    dense, sparse = export_and_rewrite(p, ctx, out, {"x": torch.zeros(1, 64, 16, 16)})
    ops = [n.op_type for n in sparse.graph.node]
    assert ops.count("BlockSparseConv") == 2 and ops.count("BlockSparseMatMul") == 1
    assert "Pad" not in ops and "Sigmoid" not in ops and "Clip" not in ops and "Relu" not in ops
    acts = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in sparse.graph.node
            if n.op_type.startswith("BlockSparse")}
    assert sorted(a["activation"] for a in acts.values()) == [b"relu", b"relu6", b"silu"]
    conv = next(a for a in acts.values() if a["activation"] == b"silu")
    assert conv["pads"] == [0, 0, 1, 1] and conv["strides"] == [2, 2]
    report = ctx.reports["sparsebytenn"]["onnx"]
    assert len(report["replaced"]) == 3 and not report["not_replaced"]
    x = rng.standard_normal((2, 64, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = out(torch.from_numpy(x)).numpy()
    got = ort_session(sparse).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # without the library, the ONNX functions compute the same
    np.testing.assert_allclose(ort_session(sparse, library=False).run(None, {"x": x})[0], want, atol=1e-4, rtol=1e-4)


def test_unmatched_weights_stay_dense_and_are_reported():
    """If the module changes after the torch stage (non-zeros in pruned groups), the ONNX stage
    refuses to pack it."""
    model = nn.Sequential(nn.Conv2d(64, 64, 1)).eval()
    calib = [{"x": np.random.default_rng(0).standard_normal((2, 64, 4, 4)).astype(np.float32)}]
    p, ctx, out = run_torch_stage(model, calib, sparsity=0.5, dispatch="off")
    with torch.no_grad():
        out[0].weight.add_(1.0)
    dense, sparse = export_and_rewrite(p, ctx, out, {"x": torch.zeros(1, 64, 4, 4)})
    assert [n.op_type for n in sparse.graph.node] == ["Conv"]
    report = ctx.reports["sparsebytenn"]["onnx"]
    assert "non-zeros in pruned groups" in report["not_replaced"][0]["reason"]
    assert any("stays a dense op" in w for w in ctx.warnings)


FACTORY = """
import sys
import numpy as np
import torch
sys.path.insert(0, {sample!r})
import cnn
from edgesparse import TorchModel

def build():
    model = cnn.FashionMobileNet(blocks=((2, 32, 1), (2, 32, 1)), stem=32, head=64)
    model.load_state_dict(torch.load({weights!r}, weights_only=True))
    calib = np.load({calib!r})
    return TorchModel(model.eval(), {{"x": torch.zeros(1, 1, 14, 14)}}, ["logits"],
                      {{"x": {{0: "batch"}}, "logits": {{0: "batch"}}}},
                      calibration=lambda: [{{"x": calib[i:i + 64]}} for i in range(0, len(calib), 64)])
"""


def test_build_fashion_cnn_package(trained_tiny, fashion_subset, verifying_registry, tmp_path):
    """The whole pipeline on a real-data model: rearrange, prune 30 %, distil, export, rewrite,
    package, verify; then the package's accuracy on real test images."""
    from edgesparse import runtime
    from edgesparse.pipeline import BuildRequest, build

    model, dense_acc = trained_tiny
    assert dense_acc > 0.6  # it learned something from 80 steps on 3000 real images
    x, y, xt, yt = fashion_subset
    torch.save(model.state_dict(), tmp_path / "w.pt")
    np.save(tmp_path / "calib.npy", x[:256])
    (tmp_path / "factory.py").write_text(textwrap.dedent(FACTORY.format(
        sample=str(SAMPLE), weights=str(tmp_path / "w.pt"), calib=str(tmp_path / "calib.npy"))))
    out = tmp_path / "pkg"
    manifest = build(BuildRequest(model=f"{tmp_path / 'factory.py'}:build", target="x86", output=out, quiet=True,
                                  passes=[("sparsebytenn", {"sparsity": 0.3, "dispatch": "off", "recovery": "distill",
                                                            "recovery_steps": 20, "lr": 5e-4,
                                                            "min_channels": 16})]),
                     registry=verifying_registry)
    assert manifest["verification"]["passed"]
    assert manifest["verification"]["fraction_on_sparse_kernels"] == 1.0
    # 1x1 convs: 2 blocks x (expand, project) + head; stem (1 input channel) and classifier (10) dense;
    # a project conv followed by its residual Add is one BlockSparseConvAdd where the target asks for it;
    # on AVX-512 the depthwise convs between sparse convs run in NCHW16c (DepthwiseConv, dense)
    sparse = [l for l in manifest["layers"] if l["op"] != "DepthwiseConv"]
    assert len(sparse) == 5
    assert {l["op"] for l in sparse} <= {"BlockSparseConv", "BlockSparseConvAdd"}
    assert all(abs(l["sparsity"] - 0.3) < 0.02 for l in sparse)
    assert all(l["sparsity"] == 0 for l in manifest["layers"] if l["op"] == "DepthwiseConv")
    report = manifest["passes"][0]["report"]
    assert report["rearrangement"]["spaces_permuted"]
    assert report["rearrangement"]["retained_mass_after"] > report["rearrangement"]["retained_mass_before"]
    rec = report["recovery"]
    assert rec["mode"] == "distill" and rec["steps"] == rec["steps_requested"] == 20 and rec["loss_last"] < rec["loss_first"]
    assert "cut_by_budget" not in rec and not any("time budget" in w for w in manifest["warnings"])
    pkg = runtime.load(out)
    session = pkg.session()
    logits = np.concatenate([session.run(None, {"x": xt[i:i + 250]})[0] for i in range(0, len(xt), 250)])
    acc = float((logits.argmax(1) == yt).mean())
    assert acc > dense_acc - 0.05, (acc, dense_acc)
    json.dumps(manifest)  # the report is plain JSON
