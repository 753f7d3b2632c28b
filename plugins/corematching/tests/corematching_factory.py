"""A model factory for the pass test: the tiny random Llama of corematching_testing, logits only."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def build():
    import torch

    from corematching_testing import tiny_llama, tokens
    from edgesparse import TorchModel

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = tiny_llama(layers=2)

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids).logits

    def calibration():
        for i in range(2):
            yield {"input_ids": tokens(64, 30 * i)[None].numpy()}

    return TorchModel(module=Logits().eval(), example_inputs={"input_ids": tokens(16)[None]}, output_names=["logits"],
                      dynamic_axes={"input_ids": {1: "sequence"}}, calibration=calibration)
