"""Markdown tables of the evidence results (samples/sparsebytenn/results/*.json), for the README.

    python samples/sparsebytenn/tables.py
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def load(name):
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def pct(v):
    return "-" if v is None else f"{100 * v:.2f}"


def cnn_grid():
    g = load("cnn_grid")
    if not g:
        return ""
    dense = g.get("dense", {}).get("top1")
    rows = ["| sparsity | no rearr., no recovery | rearr., no recovery | no rearr., 100 steps | rearr., 100 steps |",
            "|---|---|---|---|---|"]
    for s in (0.3, 0.5, 0.7, 0.9):
        cells = [pct(g.get(f"s{s:.1f}/rearrange={r}/recovery={rec}", {}).get("top1"))
                 for r, rec in ((0, "none"), (1, "none"), (0, "train"), (1, "train"))]
        rows.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    return f"Dense top-1: {pct(dense)} %\n\n" + "\n".join(rows)


def recovery():
    """One-epoch recovery vs the dense model fine-tuned by the same loop for the same steps."""
    r = load("cnn_recovery")
    g = load("cnn_grid")
    if not r:
        return ""
    controls = {k: v for k, v in r.items() if k.startswith("dense/")}
    base = g.get("dense", {}).get("top1")
    listed = ", ".join(f"{c['steps']} steps (lr {c['lr']:g}) **{pct(c['top1'])} %**"
                       for c in sorted(controls.values(), key=lambda c: c["steps"]))
    rows = [f"Dense, 3 epochs: {pct(base)} %. Dense controls, fine-tuned by the same loop: {listed}.\n"]
    rows += ["| sparsity | group | rearranged | recovery steps | top-1 | vs dense control | vs 3-epoch dense |",
             "|---|---|---|---|---|---|---|"]
    for key in sorted(k for k in r if not k.startswith("dense/")):
        e = r[key]
        ctrl = r.get(f"dense/steps={e['steps']}/lr={key.rsplit('lr=', 1)[1]}", {}).get("top1")
        diff = lambda ref: "-" if ref is None else f"{100 * (e['top1'] - ref):+.2f}"  # noqa: E731
        rows.append(f"| {e['sparsity']:.0%} | {e['block_pointwise']}x1 | {'yes' if e['rearrange'] else 'no'} | "
                    f"{e['steps']} | {pct(e['top1'])} | {diff(ctrl)} | {diff(base)} |")
    return "\n".join(rows)


def ablations():
    a = load("cnn_ablations")
    if not a:
        return ""
    names = sorted({k.split("/", 1)[1] for k in a})
    rows = ["| variant (no recovery) | 50 % | 70 % |", "|---|---|---|"]
    for n in names:
        rows.append(f"| {n} | {pct(a.get(f's0.5/{n}', {}).get('top1'))} | {pct(a.get(f's0.7/{n}', {}).get('top1'))} |")
    return "\n".join(rows)


def packages(name, metric):
    p = load(name)
    if not p:
        return ""
    rows = [f"| target | rearr. | recovery steps (done/requested) | {metric} | layers pruned (conv/linear weights zero) | "
            "dense 1T ms | package 1T ms | speedup 1T | dense 2T ms | package 2T ms | speedup 2T | "
            "3 more runs 1T / 2T |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(p):
        r = p[key]
        b = {x["threads"]: x for x in r["bench"]}
        rec = r.get("recovery", {})
        steps = f"{rec.get('steps', '-')}/{rec.get('steps_requested', r.get('options', {}).get('recovery_steps', '-'))}"
        cells = [key.split("/")[0][1:], "yes" if r.get("options", {}).get("rearrange", True) else "no", steps,
                 pct(r[metric]), f"{r.get('pruned_layers', r['sparse_nodes'])}"
                 + (f" ({r['weight_sparsity_of_conv_linear']:.1%})" if "weight_sparsity_of_conv_linear" in r else "")]
        for t in (1, 2):
            x = b.get(t)
            cells += [f"{x['dense']['median_ms']:.3f} [{x['dense']['p25_ms']:.3f}-{x['dense']['p75_ms']:.3f}]",
                      f"{x['package']['median_ms']:.3f} [{x['package']['p25_ms']:.3f}-{x['package']['p75_ms']:.3f}]",
                      f"**{x['speedup']:.2f}x**"] if x else ["-"] * 3
        reps = r.get("bench_repeats", [])
        cells.append(" / ".join(", ".join(f"{b['speedup']:.2f}x" for b in reps if b["threads"] == t) for t in (1, 2))
                     if reps else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def bench():
    """`edgesparse bench` of the CNN packages (results/cnn_bench.json)."""
    b = load("cnn_bench")
    if not b:
        return ""
    rows = ["| sparsity | package (options) | threads | dense ms [p25-p75] | package ms [p25-p75] | speedup |",
            "|---|---|---|---|---|---|"]
    for key in sorted(b):
        r = b[key]
        o = r["options"]
        opts = f"{r['package']} (dispatch={o.get('dispatch')}, recovery={o.get('recovery')})"
        for x in r["bench"]:
            d, p = x["dense"], x["package"]
            rows.append(f"| {key[1:]} | {opts} | {x['threads']} | {d['median_ms']:.3f} [{d['p25_ms']:.3f}-{d['p75_ms']:.3f}] "
                        f"| {p['median_ms']:.3f} [{p['p25_ms']:.3f}-{p['p75_ms']:.3f}] | **{x['speedup']:.2f}x** |")
    return "\n".join(rows)


def eff_grid():
    g = load("eff_grid")
    if not g:
        return ""
    rows = ["| sparsity | rearr. | recovery | allocation | top-1 agreement | dense top-1 in top-5 |", "|---|---|---|---|---|---|"]
    for key in sorted(g):
        r = g[key]
        rec = r["recovery"]["mode"] + f" ({r['recovery']['steps']} steps)" if isinstance(r["recovery"], dict) else r["recovery"]
        rows.append(f"| {r['sparsity']:.0%} | {'yes' if r['rearrange'] else 'no'} | {rec} | "
                    f"{r.get('allocation', 'uniform')} | {pct(r['agreement'])} | {pct(r.get('dense_top1_in_top5'))} |")
    return "\n".join(rows)


if __name__ == "__main__":
    for title, text in (("CNN grid", cnn_grid()), ("CNN recovery", recovery()), ("CNN ablations", ablations()), ("CNN bench", bench()),
                        ("CNN packages", packages("cnn_packages", "top1")), ("EfficientNet grid", eff_grid()),
                        ("EfficientNet packages", packages("eff_packages", "agreement"))):
        if text:
            print(f"### {title}\n\n{text}\n")
