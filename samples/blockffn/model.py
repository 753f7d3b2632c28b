"""SmolLM2-135M with its KV cache (the deltallm sample's factory) for a BlockFFN build:

    edgesparse build samples/blockffn/model.py:build --target x86 \\
        --pass blockffn:state=$HOME/.cache/edgesparse/blockffn/smollm2_s70_c8.pt,chunk=1 -o out/smollm2-blockffn

`state` is the conversion written by convert_smollm2.py (training happens there, with more text
and time than a build's calibration batches give)."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def build():
    path = Path(__file__).resolve().parent.parent / "deltallm" / "model.py"
    spec = importlib.util.spec_from_file_location("deltallm_sample_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build()
