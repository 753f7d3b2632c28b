"""The from-scratch recipe (samples/blockffn/train_scratch.py) in its smoke mode: both models train
a few steps, a run cut short resumes to the same weights, and the trained BlockFFN model is a
released-format checkpoint that builds into a RoutedFFN package calibrated with its own tokenizer."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import blockffn_models
import pytest
import torch
from safetensors.torch import load_file

from edgesparse_blockffn import checkpoint, factory
from edgesparse_blockffn.model import cache_names

SCRIPT = Path(__file__).resolve().parents[3] / "samples" / "blockffn" / "train_scratch.py"


def _train(run: Path, text: Path, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--run", str(run), "--text", str(text), *extra],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """20 'articles' of real English sentences (two of them held out)."""
    paras = [blockffn_models.TEXT.decode(), factory.CALIBRATION_TEXT]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n\n".join((paras[i % 2] + " ") * 3 for i in range(20)))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text) -> Path:
    run = tmp_path_factory.mktemp("run")
    result = _train(run, text)
    assert result.returncode == 0, result.stderr
    return run


def test_smoke_trains_both_models_with_the_same_budget(finished):
    out = json.loads((finished / "comparison.json").read_text())
    sparse, dense = out["blockffn"], out["dense"]
    assert sparse["steps"] == dense["steps"] == 6 and sparse["tokens_trained"] == dense["tokens_trained"]
    assert abs(sparse["parameters"] / dense["parameters"] - 1) < 0.01   # the twin's width matches the count
    for r in (sparse, dense):
        assert 1 < r["held_out"]["perplexity"] < 400                     # 300-token vocabulary, a few steps
    assert 0 <= out["dead_experts"] < 1 and 0 < sparse["held_out"]["tls"] < 1 and sparse["held_out"]["cls64"] <= sparse["held_out"]["cls8"]
    log = torch.load(finished / "blockffn" / "state.pt", weights_only=False)["log"]
    assert all({"ce", "locality", "chunk", "cls8"} <= set(row) for row in log)   # the paper's two losses ran
    assert set(out["bars"]) == {"perplexity_within_5pct", "tls_at_least_0.8", "cls8_at_least_0.7"}


def test_a_run_cut_short_resumes_to_the_same_model(finished, text, tmp_path):
    first = _train(tmp_path, text, "--model", "blockffn", "--max-steps", "4")
    assert first.returncode == 3 and not (tmp_path / "blockffn" / "result.json").exists()
    assert torch.load(tmp_path / "blockffn" / "state.pt", weights_only=False)["step"] == 4
    second = _train(tmp_path, text, "--model", "blockffn")
    assert second.returncode == 0 and "resuming at step 4" in second.stdout
    a = load_file(str(finished / "blockffn" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "blockffn" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _build(*args, env=None):
    import os

    result = subprocess.run([sys.executable, "-m", "edgesparse", "build", *map(str, args), "--target", "x86", "--json"],
                            capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def packages(finished, tmp_path_factory) -> tuple[Path, Path]:
    """The trained BlockFFN model through checkpoint_factory (its own tokenizer calibrates it) and
    the dense twin through scratch_model.py."""
    tmp = tmp_path_factory.mktemp("pkgs")
    factory = tmp / "model.py"
    factory.write_text(f"from edgesparse_blockffn import checkpoint_factory\n\n\ndef build():\n"
                       f"    return checkpoint_factory({str(finished / 'blockffn' / 'checkpoint')!r}, tokens=32)\n")
    _build(f"{factory}:build", "--pass", "blockffn:chunk=1,min_cls=0", "-o", tmp / "blockffn")
    _build(f"{SCRIPT.parent / 'scratch_model.py'}:build_dense", "-o", tmp / "dense",
           env={"BLOCKFFN_SCRATCH_RUN": str(finished)})
    return tmp / "blockffn", tmp / "dense"


def test_the_trained_model_deploys_through_checkpoint_factory(packages):
    manifest = json.loads((packages[0] / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["verification"]["sparse_nodes_on_kernel"] == 2
    assert manifest["passes"][0]["report"]["checkpoint"]["calibration"] == "tokenizer"   # its own tokenizer, offline


def test_the_dense_twin_builds_with_the_same_inputs_and_outputs(packages):
    sparse, dense = (json.loads((p / "manifest.json").read_text()) for p in packages)
    assert dense["verification"]["passed"] and not dense["runtime"]["custom_op_libraries"]
    layers = len(sparse["outputs"]) // 2
    assert [i["name"] for i in dense["inputs"]] == [i["name"] for i in sparse["inputs"]] == \
        ["input_ids", *cache_names(layers)]
    assert [o["name"] for o in dense["outputs"]] == [o["name"] for o in sparse["outputs"]] == \
        ["logits", *cache_names(layers, "present")]


def _run_decode_script(name, finished, packages, out):
    """One of the decode scripts on both packages, briefly (16-token prefix, minimum rounds)."""
    result = subprocess.run([sys.executable, str(SCRIPT.parent / name), "--run", str(finished),
                             "--blockffn", str(packages[0]), "--dense", str(packages[1]), "--prefix", "16",
                             "--budget", "0", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


def test_the_decode_benchmark_runs_on_both_packages(finished, packages, tmp_path):
    rows = _run_decode_script("bench_scratch_decode.py", finished, packages, tmp_path / "bench.json")["rows"]
    assert [(r["new_tokens"], r["chunk"]) for r in rows] == [(1, 1), (8, 8)]
    assert all(r["blockffn_samples"] >= 8 and r["dense_median_ms"] > 0 and r["speedup"] > 0 for r in rows)


def test_the_decode_breakdown_cuts_each_ffn_out(finished, packages, tmp_path):
    figures = _run_decode_script("decode_breakdown.py", finished, packages, tmp_path / "breakdown.json")
    assert set(figures["steps"]) == {"blockffn", "blockffn_without_ffn", "dense", "dense_without_ffn"}
    assert figures["ort_per_node_us"] > 0 and all(s["median_ms"] > 0 for s in figures["steps"].values())

