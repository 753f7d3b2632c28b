"""Latency of the assembled VLM on ONNX Runtime, dense vs CoreMatching, side by side in one
process, one thread, interleaved rounds, medians with p25/p75: the vision encoder + projector
graph (shared by both), the language model's prefill, its decode step, and whole answers
(vision + prefill + --answer greedy tokens).

Both language-model graphs come from the same exporter (onnx_graphs.export_matching): the dense
one with keep = 1 and no token pruning is the plain SmolLM2 computation on the same prompt
embeddings.

    flock /tmp/edgesparse-timing.lock nice -n 0 .venv/bin/python samples/corematching/vlm_speed.py \\
        --out samples/corematching/results/vlm_speed.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import vlm as V  # noqa: E402
from common import cache_dir  # noqa: E402
from llm_speed import session, stats  # noqa: E402


def export_all(model, settings, tag, embeds, mask):
    import onnx

    from edgesparse_corematching import onnx_graphs

    folder = cache_dir() / "corematching-samples" / f"vlm-{tag}"
    paths = folder / "prefill.onnx", folder / "decode.onnx"
    if not all(p.exists() for p in paths):
        folder.mkdir(parents=True, exist_ok=True)
        for proto, path in zip(onnx_graphs.export_matching(model.lm, settings, embeds, mask), paths):
            onnx.save(proto, str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").rename(path)
    return paths


def export_vision(model, vision):
    from edgesparse import TorchModel
    from edgesparse.export import export_torch
    import onnx

    path = cache_dir() / "corematching-samples" / "vlm-vision.onnx"
    if not path.exists():
        class Vision(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.vision, self.projector = vision, model.projector

            def forward(self, image):
                return self.projector(self.vision.extract_features(image).flatten(2).transpose(1, 2))

        proto = export_torch(TorchModel(Vision().eval(), {"image": torch.zeros(1, 3, 224, 224)}, ["image_tokens"]))
        onnx.save(proto, str(path))
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--neuron-layers", default="1-28")
    ap.add_argument("--token-layers", default="1-1")
    ap.add_argument("--answer", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from edgesparse_corematching.settings import Settings, parse_span

    torch.set_num_threads(1)
    model = V.load()
    vision = V.load_vision()
    images, _ = V.fashion_mnist("test")
    x = torch.tensor(images[:1], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
    image = ((torch.nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False) - 127.0) / 128.0).numpy()
    with torch.no_grad():
        embeds, span = model.prompt(V.image_features(vision, images[:1]))
    mask = model.prunable(1, embeds.shape[1], span)
    core = Settings(keep=args.keep, neuron_layers=parse_span(args.neuron_layers), token_layers=parse_span(args.token_layers))
    tag = f"keep{args.keep}-n{args.neuron_layers}-t{args.token_layers}"
    with torch.no_grad():
        paths = {"dense": export_all(model, Settings(keep=1.0), "dense", embeds, mask),
                 "corematching": export_all(model, core, tag, embeds, mask)}
        vpath = export_vision(model, vision)
    if args.export_only:
        return
    vis = session(vpath, args.threads)
    sess = {k: (session(p, args.threads), session(d, args.threads)) for k, (p, d) in paths.items()}
    emb_table = model.lm.model.embed_tokens.weight.detach().numpy()
    before, after = model.before.numpy(), model.after.numpy()
    layers = len(model.lm.model.layers)

    def prompt_embeds():
        tokens = vis.run(None, {"image": image})[0]
        return np.concatenate([emb_table[before][None], tokens, emb_table[after][None]], 1)

    feed_embeds = prompt_embeds()
    img_mask = mask.numpy()

    def prefill(name):
        return sess[name][0].run(None, {"inputs_embeds": feed_embeds, "image_mask": img_mask})

    def weights(name, out):
        return {o.name: v for o, v in zip(sess[name][0].get_outputs()[2 + 2 * layers:], out[2 + 2 * layers:])}

    def decode_feed(name, out, token):
        caches = out[2:2 + 2 * layers]
        names = [f"past_{k}_{i}" for i in range(layers) for k in ("key", "value")]
        return {"input_ids": token, "position": out[1], **dict(zip(names, caches)), **weights(name, out)}

    first = {k: prefill(k) for k in sess}
    token = np.array([[int(first["dense"][0][0].argmax())]], np.int64)
    feeds = {k: decode_feed(k, first[k], token) for k in sess}
    kept = [int(first["corematching"][2 + 2 * i].shape[2]) for i in range(layers)]

    def answer(name):
        out = sess[name][0].run(None, {"inputs_embeds": prompt_embeds(), "image_mask": img_mask})
        caches, pos, w = list(out[2:2 + 2 * layers]), out[1], weights(name, out)
        tok = [int(out[0][0].argmax())]
        for _ in range(args.answer - 1):
            names = [f"past_{k}_{i}" for i in range(layers) for k in ("key", "value")]
            res = sess[name][1].run(None, {"input_ids": np.array([[tok[-1]]]), "position": pos, **dict(zip(names, caches)), **w})
            caches, pos = res[1:], pos + 1
            tok.append(int(res[0][0, -1].argmax()))
        return tok

    timings = {part: {k: [] for k in sess} for part in ("prefill", "decode_step", "answer")}
    answers = {}
    for r in range(args.rounds):
        names = list(sess) if r % 2 == 0 else list(sess)[::-1]
        for name in names:
            t = time.perf_counter(); prefill(name); timings["prefill"][name].append(time.perf_counter() - t)
            t = time.perf_counter(); sess[name][1].run(None, feeds[name]); timings["decode_step"][name].append(time.perf_counter() - t)
            if r < max(3, args.rounds // 4):
                t = time.perf_counter(); answers[name] = answer(name); timings["answer"][name].append(time.perf_counter() - t)
    vision_t = []
    for _ in range(args.rounds):
        t = time.perf_counter(); vis.run(None, {"image": image}); vision_t.append(time.perf_counter() - t)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "threads": args.threads,
        "load_average": os.getloadavg(), "keep": args.keep, "neuron_layers": args.neuron_layers, "token_layers": args.token_layers,
        "prompt_tokens": int(embeds.shape[1]), "tokens_per_layer_corematching": kept, "answer_tokens": args.answer,
        "vision_and_projector": stats(vision_t),
        **{part: {k: stats(v) for k, v in t.items()} for part, t in timings.items()},
        "speedup": {part: round(float(np.median(t["dense"]) / np.median(t["corematching"])), 3) for part, t in timings.items()},
        "same_answer_tokens": answers.get("dense") == answers.get("corematching"),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
