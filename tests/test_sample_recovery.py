"""The MiniLM sample's recovery recipe (samples/minilm/recover.py), in small: a few seconds of
distillation instead of an hour, then a package built from its snapshot without rerunning it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgesparse_testing import ROOT, run_json

RECIPE = ROOT / "samples" / "minilm" / "recover.py"


def recipe(out, snapshots):
    return subprocess.run([sys.executable, str(RECIPE), "--sparsity", "0.5", "--ramp-minutes", "0.03",
                           "--snapshots", snapshots, "--save-minutes", "0.02", "--out", str(out)],
                          capture_output=True, text=True, check=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("recovery")
    recipe(out, "0.05")
    first = json.loads((out / "progress.json").read_text())
    recipe(out, "0.05,0.1")  # a second sitting continues the first
    return out, first


def test_recipe_resumes_and_keeps_the_blocks_it_pruned(run_dir):
    out, first = run_dir
    progress = json.loads((out / "progress.json").read_text())
    assert [s["minutes"] for s in progress["snapshots"]] == [0.05, 0.1]
    assert progress["snapshots"][0] == first["snapshots"][0]  # not redone
    assert progress["step"] > first["step"] > 0
    weights = torch.load(out / "snap-0.1min.pt", weights_only=True)
    pruned = [k for k in weights if k.startswith("encoder.") and k.endswith(".weight") and weights[k].ndim == 2]
    assert len(pruned) == 36
    for name in pruned:
        w = weights[name].numpy().T  # [K, N], blocks of 16 outputs x 1 input
        blocks = np.abs(w).reshape(w.shape[0], -1, 16).max(-1)
        assert (blocks == 0).mean() == pytest.approx(0.5, abs=1e-3), name
    for figure in ("embedding_cosine", "nn_agreement"):
        assert 0 <= progress["snapshots"][-1][figure] <= 1


def test_package_builds_from_the_snapshot_without_rerunning(run_dir, tmp_path):
    out, _ = run_dir
    env = dict(os.environ, MINILM_WEIGHTS=str(out / "snap-0.1min.pt"))
    manifest = run_json("build", ROOT / "samples/minilm/model.py:recovered", "--target", "x86",
                        "--pass", "magnitude:sparsity=0.5,block=16,dispatch=off", "-o", tmp_path / "pkg", env=env)
    assert manifest["verification"]["passed"] and len(manifest["layers"]) == 36
    # the pass found the snapshot's blocks already zero and kept every other weight: the package is
    # the recovered model, and its figures against the original model are the recipe's own
    assert manifest["quality"]["summary"]["cosine"] > 0.9999
    progress = json.loads((out / "progress.json").read_text())
    metric = manifest["quality"]["metrics"]["embedding_cosine"]
    assert metric["package"] == pytest.approx(progress["snapshots"][-1]["embedding_cosine"], abs=2e-3)
