"""sparsity=auto: per-layer sparsities chosen within the build's quality budget (edgesparse.allocation),
on the tiny CNN trained on real Fashion-MNIST, held-out test images for the search and the budget."""
import json
import textwrap

import numpy as np
import pytest
import torch

from sbnn_testing import SAMPLE

from edgesparse import EdgesparseError

FACTORY = """
import sys
import numpy as np
import torch
sys.path.insert(0, {sample!r})
import cnn
from edgesparse import TorchModel

calib = np.load({calib!r})
xt, yt = np.load({xt!r}), np.load({yt!r})

def evaluation():
    return [{{"x": xt[i:i + 250]}} for i in range(0, len(xt), 250)]

def evaluate(run):
    logits = np.concatenate([o["logits"] for o in run(evaluation())])
    return {{"accuracy": float((logits.argmax(1) == yt).mean())}}

def build():
    model = cnn.FashionMobileNet(blocks=((2, 32, 1), (2, 32, 1)), stem=32, head=64)
    model.load_state_dict(torch.load({weights!r}, weights_only=True))
    return TorchModel(model.eval(), {{"x": torch.zeros(1, 1, 14, 14)}}, ["logits"],
                      {{"x": {{0: "batch"}}, "logits": {{0: "batch"}}}},
                      calibration=lambda: [{{"x": calib[i:i + 64]}} for i in range(0, len(calib), 64)],
                      evaluation=evaluation, evaluate=evaluate)
"""


@pytest.fixture(scope="module")
def factory(trained_tiny, fashion_subset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto")
    model, _ = trained_tiny
    x, _, xt, yt = fashion_subset
    torch.save(model.state_dict(), folder / "w.pt")
    np.save(folder / "calib.npy", x[:256])
    np.save(folder / "xt.npy", xt)
    np.save(folder / "yt.npy", yt)
    (folder / "factory.py").write_text(textwrap.dedent(FACTORY.format(
        sample=str(SAMPLE), weights=str(folder / "w.pt"), calib=str(folder / "calib.npy"),
        xt=str(folder / "xt.npy"), yt=str(folder / "yt.npy"))))
    return f"{folder / 'factory.py'}:build"


def _build(spec, out, registry, budget, **options):
    from edgesparse.pipeline import BuildRequest, build

    return build(BuildRequest(model=spec, target="x86", output=out, quiet=True, min_quality=budget,
                              passes=[("sparsebytenn", {"sparsity": "auto", "dispatch": "off", "min_channels": 16,
                                                        **options})]), registry=registry)


def test_auto_respects_its_budget(factory, verifying_registry, tmp_path):
    """accuracy_drop=0.02: the package is within it, some layers are sparse, and the report lists
    every point checked (mean sparsity, predicted speedup, measured quality) and the chosen one."""
    manifest = _build(factory, tmp_path / "pkg", verifying_registry, {"accuracy_drop": 0.02})
    q = manifest["quality"]
    assert q["held_out"] and q["metrics"]["accuracy"]["drop"] <= 0.02
    assert q["budget"]["accuracy_drop"]["passed"]
    report = manifest["passes"][0]["report"]
    auto = report["auto"]
    assert report["target_sparsity"] == "auto" and manifest["passes"][0]["options"]["sparsity"] == "auto"
    assert auto["budget"] == {"accuracy_drop": 0.02} and auto["sensitivity_inputs"] == "held-out"
    tried = auto["tried"]
    assert 1 <= len(tried) <= 1 + int(np.ceil(np.log2(auto["path_points"] + 1)))  # bisection, not a walk
    for point in tried:
        assert {"mean_sparsity", "predicted_speedup", "quality", "passed", "allocation"} <= set(point)
        assert "accuracy_drop" in point["quality"] and "top1_agreement" in point["quality"]
        assert point["passed"] == (point["quality"]["accuracy_drop"] <= 0.02)
    chosen = auto["chosen"]
    assert chosen["mean_sparsity"] > 0 and chosen["predicted_speedup"] > 1.0
    assert any(p["passed"] and p["point"] == chosen["point"] for p in tried)
    assert all(not p["passed"] for p in tried if p["point"] > chosen["point"])
    sparse = {l["layer"]: l["sparsity"] for l in report["layers"] if l["sparsity"] > 0}
    assert sparse == {k: v for k, v in auto["allocation"].items() if v > 0}
    json.dumps(manifest)


def test_auto_with_an_impossible_budget_is_one_line_and_writes_nothing(factory, verifying_registry, tmp_path):
    """cosine=1.0: only the dense model meets it; auto says so in one line and writes nothing."""
    out = tmp_path / "pkg"
    with pytest.raises(EdgesparseError) as err:
        _build(factory, out, verifying_registry, {"cosine": 1.0})
    message = str(err.value)
    assert "\n" not in message and "no allocation meets the quality budget" in message and "cosine" in message
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("budget,options,expect", [
    ({}, {}, "sparsity=auto needs a quality budget"),
    ({"cosine": 0.9}, {"allocation": "sensitivity"}, "drop allocation=sensitivity"),
    ({"cosine": 0.9}, {"dispatch": "measure"}, "use dispatch=target"),
    ({"cosine": 0.9}, {"auto_probe_steps": 5}, "needs recovery=train or recovery=distill"),
    ({"cosine": 0.9}, {"sparsity": "automatic"}, "expects float or 'auto'"),
])
def test_auto_bad_input_is_one_line(factory, verifying_registry, tmp_path, budget, options, expect):
    out = tmp_path / "pkg"
    with pytest.raises(EdgesparseError) as err:
        _build(factory, out, verifying_registry, budget, **options)
    assert expect in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_auto_probe_steps_needs_auto(factory, verifying_registry, tmp_path):
    with pytest.raises(EdgesparseError, match="auto_probe_steps is for sparsity=auto"):
        _build(factory, tmp_path / "pkg", verifying_registry, {"cosine": 0.9}, sparsity=0.5, auto_probe_steps=5)


def test_auto_probes_recover_before_they_are_checked(factory, verifying_registry, tmp_path):
    """auto_probe_steps: each allocation checked gets that much recovery first; the chosen one then
    gets the full recovery, and the package still meets the budget."""
    manifest = _build(factory, tmp_path / "pkg", verifying_registry, {"top1_agreement": 0.9},
                      recovery="distill", recovery_steps=6, auto_probe_steps=3, lr=5e-4)
    report = manifest["passes"][0]["report"]
    assert report["auto"]["probe_recovery_steps"] == 3 and report["auto"]["tried"]
    assert report["recovery"]["mode"] == "distill" and report["recovery"]["steps"] == 6
    assert manifest["quality"]["summary"]["top1_agreement"] >= 0.9
