"""Markdown tables for the plugin README from the committed results (bench.json, generation.json,
accuracy*.json).

    python samples/deltallm/tables.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _ratio(r: dict) -> str:
    return f"**{r['median']:.2f}x** ({r['p25']:.2f}-{r['p75']:.2f})"


def timing(bench: dict) -> None:
    runs = bench["runs"]
    titles = {"operator": "Operator alone, prefill (30 layers summed per round)",
              "decode": "Operator alone, decode: one token against the cache (30 layers summed)",
              "model": "Whole-model prefill", "model_decode": "Whole-model decode step (KV cache)"}
    for part, title in titles.items():
        rows = sorted((r for k, r in runs.items() if k.startswith(part + "_T")), key=lambda r: r["context"])
        if not rows:
            continue
        print(f"\n{title}\n")
        extra = "exact kernel CPU ms | " if part == "operator" else ""
        att = "attention in the model (profiler): dense ms / delta ms / ratio | " if part == "model" else ""
        print(f"| context | sparsity | dense CPU ms | delta CPU ms | {extra}ratio, CPU time | ratio, wall time | {att}load avg |")
        print("|---|---|---|---|" + ("---|" if extra else "") + "---|---|" + ("---|" if att else "") + "---|")
        for r in rows:
            cpu, wall = r["cpu"], r["wall"]
            cells = [str(r["context"]), f"{100 * r['sparsity']:.1f}%" if "sparsity" in r else "-",
                     f"{cpu['dense_ort']['median_ms']:.1f}", f"{cpu['delta']['median_ms']:.1f}"]
            if extra:
                cells.append(f"{cpu['exact_kernel']['median_ms']:.1f} ({cpu['speedup']['exact_kernel']['median']:.2f}x)")
            cells += [_ratio(cpu["speedup"]["delta"]), _ratio(wall["speedup"]["delta"])]
            if att:
                p = r["profile"]
                cells.append(f"{p['dense_ort']['attention']['median_ms']:.0f} / {p['delta']['attention']['median_ms']:.0f} / "
                             f"{_ratio(p['attention_speedup'])}")
            cells.append(f"{r['load_average_before'][0]:.0f}")
            print("| " + " | ".join(cells) + " |")


def accuracy(acc: dict) -> None:
    print(f"\nPerplexity ({acc['setting']}):\n")
    print("| context | tokens | dense | delta | change | prefill sparsity (QK / PV) |")
    print("|---|---|---|---|---|---|")
    for r in acc["results"]:
        print(f"| {r['context']} | {r['tokens']} | {r['perplexity_dense']:.3f} | {r['perplexity_delta']:.3f} | "
              f"{100 * r['relative_change']:+.2f}% | {100 * r['sparsity']:.1f}% ({100 * r['qk_sparsity']:.1f}% / "
              f"{100 * r['pv_sparsity']:.1f}%) |")


def generation(gen: dict) -> None:
    print("\nGreedy generation, dense vs delta:\n")
    print("| prompt | prompt tokens | generated (dense, delta) | identical prefix | prefill / decode sparsity |")
    print("|---|---|---|---|---|")
    for p in gen["prompts"]:
        print(f"| {p['prompt']} | {p['prompt_tokens']} | {p['generated'][0]}, {p['generated'][1]} | {p['identical_prefix']} | "
              f"{100 * p['prefill_sparsity']:.1f}% / {100 * p['decode_sparsity']:.1f}% |")
    print(f"\n{json.dumps(gen['agreement'])}; sparsity {json.dumps(gen['sparsity'])}")


def main():
    for name in sys.argv[1:] or sorted(p.name for p in RESULTS.glob("accuracy*.json")):
        accuracy(json.loads((RESULTS / name).read_text()))
    if (RESULTS / "generation.json").exists():
        generation(json.loads((RESULTS / "generation.json").read_text()))
    if (RESULTS / "bench.json").exists():
        timing(json.loads((RESULTS / "bench.json").read_text()))


if __name__ == "__main__":
    main()
