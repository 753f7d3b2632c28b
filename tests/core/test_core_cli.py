"""Each CLI command on a real build of a small MLP."""
import json
import zipfile

import numpy as np

from edgesparse_testing import run, run_json


def test_build_writes_verified_package(built_mlp):
    manifest = json.loads((built_mlp / "manifest.json").read_text())
    assert manifest["target"]["name"] == "x86"
    assert [p["name"] for p in manifest["passes"]] == ["magnitude"]
    assert manifest["passes"][0]["options"]["sparsity"] == 0.75
    v = manifest["verification"]
    assert v["passed"] and v["max_abs_error"] <= 1e-4
    assert v["measured"] and v["sparse_nodes"] == 2 and v["fraction_on_sparse_kernels"] == 1.0
    assert {l["op"] for l in manifest["layers"]} == {"BlockSparseMatMul"}
    for layer in manifest["layers"]:
        assert abs(layer["sparsity"] - 0.75) < 0.01
    assert set(manifest["files"]) >= {"model.onnx", "verification.npz"}
    assert any(f.startswith("lib/") for f in manifest["files"])
    with zipfile.ZipFile(built_mlp.parent / "mlp.zip") as archive:
        assert "mlp/manifest.json" in archive.namelist()


def test_inspect(built_mlp):
    text = run("inspect", built_mlp).stdout
    assert "target x86" in text and "BlockSparseMatMul" in text
    data = run_json("inspect", built_mlp)
    assert data["layers"][0]["op"] == "BlockSparseMatMul"


def test_verify(built_mlp):
    assert run("verify", built_mlp).stdout.startswith("ok:")


def test_verify_archive(built_mlp):
    assert run("verify", built_mlp.parent / "mlp.zip").stdout.startswith("ok:")


def test_bench_reports_interleaved_ratio(built_mlp):
    records = run_json("bench", built_mlp, "--threads", "1", "--rounds", "8")
    (r,) = records
    assert r["threads"] == 1 and r["dense"]["rounds"] >= 5
    assert np.isclose(r["speedup"], r["dense"]["median_ms"] / r["package"]["median_ms"])
    assert r["max_abs_error"] <= 1e-4


def test_listing_commands():
    plugins = {p["name"]: p for p in run_json("plugins")}
    assert "pass:magnitude" in plugins["magnitude"]["registered"]
    assert "target:x86" in plugins["x86"]["registered"]
    assert plugins["core"]["error"] is None
    passes = {p["name"]: p for p in run_json("passes")}
    assert {o["name"] for o in passes["magnitude"]["options"]} >= {"sparsity", "block"}
    assert "x86" in {t["name"] for t in run_json("targets")}
    assert "magnitude" in run("passes").stdout


def test_recipe_holds_everything(tmp_path, mlp_onnx):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        'model = "mlp.onnx"\ntarget = "x86"\noutput = "from-recipe"\ntolerance = 1e-4\n'
        '[[passes]]\nname = "magnitude"\nsparsity = 0.5\nblock = 8\n'
    )
    manifest = run_json("build", "--recipe", recipe)
    assert manifest["passes"][0]["options"] == {"sparsity": 0.5, "block": 8, "skip": [], "min_features": 64} or \
        manifest["passes"][0]["options"]["block"] == 8
    assert (tmp_path / "from-recipe" / "manifest.json").is_file()


def test_gemm_with_transposed_weight(tmp_path):
    import onnx
    from edgesparse_testing import mlp_model

    onnx.save(mlp_model(gemm=True), str(tmp_path / "gemm.onnx"))
    manifest = run_json("build", tmp_path / "gemm.onnx", "-t", "x86", "-p", "magnitude:sparsity=0.9,dispatch=off", "-o", tmp_path / "g")
    assert manifest["verification"]["sparse_nodes_on_kernel"] == 2


def test_conv_layers_become_block_sparse_conv(tmp_path):
    import onnx
    from edgesparse_testing import conv_model

    onnx.save(conv_model(), str(tmp_path / "conv.onnx"))
    manifest = run_json("build", tmp_path / "conv.onnx", "-t", "x86", "-p", "magnitude:sparsity=0.9,dispatch=off", "-o", tmp_path / "c")
    report = manifest["passes"][0]["report"]
    assert {d["layer"]: d["reason"] for d in report["kept_dense"]}["depthwise"] == "grouped or depthwise conv"
    assert manifest["verification"]["passed"]
    assert {l["node"] for l in manifest["layers"]} == {"pointwise_sparse", "conv3x3_sparse"}
    assert {l["op"] for l in manifest["layers"]} == {"BlockSparseConv"}
    assert manifest["verification"]["sparse_nodes"] == manifest["verification"]["sparse_nodes_on_kernel"]
    for layer in manifest["layers"]:
        assert abs(layer["sparsity"] - 0.9) < 0.02


def test_bench_kernels_quick():
    records = run_json("bench", "kernels", "--quick", "--threads", "1")
    assert records and {"op", "sparsity", "threads", "speedup"} <= set(records[0])
    for r in records:
        assert r["threads"] == 1 and r["speedup"] > 0
        assert abs(r["speedup"] - r["dense_ms_median"] / r["sparse_ms_median"]) < 1e-6 * r["speedup"]
