"""Shared by the blockffn sample scripts: SmolLM2-135M and the gensim Wikipedia text come from
the deltallm sample's loader (nothing is downloaded at run time); all-MiniLM-L6-v2 from the
minilm sample. Results go to samples/blockffn/results/."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _deltallm_common():
    spec = importlib.util.spec_from_file_location("deltallm_sample_common", HERE.parent / "deltallm" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _deltallm_common()
cache_dir, load_smollm2, wiki_articles = _shared.cache_dir, _shared.load_smollm2, _shared.wiki_articles
wiki_tokens, windows = _shared.wiki_tokens, _shared.windows

RESULTS = HERE / "results"


def state_dir() -> Path:
    path = cache_dir() / "blockffn"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
