"""Every mainstream decoder family through `edgesparse build hf:FOLDER --pass deltallm`: the
attention of each is found, its sliding windows and soft-capping are read, and with a window
longer than the context (nothing skipped) the package equals the transformers model within 1e-4,
in prefill and in decode with the package's KV cache."""
import json

import numpy as np
import pytest

import tiny_families
from edgesparse import EdgesparseError
from edgesparse.pipeline import BuildRequest, build

EXPECTED = {  # per layer: (sliding window, soft-cap)
    "llama": [(None, None)] * 2,
    "mistral": [(tiny_families.SLIDING, None)] * 2,
    "qwen2": [(None, None)] * 2,
    "qwen3": [(None, None)] * 2,
    "gemma2": [(tiny_families.SLIDING, 5.0), (None, 5.0)],
    "gemma3": [(tiny_families.SLIDING, None), (None, None)],
    "phi3": [(None, None)] * 2,
}
PROMPT = "the river rises in the hills north of the town and flows south to the sea past the mills"
DECODE = 4


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(tiny_families.text())
    return path


def _session(package):
    import onnxruntime as ort

    manifest = json.loads((package / "manifest.json").read_text())
    options = ort.SessionOptions()
    for lib in manifest["runtime"]["custom_op_libraries"]:
        options.register_custom_ops_library(str(package / lib))
    options.log_severity_level = 3
    return ort.InferenceSession(str(package / manifest["runtime"]["model"]), options)


@pytest.mark.parametrize("family", tiny_families.FAMILIES)
def test_family_builds_and_is_exact_when_nothing_is_skipped(family, tmp_path, text_file, library):
    folder = tiny_families.save(family, tmp_path / family)
    manifest = build(BuildRequest(model=f"hf:{folder}", target="x86", output=tmp_path / "pkg",
                                  passes=[("deltallm", {"window": 4096, "decode_steps": 0})],
                                  calibration_text=text_file, calibration_batches=1, quiet=True))
    report = manifest["passes"][0]["report"]
    assert [(row["sliding_window"], row["softcap"]) for row in report["layers"]] == EXPECTED[family]
    assert manifest["verification"]["passed"] and manifest["verification"]["sparse_nodes_on_kernel"] == 2
    _equals_transformers(family, tmp_path / "pkg")


def test_a_window_longer_than_the_calibration_text_is_still_read(tmp_path, library):
    """Real windows (512 to 4096 keys) are longer than calibration windows; the masks are read
    after a long empty cache, so a 4-token text still shows Mistral's 6-key window."""
    folder = tiny_families.save("mistral", tmp_path / "mistral")
    text = tmp_path / "short.txt"
    text.write_text("the river rises in")
    manifest = build(BuildRequest(model=f"hf:{folder}", target="x86", output=tmp_path / "pkg",
                                  passes=[("deltallm", {"window": 4096, "decode_steps": 0})],
                                  calibration_text=text, calibration_batches=1, quiet=True))
    assert [row["sliding_window"] for row in manifest["passes"][0]["report"]["layers"]] == [tiny_families.SLIDING] * 2
    _equals_transformers("mistral", tmp_path / "pkg")


def _equals_transformers(family, package, delta=None):
    """The package against transformers itself: prefill, then decode one token at a time. `delta`
    (the package's manifest): transformers runs the PyTorch reference of delta attention with the
    package's setting, and the two must agree up to float rounding (a decision at a threshold may
    flip: then a few logits differ a little)."""
    import torch

    from edgesparse import hf
    from edgesparse_deltallm import hf as delta_hf

    lm = tiny_families.model(family)
    if delta is not None:
        import onnx
        from onnx import numpy_helper

        packaged = onnx.load(str(package / "model.onnx"))
        inits = {i.name: i for i in packaged.graph.initializer}
        nodes = [n for n in packaged.graph.node if n.op_type == "DeltaAttention"]
        setting = delta["passes"][0]["report"]["setting"]
        theta_q = [numpy_helper.to_array(inits[n.input[3]])[:, 0].tolist() for n in nodes]
        theta_v = [numpy_helper.to_array(inits[n.input[4]]).reshape(-1).tolist() for n in nodes]
        delta_hf.enable(lm, delta_hf.Settings(setting["window"], setting["sinks"], theta_q, theta_v))
    ids = np.asarray(tiny_families.tokenizer()(PROMPT, add_special_tokens=False)["input_ids"], np.int64)
    assert ids.size > 2 * tiny_families.SLIDING
    session = _session(package)
    past_k, past_v = hf.empty_cache(lm.config)
    feed, seq, got = ids[None], list(ids), []
    for step in range(DECODE + 1):
        logits, past_k, past_v = session.run(None, {"input_ids": feed, "attention_mask": np.ones((1, len(seq)), np.int64),
                                                    "past_keys": past_k, "past_values": past_v})
        got.append(logits[0])
        token = int(logits[0, -1].argmax())
        seq.append(token)
        feed = np.asarray([[token]], np.int64)
    with torch.no_grad():
        dense = lm(torch.tensor([seq[:-1]])).logits[0].numpy()
    package = np.concatenate(got)
    assert package.shape == dense.shape
    if delta is not None:
        delta_hf.disable(lm)
        assert np.abs(package - dense).max() < 1e-3 and (np.abs(package - dense) < 1e-4).mean() > 0.99
        return
    np.testing.assert_allclose(package[:ids.size], dense[:ids.size], atol=1e-4, rtol=0)   # prefill
    np.testing.assert_allclose(package[ids.size:], dense[ids.size:], atol=1e-4, rtol=0)   # decode


def _attention_graph(path, scale_values=False, fused=False):
    """q, k, v inputs -> one attention block; `scale_values` scales v before P.V (not understood)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info(n, f, [1, 2, 8, 16]) for n in "qkv"]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1, name="layers.3.attn.softmax"),
             helper.make_node("Mul", ["v", "two"], ["v2"]),
             helper.make_node("MatMul", ["p", "v2" if scale_values else "v"], ["y"])]
    g = helper.make_graph(nodes, "att", ins, [helper.make_tensor_value_info("y", f, [1, 2, 8, 16])],
                          [numpy_helper.from_array(np.asarray([2.0], np.float32), "two")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_attention_in_a_form_not_understood_is_one_line_naming_the_layer(tmp_path):
    import onnx_ir as ir

    from edgesparse_deltallm import rewrite

    model = ir.load(str(_attention_graph(tmp_path / "a.onnx", scale_values=True)))
    with pytest.raises(EdgesparseError) as info:
        rewrite.apply(model, window=4, sinks=0)
    message = str(info.value)
    assert "\n" not in message
    assert "'layers.3.attn.softmax'" in message and "values are scaled before P.V" in message
    # the same graph without the scaled values is understood
    assert len(rewrite.find_attention(ir.load(str(_attention_graph(tmp_path / "b.onnx"))))) == 1


def test_local_layers_skip_inside_their_window_and_verify_at_the_default_tolerance(tmp_path, text_file, library):
    """Gemma 2 with delta attention: inside the local layer's sliding window the keys beyond the
    exact window go through the delta approximation too (and leave it with the window); the global,
    soft-capped layer skips work as well; the package verifies against the op's reference at the
    default tolerance, and equals the PyTorch reference inside transformers in prefill and decode."""
    folder = tiny_families.save("gemma2", tmp_path / "gemma2")
    manifest = build(BuildRequest(model=f"hf:{folder}", target="x86", output=tmp_path / "pkg",
                                  passes=[("deltallm", {"window": 2, "theta_q": 0.3, "theta_v": 0.01,
                                                        "decode_steps": 4})],
                                  calibration_text=text_file, calibration_batches=1, quiet=True))
    local, full = manifest["passes"][0]["report"]["layers"]
    assert local["sliding_window"] == tiny_families.SLIDING and local["prefill"] > 0.1 and local["decode"] > 0.1
    assert full["sliding_window"] is None and full["prefill"] > 0.1 and full["decode"] > 0.1
    assert manifest["verification"]["passed"] and manifest["verification"]["reference"] == "op reference"
    _equals_transformers("gemma2", tmp_path / "pkg", delta=manifest)


def test_fused_attention_nodes_are_named():
    import onnx
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from edgesparse_deltallm import rewrite

    f = TensorProto.FLOAT
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=4,
                            kv_num_heads=2)
    g = helper.make_graph([node], "gqa", [helper.make_tensor_value_info(n, f, [1, 8, 64]) for n in "qkv"],
                          [helper.make_tensor_value_info("y", f, [1, 8, 64])])
    model = ir.from_proto(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18),
                                                              helper.make_opsetid("com.microsoft", 1)]))
    message = str(rewrite.not_found_error(model))
    assert "fused GroupQueryAttention node(s)" in message and "opset <= 22" in message
