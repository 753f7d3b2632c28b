"""A VLM-style model factory for the pass test: the tiny random Llama of corematching_testing fed
with prompt embeddings and an image mask (the positions the model declares as image tokens), as a
VLM's language model is after its projector. IMAGE env var "none" gives prompts without image tokens."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

IMAGE_SPAN = (4, 34)


def build():
    import torch

    from corematching_testing import tiny_llama, tokens
    from edgesparse import TorchModel

    lm = tiny_llama(layers=3)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, inputs_embeds, image_mask):
            # the dense model attends to every token; the mask only tells the pass which ones are image tokens
            return self.lm(inputs_embeds=inputs_embeds).logits + 0.0 * image_mask.any().float()

    def prompt(length, offset):
        with torch.no_grad():
            embeds = lm.model.embed_tokens(tokens(length, offset)[None])
        mask = torch.zeros(1, length, dtype=torch.bool)
        if os.environ.get("CM_TEST_IMAGE") != "none":
            mask[:, IMAGE_SPAN[0]:IMAGE_SPAN[1]] = True
        return {"inputs_embeds": embeds.numpy(), "image_mask": mask.numpy()}

    def calibration():
        for i in range(2):
            yield prompt(40, 11 * i)

    example = prompt(40, 0)
    return TorchModel(module=Logits().eval(), example_inputs={k: torch.tensor(v) for k, v in example.items()},
                      output_names=["logits"], dynamic_axes={"inputs_embeds": {1: "sequence"}, "image_mask": {1: "sequence"},
                                                             "logits": {1: "sequence"}},
                      calibration=calibration)
