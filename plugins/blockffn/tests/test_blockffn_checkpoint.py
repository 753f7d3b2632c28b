"""Trained BlockFFN checkpoints in the released format: the torch model against the format's
per-head formulation, the CLI build into a RoutedFFN package checked against torch (prefill and
a decode step with the latent cache), and bad checkpoints refused in one line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import blockffn_checkpoint as ckpt
from edgesparse import EdgesparseError
from edgesparse_blockffn import checkpoint, checkpoint_factory, generate
from edgesparse_blockffn.model import cache_names, layer_order

FACTORY = """from edgesparse_blockffn import checkpoint_factory


def build():
    return checkpoint_factory({path!r})
"""


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "edgesparse", *map(str, args)], capture_output=True, text=True)


def _factory(tmp_path: Path, ck: Path) -> Path:
    path = tmp_path / "model.py"
    path.write_text(FACTORY.format(path=str(ck)))
    return path


@pytest.mark.parametrize("ffn_type,norm,bias", [("block", "rms", False), ("block_linear", "sum", False),
                                               ("block", "none", False), ("block", "rms", True)])
def test_model_computes_the_released_formulation(ffn_type, norm, bias, tmp_path):
    torch.set_num_threads(1)
    cfg = ckpt.TINY | {"ffn_type": ffn_type, "norm_after_router": norm, "tie_word_embeddings": norm == "sum",
                       "attention_bias": bias}
    ckpt.write(tmp_path, cfg, seed=1)
    model = checkpoint.load(tmp_path)
    ids = torch.randint(0, cfg["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ckpt.reference_logits(cfg, ckpt.tensors(cfg, seed=1), ids)
        logits, latent, rope = model(ids, *model.empty_cache())
        # the latent cache continues a sequence exactly: prefix, then the rest with the prefix's cache
        head, cache_l, cache_r = model(ids[:, :7], *model.empty_cache())
        tail, _, _ = model(ids[:, 7:], cache_l, cache_r)
    assert (logits - want).abs().max() < 1e-5 * max(1.0, float(want.abs().max()))
    assert (torch.cat([head, tail], 1) - logits).abs().max() < 1e-5
    assert latent.shape == (2, 1, 12, cfg["kv_lora_rank"]) and rope.shape == (2, 1, 12, cfg["qk_rope_head_dim"])


def _session(pkg: Path):
    import onnxruntime as ort

    manifest = json.loads((pkg / "manifest.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    for lib in manifest["runtime"]["custom_op_libraries"]:
        so.register_custom_ops_library(str(pkg / lib))
    return manifest, ort.InferenceSession(str(pkg / manifest["runtime"]["model"]), so)


def test_checkpoint_builds_into_a_routedffn_package_that_matches_torch(tmp_path):
    torch.set_num_threads(1)
    ck = ckpt.write(tmp_path / "ck")
    out = tmp_path / "pkg"
    result = _cli("build", f"{_factory(tmp_path, ck)}:build", "--target", "x86", "--pass", "blockffn:chunk=1,min_cls=0",
                  "-o", out, "--json")
    assert result.returncode == 0, result.stderr
    manifest, session = _session(out)
    assert manifest["verification"]["passed"] and manifest["verification"]["sparse_nodes_on_kernel"] == 2
    report = manifest["passes"][0]["report"]
    assert report["checkpoint"] == {"ffns": 2, "calibration": "random token ids"}
    shown = _cli("inspect", out).stdout  # the layers' weights are dense: inspect says what is sparse instead
    assert shown.count("RoutedFFN") >= 2 and "weights dense; activation sparsity" in shown and "sparsity 0.00" not in shown
    assert 0.2 < report["sparsity"]["tls"] < 0.8  # random ReLU routers: about half the experts off per token
    # every BlockMLP is one RoutedFFN node fed by the checkpoint's router; no expert weights left outside it
    graph = onnx.load(str(out / "model.onnx")).graph
    routed = [n for n in graph.node if n.op_type == "RoutedFFN"]
    assert len(routed) == 2 and all({a.name: a.i for a in n.attribute if a.name == "chunk"} == {"chunk": 1} for n in routed)
    assert not {"ReduceSum"} & {n.op_type for n in graph.node if "router" in n.name}  # norm "rms", not "sum"
    used = {i for n in graph.node for i in n.input}
    assert all(init.name in used for init in graph.initializer)
    inter = ckpt.TINY["num_experts"] * ckpt.TINY["expert_size"]
    assert not [i for i in graph.initializer if inter in i.dims and 64 in i.dims and len(i.dims) == 2]
    # the package against the torch model on tokens the build never saw: prompt, then one decode step
    model = checkpoint.load(ck)
    ids = np.random.default_rng(7).integers(0, ckpt.TINY["vocab_size"], (1, 20)).astype(np.int64)
    names = cache_names(model.config.layers)
    assert [i.name for i in session.get_inputs()] == ["input_ids", *names]  # one cache tensor per layer and kind
    assert [o.name for o in session.get_outputs()] == ["logits", *cache_names(model.config.layers, "present")]
    latent, rope = model.empty_cache()
    for step in (ids[:, :19], ids[:, 19:]):
        got = session.run(None, {"input_ids": step, **dict(zip(names, layer_order(latent.numpy(), rope.numpy())))})
        with torch.no_grad():
            want = [t.numpy() for t in model(torch.tensor(step), latent, rope)]
        assert got[0].shape == want[0].shape and np.abs(got[0] - want[0]).max() <= 1e-4, np.abs(got[0] - want[0]).max()
        for i, (g_latent, g_rope) in enumerate(zip(got[1::2], got[2::2])):
            assert np.abs(g_latent - want[1][i]).max() <= 1e-4 and np.abs(g_rope - want[2][i]).max() <= 1e-4
        # the package's own cache feeds the next step
        latent, rope = torch.tensor(np.stack(got[1::2])), torch.tensor(np.stack(got[2::2]))
    assert latent.shape[2] == 20
    # an app's greedy decoding (edgesparse_blockffn.generate) gives the torch model's tokens
    want, feed, (latent, rope) = [], torch.tensor(ids[:, :9]), model.empty_cache()
    with torch.no_grad():
        for _ in range(6):
            logits, latent, rope = model(feed, latent, rope)
            want.append(int(logits[0, -1].argmax()))
            feed = torch.tensor([[want[-1]]])
    assert generate(session, ids[0, :9], 6) == want
    assert generate(session, ids[0, :9], 6, eos_token_id=want[2]) == want[:want.index(want[2]) + 1]


def _one_line_refusal(tmp_path, ck: Path, expect: str):
    out = tmp_path / "never"
    result = _cli("build", f"{_factory(tmp_path, ck)}:build", "--target", "x86", "--pass", "blockffn:chunk=1", "-o", out)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], result.stderr
    assert not out.exists() and not (tmp_path / "never.zip").exists()


def test_non_blockffn_and_misshapen_checkpoints_are_refused_by_the_cli(tmp_path):
    dense = ckpt.TINY | {"ffn_type": "vanilla"}
    ckpt.write(tmp_path / "dense", dense, weights=ckpt.tensors(ckpt.TINY))
    _one_line_refusal(tmp_path, tmp_path / "dense", "not a BlockFFN model: config.json has ffn_type 'vanilla'")
    wrong = ckpt.write(tmp_path / "wrong", weights=ckpt.tensors(ckpt.TINY | {"expert_size": 12}))
    _one_line_refusal(tmp_path, wrong, "tensor model.layers.0.mlp.up_proj has shape [8, 12, 64], config.json implies "
                                       "[8, 16, 64]")


@pytest.mark.parametrize("edit,expect", [
    (lambda c, t: c.pop("ffn_type"), "not a BlockFFN model: config.json has no ffn_type"),
    (lambda c, t: t.pop("model.layers.1.mlp.router_norm.weight"), "tensor model.layers.1.mlp.router_norm.weight is missing"),
    (lambda c, t: t.update({"model.layers.0.mlp.gate_proj": torch.zeros(8, 16, 64)}), "unexpected tensor model.layers.0.mlp.gate_proj"),
    (lambda c, t: c.update(num_experts=4), "tensor model.layers.0.mlp.router_proj.weight has shape [8, 64], config.json implies [4, 64]"),
    (lambda c, t: c.update(expert_gated=True), "expert_gated is true"),
    (lambda c, t: c.update(attention_type="vanilla"), "attention_type 'vanilla' is not supported"),
    (lambda c, t: c.update(router_act="softmax"), "router activation 'softmax'"),
    (lambda c, t: c.update(v_head_dim=8), "v_head_dim 8 disagrees with hidden_size / num_attention_heads = 16"),
    (lambda c, t: c.pop("num_experts"), "config.json has no num_experts / num_expert"),
])
def test_bad_checkpoints_are_one_line_errors(edit, expect, tmp_path):
    cfg, tensors = dict(ckpt.TINY), ckpt.tensors(ckpt.TINY)
    edit(cfg, tensors)
    ckpt.write(tmp_path, cfg, weights=tensors)
    with pytest.raises(EdgesparseError) as err:
        checkpoint.load(tmp_path)
    assert expect in str(err.value) and "\n" not in str(err.value) and str(err.value).startswith("blockffn: checkpoint")


def test_training_side_key_names_are_accepted(tmp_path):
    cfg = dict(ckpt.TINY)
    cfg["num_expert"], cfg["dim_expert"] = cfg.pop("num_experts"), cfg.pop("expert_size")
    ckpt.write(tmp_path, cfg, weights=ckpt.tensors(ckpt.TINY))
    assert checkpoint.load(tmp_path).config.experts == 8


def test_checkpoint_options_that_do_not_apply_are_refused(tmp_path):
    from edgesparse.context import BuildContext
    from edgesparse_blockffn import BlockFFN

    model = checkpoint_factory(ckpt.write(tmp_path), tokens=16, batches=2)
    ctx = BuildContext(None, None, calibration=list(model.calibration()), quiet=True)
    p = BlockFFN(experts=4)
    ctx.begin_pass(p.name)
    with pytest.raises(EdgesparseError, match="trained BlockFFN checkpoint.*state/experts do not apply"):
        p.transform_module(model.module, ctx)


def test_sum_normalised_block_linear_checkpoint_builds_and_matches_torch(tmp_path):
    """The other router norm and expert layout of the format, through the pipeline in-process."""
    from edgesparse.pipeline import BuildRequest, build

    torch.set_num_threads(1)
    cfg = ckpt.TINY | {"ffn_type": "block_linear", "norm_after_router": "sum", "tie_word_embeddings": True}
    ck = ckpt.write(tmp_path / "ck", cfg, seed=2)
    manifest = build(BuildRequest(model=f"{_factory(tmp_path, ck)}:build", target="x86", output=tmp_path / "pkg",
                                  passes=[("blockffn", {"chunk": 4, "min_cls": 0.0})], quiet=True))
    assert manifest["verification"]["passed"] and manifest["verification"]["sparse_nodes_on_kernel"] == 2
    _, session = _session(tmp_path / "pkg")
    graph = onnx.load(str(tmp_path / "pkg" / "model.onnx")).graph
    assert sum(n.op_type == "ReduceSum" and "router" in n.name for n in graph.node) == 2
    model = checkpoint.load(ck)
    ids = np.random.default_rng(3).integers(0, cfg["vocab_size"], (1, 13)).astype(np.int64)
    empty = layer_order(*(c.numpy() for c in model.empty_cache()))
    got = session.run(None, {"input_ids": ids, **dict(zip(cache_names(cfg["num_hidden_layers"]), empty))})[0]
    with torch.no_grad():
        want = model(torch.tensor(ids), *model.empty_cache())[0].numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_bf16_checkpoints_load_as_float32(tmp_path):
    tensors = {k: t.to(torch.bfloat16) for k, t in ckpt.tensors(ckpt.TINY).items()}
    ckpt.write(tmp_path, weights=tensors)
    model = checkpoint.load(tmp_path)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.arange(10)[None]
    with torch.no_grad():
        want = ckpt.reference_logits(ckpt.TINY, {k: t.float() for k, t in tensors.items()}, ids)
        assert (model(ids, *model.empty_cache())[0] - want).abs().max() < 1e-5


def test_unreadable_checkpoint_files_are_one_line_errors(tmp_path):
    ck = ckpt.write(tmp_path / "ck")
    with pytest.raises(EdgesparseError, match="not a directory"):
        checkpoint.load(tmp_path / "absent")
    (ck / "model.safetensors").write_bytes(b"not safetensors" * 4)
    with pytest.raises(EdgesparseError, match="model.safetensors is not a readable safetensors file"):
        checkpoint.load(ck)
    (ck / "model.safetensors").unlink()
    with pytest.raises(EdgesparseError, match=r"no \*.safetensors file \(nor pytorch_model.bin\)"):
        checkpoint.load(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(EdgesparseError, match="config.json is not valid JSON"):
        checkpoint.load(ck)


def test_pytorch_bin_checkpoints_load_like_safetensors(tmp_path):
    """The authors' converter writes pytorch_model.bin: same names, read without running code."""
    ck = ckpt.write(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((ck / "config.json").read_text())
    torch.save(ckpt.tensors(ckpt.TINY), tmp_path / "bin" / "pytorch_model.bin")
    ids = torch.arange(7)[None]
    a, b = checkpoint.load(ck), checkpoint.load(tmp_path / "bin")
    with torch.no_grad():
        assert torch.equal(a(ids, *a.empty_cache())[0], b(ids, *b.empty_cache())[0])


def test_expert_sizes_the_kernel_cannot_take_stay_dense(tmp_path):
    """A valid checkpoint with 6-neuron experts: RoutedFFN's panels need multiples of 4, so the
    FFNs keep ORT's kernels (warned, reported) and the package still computes the model."""
    from edgesparse.pipeline import BuildRequest, build

    torch.set_num_threads(1)
    cfg = ckpt.TINY | {"expert_size": 6}
    ck = ckpt.write(tmp_path / "ck", cfg)
    manifest = build(BuildRequest(model=f"{_factory(tmp_path, ck)}:build", target="x86", output=tmp_path / "pkg",
                                  passes=[("blockffn", {"chunk": 1, "min_cls": 0.0})], quiet=True))
    report = manifest["passes"][0]["report"]
    assert report["nodes"] == [] and len(report["dense_layers"]) == 2 and manifest["verification"]["passed"]
    assert any("multiples of 4" in w and "expert size 6" in w for w in manifest["warnings"])
