"""Greedy generation with dense vs delta attention on real prompts (SmolLM2-135M-Instruct, ONNX
Runtime, KV cache: one prefill call, then one call per new token; the DeltaAttention nodes carry
their delta state between calls). Reports token agreement and attention sparsity of prefill and
decode separately.

Prompts: the opening paragraphs of evaluation-split Wikipedia articles (continuation), and the
same articles behind the model's chat template with a question about them.

    python samples/deltallm/generate.py --thresholds samples/deltallm/results/accuracy_s60_c512.thresholds.npz \
        --threads 1 --out samples/deltallm/results/generation.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).parent))

import evalkit  # noqa: E402
from common import cache_dir, wiki_articles  # noqa: E402


def prompts(tok, count: int, length: int) -> list[tuple[str, np.ndarray]]:
    arts = [a for i, a in enumerate(wiki_articles()) if i % 10 != 0]
    picks = np.linspace(0, len(arts) - 1, count).round().astype(int)
    out = []
    for n, i in enumerate(picks):
        title, text = arts[i]
        if n % 2 == 0:  # continuation of the article
            ids = tok(text)["input_ids"][:length]
            out.append((f"continue: {title}", np.asarray(ids, np.int64)))
        else:  # chat: a question about the article
            body = tok.decode(tok(text)["input_ids"][: length - 40])
            msgs = [{"role": "user", "content": f"{body}\n\nIn one sentence, what is this text about?"}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # BatchEncoding in recent transformers
            out.append((f"chat: {title}", np.asarray(ids, np.int64)))
    return out


def greedy(run, prompt: np.ndarray, new: int, eos: int):
    """run(feeds) -> (logits, present_keys, present_values, macs or None). Returns the tokens,
    the MACs of prefill and decode, and the wall time of prefill and of each decode call."""
    start = time.perf_counter()
    logits, keys, values, macs = run(evalkit.feeds(prompt))
    prefill_s = time.perf_counter() - start
    prefill_macs = macs
    decode_macs = None
    decode_s = []
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(new - 1):
        if tokens[-1] == eos:
            break
        start = time.perf_counter()
        logits, keys, values, macs = run(evalkit.feeds(np.asarray([tokens[-1]]), cache=(keys, values)))
        decode_s.append(time.perf_counter() - start)
        decode_macs = macs if decode_macs is None else (decode_macs + macs if macs is not None else None)
        tokens.append(int(logits[0, -1].argmax()))
    return tokens, prefill_macs, decode_macs, prefill_s, decode_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--thresholds", required=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=400)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from edgesparse_deltallm.build import build_library
    from edgesparse_deltallm.probe import Probe
    from evaluate import delta_model

    th = dict(np.load(args.thresholds))
    tok = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-fp32")
    original = evalkit.original()
    library = str(build_library())
    dense = evalkit.session(original, args.threads)
    probe = Probe(delta_model(original), library, args.threads, window=int(th["window"]), sinks=int(th["sinks"]),
                  carry=True)
    theta_q = [np.repeat(np.asarray(t, np.float32).reshape(-1, 1), 64, axis=1) for t in th["theta_q"]]
    theta_v = list(th["theta_v"])

    def run_dense(feeds):
        logits, k, v = dense.run(["logits", "present_keys", "present_values"], feeds)
        return logits, k, v, None

    def run_delta(feeds):
        out, macs, _ = probe.run(feeds, theta_q, theta_v)
        return out["logits"], out["present_keys"], out["present_values"], macs

    rows, pre_total, dec_total = [], np.zeros(3), np.zeros(3)
    times = {"dense_prefill": [], "delta_prefill": [], "dense_decode": [], "delta_decode": []}
    for name, ids in prompts(tok, args.prompts, args.prompt_tokens):
        a, _, _, pa, da = greedy(run_dense, ids, args.new_tokens, tok.eos_token_id)
        b, pre, dec, pb, db = greedy(run_delta, ids, args.new_tokens, tok.eos_token_id)
        times["dense_prefill"].append(pa)
        times["delta_prefill"].append(pb)
        times["dense_decode"] += da
        times["delta_decode"] += db
        n = min(len(a), len(b))
        first = next((i for i in range(n) if a[i] != b[i]), n)
        same = sum(x == y for x, y in zip(a, b))
        pre_total += pre.sum(0)
        if dec is not None:
            dec_total += dec.sum(0)
        rows.append({"prompt": name, "prompt_tokens": int(len(ids)), "generated": [len(a), len(b)],
                     "identical_prefix": first, "matching_positions": same,
                     "prefill_sparsity": round(float(1 - pre[:, 1:].sum() / pre[:, 0].sum()), 4),
                     "decode_sparsity": round(float(1 - dec[:, 1:].sum() / dec[:, 0].sum()), 4) if dec is not None else None,
                     "dense_text": tok.decode(a), "delta_text": tok.decode(b)})
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.endswith("_text")}), flush=True)
    both = pre_total + dec_total
    report = {
        "date": time.strftime("%Y-%m-%d"), "thresholds": args.thresholds,
        "window": int(th["window"]), "sinks": int(th["sinks"]),
        "agreement": {
            "identical_prefix_mean": round(float(np.mean([r["identical_prefix"] for r in rows])), 2),
            "all_identical": sum(r["identical_prefix"] == min(r["generated"]) for r in rows),
            "matching_fraction": round(sum(r["matching_positions"] for r in rows) / sum(min(r["generated"]) for r in rows), 4),
        },
        "sparsity": {"prefill": round(float(1 - pre_total[1:].sum() / pre_total[0]), 4),
                     "decode": round(float(1 - dec_total[1:].sum() / dec_total[0]), 4) if dec_total[0] else None,
                     "prefill_plus_decode": round(float(1 - both[1:].sum() / both[0]), 4)},
        "wall_time_ms_median": {k: round(float(np.median(v)) * 1e3, 2) for k, v in times.items() if v},
        "note": "wall times include the delta model's MAC-counter outputs; dense and delta runs alternate per prompt",
        "prompts": rows,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "prompts"}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
