"""The pass in VLM mode (token_layers): the package ships the CoreMatching graphs, checked against the
engine at build time; an app feeds them embeddings and an image mask; a prompt without image tokens
falls back to neuron-only pruning and says so; a factory without image masks is a one-line error."""
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgesparse import EdgesparseError
from edgesparse.pipeline import BuildRequest, build

FACTORY = f"{Path(__file__).parent / 'corematching_vlm_factory.py'}:build"
TEXT_FACTORY = f"{Path(__file__).parent / 'corematching_factory.py'}:build"
OPTIONS = {"keep": 0.5, "layers": "1-2", "token_layers": "0-1"}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmv") / "pkg"
    return out, build(BuildRequest(FACTORY, "x86", out, passes=[("corematching", OPTIONS)], quiet=True))


def test_package_ships_checked_vlm_graphs(package):
    out, manifest = package
    report = manifest["passes"][0]["report"]
    assert {"corematching/vlm_prefill.onnx", "corematching/vlm_decode.onnx"} <= set(manifest["files"])
    check = report["verification"]
    assert check["same_tokens_as_engine"] and check["max_abs_error"] < 1e-3
    kept = check["tokens_per_layer"]
    assert kept[0] == 40 and kept[2] <= kept[1] < 40 and kept[2] >= 40 - check["image_tokens"]  # image tokens only
    assert report["flops_reduction"]["prefill"] > 1.0
    assert [row["neurons_kept"] for row in report["layers"]] == [1.0, 0.5, 0.5]


def test_app_runs_the_vlm_graphs(package):
    out, _ = package
    pre = ort.InferenceSession(str(out / "corematching/vlm_prefill.onnx"))
    dec = ort.InferenceSession(str(out / "corematching/vlm_decode.onnx"))
    rng = np.random.default_rng(0)
    embeds = rng.normal(0, 0.02, (1, 50, 64)).astype(np.float32)      # another length than at build
    mask = np.zeros((1, 50), bool)
    mask[:, 2:45] = True
    outs = pre.run(None, {"inputs_embeds": embeds, "image_mask": mask})
    pasts = {i.name: v for i, v in zip(dec.get_inputs()[2:], outs[2:8])}
    weights = {o.name: v for o, v in zip(pre.get_outputs()[8:], outs[8:])}
    step = dec.run(None, {"input_ids": np.array([[65]]), "position": outs[1], **pasts, **weights})
    assert outs[1][0] == 50 and np.isfinite(step[0]).all() and step[1].shape[2] == outs[2].shape[2] + 1


def test_prompt_without_image_tokens_is_neuron_only_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CM_TEST_IMAGE", "none")
    manifest = build(BuildRequest(FACTORY, "x86", tmp_path / "pkg", passes=[("corematching", OPTIONS)], quiet=True))
    report = manifest["passes"][0]["report"]
    assert report["verification"]["tokens_per_layer"] == [40, 40, 40]
    assert any("no image tokens" in w for w in manifest["passes"][0].get("warnings", []) + manifest.get("warnings", []))


def test_token_layers_need_image_masks(tmp_path):
    with pytest.raises(EdgesparseError, match="needs calibration batches with 'inputs_embeds'"):
        build(BuildRequest(TEXT_FACTORY, "x86", tmp_path / "o", passes=[("corematching", {"token_layers": "0-0"})],
                          quiet=True))
    assert not (tmp_path / "o").exists()
