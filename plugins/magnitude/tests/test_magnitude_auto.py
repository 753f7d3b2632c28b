"""magnitude sparsity=auto: per-layer sparsities within the build's quality budget, on an ONNX model
(held-out --eval-inputs, cosine / top-1 agreement budgets) and on a model factory."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgesparse import EdgesparseError
from edgesparse.pipeline import BuildRequest, build
from magnitude_testing import write_factory

EDGESPARSE = [sys.executable, "-m", "edgesparse"]


def mlp(path: Path, seed=0) -> Path:
    """x[*, 256] -> 512 -> 512 -> 64 logits; input features of uneven importance (scales spread over
    two decades), so that some blocks cost little to prune and some a lot."""
    rng = np.random.default_rng(seed)
    dims = [256, 512, 512, 64]
    nodes, inits, prev = [], [], "x"
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        w = rng.standard_normal((k, n)) * np.logspace(0, -2, k)[rng.permutation(k)][:, None] / np.sqrt(k)
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        out = "y" if i == len(dims) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}" if out != "y" else out], name=f"fc{i}"))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"m{i}"], [out], name=f"relu{i}"))
        prev = out
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def inputs(path: Path, seed: int, rows=128) -> Path:
    np.savez(path, x=np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32))
    return path


@pytest.fixture
def onnx_mlp(tmp_path):
    return mlp(tmp_path / "mlp.onnx"), inputs(tmp_path / "calib.npz", 1), inputs(tmp_path / "eval.npz", 2)


def _build(model, out, budget, calib=None, held=None, **options):
    return build(BuildRequest(model=str(model), target="x86", output=out, quiet=True, min_quality=budget,
                              inputs=calib, eval_inputs=held,
                              passes=[("magnitude", {"sparsity": "auto", "dispatch": "off", **options})]))


def cli(*args):
    return subprocess.run([*EDGESPARSE, *map(str, args)], capture_output=True, text=True)


def one_line_error(result, expect):
    assert result.returncode != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    assert expect in errors[0], errors[0]


def test_auto_respects_a_cosine_budget_on_an_onnx_model(onnx_mlp, tmp_path):
    model, calib, held = onnx_mlp
    manifest = _build(model, tmp_path / "pkg", {"cosine": 0.97}, calib, held)
    q = manifest["quality"]
    assert q["inputs"] == "file" and q["held_out"] and q["summary"]["cosine"] >= 0.97
    report = manifest["passes"][0]["report"]
    auto = report["auto"]
    assert auto["sensitivity_inputs"] == "held-out" and auto["tried"]
    for point in auto["tried"]:
        assert {"mean_sparsity", "predicted_speedup", "quality", "passed", "allocation"} <= set(point)
        assert point["passed"] == (point["quality"]["cosine"] >= 0.97)
    chosen = auto["chosen"]
    assert chosen["mean_sparsity"] > 0.2 and chosen["predicted_speedup"] > 1
    assert all(not p["passed"] for p in auto["tried"] if p["point"] > chosen["point"])
    # what the package holds is the allocation chosen, per layer (several sparsities: not one uniform value)
    pruned = {p["layer"]: p["sparsity"] for p in report["pruned"]}
    assert pruned == pytest.approx({k: v for k, v in auto["allocation"].items() if v > 0}, abs=0.01)
    assert len(set(auto["allocation"].values())) >= 2
    # the chosen point's measured cosine is the package's (the same comparison, the same batches)
    point = next(p for p in auto["tried"] if p["point"] == chosen["point"])
    assert point["quality"]["cosine"] == pytest.approx(q["summary"]["cosine"], abs=1e-4)
    json.dumps(manifest)


def test_a_tighter_budget_gives_a_lighter_allocation(onnx_mlp, tmp_path):
    model, calib, held = onnx_mlp
    loose = _build(model, tmp_path / "a", {"cosine": 0.9}, calib, held)["passes"][0]["report"]["auto"]["chosen"]
    tight = _build(model, tmp_path / "b", {"cosine": 0.995}, calib, held)["passes"][0]["report"]["auto"]["chosen"]
    assert tight["mean_sparsity"] < loose["mean_sparsity"]
    assert tight["predicted_speedup"] < loose["predicted_speedup"]


def test_top1_agreement_budget_without_held_out_inputs_says_so(onnx_mlp, tmp_path):
    model, calib, _ = onnx_mlp
    manifest = _build(model, tmp_path / "pkg", {"top1_agreement": 0.9}, calib)
    auto = manifest["passes"][0]["report"]["auto"]
    assert auto["sensitivity_inputs"].startswith("calibration")
    assert manifest["quality"]["summary"]["top1_agreement"] >= 0.9


def test_impossible_budget_is_one_line_and_writes_nothing(onnx_mlp, tmp_path):
    model, calib, held = onnx_mlp
    out = tmp_path / "pkg"
    result = cli("build", model, "-t", "x86", "-p", "magnitude:sparsity=auto,dispatch=off", "--inputs", calib,
                 "--eval-inputs", held, "--min-quality", "cosine=1", "-o", out)
    one_line_error(result, "no allocation meets the quality budget")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_auto_without_a_budget_is_one_line(onnx_mlp, tmp_path):
    model, calib, _ = onnx_mlp
    out = tmp_path / "pkg"
    result = cli("build", model, "-t", "x86", "-p", "magnitude:sparsity=auto", "--inputs", calib, "-o", out)
    one_line_error(result, "sparsity=auto needs a quality budget")
    assert "--min-quality" in result.stderr and not out.exists()


def test_auto_on_a_factory_and_its_bad_combinations(tmp_path):
    spec = write_factory(tmp_path, train=True)
    manifest = build(BuildRequest(model=spec, target="x86", output=tmp_path / "pkg", quiet=True,
                                  min_quality={"cosine": 0.8},
                                  passes=[("magnitude", {"sparsity": "auto", "dispatch": "off"})]))
    assert manifest["quality"]["summary"]["cosine"] >= 0.8
    assert manifest["passes"][0]["report"]["auto"]["chosen"]["mean_sparsity"] > 0
    with pytest.raises(EdgesparseError, match="does not combine with recover_steps"):
        build(BuildRequest(model=spec, target="x86", output=tmp_path / "b", quiet=True, min_quality={"cosine": 0.9},
                           passes=[("magnitude", {"sparsity": "auto", "recover_steps": 4})]))
    assert not (tmp_path / "b").exists()
    with pytest.raises(EdgesparseError, match="expects float or 'auto'"):
        build(BuildRequest(model=spec, target="x86", output=tmp_path / "c", quiet=True, min_quality={"cosine": 0.9},
                           passes=[("magnitude", {"sparsity": "most"})]))
