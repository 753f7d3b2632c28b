"""`edgesparse build hf:PATH`: a Hugging Face causal LM folder built with no factory written by the
user, its KV cache as inputs and outputs, calibrated on a text file; and the one-line errors."""
import json

import numpy as np
import pytest

from edgesparse import EdgesparseError, hf
from edgesparse_testing import run

SENTENCES = ["the cat sat on the mat and looked at the door", "a dog ran down the road to the old mill by the river",
             "the river was cold and the mill was quiet in the winter"]


def _tiny_llama(folder):
    """A 2-layer random Llama (GQA 4/2) and a word-level tokenizer trained on SENTENCES, saved as
    save_pretrained writes them."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                            unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    lm = LlamaForCausalLM(config).eval()
    lm.save_pretrained(folder)
    return lm


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(transformers model, package folder): one dense build through the real CLI."""
    tmp = tmp_path_factory.mktemp("hf")
    lm = _tiny_llama(tmp / "llama")
    text = tmp / "calibration.txt"
    text.write_text(" . ".join(SENTENCES * 30))  # about 1000 tokens: three windows
    run("build", f"hf:{tmp / 'llama'}", "--target", "x86", "--calibration-text", text, "--calibration-batches", "2",
        "-o", tmp / "pkg")
    return lm, tmp / "pkg"


def test_package_has_the_kv_cache_and_dynamic_axes(built):
    _, package = built
    manifest = json.loads((package / "manifest.json").read_text())
    inputs = {i["name"]: i["shape"] for i in manifest["inputs"]}
    outputs = {o["name"]: o["shape"] for o in manifest["outputs"]}
    assert list(inputs) == list(hf.INPUTS) and list(outputs) == list(hf.OUTPUTS)
    assert all(isinstance(d, str) for d in inputs["input_ids"])              # batch and sequence
    assert isinstance(inputs["past_keys"][1], str) and isinstance(inputs["past_keys"][3], str)  # batch, past
    assert inputs["past_keys"][0] == 2 and inputs["past_keys"][2] == 2 and inputs["past_keys"][4] == 16
    verification = manifest["verification"]
    assert verification["passed"] and verification["max_abs_error"] < 1e-4
    assert verification["calibration_batches"] == 2  # windows of the calibration text


def test_generation_with_the_kv_cache_matches_transformers(built):
    import onnxruntime as ort
    import torch

    lm, package = built
    session = ort.InferenceSession(str(package / "model.onnx"))
    prompt = [5, 9, 12, 7, 20, 3, 11]
    got = hf.generate(session, prompt, 6, config=lm.config)
    with torch.no_grad():
        want = lm.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, len(prompt):]
    assert got == want.tolist()
    # a batch of two sequences (no padding) in one call: dynamic batch
    ids = np.asarray([prompt, prompt[::-1]], np.int64)
    pk, pv = hf.empty_cache(lm.config, batch=2)
    logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), "past_keys": pk,
                                      "past_values": pv})[0]
    with torch.no_grad():
        dense = lm(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(logits, dense, atol=1e-4, rtol=0)


def test_bad_hf_inputs_are_one_line(tmp_path, mlp_onnx):
    text = tmp_path / "text.txt"
    text.write_text("some words")
    cases = [
        (("build", f"hf:{tmp_path / 'missing'}", "--target", "x86", "-o", tmp_path / "o"), "no such file or folder"),
        (("build", f"hf:{tmp_path}", "--target", "x86", "-o", tmp_path / "o"), "no config.json"),
        (("build", f"hf:{tmp_path}", "--target", "x86", "--calibration-text", tmp_path / "none.txt", "-o", tmp_path / "o"),
         "calibration text not found"),
        (("build", mlp_onnx, "--target", "x86", "--calibration-text", text, "-o", tmp_path / "o"),
         "--calibration-text is for hf: models"),
    ]
    for args, message in cases:
        result = run(*args, check=False)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
        assert not (tmp_path / "o").exists()


def test_calibration_windows_split_the_text():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    batches = hf.calibration_batches(np.arange(600), config, length=256)
    assert [b["input_ids"].shape for b in batches] == [(1, 256), (1, 256)]
    assert batches[1]["input_ids"][0, 0] == 256 and batches[0]["past_keys"].shape == (3, 1, 2, 0, 16)
    assert hf.calibration_batches(np.arange(40), config)[0]["input_ids"].shape == (1, 40)
    with pytest.raises(EdgesparseError, match="fewer than 2 tokens"):
        hf.calibration_batches(np.arange(1), config)


def test_recipe_holds_the_hf_model_and_its_calibration_text(tmp_path):
    from edgesparse.recipe import load_recipe

    (tmp_path / "r").mkdir()
    recipe = tmp_path / "r" / "llm.toml"
    recipe.write_text('model = "hf:models/llama"\ncalibration_text = "text/wiki.txt"\ntarget = "x86"\n')
    settings = load_recipe(recipe)
    assert settings["model"] == f"hf:{tmp_path / 'r' / 'models' / 'llama'}"
    assert settings["calibration_text"] == str(tmp_path / "r" / "text" / "wiki.txt")
