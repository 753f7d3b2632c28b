"""Tiny random decoders of the mainstream families, built from transformers' own configuration
classes (no weights downloaded), saved as model folders with a tiny tokenizer trained on a few
sentences, so that `edgesparse build hf:FOLDER` takes them as it takes a real checkout.

What each family adds to the attention the passes must understand:
    llama    GQA (4 query heads over 2 KV heads)
    mistral  a sliding window on every layer
    qwen2    biased Q/K/V projections
    qwen3    QK-norm (RMSNorm on q and k before RoPE)
    gemma2   attention logit soft-capping, local (sliding) and global layers alternating, eager attention
    gemma3   QK-norm, local and global layers alternating
    phi3     fused QKV and gate/up projections
"""
from __future__ import annotations

from pathlib import Path

SLIDING = 6  # shorter than the test contexts, so the window shows in the masks
SENTENCES = [
    "the river rises in the hills north of the town and flows south to the sea",
    "in the old days the mills along the river made wool and flour for the town",
    "today visitors walk the path beside the water past the locks and the bridges",
    "a castle once guarded the crossing where the road meets the river",
]


def text() -> str:
    return " . ".join(SENTENCES * 4)


def _common(**extra):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(extra)
    return base


def config(family: str):
    import transformers as t

    if family == "llama":
        return t.LlamaConfig(**_common())
    if family == "mistral":
        return t.MistralConfig(**_common(sliding_window=SLIDING))
    if family == "qwen2":
        return t.Qwen2Config(**_common())
    if family == "qwen3":
        return t.Qwen3Config(**_common(head_dim=16))
    if family == "gemma2":
        return t.Gemma2Config(**_common(head_dim=16, sliding_window=SLIDING, attn_logit_softcapping=5.0,
                                        final_logit_softcapping=30.0, query_pre_attn_scalar=16))
    if family == "gemma3":
        return t.Gemma3TextConfig(**_common(head_dim=16, sliding_window=SLIDING, query_pre_attn_scalar=16,
                                            layer_types=["sliding_attention", "full_attention"]))
    if family == "phi3":
        return t.Phi3Config(**_common())
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def tokenizer():
    """A word-level tokenizer trained on SENTENCES (ids below the models' vocabulary of 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                   unk_token="[UNK]")


def model(family: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(config(family)).eval()
    with torch.no_grad():  # random init leaves norms at 1 and small logits; spread them a little
        for p in lm.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return lm


def save(family: str, folder: Path) -> Path:
    """A model folder (config, safetensors, tokenizer) as save_pretrained writes it."""
    folder = Path(folder)
    model(family).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder
