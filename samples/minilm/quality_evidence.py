"""What pruning costs the MiniLM sample, in the metric its users see: mean-pooled sentence
embeddings on 512 held-out Wikipedia sentences against the original model's (model.evaluate's
embedding_cosine and nn_agreement), computed in PyTorch (the package computes the same function:
every build verifies that).

    .venv/bin/python samples/minilm/quality_evidence.py            # ~3 min on 2 cores

- one-shot: magnitude's block pruning (edgesparse_magnitude.prune_blocks) at 20-75 %, 16x1 and 4x1
  blocks, on every Linear layer or on the FFN layers only;
- reconstructed: the same 16x1 masks chosen by activation-weighted block norms, then the kept
  weights of each layer refit by least squares to the layer's original outputs on 256 other
  Wikipedia sentences, layer after layer (each sees the inputs its pruned predecessors give it).

Writes samples/minilm/results/quality_evidence.json.
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import model as sample  # noqa: E402

from edgesparse_magnitude import prune_blocks  # noqa: E402

RESULTS = HERE / "results" / "quality_evidence.json"


def calibration_sentences(count: int = 256) -> list[str]:
    """Wikipedia sentences none of which is an evaluation sentence."""
    held_out, found = set(sample.wiki_sentences()), []
    for sentences in sample.wiki_article_sentences():
        found += [s for s in sentences if s not in held_out][1::7][:4]
        if len(found) >= count:
            break
    return found[:count]


def encode(tokenizer, sentences):
    return tokenizer(sentences, padding="max_length", truncation=True, max_length=sample.MAX_LENGTH, return_tensors="pt")


def embeddings(bert, enc) -> np.ndarray:
    with torch.no_grad():
        hidden = bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.numpy()
    return sample.pooled(hidden, enc["attention_mask"].numpy())


def linears(bert, ffn_only: bool):
    for name, module in bert.named_modules():
        if isinstance(module, torch.nn.Linear) and "encoder" in name:
            if not ffn_only or "intermediate" in name or ("output.dense" in name and "attention" not in name):
                yield name, module


def one_shot(bert, sparsity: float, block: int, ffn_only: bool):
    pruned = copy.deepcopy(bert)
    for _, layer in linears(pruned, ffn_only):
        w = layer.weight.detach().numpy().T  # [K, N] as in the exported MatMul
        layer.weight.data = torch.from_numpy(prune_blocks(w, sparsity, block).T.copy())
    return pruned


def reconstructed(bert, sparsity: float, block: int, calibration):
    pruned = copy.deepcopy(bert).eval()
    real = calibration["attention_mask"].bool()
    for _, layer in linears(pruned, ffn_only=False):
        seen = {}
        hook = layer.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].detach()))
        with torch.no_grad():
            pruned(**calibration)
        hook.remove()
        x = seen["x"][real].double()                       # [tokens, K]: real tokens only
        h = x.T @ x
        w = layer.weight.detach().double().T.clone()      # [K, N]
        k, n = w.shape
        blocks = n // block
        score = (w.reshape(k, blocks, block) ** 2).sum(-1) * torch.diag(h)[:, None]
        keep = torch.ones(k * blocks, dtype=torch.bool)
        keep[torch.argsort(score.flatten())[: int(round(sparsity * k * blocks))]] = False
        keep = keep.reshape(k, blocks)
        damp = 0.01 * torch.diag(h).mean()
        target = h @ w                                     # x^T x w: the original outputs' moments
        refit = torch.zeros_like(w)
        for j in range(blocks):
            rows = keep[:, j].nonzero().flatten()
            if rows.numel():
                cols = slice(j * block, (j + 1) * block)
                a = h[rows][:, rows] + damp * torch.eye(rows.numel(), dtype=h.dtype)
                refit[rows, cols] = torch.linalg.solve(a, target[rows, cols])
        layer.weight.data = refit.T.float().contiguous()
    return pruned


def main() -> None:
    torch.set_num_threads(1)
    tokenizer, bert = sample._tokenizer_and_model()
    evaluation = encode(tokenizer, sample.wiki_sentences())
    reference = embeddings(bert, evaluation)
    rows = []

    def record(**what):
        t0 = time.time()
        model = what.pop("model")()
        metrics = sample.embedding_agreement(embeddings(model, evaluation), reference)
        rows.append({**what, **{k: round(v, 4) for k, v in metrics.items()}, "seconds": round(time.time() - t0, 1)})
        print(rows[-1], flush=True)

    for ffn_only in (False, True):
        for block in (16, 4):
            for sparsity in (0.2, 0.3, 0.5, 0.75):
                record(method="one-shot", layers="ffn" if ffn_only else "all", block=block, sparsity=sparsity,
                       model=lambda: one_shot(bert, sparsity, block, ffn_only))
    calibration = encode(tokenizer, calibration_sentences())
    record(method="reconstructed", layers="all", block=16, sparsity=0.5,
           model=lambda: reconstructed(bert, 0.5, 16, calibration))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"sentences": len(sample.wiki_sentences()), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
