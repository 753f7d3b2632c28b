"""Every build compares the package with the model as the user gave it, on held-out inputs, and
can be held to a quality budget: a missed budget fails in one line and writes nothing."""
import json
import textwrap
import types

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgesparse import Pass, hookimpl, runtime
from edgesparse.cli import main
from edgesparse.pipeline import BuildRequest, build
from edgesparse.plugins import load_registry
from edgesparse_testing import fails, mlp_model, run, run_json

DAMAGE = "magnitude:sparsity=0.95,block=16,dispatch=off"  # every layer sparse, whatever the host's table says


def nothing_written(folder, out):
    assert not out.exists() and not out.with_name(out.name + ".zip").exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no staging left


# --- ONNX models ---------------------------------------------------------------------------------

def test_pass_that_changes_nothing_scores_perfect(mlp_onnx, tmp_path):
    out = tmp_path / "pkg"
    result = run("build", mlp_onnx, "-t", "x86", "-p", "magnitude:skip=fc", "-o", out, "--min-quality", "cosine=1")
    assert "quality vs the original on 2 calibration batches, not held out: cosine 1.0000" in result.stdout
    q = runtime.load(out).manifest["quality"]
    assert q["inputs"] == "calibration" and q["held_out"] is False and q["batches"] == 2
    y = q["outputs"]["y"]
    assert y["cosine"] == pytest.approx(1.0, abs=1e-9) and y["cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert y["top1_agreement"] == 1.0 and y["rel_l2"] < 1e-6
    assert q["budget"] == {"cosine": {"min": 1.0, "value": q["summary"]["cosine"], "passed": True}}
    # inspect shows it, as text and as JSON
    assert "quality vs the original" in run("inspect", out).stdout
    assert run_json("inspect", out)["quality"]["outputs"]["y"]["top1_agreement"] == 1.0


def test_eval_inputs_file_is_held_out(mlp_onnx, tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "eval.npz", x=rng.standard_normal((5, 256)).astype(np.float32))
    out = tmp_path / "pkg"
    manifest = run_json("build", mlp_onnx, "-t", "x86", "-p", "magnitude:sparsity=0.5,dispatch=off", "-o", out,
                        "--eval-inputs", tmp_path / "eval.npz")
    q = manifest["quality"]
    assert q["inputs"] == "file" and q["held_out"] is True and q["batches"] == 1
    y = q["outputs"]["y"]
    assert y["rows"] == 5
    assert -1 <= y["cosine_min"] <= y["cosine"] < 0.999  # half the weights gone: measurably off
    assert y["rel_l2"] > 0.01
    assert json.loads((out / "manifest.json").read_text())["quality"] == q


def test_damaging_pass_misses_budget_and_writes_nothing(mlp_onnx, tmp_path):
    out = tmp_path / "pkg"
    line = fails("build", mlp_onnx, "-t", "x86", "-p", DAMAGE, "-o", out, "--min-quality", "cosine=0.999",
                 expect="quality budget missed: cosine ")
    assert float(line.split("cosine ")[1].split(" <")[0]) < 0.999
    nothing_written(tmp_path, out)
    fails("build", mlp_onnx, "-t", "x86", "-p", DAMAGE, "-o", out, "--min-quality", "rel_l2=0.01",
          expect="quality budget missed: rel_l2 ")
    nothing_written(tmp_path, out)


def test_recipe_budget_and_flag_override(mlp_onnx, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{mlp_onnx.name}"\ntarget = "x86"\noutput = "pkg"\nmin_quality = {{ cosine = 0.999 }}\n'
                      f'[[passes]]\nname = "magnitude"\nsparsity = 0.95\ndispatch = "off"\n')
    fails("build", "--recipe", recipe, expect="quality budget missed: cosine")
    nothing_written(tmp_path, tmp_path / "pkg")
    # a flag wins over the recipe for its metric
    manifest = run_json("build", "--recipe", recipe, "--min-quality", "cosine=-1")
    assert manifest["quality"]["budget"]["cosine"]["min"] == -1.0


@pytest.mark.parametrize("flag, expect", [
    ("cosin=0.9", "unknown quality metric 'cosin'"),
    ("accuracy_drop=0.01", "unknown quality metric 'accuracy_drop'"),  # an ONNX model has no evaluate()
    ("cosine=1.5", "cosine must be [-1, 1]"),
    ("top1_agreement=2", "top1_agreement must be [0, 1]"),
    ("rel_l2=-0.1", "rel_l2 must be >= 0"),
    ("cosine=high", "'high' is not a number"),
    ("cosine", "--min-quality must be METRIC=VALUE"),
])
def test_bad_budget(mlp_onnx, tmp_path, flag, expect):
    fails("build", mlp_onnx, "-t", "x86", "-o", tmp_path / "pkg", "--min-quality", flag, expect=expect)
    nothing_written(tmp_path, tmp_path / "pkg")


def test_bad_recipe_budget(mlp_onnx, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'model = "{mlp_onnx.name}"\ntarget = "x86"\noutput = "pkg"\nmin_quality = 0.98\n')
    fails("build", "--recipe", recipe, expect="min_quality must be a table")


@pytest.mark.parametrize("arrays, expect", [
    ({"X": np.zeros((2, 256), np.float32)}, "lacks input 'x'"),
    ({"x": np.zeros((2, 256), np.float32), "z": np.zeros(3)}, "holds 'z', which is not an input"),
    ({"x": np.zeros((2, 255), np.float32)}, "'x' has shape [2, 255], the model takes ['batch', 256]"),
    ({"x": np.zeros(256, np.float32)}, "'x' has shape [256]"),
    ({"x": np.zeros((2, 256), np.float64)}, "'x' is float64, the model takes float32"),
])
def test_eval_inputs_that_do_not_fit(mlp_onnx, tmp_path, arrays, expect):
    np.savez(tmp_path / "eval.npz", **arrays)
    fails("build", mlp_onnx, "-t", "x86", "-o", tmp_path / "pkg", "--eval-inputs", tmp_path / "eval.npz", expect=expect)
    nothing_written(tmp_path, tmp_path / "pkg")


def test_model_that_already_holds_sparse_nodes(tmp_path):
    """A package's own model given back as input: the original runs densely via its ONNX functions."""
    src = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(src))
    run("build", src, "-t", "x86", "-p", DAMAGE, "-o", tmp_path / "first")
    again = run_json("build", tmp_path / "first" / "model.onnx", "-t", "x86", "-o", tmp_path / "second")
    assert again["quality"]["summary"]["cosine"] == pytest.approx(1.0, abs=1e-6)


# --- model factories -------------------------------------------------------------------------------

FACTORY = '''
import torch
from edgesparse import TorchModel

def batches(seed0, count):
    def gen():
        for seed in range(seed0, seed0 + count):
            yield {"x": torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))}
    return gen

def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

def model(**kw):
    return TorchModel(net(), {"x": torch.randn(8, 64)}, ["logits"], {"x": {0: "batch"}, "logits": {0: "batch"}},
                      calibration=batches(0, 100), **kw)

# labels: the unmodified module's own predictions, so the original scores exactly 1.0
TEST = [{"x": torch.randn(16, 64, generator=torch.Generator().manual_seed(1000 + i))} for i in range(3)]
with torch.no_grad():
    LABELS = [net()(b["x"]).argmax(-1).numpy() for b in TEST]

def accuracy(run):
    outs = run(TEST)
    hits = sum(int((o["logits"].argmax(-1) == y).sum()) for o, y in zip(outs, LABELS))
    return {"accuracy": hits / sum(len(y) for y in LABELS), "rows": float(sum(len(o["logits"]) for o in outs))}

def build():
    return model(evaluation=batches(500, 4), evaluate=accuracy)

def build_no_evaluate():
    return model(evaluation=batches(500, 4))

def build_empty_evaluation():
    return model(evaluation=batches(500, 0))

def raises(run):
    raise RuntimeError("no test set here")

def build_raises():
    return model(evaluate=raises)

def build_empty():
    return model(evaluate=lambda run: {})

def build_words():
    return model(evaluate=lambda run: {"accuracy": "high"})

def build_none():
    return model(evaluate=lambda run: None)
'''


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    path = tmp_path_factory.mktemp("factory") / "model.py"
    path.write_text(FACTORY)
    return path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_factory_evaluate_recorded_for_both_models(factory, tmp_path):
    out = tmp_path / "pkg"
    result = cli("build", f"{factory}:build", "-t", "x86", "-p", "magnitude:sparsity=0.9,dispatch=off", "-o", out,
                 "--min-quality", "accuracy_drop=1", "--min-quality", "rows=48")
    assert result.exit_code == 0, result.output
    assert "on 4 held-out batches (evaluation)" in result.output and "accuracy 1 -> " in result.output
    q = runtime.load(out).manifest["quality"]
    assert q["inputs"] == "evaluation" and q["held_out"] is True and q["batches"] == 4
    assert q["outputs"]["logits"]["rows"] == 32
    acc = q["metrics"]["accuracy"]
    assert acc["original"] == 1.0 and acc["package"] < 1.0  # 90 % of the blocks gone changes predictions
    assert acc["drop"] == pytest.approx(acc["original"] - acc["package"])
    assert q["metrics"]["rows"] == {"original": 48.0, "package": 48.0, "drop": 0.0}
    assert q["budget"]["accuracy_drop"] == {"max": 1.0, "value": acc["drop"], "passed": True}


def test_factory_metric_budget_missed(factory, tmp_path):
    out = tmp_path / "pkg"
    result = cli("build", f"{factory}:build", "-t", "x86", "-p", "magnitude:sparsity=0.9,dispatch=off", "-o", out,
                 "--min-quality", "accuracy_drop=0.001")
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("error: quality budget missed: accuracy_drop ")
    assert "(accuracy 1 -> " in result.output and "Traceback" not in result.output
    nothing_written(tmp_path, out)


def test_factory_without_passes_scores_perfect(factory, tmp_path):
    result = cli("build", f"{factory}:build_no_evaluate", "-t", "x86", "-o", tmp_path / "pkg",
                 "--min-quality", "top1_agreement=1", "--min-quality", "cosine_min=0.99999")
    assert result.exit_code == 0, result.output
    q = runtime.load(tmp_path / "pkg").manifest["quality"]
    assert q["summary"]["top1_agreement"] == 1.0 and q["metrics"] == {}


class _Negate(Pass):
    """A torch-stage pass that flips the last layer's sign: the package computes -original."""
    name = "negate"

    def transform_module(self, module, ctx):
        import torch

        with torch.no_grad():
            module[2].weight.neg_()
            module[2].bias.neg_()
        return module


def test_torch_pass_is_compared_with_the_module_before_it(factory, tmp_path):
    plugin = types.ModuleType("negate_plugin")
    plugin.register_passes = hookimpl(lambda register: register(_Negate))
    registry = load_registry(extra_modules=[plugin])
    manifest = build(BuildRequest(f"{factory}:build_no_evaluate", "x86", tmp_path / "pkg", passes=[("negate", {})],
                                  quiet=True), registry)
    y = manifest["quality"]["outputs"]["logits"]
    assert y["cosine"] == pytest.approx(-1.0, abs=1e-5) and y["cosine_min"] == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize("func, flags, expect", [
    ("build_raises", [], "the model factory's evaluate() failed on the original model: RuntimeError: no test set here"),
    ("build_empty", [], "the model factory's evaluate() returned no metrics"),
    ("build_words", [], "the model factory's evaluate() returned str for 'accuracy': metrics must be numbers"),
    ("build_none", [], "the model factory's evaluate() must return {metric: number}, got NoneType"),
    ("build", ["--min-quality", "acuracy_drop=0.01"], "unknown quality metric 'acuracy_drop' (known: accuracy, accuracy_drop, "),
    ("build_no_evaluate", ["--min-quality", "accuracy_drop=0.01"], "unknown quality metric 'accuracy_drop'"),
    ("build_empty_evaluation", [], "the model factory's evaluation() yielded no batches"),
    ("build", ["--eval-inputs", "eval.npz"], "--eval-inputs is for ONNX models"),
])
def test_factory_bad_input(factory, tmp_path, func, flags, expect):
    out = tmp_path / "pkg"
    result = cli("build", f"{factory}:{func}", "-t", "x86", "-o", out, *flags)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and expect in lines[-1], result.output
    assert "Traceback" not in result.output
    nothing_written(tmp_path, out)


# --- the metrics themselves --------------------------------------------------------------------------

def test_metrics_on_known_outputs():
    from edgesparse.quality import check_budget, output_quality

    rng = np.random.default_rng(0)
    a = [rng.standard_normal((2, 3, 5)).astype(np.float32), rng.standard_normal((4, 3, 5)).astype(np.float32)]
    same = output_quality("y", a, [x.copy() for x in a])
    assert same == {"rows": 18, "cosine": 1.0, "cosine_min": 1.0, "rel_l2": 0.0, "top1_agreement": 1.0}
    flipped = output_quality("y", a, [-x for x in a])
    assert flipped["cosine"] == -1.0 and flipped["rel_l2"] == pytest.approx(2.0) and flipped["top1_agreement"] == 0.0
    # one row zeroed: that row scores 0, the others 1; rel_l2 is that row's share of the norm
    b = [x.copy() for x in a]
    b[0][0, 0] = 0
    hit = output_quality("y", a, b)
    assert hit["cosine_min"] == 0.0 and hit["cosine"] == pytest.approx(17 / 18)
    assert hit["rel_l2"] == pytest.approx(np.linalg.norm(a[0][0, 0]) / np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in a)))
    # a NaN in the package is the worst case, and fails any budget
    b[1][0, 0, 0] = np.nan
    bad = output_quality("y", a, b)
    assert bad["cosine_min"] == -1.0 and bad["rel_l2"] == float("inf")
    with pytest.raises(Exception, match="quality budget missed: rel_l2 inf > 1"):
        check_budget({"summary": bad, "metrics": {}}, {"cosine_min": -1, "rel_l2": 1})
    # integer outputs: the fraction of equal elements; a last axis of 1: no top-1 agreement
    assert output_quality("ids", [np.array([1, 2, 3, 4])], [np.array([1, 2, 0, 4])]) == {"exact_match": 0.75}
    assert "top1_agreement" not in output_quality("p", [np.ones((3, 1), np.float32)], [np.ones((3, 1), np.float32)])
