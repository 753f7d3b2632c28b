"""How much of SmolLM2's FFN output any router can keep at 70% chunk sparsity: an oracle that
knows each expert's true contribution to the FFN output keeps, per chunk of 8 tokens, the 7 of 24
experts with the largest summed contribution (CLS8 = 70.8%), or per token its own best 7 (TLS
70.8%); relative MSE of the FFN output vs dense, for co-activation-clustered experts and for
experts by index order. Layers 0, 10, 20; 4096 tokens of calibration text.

    nice -n 10 .venv/bin/python samples/blockffn/oracle_smollm2.py
"""
from __future__ import annotations

import datetime

import torch

from blockffn_common import load_smollm2, wiki_tokens, windows, write_result
from edgesparse_blockffn import block, convert
from edgesparse_blockffn.ffn import find_ffns

EXPERTS, KEEP, CHUNK, LAYERS = 24, 7, 8, (0, 10, 20)


def main():
    torch.set_num_threads(1)
    tok, model = load_smollm2()
    sites = find_ffns(model)
    text = windows(wiki_tokens(tok, "calibration"), 256, 16)
    seqs = convert.collect_inputs(model, [sites[i] for i in LAYERS], [{"input_ids": w[None]} for w in text])
    rows = []
    for j, i in enumerate(LAYERS):
        site = sites[i]
        flat = convert.windows(seqs[j], 64).reshape(-1, site.up.in_features)
        h = convert.ffn_hidden(site, flat)
        orders = {"co-activation clusters": convert.cluster_neurons(h[::4], EXPERTS, 0),
                  "index order": torch.arange(h.shape[1])}
        for name, order in orders.items():
            hh, w = h[:, order], site.down.weight.detach()[:, order]
            size = hh.shape[1] // EXPERTS
            with torch.no_grad():
                y = hh @ w.T
                c = torch.stack([(hh[:, e * size:(e + 1) * size] @ w[:, e * size:(e + 1) * size].T).norm(dim=1)
                                 for e in range(EXPERTS)], 1)
                per_chunk = c.reshape(-1, CHUNK, EXPERTS).sum(1)
                keep = torch.zeros_like(per_chunk).scatter_(1, per_chunk.topk(KEEP, dim=1).indices, 1.0)
                y_chunk = block.scale_experts(hh, keep.repeat_interleave(CHUNK, 0)) @ w.T
                keep_t = torch.zeros_like(c).scatter_(1, c.topk(KEEP, dim=1).indices, 1.0)
                y_token = block.scale_experts(hh, keep_t) @ w.T
            rel = lambda a: round(float((a - y).pow(2).mean() / y.pow(2).mean()), 4)
            rows.append({"layer": i, "experts": name, "oracle_chunk8_relative_mse": rel(y_chunk),
                         "oracle_per_token_relative_mse": rel(y_token)})
            print(rows[-1], flush=True)
    print(write_result("oracle_smollm2.json", {"date": datetime.date.today().isoformat(), "experts": EXPERTS,
                                                "kept": KEEP, "chunk": CHUNK, "tokens": int(h.shape[0]), "rows": rows}))


if __name__ == "__main__":
    main()
