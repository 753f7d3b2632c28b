"""Accuracy and sparsity of delta attention on SmolLM2-135M, on the real Wikipedia text shipped
with gensim, run in ONNX Runtime with the deltallm kernels (the same graph a build ships).

1. Calibrate with the pass's own calibrator on calibration-split text (articles never used
   for evaluation) at --calibration-context tokens, for --target (sparsity or accuracy).
2. Perplexity, dense vs delta, on --windows non-overlapping windows of the evaluation split at
   each context length; attention sparsity per layer as the kernel counts it.

    python samples/deltallm/evaluate.py --out samples/deltallm/results/accuracy.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))

import evalkit  # noqa: E402
from common import wiki_tokens, windows  # noqa: E402


def delta_model(original: onnx.ModelProto, carry: bool = False) -> onnx.ModelProto:
    import onnx_ir as ir
    from edgesparse_deltallm import rewrite

    m = ir.from_proto(onnx.shape_inference.infer_shapes(original))
    rewrite.apply(m, window=32, sinks=0, carry=carry)
    proto = ir.to_proto(m)
    proto.opset_import.append(onnx.helper.make_opsetid(rewrite.DOMAIN, 1))
    return proto


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="256,512,1024")
    ap.add_argument("--windows", type=int, default=12, help="evaluation windows per context length")
    ap.add_argument("--calibration-context", type=int, default=512)
    ap.add_argument("--calibration-batches", type=int, default=4)
    ap.add_argument("--target", default="sparsity", choices=("sparsity", "accuracy"))
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--window", type=int, default=0, help="0: calibrate among --window-candidates")
    ap.add_argument("--window-candidates", default="16,32")
    ap.add_argument("--theta-v-candidates", default="0.01,0.03")
    ap.add_argument("--sinks", type=int, default=0)
    ap.add_argument("--alpha", type=float, default=None, help="fixed theta_q scale (skips its search)")
    ap.add_argument("--theta-v", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--thresholds", default=None, help=".thresholds.npz of an earlier run: evaluate it, no calibration")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from common import cache_dir
    from edgesparse_deltallm import calibrate
    from edgesparse_deltallm.build import build_library
    from edgesparse_deltallm.probe import Probe

    started = time.time()
    tok = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-fp32")
    original = evalkit.original()
    delta = delta_model(original)
    library = str(build_library())
    if args.thresholds:  # a setting calibrated earlier (its .thresholds.npz)
        th = np.load(args.thresholds)
        theta_q, theta_v = list(th["theta_q"]), list(th["theta_v"])  # per layer, per head
        setting = calibrate.Setting(int(th["window"]), int(th["sinks"]), None, float(np.max(th["theta_v"])))
        calibration = {"thresholds_from": args.thresholds}
    else:
        cal_ids = windows(wiki_tokens(tok, "calibration"), args.calibration_context, args.calibration_batches)
        batches = [evalkit.feeds(w) for w in cal_ids]
        cal = calibrate.Calibrator(original, delta, batches, library, args.threads, lambda m: print(m, flush=True))
        win = (args.window,) if args.window else tuple(int(w) for w in args.window_candidates.split(","))
        theta_vs = (args.theta_v,) if args.theta_v is not None else tuple(float(x) for x in args.theta_v_candidates.split(","))
        chosen, tried = cal.search(target=args.target, sparsity=args.sparsity, budget=args.budget, windows=win,
                                   sinks=args.sinks, theta_vs=theta_vs, alpha=args.alpha)
        setting = chosen.setting
        theta_q, theta_v = cal.thresholds(setting)
        print(f"calibrated: {setting} sparsity {chosen.sparsity:.4f} error {chosen.error:+.4f} "
              f"({len(tried)} evaluations, {time.time() - started:.0f} s)", flush=True)
        calibration = {"context": args.calibration_context, "batches": args.calibration_batches,
                       "target": args.target, "sparsity_target": args.sparsity, "budget": args.budget,
                       "chosen": chosen.row(), "evaluations": [e.row() for e in tried]}
        del cal

    dense = evalkit.session(original, args.threads)
    probe = Probe(delta, library, args.threads, window=setting.window, sinks=setting.sinks)
    eval_ids = wiki_tokens(tok, "eval")
    results = []
    for length in [int(x) for x in args.contexts.split(",")]:
        nll_d = nll_x = count = 0.0
        macs = np.zeros((len(probe.layers), 3))
        for w in windows(eval_ids, length, args.windows):
            f = evalkit.feeds(w)
            a, n = evalkit.nll(dense.run(["logits"], f)[0], w)
            out, m, _ = probe.run(f, theta_q, theta_v)
            b, _ = evalkit.nll(out["logits"], w)
            nll_d, nll_x, count, macs = nll_d + a, nll_x + b, count + n, macs + m
        ppl_d, ppl_x = float(np.exp(nll_d / count)), float(np.exp(nll_x / count))
        row = {"context": length, "windows": args.windows, "tokens": int(count),
               "perplexity_dense": round(ppl_d, 4), "perplexity_delta": round(ppl_x, 4),
               "relative_change": round(ppl_x / ppl_d - 1, 5),
               "sparsity": round(float(1 - macs[:, 1:].sum() / macs[:, 0].sum()), 4),
               "qk_sparsity": round(float(1 - 2 * macs[:, 1].sum() / macs[:, 0].sum()), 4),
               "pv_sparsity": round(float(1 - 2 * macs[:, 2].sum() / macs[:, 0].sum()), 4),
               "layer_sparsity": [round(float(1 - (r[1] + r[2]) / r[0]), 4) for r in macs]}
        results.append(row)
        print({k: v for k, v in row.items() if k != "layer_sparsity"}, flush=True)

    report = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32), ONNX dynamo export with KV cache",
        "text": "gensim test_data enwiki extract: calibration = every 10th article, evaluation = the others",
        "calibration": calibration,
        "setting": {"window": setting.window, "sinks": setting.sinks, "theta_q_scale": setting.alpha,
                    "theta_v": setting.theta_v},
        "results": results,
        "seconds": round(time.time() - started),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.out and not args.thresholds:
        np.savez(Path(args.out).with_suffix(".thresholds.npz"), theta_q=np.stack(theta_q), theta_v=np.stack(theta_v),
                 window=setting.window, sinks=setting.sinks)


if __name__ == "__main__":
    main()
