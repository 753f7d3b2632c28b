"""The MiniLM sample's recovery recipe: prune all-MiniLM-L6-v2 with the sample's 16x1 blocks and
win its sentence embeddings back by distillation from the original model, on Wikipedia sentences
that the quality figures never see.

    .venv/bin/python samples/minilm/recover.py --sparsity 0.5 --out out/minilm-recovery/s50
    # then build the package from its result, without rerunning it:
    MINILM_WEIGHTS=out/minilm-recovery/s50/snap-60min.pt .venv/bin/edgesparse build \
        samples/minilm/model.py:recovered --target x86 --pass magnitude:sparsity=0.5,block=16 -o out/minilm-s50

The recipe, and why:
- Data: every sentence of gensim's Wikipedia test articles (about 15 k) except the 512 held-out
  sentences of the sample's `evaluate()`, batches of 32, padded to the longest, at most 32 tokens
  (the sample's length).
- Masks: the sample's blocks (16 outputs x 1 input) in every Linear of the encoder, chosen by
  activation-weighted block energy (sum of w^2 over the block x the input's mean square on the
  data: a block that multiplies large inputs matters more than its weights say), reached
  gradually (cubic schedule over the first `--ramp-minutes`, masks re-chosen every 25 steps, a
  pruned block never returns), then fixed.
- Loss: per-layer hidden-state MSE (each of the 6 layers' outputs, real tokens only, normalised by
  the teacher's mean square) plus 1 - cosine of the mean-pooled sentence embeddings (the metric
  users see). Adam, constant learning rate after a short warm-up, so a snapshot after 10, 30 or 60
  minutes is a finished model at the target sparsity, not a point halfway down a schedule.
- Budget in CPU minutes of this process at `--threads` (1 by default), so that a shared machine's
  load does not change what "10 minutes" means; snapshots `snap-<N>min.pt` are the pruned weights
  (zeros in place) with their held-out figures in `progress.json`.
- Resumable: `state.pt` (weights, masks, optimiser, data order, CPU seconds) is written every
  `--save-minutes` atomically; rerun the same command to continue where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import model as sample  # noqa: E402

from edgesparse.kernels import dispatch  # noqa: E402

BATCH = 32


def training_sentences() -> list[str]:
    held_out = set(sample.wiki_sentences())
    return [s for found in sample.wiki_article_sentences() for s in found if s not in held_out]


def prunable(bert):
    """The encoder's Linear layers: the ones the sample's magnitude pass makes sparse."""
    return {name: m for name, m in bert.named_modules() if isinstance(m, torch.nn.Linear) and "encoder" in name}


def block_scores(weight: torch.Tensor, input_ms: torch.Tensor, block: int) -> torch.Tensor:
    """[K, N/block] energy of each 16x1 block (weight is torch's [N, K]) weighted by the mean square
    of its input feature."""
    n, k = weight.shape
    w2 = weight.detach().double().T.pow(2).reshape(k, n // block, block).sum(-1)
    return w2 * input_ms.double()[:, None]


def choose_mask(weight, input_ms, old_mask, sparsity: float, block: int) -> torch.Tensor:
    """Keep-mask of torch's [N, K] shape with `sparsity` of the blocks dropped; blocks dropped
    before stay dropped (they score -1)."""
    n, k = weight.shape
    score = block_scores(weight, input_ms, block)
    if old_mask is not None:
        kept_before = old_mask.T.reshape(k, n // block, block)[:, :, 0]
        score = torch.where(kept_before, score, torch.full_like(score, -1.0))
    keep = torch.ones(score.numel(), dtype=torch.bool)
    keep[torch.argsort(score.flatten(), stable=True)[: int(round(sparsity * score.numel()))]] = False
    return keep.reshape(k, n // block, 1).expand(k, n // block, block).reshape(k, n).T.contiguous()


def cubic(fraction: float) -> float:
    return 1.0 - (1.0 - min(max(fraction, 0.0), 1.0)) ** 3


class Recipe:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.tokenizer, self.teacher = sample._tokenizer_and_model()
        _, self.student = sample._tokenizer_and_model()
        # both in eval mode throughout (no dropout): the student learns the teacher's function
        self.teacher.eval()
        self.student.eval()
        self.layers = prunable(self.student)
        self.sentences = training_sentences()
        self.opt = torch.optim.Adam([p for p in self.student.parameters()], lr=args.lr)
        self.masks: dict[str, torch.Tensor] = {}
        self.state = {"step": 0, "cpu_seconds": 0.0, "order_seed": args.seed, "snapshots": [],
                      "sparsity_now": 0.0}
        self.eval_enc = self.encode(sample.wiki_sentences())
        self.reference = self.embeddings(self.teacher)
        self.input_ms = self.measure_inputs()

    # -- data --------------------------------------------------------------------------------------
    def encode(self, sentences):
        return self.tokenizer(sentences, padding="longest", truncation=True, max_length=sample.MAX_LENGTH,
                              return_tensors="pt")

    def batch(self, step: int) -> dict:
        per_epoch = len(self.sentences) // BATCH
        epoch, i = divmod(step, per_epoch)
        order = list(range(len(self.sentences)))
        random.Random(self.state["order_seed"] + epoch).shuffle(order)
        return self.encode([self.sentences[j] for j in order[i * BATCH:(i + 1) * BATCH]])

    def measure_inputs(self) -> dict[str, torch.Tensor]:
        """Mean square of every prunable layer's input features on 16 batches (of the unpruned model)."""
        sums, hooks = {}, []
        for name, m in prunable(self.teacher).items():
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, name=name: sums.__setitem__(name, sums.get(name, 0) + i[0].detach().pow(2).flatten(0, -2).mean(0))))
        with torch.no_grad():
            for s in range(16):
                self.teacher(**self.batch(s))
        for h in hooks:
            h.remove()
        return {k: v / 16 for k, v in sums.items()}

    # -- model -------------------------------------------------------------------------------------
    def embeddings(self, bert) -> np.ndarray:
        with torch.no_grad():
            out = []
            for i in range(0, len(self.eval_enc["input_ids"]), 128):
                part = {k: v[i:i + 128] for k, v in self.eval_enc.items()}
                out.append(sample.pooled(bert(**part).last_hidden_state.numpy(), part["attention_mask"].numpy()))
        return np.concatenate(out)

    def evaluate(self) -> dict:
        figures = sample.embedding_agreement(self.embeddings(self.student), self.reference)
        return {k: round(v, 4) for k, v in figures.items()}

    def apply_masks(self) -> None:
        with torch.no_grad():
            for name, mask in self.masks.items():
                self.layers[name].weight.mul_(mask)

    def update_masks(self, sparsity: float) -> None:
        for name, layer in self.layers.items():
            self.masks[name] = choose_mask(layer.weight, self.input_ms[name], self.masks.get(name), sparsity, self.args.block)
        self.apply_masks()
        self.state["sparsity_now"] = sparsity

    def loss(self, enc) -> torch.Tensor:
        with torch.no_grad():
            t = self.teacher(**enc, output_hidden_states=True)
        s = self.student(**enc, output_hidden_states=True)
        real = enc["attention_mask"].bool()
        layer_loss = 0.0
        for hs, ht in zip(s.hidden_states[1:], t.hidden_states[1:]):
            layer_loss = layer_loss + (hs[real] - ht[real]).pow(2).mean() / ht[real].pow(2).mean()
        layer_loss = layer_loss / (len(s.hidden_states) - 1)
        m = enc["attention_mask"][..., None].float()
        ps = (s.last_hidden_state * m).sum(1) / m.sum(1)
        pt = (t.last_hidden_state * m).sum(1) / m.sum(1)
        cosine = torch.nn.functional.cosine_similarity(ps, pt, dim=-1).mean()
        return layer_loss + (1.0 - cosine)

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: Path, payload) -> None:
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)

    def checkpoint(self) -> None:
        self.save(self.out / "state.pt", {"student": self.student.state_dict(), "opt": self.opt.state_dict(),
                                          "masks": self.masks, "state": self.state, "args": vars(self.args)})

    def resume(self) -> bool:
        path = self.out / "state.pt"
        if not path.is_file():
            return False
        saved = torch.load(path, weights_only=False)
        for key in ("sparsity", "block", "lr", "seed"):
            if saved["args"][key] != getattr(self.args, key):
                sys.exit(f"error: {path} was made with {key}={saved['args'][key]}, not {getattr(self.args, key)}: "
                         f"use another --out")
        self.student.load_state_dict(saved["student"])
        self.opt.load_state_dict(saved["opt"])
        self.masks, self.state = saved["masks"], saved["state"]
        return True

    def snapshot(self, minutes: float) -> None:
        figures = self.evaluate()
        self.save(self.out / f"snap-{minutes:g}min.pt", {k: v for k, v in self.student.state_dict().items()})
        row = {"minutes": minutes, "step": self.state["step"], "sparsity": self.state["sparsity_now"], **figures}
        self.state["snapshots"].append(row)
        print(json.dumps(row), flush=True)

    def write_progress(self) -> None:
        progress = {"sparsity": self.args.sparsity, "block": self.args.block, "threads": self.args.threads,
                    "lr": self.args.lr, "ramp_minutes": self.args.ramp_minutes, "training_sentences": len(self.sentences),
                    "held_out_sentences": len(sample.wiki_sentences()), "batch": BATCH,
                    "cpu": dispatch.host_cpu(), "step": self.state["step"], "cpu_minutes": round(self.state["cpu_seconds"] / 60, 2),
                    "one_shot": self.state.get("one_shot"), "snapshots": self.state["snapshots"]}
        tmp = self.out / "progress.json.tmp"
        tmp.write_text(json.dumps(progress, indent=1) + "\n")
        os.replace(tmp, self.out / "progress.json")

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> None:
        a = self.args
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume():
            # what pruning once at the target sparsity (same masks rule) costs, for the record
            keep = {n: l.weight.detach().clone() for n, l in self.layers.items()}
            self.update_masks(a.sparsity)
            self.state["one_shot"] = self.evaluate()
            print(json.dumps({"one_shot": self.state["one_shot"]}), flush=True)
            with torch.no_grad():
                for n, l in self.layers.items():
                    l.weight.copy_(keep[n])
            self.masks = {}
            self.state["sparsity_now"] = 0.0
        targets = sorted(float(m) for m in a.snapshots.split(","))
        done = {s["minutes"] for s in self.state["snapshots"]}
        last_save = time.process_time()
        t_mark = time.process_time()
        while True:
            minutes, step = self.state["cpu_seconds"] / 60, self.state["step"]
            ramp = cubic(minutes / a.ramp_minutes) if a.ramp_minutes > 0 else 1.0
            if step % 25 == 0 or (ramp >= 1.0 and self.state["sparsity_now"] < a.sparsity):
                self.update_masks(a.sparsity * ramp)
            for m in [m for m in targets if m not in done and minutes >= m]:
                self.snapshot(m)
                done.add(m)
                self.write_progress()
            if all(m in done for m in targets):
                break
            for g in self.opt.param_groups:
                g["lr"] = a.lr * min(1.0, (step + 1) / 50)
            loss = self.loss(self.batch(step))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.apply_masks()
            self.state["step"] = step + 1
            now = time.process_time()
            self.state["cpu_seconds"] += now - t_mark
            t_mark = now
            if step % 100 == 0:
                print(f"step {step} cpu {self.state['cpu_seconds'] / 60:.1f} min sparsity {self.state['sparsity_now']:.3f} "
                      f"loss {loss.item():.4f}", flush=True)
            if now - last_save > a.save_minutes * 60:
                self.checkpoint()
                self.write_progress()
                last_save = now
        self.checkpoint()
        self.write_progress()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--block", type=int, default=16, choices=(4, 8, 16))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ramp-minutes", type=float, default=5.0, help="CPU minutes of the gradual pruning")
    p.add_argument("--snapshots", default="10,30,60", help="CPU minutes at which to save and evaluate")
    p.add_argument("--save-minutes", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not 0 < args.sparsity < 1:
        sys.exit("error: --sparsity must be in (0, 1)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    Recipe(args).run()


if __name__ == "__main__":
    main()
