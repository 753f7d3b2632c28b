"""A BlockFFN checkpoint (or any model with BlockFFNForCausalLM's forward and cache) as an
edgesparse model factory's TorchModel:

    # model.py
    from edgesparse_blockffn import checkpoint_factory
    def build():
        return checkpoint_factory("/path/to/BlockFFN-0.1B")

    edgesparse build model.py:build --target x86 --pass blockffn:chunk=1 -o out/blockffn-0.1b
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgesparse import EdgesparseError

from .checkpoint import load

CALIBRATION_TEXT = (
    "The river rises in the hills north of the town and runs south through farmland for about forty "
    "kilometres before it reaches the sea. In the nineteenth century mills were built along its banks, "
    "and a canal was dug to carry coal from the mines to the harbour. Most of the mills closed after "
    "the war; some of the buildings are now flats, others a museum of local history. The canal was "
    "restored by volunteers in the nineteen nineties and is used by walkers, anglers and small boats. "
    "A railway line opened in 1862 and still runs twice an hour to the city, where most people who live "
    "in the town work. The population grew quickly after the line opened and has changed little since. "
)


def _calibration_ids(path: Path, calibration, vocab: int, tokens: int, batches: int, seed: int):
    """Token id sequences for calibration and verification, and where they came from."""
    if calibration is not None:
        items = list(calibration)
        if items and all(isinstance(x, str) for x in items):
            tok = _tokenizer(path)
            if tok is None:
                raise EdgesparseError(f"blockffn: calibration text given, but checkpoint {path} has no tokenizer "
                                      "that loads offline: pass token id sequences instead")
            items = [tok(x)["input_ids"] for x in items]
        seqs = [np.asarray(x, np.int64).reshape(-1) for x in items]
        if not seqs or min(len(s) for s in seqs) < 2:
            raise EdgesparseError("blockffn: calibration needs sequences of at least 2 tokens")
        if max(int(s.max()) for s in seqs) >= vocab or min(int(s.min()) for s in seqs) < 0:
            raise EdgesparseError(f"blockffn: calibration token ids must be in [0, {vocab})")
        return seqs, "given"
    tok = _tokenizer(path)
    if tok is not None:
        ids = np.asarray(tok(CALIBRATION_TEXT * 8)["input_ids"], np.int64)
        if len(ids) >= tokens * batches and ids.max() < vocab:
            return [ids[i * tokens:(i + 1) * tokens] for i in range(batches)], "tokenizer"
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, tokens, dtype=np.int64) for _ in range(batches)], "random token ids"


def _tokenizer(path: Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # a tokenizer that needs remote code or a missing package: calibrate without it
        return None


def checkpoint_factory(path, *, calibration=None, tokens: int = 64, batches: int = 4, seed: int = 0):
    """An edgesparse model factory's TorchModel for a released-format BlockFFN checkpoint.

    The exported graph serves prefill and decode: inputs input_ids [1, T] and per layer i
    past_latent.i [1, P, kv_lora_rank], past_rope.i [1, P, qk_rope_head_dim] (P = 0 for a prompt);
    outputs logits [1, T, V] and present_latent.i, present_rope.i ([1, P + T, .]: the next call's past).
    calibration: token id sequences, or strings when the checkpoint has a tokenizer that loads
    offline; by default a short English text through that tokenizer, else seeded random ids (the
    sparsity report then says so). Every other calibration batch continues a sequence from a
    cache of its first half, so the build's verification covers decode with a cache too.
    """
    path = Path(path)
    module = load(path)
    seqs, source = _calibration_ids(path, calibration, module.config.vocab_size, tokens, batches, seed)
    return torch_model(module, seqs, source, seed)


def torch_model(module, seqs: list, source: str, seed: int = 0):
    """The build's TorchModel for a model with BlockFFNForCausalLM's step() and cache (a loaded
    checkpoint, or e.g. a dense twin of the same shape), calibrated on token id sequences; exported
    with one cache input and output per layer (model.LayerCaches)."""
    import torch

    from edgesparse import TorchModel

    from .model import LayerCaches, cache_names, layer_order

    cfg = module.config
    names = cache_names(cfg.layers)
    exported = LayerCaches(module)
    exported.calibration_source = source  # the pass reports it (and warns about random ids)

    def per_layer(latents, ropes) -> dict:
        return dict(zip(names, (t.numpy() for t in layer_order(latents, ropes))))

    def calibration_batches():
        for i, seq in enumerate(seqs):
            latents, ropes = (list(c) for c in module.empty_cache())
            ids = seq
            if i % 2 == 1:  # continue from a cache of the first half
                half = len(seq) // 2
                with torch.no_grad():
                    _, latents, ropes = module.step(torch.tensor(seq[None, :half]), latents, ropes)
                ids = seq[half:]
            yield {"input_ids": ids[None].astype(np.int64), **per_layer(latents, ropes)}

    rng = torch.Generator().manual_seed(seed)
    example_past = 3  # a non-empty example cache: a zero-length one would pin the past axis to 0 in the export
    cache = lambda width: [torch.randn(1, example_past, width, generator=rng) for _ in range(cfg.layers)]
    example = {"input_ids": torch.randint(0, cfg.vocab_size, (1, 5), generator=rng),
               **dict(zip(names, layer_order(cache(cfg.kv_lora_rank), cache(cfg.qk_rope_head_dim))))}
    return TorchModel(module=exported, example_inputs=example,
                      output_names=["logits", *cache_names(cfg.layers, "present")],
                      dynamic_axes={"input_ids": {1: "sequence"}, **{n: {1: "past"} for n in names}},
                      calibration=calibration_batches)
