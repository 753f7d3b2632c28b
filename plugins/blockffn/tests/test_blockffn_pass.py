"""The blockffn pass: conversion of tiny Llama- and BERT-style models, the package against the
converted torch model, metrics, losses and bad input."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import blockffn_models
from edgesparse import EdgesparseError
from edgesparse.pipeline import BuildRequest, build
from edgesparse_blockffn import block, convert

MODELS = Path(blockffn_models.__file__)


def _build(kind, tmp_path, **options):
    request = BuildRequest(model=f"{MODELS}:build_{kind}", target="x86", output=tmp_path / kind,
                           passes=[("blockffn", options)], quiet=True)
    manifest = build(request)
    loaded = [m for m in sys.modules.values()  # the factory module as the build imported it
              if getattr(m, "__file__", None) == str(MODELS) and getattr(m, "BUILT", None)]
    return manifest, loaded[-1].BUILT[-1]


def _package_outputs(pkg: Path, feeds: dict, threads=1):
    import json

    import onnxruntime as ort

    manifest = json.loads((pkg / "manifest.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    for lib in manifest["runtime"]["custom_op_libraries"]:
        so.register_custom_ops_library(str(pkg / lib))
    return ort.InferenceSession(str(pkg / manifest["runtime"]["model"]), so).run(None, feeds)[0]


@pytest.mark.parametrize("kind,gated", [("llama", True), ("bert", False)])
def test_build_matches_the_converted_torch_model(kind, gated, tmp_path):
    torch.set_num_threads(1)
    manifest, source = _build(kind, tmp_path, experts=8, steps=20, chunk=8)
    report = manifest["passes"][0]["report"]
    assert manifest["verification"]["passed"]
    assert manifest["verification"]["sparse_nodes_on_kernel"] == 2
    # the package computes what the converted torch model computes, on text it was not calibrated on
    ids = blockffn_models.tokens(40, 500)[None]
    with torch.no_grad():
        want = source.module(torch.tensor(ids)).numpy()
    got = _package_outputs(tmp_path / kind, {"input_ids": ids})
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(want).max())))
    # the dense FFN weights are gone from the graph: only RoutedFFN nodes hold them
    model = onnx.load(str(tmp_path / kind / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("RoutedFFN") == 2
    routed = [n for n in model.graph.node if n.op_type == "RoutedFFN"]
    assert all({a.name: a.i for a in n.attribute if a.name in ("gated", "chunk")} == {"gated": int(gated), "chunk": 8}
               for n in routed)
    used = {i for n in model.graph.node for i in n.input}
    assert all(init.name in used for init in model.graph.initializer)
    # reports: per layer TLS and CLS(s), non-increasing in s, FLOPs below dense
    layers = report["layers"]
    assert len(layers) == 2
    for row in layers:
        assert 0 <= row["cls64"] <= row["cls32"] <= row["cls8"] <= row["cls1"] == row["tls"] < 1  # some expert on
    flops = report["ffn_flops"]
    assert flops["chunk1"]["executed_per_token"] <= flops["chunk8"]["executed_per_token"] <= \
        flops["chunk64"]["executed_per_token"] < flops["chunk64"]["dense_per_token"] + 1e-6


def test_metrics_by_hand():
    r = torch.zeros(1, 4, 3)
    r[0, 0, 0] = r[0, 1, 0] = r[0, 2, 1] = 1.0
    assert block.tls(r) == pytest.approx(1 - 3 / 12)
    assert block.cls(r, 2) == pytest.approx(1 - 2 / 6)       # chunk {0,1}: expert 0; chunk {2,3}: expert 1
    assert block.cls(r, 4) == pytest.approx(1 - 2 / 3)
    assert block.cls(r, 3) == pytest.approx(1 - 2 / 6)       # a last partial chunk adds nothing new


def test_losses_reward_shared_experts():
    same = torch.tensor([[[1.0, 0.0, 0.0, 0.0]] * 8])
    spread = torch.eye(4).repeat(2, 1)[None]
    assert block.chunk_sparsification_loss(same, 8) < block.chunk_sparsification_loss(spread, 8)
    z_same = torch.tensor([[[0.5, -0.5]] * 6])
    z_flip = torch.tensor([[[0.5, -0.5], [-0.5, 0.5]] * 3])
    assert block.locality_loss(z_same) < block.locality_loss(z_flip)


def test_router_and_scaling_match_the_formula():
    router = block.Router(3, 2)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0], [0, -1.0, 0]]))
        router.gain.copy_(torch.tensor([2.0, 3.0]))
    x = torch.tensor([[2.0, 1.0, 0.0]])
    r = router(x).detach()
    assert r[0, 1] == 0 and r[0, 0] == pytest.approx(2 / np.sqrt(4 / 2 + block.EPS) * 2, rel=1e-5)
    h = torch.arange(4.0)[None]
    assert block.scale_experts(h, r)[0].tolist() == pytest.approx([0.0, float(r[0, 0]), 0.0, 0.0])


def test_clustering_gives_equal_experts_of_co_active_neurons():
    gen = torch.Generator().manual_seed(0)
    tokens, groups = 400, 4
    which = torch.randint(0, groups, (tokens,), generator=gen)
    h = torch.rand(tokens, 16, generator=gen) * 0.05
    truth = torch.randperm(16, generator=gen).reshape(groups, 4)  # neurons of group g fire on its tokens
    for g in range(groups):
        h[which == g][:, truth[g]] += 1.0
        h[(which == g).nonzero()[:, 0][:, None], truth[g][None]] += 1.0
    order = convert.cluster_neurons(h, groups, seed=0)
    assert sorted(order.tolist()) == list(range(16))
    found = {frozenset(order[4 * e:4 * (e + 1)].tolist()) for e in range(groups)}
    assert found == {frozenset(t.tolist()) for t in truth}


def test_bad_input_is_one_clear_error():
    torch.set_num_threads(1)
    plain = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(EdgesparseError, match="no FFN block found.*gate_proj.*intermediate.dense"):
        convert.convert(plain, [{"input": np.zeros((1, 8), np.float32)}], convert.Settings())
    src = blockffn_models.factory("llama")
    batches = list(src.calibration())
    with pytest.raises(EdgesparseError, match="7 experts do not divide the intermediate size 256"):
        convert.convert(src.module, batches, convert.Settings(experts=7))
    short = list(blockffn_models.factory("llama", seq=6).calibration())
    with pytest.raises(EdgesparseError, match="at most 6 tokens, fewer than the chunk length 8"):
        convert.convert(src.module, short, convert.Settings(experts=8, chunk=8))


def test_state_file_of_another_model_is_refused(tmp_path):
    src = blockffn_models.factory("llama")
    layers = convert.convert(src.module, list(src.calibration())[:2], convert.Settings(experts=8, steps=2))
    path = tmp_path / "routers.pt"
    convert.save(layers, path)
    with pytest.raises(EdgesparseError, match="made for another model"):
        convert.load(blockffn_models.factory("bert").module, path)
    fresh = blockffn_models.factory("llama")
    loaded = convert.load(fresh.module, path)
    ids = torch.tensor(blockffn_models.tokens(20)[None])
    with torch.no_grad():
        assert torch.allclose(fresh.module(ids), src.module(ids), atol=1e-5)
    assert len(loaded) == 2


def test_ffns_below_break_even_stay_dense():
    """At a target sparsity where RoutedFFN would lose to dense, the FFNs keep ORT's kernels and
    the report says so (the pass's two stages, without packaging)."""
    import onnx_ir as ir

    from edgesparse.context import BuildContext
    from edgesparse_blockffn import BREAK_EVEN_CLS, BlockFFN

    torch.set_num_threads(1)
    source = blockffn_models.factory("llama", batches=2)
    ctx = BuildContext(None, None, calibration=[{k: np.asarray(v) for k, v in b.items()} for b in source.calibration()],
                       quiet=True)
    p = BlockFFN(experts=8, steps=5, chunk=8, sparsity=0.2)
    ctx.begin_pass(p.name)
    source.module = p.transform_module(source.module, ctx)
    assert all(c < BREAK_EVEN_CLS for c in p.layer_cls), p.layer_cls
    model = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18}), ir_version=10)  # nothing gets rewritten
    p.rewrite_graph(model, ctx)
    assert ctx.reports["blockffn"]["nodes"] == [] and len(ctx.reports["blockffn"]["dense_layers"]) == 2
    assert any("keep ORT's dense kernels" in w for w in ctx.warnings)
