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
    rows = ["| sparsity | no rearr., no recovery | rearr., no recovery | no rearr., recovery | rearr., recovery |",
            "|---|---|---|---|---|"]
    for s in (0.3, 0.5, 0.7, 0.9):
        cells = [pct(g.get(f"s{s:.1f}/rearrange={r}/recovery={rec}", {}).get("top1"))
                 for r, rec in ((0, "none"), (1, "none"), (0, "train"), (1, "train"))]
        rows.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    return f"Dense top-1: {pct(dense)} %\n\n" + "\n".join(rows)


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
    rows = [f"| sparsity | {metric} | sparse nodes | on kernel | dense 1T ms | package 1T ms | speedup 1T | "
            "dense 2T ms | package 2T ms | speedup 2T |", "|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(p):
        r = p[key]
        b = {x["threads"]: x for x in r["bench"]}
        cells = [key[1:], pct(r[metric]), str(r["sparse_nodes"]), f"{r['on_kernel']:.0%}"]
        for t in (1, 2):
            x = b.get(t)
            cells += [f"{x['dense']['median_ms']:.3f}", f"{x['package']['median_ms']:.3f}", f"{x['speedup']:.2f}x"] if x else ["-"] * 3
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
    for title, text in (("CNN grid", cnn_grid()), ("CNN ablations", ablations()), ("CNN bench", bench()),
                        ("CNN packages", packages("cnn_packages", "top1")), ("EfficientNet grid", eff_grid()),
                        ("EfficientNet packages", packages("eff_packages", "agreement"))):
        if text:
            print(f"### {title}\n\n{text}\n")
