"""CoreInfer on every mainstream decoder family (tiny random models from transformers'
configuration classes, tests/tiny_families.py of the deltallm plugin): the engine's own layer
loop equals transformers when nothing is pruned, in prefill and decode; the exported prefill and
decode graphs equal the engine with half the FFN neurons kept (the pass checks the same at
build time, after checking the engine against transformers)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "deltallm" / "tests"))  # the shared tiny families

import tiny_families  # noqa: E402
from edgesparse_corematching import onnx_graphs, verify  # noqa: E402
from edgesparse_corematching.engine import Engine  # noqa: E402
from edgesparse_corematching.settings import Settings  # noqa: E402

PROMPT = "the river rises in the hills north of the town and flows south to the sea past the mills"


def _ids():
    ids = tiny_families.tokenizer()(PROMPT, add_special_tokens=False)["input_ids"]
    assert len(ids) > 2 * tiny_families.SLIDING
    return torch.tensor([ids])


@pytest.mark.parametrize("family", tiny_families.FAMILIES)
def test_engine_equals_transformers_when_nothing_is_pruned(family):
    lm = tiny_families.model(family)
    ids = _ids()
    engine = Engine(lm, Settings(keep=1.0))
    with torch.no_grad():
        state, prefill = engine.prefill(lm.model.embed_tokens(ids[:, :-3]), keep_logits=True)
        decode = engine.decode(state, ids[:, -3:-1])            # two tokens on the engine's cache
        decode = torch.cat([decode, engine.decode(state, ids[:, -1:])], 1)   # and one more
        dense = lm(input_ids=ids).logits
    np.testing.assert_allclose(prefill.numpy(), dense[:, :-3].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(decode.numpy(), dense[:, -3:].numpy(), atol=1e-4, rtol=0)
    assert verify.engine_reproduces(lm, ids) < 1e-4


# two exports per family are slow on a shared machine: the families whose layers differ most from
# Llama's (Gemma 2: sandwich norms, soft-capping, local layers; Phi-3: fused projections); the
# graphs run the same family.py code as the engine for the others
@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_exported_graphs_equal_the_engine_with_half_the_neurons(family):
    lm = tiny_families.model(family)
    ids = _ids()
    settings = Settings(keep=0.5)
    with torch.no_grad():
        prefill, decode = onnx_graphs.export(lm, settings, ids[:, :8])
    check = verify.against_engine(lm, settings, prefill, decode, ids, steps=3, threads=1)
    assert check["same_core_neurons"]
    assert check["max_abs_error"] < 1e-4 * max(1.0, check["max_abs_logit"])


def test_a_model_the_layer_loop_misreads_stops_with_one_line():
    from edgesparse import EdgesparseError

    lm = tiny_families.model("llama")
    attn = lm.model.layers[1].self_attn
    plain = attn.forward
    attn.forward = lambda *a, **k: (2.0 * plain(*a, **k)[0], None)   # something the engine's loop does not do
    with pytest.raises(EdgesparseError, match="does not reproduce this LlamaForCausalLM") as info:
        verify.engine_reproduces(lm, _ids())
    assert "\n" not in str(info.value)


def test_hf_folder_builds_with_corematching(tmp_path):
    """The whole build on a Gemma 3 folder through hf: (QK-norm, sandwich norms, a local layer)."""
    from edgesparse.pipeline import BuildRequest, build

    folder = tiny_families.save("gemma3", tmp_path / "gemma3")
    text = tmp_path / "text.txt"
    text.write_text(tiny_families.text())
    manifest = build(BuildRequest(model=f"hf:{folder}", target="x86", output=tmp_path / "pkg",
                                  passes=[("corematching", {"keep": 0.5})], calibration_text=text,
                                  calibration_batches=1, quiet=True))
    report = manifest["passes"][0]["report"]
    assert report["verification"]["same_core_neurons"]
    assert report["verification"]["max_abs_error"] < 1e-4 * max(1.0, report["verification"]["max_abs_logit"])
    assert [row["neurons_kept"] for row in report["layers"]] == [0.5, 0.5]
    assert manifest["verification"]["passed"]
