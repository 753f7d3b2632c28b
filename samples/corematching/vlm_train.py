"""Train the VLM's projector (LLaVA stage 1: EfficientNet-Lite0 and SmolLM2 frozen, loss on the
answer tokens only) on Fashion-MNIST training images; saves <cache>/corematching-samples/vlm_projector.pt
and writes the training log to samples/corematching/results/vlm_train.json.

    nice -n 10 .venv/bin/python samples/corematching/vlm_train.py --steps 120
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
from common import cache_dir  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-steps", type=int, default=300,
                    help="before the LM-loss steps: regress image tokens onto the class name's word embeddings (cheap, no LM)")
    ap.add_argument("--resume", action="store_true", help="continue from the saved projector (use another --seed: new images)")
    ap.add_argument("--save-every", type=int, default=10, help="save the projector every N steps (long runs on a shared machine)")
    ap.add_argument("--out", default="samples/corematching/results/vlm_train.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = V.load(projector_path=None if args.resume else Path("/nonexistent"))
    images, labels = V.fashion_mnist("train")
    pick = rng.choice(len(images), args.steps * args.batch, replace=False)
    start = time.time()
    cached = cache_dir() / "corematching-samples" / f"vlm_train_features_{args.seed}_{len(pick)}.pt"
    if cached.exists():
        feats = torch.load(cached)
    else:
        feats = V.image_features(V.load_vision(), images[pick])
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(feats, cached)
    print(f"features of {len(pick)} images in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    model.projector.train()
    emb = model.lm.model.embed_tokens
    if args.init_steps and not args.resume:
        # initialisation: each image token regressed onto the mean word embedding of its class name
        targets = torch.stack([emb(torch.tensor(model.answers[c][:-1])).mean(0) for c in range(len(V.CLASSES))]).detach()
        opt = torch.optim.Adam(model.projector.parameters(), lr=1e-3)
        for step in range(args.init_steps):
            i = torch.tensor(rng.choice(len(pick), 64))
            j = torch.tensor(rng.choice(feats.shape[1], (64, 4)))
            x = feats[i[:, None], j]                                     # 4 random tokens of 64 images
            loss = ((model.projector(x) - targets[torch.tensor(labels[pick])[i]][:, None]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"init regression: mse {loss.item():.4f} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    opt = torch.optim.AdamW(model.projector.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    log = []
    for step in range(args.steps):
        idx = slice(step * args.batch, (step + 1) * args.batch)
        y = labels[pick[idx]]
        prompt, _ = model.prompt(feats[idx])
        answers = [torch.tensor(model.answers[c]) for c in y]
        width = max(len(a) for a in answers)
        pad = model.tok.pad_token_id or 0
        ans = torch.stack([torch.cat([a, torch.full((width - len(a),), pad)]) for a in answers])
        mask = torch.stack([torch.arange(width) < len(a) for a in answers])
        inputs = torch.cat([prompt, emb(ans)], 1)
        out = model.lm.model(inputs_embeds=inputs)   # right padding: answers come last, causal
        hidden = out.last_hidden_state[:, prompt.shape[1] - 1:-1]
        logits = model.lm.lm_head(hidden)
        loss = torch.nn.functional.cross_entropy(logits[mask], ans[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        first = (logits[:, 0].argmax(-1) == ans[:, 0]).float().mean().item()
        log.append({"step": step, "loss": round(loss.item(), 4), "first_token_acc": round(first, 3)})
        if (step + 1) % args.save_every == 0:
            save(model, args, log, pick, start)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step} loss {np.mean([l['loss'] for l in log[-10:]]):.3f} first-token acc "
                  f"{np.mean([l['first_token_acc'] for l in log[-10:]]):.2f} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    save(model, args, log, pick, start)


def save(model, args, log, pick, start):
    path = cache_dir() / V.PROJECTOR
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.projector.state_dict(), path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "train_images": len(log) * args.batch, "steps_done": len(log),
        "steps_planned": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "seconds": round(time.time() - start), "frozen": ["EfficientNet-Lite0", "SmolLM2-135M"],
        "trained": "projector (1280-576-576 MLP)", "init_regression_steps": args.init_steps, "resumed": args.resume, "log_every_10": log[::10] + [log[-1]]}, indent=1) + "\n")


if __name__ == "__main__":
    main()
