"""A trained BlockFFN checkpoint in the authors' released format (config.json + *.safetensors)
as an edgesparse model factory; the directory comes from the environment:

    BLOCKFFN_CHECKPOINT=/path/to/BlockFFN-0.1B edgesparse build samples/blockffn/checkpoint_model.py:build \\
        --target x86 --pass blockffn:chunk=1 -o out/blockffn-0.1b

Calibration: the checkpoint's own tokenizer on a short English text when it loads offline, else
random token ids (the build warns); see plugins/blockffn/README.md."""
from __future__ import annotations

import os

from edgesparse import EdgesparseError


def build():
    from edgesparse_blockffn import checkpoint_factory

    path = os.environ.get("BLOCKFFN_CHECKPOINT")
    if not path:
        raise EdgesparseError("set BLOCKFFN_CHECKPOINT to a BlockFFN checkpoint directory (config.json + *.safetensors)")
    return checkpoint_factory(path)
