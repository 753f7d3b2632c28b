"""The README's main job: the bundled MiniLM sample, built end to end from its PyTorch factory."""
from edgesparse_testing import ROOT, run_json


def test_minilm_sample_builds_and_verifies(tmp_path):
    manifest = run_json("build", ROOT / "samples/minilm/model.py:build", "--target", "x86",
                        "--pass", "magnitude:sparsity=0.75,block=16", "-o", tmp_path / "minilm")
    v = manifest["verification"]
    assert v["inputs"] == "calibration" and v["max_abs_error"] <= 1e-4
    assert v["passed"] and v["measured"] and v["fraction_on_sparse_kernels"] == 1.0
    # 6 layers x (q, k, v, out, up, down) linear layers: each is pruned or reported as kept dense
    report = manifest["passes"][0]["report"]
    assert len(report["pruned"]) + len(report["kept_dense"]) == 36
    assert len(report["pruned"]) == len(manifest["layers"]) >= 12
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["inputs"][0]["shape"] == ["batch", "sequence"]
    # the quality comparison with the original model ran on held-out sentences (40 or more, 32 tokens each)
    q = manifest["quality"]
    assert q["inputs"] == "evaluation" and q["held_out"] is True
    assert q["outputs"]["last_hidden_state"]["rows"] >= 40 * 32
    assert -1 <= q["summary"]["cosine_min"] <= q["summary"]["cosine"] <= 1
