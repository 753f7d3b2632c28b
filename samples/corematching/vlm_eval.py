"""Answer accuracy and FLOPs of the assembled VLM (vlm.py), dense vs CoreMatching (image-token +
FFN-neuron co-pruning) vs neuron-only, with the torch reference engine, on Fashion-MNIST test
images; batches of --batch images (each sequence prunes its own tokens and neurons).

Per image the prompt is prefilled (image tokens declared by the VLM as prunable), then up to
--answer tokens are generated greedily; the answer is correct when it starts with the class name.
FLOPs (2 x MACs) cover the language model (attention, FFN, projections, lm_head), plus the
vision encoder and projector, which both variants run alike.

    nice -n 10 .venv/bin/python samples/corematching/vlm_eval.py --images 200 --out samples/corematching/results/vlm_accuracy.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import vlm as V  # noqa: E402
from edgesparse_corematching.engine import Engine  # noqa: E402
from edgesparse_corematching.settings import Settings, parse_span  # noqa: E402

VISION_MACS = 385e6   # EfficientNet-Lite0 at 224 x 224 (counted by vision_macs() below)


def vision_macs(vision) -> int:
    """Conv and Linear MACs of one 224 x 224 image, counted with forward hooks."""
    total = [0]

    def conv(m, i, o):
        total[0] += o.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    hooks = [m.register_forward_hook(conv) for m in vision.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        vision.extract_features(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    return total[0]


def run(engine, model, feats, answer_tokens, with_image=True):
    """Greedy answers for a batch; (predicted classes, state)."""
    prompt, span = model.prompt(feats, with_image)
    prunable = model.prunable(prompt.shape[0], prompt.shape[1], span)
    state, last = engine.prefill(prompt, prunable=prunable)
    out = [last.argmax(-1)]
    for _ in range(answer_tokens - 1):
        out.append(engine.decode(state, out[-1][:, None])[:, -1].argmax(-1))
    ids = torch.stack(out, 1)
    texts = [model.tok.decode(row, skip_special_tokens=False).split("<|im_end|>")[0] for row in ids.tolist()]
    return [model.answer(t) for t in texts], state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--answer", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--neuron-layers", default="1-28")
    ap.add_argument("--token-layers", default="1-1")
    ap.add_argument("--variants", default="dense,tokens_only,neurons_only,corematching")
    ap.add_argument("--split", default="test", choices=("test", "train"), help="train: for choosing settings, never for reporting")
    ap.add_argument("--min-tokens", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = V.load()
    vision = V.load_vision()
    vmacs = vision_macs(vision)
    images, labels = V.fashion_mnist(args.split)
    pick = np.random.default_rng(args.seed).choice(len(images), args.images, replace=False)
    start = time.time()
    feats = V.image_features(vision, images[pick])
    proj_macs = feats.shape[1] * (1280 * 576 + 576 * 576)
    variants = {
        "dense": Settings(keep=1.0),
        "tokens_only": Settings(keep=args.keep, token_layers=parse_span(args.token_layers), slice_decode=False, min_tokens=args.min_tokens),
        "neurons_only": Settings(keep=args.keep, neuron_layers=parse_span(args.neuron_layers)),
        "corematching": Settings(keep=args.keep, neuron_layers=parse_span(args.neuron_layers), token_layers=parse_span(args.token_layers),
                                 min_tokens=args.min_tokens),
    }
    variants = {k: v for k, v in variants.items() if k in args.variants.split(",") or k == "dense"}
    engines = {k: Engine(model.lm, s) for k, s in variants.items()}
    correct = {k: 0 for k in variants}
    agree = {k: 0 for k in variants}
    macs = {k: {"prefill": 0, "decode": 0} for k in variants}
    kept_tokens = []
    for i in range(0, len(pick), args.batch):
        f = feats[i:i + args.batch]
        y = labels[pick[i:i + args.batch]]
        preds = {}
        for name, engine in engines.items():
            preds[name], state = run(engine, model, f, args.answer)
            correct[name] += int(sum(p == t for p, t in zip(preds[name], y)))
            agree[name] += int(sum(p == d for p, d in zip(preds[name], preds["dense"])))
            for stage in ("prefill", "decode"):
                macs[name][stage] += sum(r["macs"] for r in state.stats[stage].values())
            if name == "corematching":
                last = state.caches[-1].valid.sum(1).float() - args.answer + 1   # prompt tokens reaching the last layer
                kept_tokens.append((last / (len(model.before) + 49 + len(model.after))).mean().item())
        print(f"{i + len(f)}/{len(pick)} ({time.time() - start:.0f} s): " + ", ".join(
            f"{k} {correct[k] / (i + len(f)):.3f}" for k in variants), file=sys.stderr, flush=True)
    n = len(pick)
    side = n * (vmacs + proj_macs)
    rows = []
    for name in variants:
        total = macs[name]["prefill"] + macs[name]["decode"]
        dense_total = macs["dense"]["prefill"] + macs["dense"]["decode"]
        rows.append({"variant": name, "accuracy": round(correct[name] / n, 4), "agreement_with_dense": round(agree[name] / n, 4),
                     "lm_flops_reduction": round(dense_total / total, 3),
                     "lm_prefill_flops_reduction": round(macs["dense"]["prefill"] / macs[name]["prefill"], 3),
                     "lm_decode_flops_reduction": round(macs["dense"]["decode"] / macs[name]["decode"], 3),
                     "flops_reduction_with_vision": round((dense_total + side) / (total + side), 3),
                     "gflops_per_image": round(2 * (total + side) / n / 1e9, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    result = {"model": "EfficientNet-Lite0 (frozen) -> trained projector -> SmolLM2-135M-Instruct (frozen)",
              "data": f"Fashion-MNIST {args.split} images", "images": n, "seed": args.seed, "batch": args.batch,
              "answer_tokens": args.answer, "keep": args.keep, "neuron_layers": args.neuron_layers,
              "token_layers": args.token_layers, "image_tokens": 49,
              "prompt_tokens": len(model.before) + 49 + len(model.after),
              "corematching_prompt_tokens_at_last_layer": round(float(np.mean(kept_tokens)), 4),
              "vision_macs_per_image": vmacs, "engine": "torch reference", "date": datetime.date.today().isoformat(),
              "seconds": round(time.time() - start), "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
