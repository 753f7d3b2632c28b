"""magnitude's torch stage on a model factory: gradual pruning with recovery, then the ONNX stage
packs exactly the layers pruned in PyTorch; ONNX inputs stay one-shot."""
import numpy as np
import onnx
import pytest
import torch

from edgesparse import EdgesparseError, runtime
from edgesparse.pipeline import BuildRequest, build
from edgesparse_magnitude import keep_blocks, prune_blocks
from magnitude_testing import write_factory


def _build(spec, out, **options):
    return build(BuildRequest(model=spec, target="x86", output=out, quiet=True,
                              passes=[("magnitude", {"sparsity": 0.5, "block": 16, **options})]))


def _factory(spec):
    import importlib.util

    loader = importlib.util.spec_from_file_location("magnitude_factory", spec.rpartition(":")[0])
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def _relative_error(package, original, batches):
    """The package's outputs against the original module's."""
    session = runtime.load(package).session()
    num = den = 0.0
    for b in batches:
        want = original(torch.from_numpy(b["x"])).detach().numpy()
        got = session.run(None, b)[0]
        num += float(((got - want) ** 2).sum())
        den += float((want ** 2).sum())
    return (num / den) ** 0.5


RECOVERED = {"dispatch": "off", "recover_steps": 45, "prune_stages": 3, "lr": 1e-3, "distill_loss": "mse"}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("magnitude")
    spec = write_factory(tmp)
    one_shot = _build(spec, tmp / "one-shot", dispatch="off")
    recovered = _build(spec, tmp / "recovered", **RECOVERED)
    return spec, tmp, one_shot, recovered


def test_gradual_pruning_with_recovery_beats_one_shot_on_held_out_inputs(builds):
    spec, tmp, one_shot, recovered = builds
    report = recovered["passes"][0]["report"]
    rec = report["recovery"]
    assert rec["mode"] == "distill" and rec["steps"] == rec["steps_requested"] == 45
    assert [s["sparsity"] for s in rec["stages"]] == pytest.approx([0.5 * (1 - (1 - k / 3) ** 3) for k in (1, 2, 3)], abs=1e-4)
    assert rec["loss_after"] < 0.5 * rec["loss_one_shot"], rec
    factory = _factory(spec)
    held_out = factory.inputs(99, batches=4)  # inputs the build never saw
    err_one_shot = _relative_error(tmp / "one-shot", factory.module(), held_out)
    err_recovered = _relative_error(tmp / "recovered", factory.module(), held_out)
    assert err_recovered < 0.8 * err_one_shot, (err_recovered, err_one_shot)


def test_the_onnx_stage_packs_exactly_the_layers_pruned_in_torch(builds):
    spec, tmp, one_shot, recovered = builds
    report = recovered["passes"][0]["report"]
    assert report["torch_stage"]["pruned"] == ["0", "2"]  # the 256 -> 16 head has fewer than 64 features
    assert [l["reason"] for l in report["torch_stage"]["kept_dense"]] == ["fewer than 64 features"]
    # the same layers as the one-shot build, each at exactly the target sparsity, verified on the kernels
    assert [(l["op"], l["sparsity"]) for l in recovered["layers"]] == [(l["op"], l["sparsity"]) for l in one_shot["layers"]]
    assert [l["sparsity"] for l in recovered["layers"]] == [0.5, 0.5]
    assert recovered["verification"]["passed"] and recovered["verification"]["fraction_on_sparse_kernels"] == 1.0
    # the weights differ from one-shot pruning: recovery trained them (zeros kept)
    a, b = (onnx.load(str(tmp / name / "model.onnx")) for name in ("one-shot", "recovered"))
    va = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer if i.name.endswith(".values")}
    vb = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer if i.name.endswith(".values")}
    assert va.keys() == vb.keys() and all(va[k].shape == vb[k].shape for k in va)
    assert not all(np.array_equal(va[k], vb[k]) for k in va)


def test_pruning_a_pruned_weight_again_keeps_it():
    """What lets the ONNX stage find the torch stage's blocks: already-zero blocks go first."""
    rng = np.random.default_rng(0)
    for shape in ((96, 80), (48, 32, 3, 3)):
        w = prune_blocks(rng.standard_normal(shape).astype(np.float32), 0.6, 8)
        w = w * (1 + rng.random(shape).astype(np.float32))  # training moves the kept weights, not the zeros
        assert np.array_equal(prune_blocks(w, 0.6, 8), w)
        assert keep_blocks(w, 0.6, 8).mean() == pytest.approx(0.4, abs=0.01)


class ShapeRuleTarget:
    """A target whose dispatch rule prefers the sparse kernel for N >= 256 outputs only."""

    name = "shape-rule"

    def prefers_sparse(self, op, shape, sparsity, block, threads=1):
        return shape["N"] >= 256


def _stage(module, torch_stage: bool, **options):
    """The magnitude pass on `module` outside a build: torch stage (or not), export, ONNX stage."""
    import onnx_ir as ir

    from edgesparse import BuildContext, TorchModel, export
    from edgesparse_magnitude import Magnitude

    ctx = BuildContext(ShapeRuleTarget(), None, calibration=[{"x": np.ones((8, 128), np.float32)}], quiet=True)
    ctx.begin_pass("magnitude")
    p = Magnitude(sparsity=0.5, block=8, **options)
    if torch_stage:
        module = p.transform_module(module, ctx)
    graph = ir.from_proto(export.export_torch(TorchModel(module, {"x": torch.zeros(2, 128)}, ["y"])))
    p.rewrite_graph(graph, ctx)
    return ctx.reports["magnitude"]


def test_dispatch_target_prunes_in_torch_what_the_onnx_stage_would():
    """The target's rule decides per layer from the same shapes in both stages."""
    make = lambda: torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                                       torch.nn.ReLU(), torch.nn.Linear(128, 256), torch.nn.Linear(256, 16)).eval()
    torch.manual_seed(0)
    one_shot = _stage(make(), False)
    torch.manual_seed(0)
    gradual = _stage(make(), True, recover_steps=2, prune_stages=2)
    assert gradual["torch_stage"]["pruned"] == ["0", "4"]
    assert [l["reason"] for l in gradual["torch_stage"]["kept_dense"]] == [
        "the sparse kernel would be slower than dense on shape-rule at this sparsity", "fewer than 64 features"]
    assert gradual["pruned"] == one_shot["pruned"] and len(one_shot["pruned"]) == 2
    assert [l["layer"] for l in gradual["kept_dense"]] == [l["layer"] for l in one_shot["kept_dense"]]


class WithPooler(torch.nn.Module):
    """A Linear the forward runs but the outputs do not use (as BERT's pooler under an encoder that
    returns the last hidden state)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(128, 256)
        self.pooler = torch.nn.Linear(256, 256)

    def forward(self, x):
        h = self.body(x)
        self.pooler(h)
        return h


def test_layers_the_outputs_do_not_use_are_left_alone():
    model = WithPooler().eval()
    pooler = model.pooler.weight.detach().clone()
    report = _stage(model, True, recover_steps=2, prune_stages=1)
    assert report["torch_stage"]["pruned"] == ["body"] and report["torch_stage"]["kept_dense"] == []
    assert torch.equal(model.pooler.weight, pooler) and len(report["pruned"]) == 1


def test_the_users_training_loop_as_recovery_keeps_the_blocks(tmp_path):
    spec = write_factory(tmp_path, train=True)
    m = _build(spec, tmp_path / "pkg", dispatch="off", recovery="train", recover_steps=6, prune_stages=2,
               recover_seconds=0)
    rec = m["passes"][0]["report"]["recovery"]
    assert rec["mode"] == "train" and rec["calls"] == [3, 3] and "loss_after" in rec
    assert [l["sparsity"] for l in m["layers"]] == [0.5, 0.5] and m["verification"]["passed"]


def test_onnx_inputs_cannot_ask_for_recovery(tmp_path):
    import subprocess
    import sys

    from edgesparse import export

    onnx.save(export.export_torch(_factory(write_factory(tmp_path)).build()), str(tmp_path / "mlp.onnx"))
    result = subprocess.run([sys.executable, "-m", "edgesparse", "build", str(tmp_path / "mlp.onnx"), "--target", "x86",
                             "--pass", "magnitude:recover_steps=10", "-o", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "works on PyTorch models" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, message", [
    ("recover_steps=-3", "must be >= 0"),
    ("recover_seconds=-1", "must be >= 0"),
    ("prune_stages=0", "must be at least 1"),
    ("recovery=finetune", "is not one of distill, train"),
])
def test_bad_recovery_options_are_one_line_errors(option, message):
    from edgesparse.recipe import parse_pass
    from edgesparse_magnitude import Magnitude

    name, options = parse_pass(f"magnitude:{option}")
    with pytest.raises(EdgesparseError) as err:
        Magnitude(**options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_build_under_torchrun_recovers_data_parallel_and_only_rank_0_writes(builds, tmp_path):
    """`torchrun --nproc_per_node 2 -m edgesparse build ...` on CPU (gloo): every calibration batch is
    shared by the two processes, so the package is the single-process build's; one package, one
    report, written by rank 0."""
    import os
    import subprocess
    import sys

    spec, tmp, _, recovered = builds
    spec = write_factory(tmp_path)  # the same factory, in a folder of its own
    options = ",".join(f"{k}={v}" for k, v in {"sparsity": 0.5, "block": 16, **RECOVERED}.items())
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "edgesparse", "build", spec, "--target", "x86", "--pass", f"magnitude:{options}",
                             "-o", str(tmp_path / "ddp")], capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("package:") == 1 and result.stderr.count("exporting to ONNX") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ddp.zip", "factory.py"]
    ddp = runtime.load(tmp_path / "ddp").manifest
    rec, single = ddp["passes"][0]["report"]["recovery"], recovered["passes"][0]["report"]["recovery"]
    assert rec["world_size"] == 2 and rec["steps"] == single["steps"] == 45
    # the same steps on the same global batches: the first stage's losses agree to float rounding;
    # later, each stage's fresh Adam (whose first step is about lr * sign(gradient)) amplifies the
    # rounding of the two processes' summation order, so the rest agrees to a percent
    curve, curve_single = ([loss for _, loss in r["loss_curve"]] for r in (rec, single))
    assert curve[:15] == pytest.approx(curve_single[:15], rel=1e-5)
    assert curve == pytest.approx(curve_single, rel=1e-2)
    assert rec["loss_after"] == pytest.approx(single["loss_after"], rel=1e-2)
    a, b = (onnx.load(str(d / "model.onnx")) for d in (tmp_path / "ddp", tmp / "recovered"))
    wa = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    wb = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    assert wa.keys() == wb.keys()
    for k in wa:
        if "index" in k or "row_ptr" in k:  # the same blocks pruned
            assert np.array_equal(wa[k], wb[k]), k
        else:
            assert np.linalg.norm(wa[k] - wb[k]) <= 1e-2 * np.linalg.norm(wb[k]), k
