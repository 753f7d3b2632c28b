"""The pass in a real build: the package ships the prefill and decode graphs, they run in ONNX
Runtime, and an app that only has onnxruntime + numpy gets the engine's answers from them."""
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgesparse import EdgesparseError
from edgesparse.pipeline import BuildRequest, build

FACTORY = f"{Path(__file__).parent / 'corematching_factory.py'}:build"


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("cm") / "pkg"
    manifest = build(BuildRequest(FACTORY, "x86", out, passes=[("corematching", {"keep": 0.25, "layers": "1-1"})], quiet=True))
    return out, manifest


def test_package_ships_checked_graphs_and_reports(package):
    out, manifest = package
    report = manifest["passes"][0]["report"]
    assert {"corematching/prefill.onnx", "corematching/decode.onnx"} <= set(manifest["files"])
    assert report["verification"]["same_core_neurons"] and report["verification"]["max_abs_error"] < 1e-3
    layers = report["layers"]
    assert layers[0]["neurons_kept"] == 1.0 and layers[1]["neurons_kept"] == 0.25
    assert report["calibration"]["decode_flops_reduction"] > 1.0
    assert json.loads((out / "manifest.json").read_text())["verification"]["passed"]


def test_app_generates_with_the_two_graphs(package):
    out, _ = package
    pre = ort.InferenceSession(str(out / "corematching/prefill.onnx"))
    dec = ort.InferenceSession(str(out / "corematching/decode.onnx"))
    ids = np.frombuffer(b"The state and capitalism are ", np.uint8).astype(np.int64)[None]
    ids = np.concatenate([ids, ids + 1])                     # batch of 2, equal lengths
    names = [o.name for o in pre.get_outputs()]
    assert names[4:] == ["core_gate_up_1", "core_down_1"]
    logits, keys, values, neurons, gate_up, down = pre.run(None, {"input_ids": ids})
    assert neurons.shape == (1, 2, 32) and gate_up.shape == (2, 64, 64) and keys.shape[3] == ids.shape[1]
    assert not np.array_equal(neurons[0, 0], neurons[0, 1])   # each sequence keeps its own neurons
    token = logits[:, -1:].argmax(-1)
    for _ in range(3):
        logits, keys, values = dec.run(None, {"input_ids": token, "past_keys": keys, "past_values": values,
                                               "core_gate_up_1": gate_up, "core_down_1": down})
        token = logits[:, -1:].argmax(-1)
    assert keys.shape[3] == ids.shape[1] + 3 and np.isfinite(logits).all()


@pytest.mark.parametrize("options, message", [
    ({"keep": 0.0}, "keep ratio of 0"),
    ({"layers": "1-9"}, "outside the model's layers 0-1"),
    ({"layers": "x"}, "must look like 5-18"),
])
def test_bad_options_fail_before_anything_is_written(tmp_path, options, message):
    with pytest.raises(EdgesparseError, match=message):
        build(BuildRequest(FACTORY, "x86", tmp_path / "o", passes=[("corematching", options)], quiet=True))
    assert not (tmp_path / "o").exists()
