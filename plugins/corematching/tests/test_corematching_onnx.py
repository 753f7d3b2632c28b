"""The CoreMatching graphs (VLM prompts, batch 1) in ONNX Runtime against the torch engine: the same
tokens removed per layer (the caches really are shorter), the same logits, and a prompt without
image tokens removes nothing."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from corematching_testing import tiny_llama, tokens
from edgesparse_corematching import onnx_graphs
from edgesparse_corematching.engine import Engine
from edgesparse_corematching.settings import Settings

SETTINGS = Settings(keep=0.5, neuron_layers=(1, 2), token_layers=(0, 1))


@pytest.fixture(scope="module")
def graphs():
    torch.set_num_threads(1)
    model = tiny_llama(layers=3)
    ids = tokens(40)[None]
    mask = torch.zeros(1, 40, dtype=torch.bool)
    mask[:, 4:34] = True
    with torch.no_grad():
        pre, dec = onnx_graphs.export_matching(model, SETTINGS, model.model.embed_tokens(ids), mask)
    return model, ort.InferenceSession(pre.SerializeToString()), ort.InferenceSession(dec.SerializeToString())


def _prompt(model, length=44, image=(3, 40)):
    with torch.no_grad():
        embeds = model.model.embed_tokens(tokens(length, 9)[None])
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[:, image[0]:image[1]] = True
    return embeds, mask


def test_prefill_and_decode_match_the_engine(graphs):
    model, pre, dec = graphs
    embeds, mask = _prompt(model)                  # another length and image span than at export
    out = pre.run(None, {"inputs_embeds": embeds.numpy(), "image_mask": mask.numpy()})
    engine = Engine(model, SETTINGS)
    state, last = engine.prefill(embeds, prunable=mask)
    kept = [out[2 + 2 * i].shape[2] for i in range(3)]
    assert kept == [int(c.valid.sum()) for c in state.caches]
    assert kept[0] == 44 and kept[2] < kept[1] < 44            # removed from the following layers' caches
    assert np.abs(out[0] - last.numpy()).max() < 1e-4
    names = [f"past_{k}_{i}" for i in range(3) for k in ("key", "value")]
    token = np.array([[int(out[0][0].argmax())]])
    weights = {o.name: v for o, v in zip(pre.get_outputs()[8:], out[8:])}
    assert sorted(weights) == ["core_down_1", "core_down_2", "core_gate_up_1", "core_gate_up_2"]
    step = dec.run(None, {"input_ids": token, "position": out[1], **dict(zip(names, out[2:8])), **weights})
    assert np.abs(step[0] - engine.decode(state, torch.tensor(token)).numpy()).max() < 1e-4
    assert out[1][0] == 44 and step[5].shape[2] == kept[2] + 1


def test_prompt_without_image_tokens_removes_nothing(graphs):
    model, pre, _ = graphs
    embeds, _ = _prompt(model)
    out = pre.run(None, {"inputs_embeds": embeds.numpy(), "image_mask": np.zeros((1, 44), bool)})
    assert [out[2 + 2 * i].shape[2] for i in range(3)] == [44, 44, 44]
