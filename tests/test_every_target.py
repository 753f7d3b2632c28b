"""One sample model builds for every target with one command each, and each package is verified
where it runs here: natively (x86), under qemu (snapdragon), in node (wasm), on TVM's CPU module
(jetson: its CUDA cubins need a GPU, see docs/jetson.md)."""
import pytest

from edgesparse_testing import ROOT, run_json


@pytest.mark.parametrize("target", ["x86", "snapdragon", "wasm", "jetson"])
def test_sample_builds_and_verifies_for_target(target, tmp_path):
    manifest = run_json("build", ROOT / "samples/minilm_ffn/model.py:build", "--target", target,
                        "--pass", "magnitude:sparsity=0.75,block=16,dispatch=off", "-o", tmp_path / target)
    v = manifest["verification"]
    assert manifest["target"]["name"] == target
    assert v["passed"] and v["max_abs_error"] <= v["tolerance"]
    assert v["sparse_nodes"] == 2 and v["sparse_nodes_on_kernel"] == 2
