"""CoreInfer on SmolLM2-135M, torch reference engine: perplexity of continuations and greedy
agreement, dense vs core neurons only (keep ratios), on real Wikipedia text.

Per window: a prompt of --prompt tokens is prefilled densely and picks each layer's core neurons;
the next --continuation tokens of the article are then scored in decode mode (FFNs sliced to the
core neurons) -> perplexity; and --greedy tokens are generated greedily from the prompt by both,
-> agreement (top-1 of CoreInfer on the dense greedy text, teacher-forced) and the length of the
exactly equal prefix.

    nice -n 10 .venv/bin/python samples/corematching/llm_accuracy.py --out samples/corematching/results/llm_accuracy.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import eval_windows, load_smollm2  # noqa: E402
from edgesparse_corematching.engine import Engine  # noqa: E402
from edgesparse_corematching.settings import Settings, parse_span  # noqa: E402


def nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))


def greedy(engine, model, prompt, steps):
    state, last = engine.prefill(model.model.embed_tokens(prompt))
    out = [int(last.argmax(-1))]
    for _ in range(steps - 1):
        out.append(int(engine.decode(state, torch.tensor([[out[-1]]]))[0, -1].argmax()))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keeps", default="0.5,0.7,0.85")
    ap.add_argument("--rho", type=float, default=0.2)
    ap.add_argument("--layers", default="1-28", help="layers whose decode FFN is sliced ('all' for every layer)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--continuation", type=int, default=64)
    ap.add_argument("--greedy", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok, model = load_smollm2()
    keeps = [float(k) for k in args.keeps.split(",")]
    engines = {"dense": Engine(model, Settings(keep=1.0))} | {f"keep={k}": Engine(model, Settings(keep=k, rho=args.rho, neuron_layers=parse_span(args.layers))) for k in keeps}
    wins = eval_windows(tok, args.prompt + args.continuation, args.windows)
    sums = {name: {"nll": 0.0, "tokens": 0, "agree": 0, "prefix": [], "flops": []} for name in engines}
    start = time.time()
    dense_report_state = None
    for w, ids in enumerate(wins):
        ids = torch.tensor(ids)[None]
        prompt, cont = ids[:, :args.prompt], ids[:, args.prompt:]
        reference = greedy(engines["dense"], model, prompt, args.greedy)
        for name, engine in engines.items():
            state, last = engine.prefill(model.model.embed_tokens(prompt))
            logits = torch.cat([last[:, None], engine.decode(state, cont[:, :-1])], 1)
            sums[name]["nll"] += nll(logits, cont)
            sums[name]["tokens"] += cont.numel()
            if name == "dense":
                dense_report_state = state
                continue
            sums[name]["flops"].append(engine.report(state, dense_report_state)["flops_reduction"]["decode"])
            state, last = engine.prefill(model.model.embed_tokens(prompt))
            forced = torch.tensor([reference[:-1]])
            top = torch.cat([last[:, None], engine.decode(state, forced)], 1).argmax(-1)[0].tolist()
            sums[name]["agree"] += sum(a == b for a, b in zip(top, reference))
            mine = greedy(engine, model, prompt, args.greedy)
            same = next((i for i, (a, b) in enumerate(zip(mine, reference)) if a != b), args.greedy)
            sums[name]["prefix"].append(same)
        print(f"window {w + 1}/{len(wins)} ({time.time() - start:.0f} s): " + ", ".join(
            f"{n} ppl {math.exp(s['nll'] / s['tokens']):.3f}" for n, s in sums.items()), file=sys.stderr, flush=True)
    dense_ppl = math.exp(sums["dense"]["nll"] / sums["dense"]["tokens"])
    rows = []
    for name, s in sums.items():
        ppl = math.exp(s["nll"] / s["tokens"])
        row = {"setting": name, "perplexity": round(ppl, 4), "perplexity_vs_dense": round(ppl / dense_ppl - 1, 4)}
        if name != "dense":
            row |= {"greedy_agreement_teacher_forced": round(s["agree"] / (args.greedy * len(wins)), 4),
                    "greedy_equal_prefix_median": float(np.median(s["prefix"])),
                    "greedy_fully_equal": round(float(np.mean([p == args.greedy for p in s["prefix"]])), 4),
                    "decode_flops_reduction": round(float(np.mean(s["flops"])), 3)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    result = {"model": "SmolLM2-135M-Instruct fp32", "text": "gensim Wikipedia extract, evaluation articles",
              "windows": len(wins), "prompt_tokens": args.prompt, "continuation_tokens": args.continuation,
              "greedy_tokens": args.greedy, "rho": args.rho, "neuron_layers": args.layers, "engine": "torch reference (edgesparse_corematching.engine)",
              "date": datetime.date.today().isoformat(), "seconds": round(time.time() - start), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
