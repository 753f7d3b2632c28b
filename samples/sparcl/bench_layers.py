"""Per-layer training kernels vs torch's dense convolution (oneDNN) at the small ResNet's shapes:
forward, and backward (dX + dW) of a batch of 96 images, interleaved, CPU time and wall-clock.

    python samples/sparcl/bench_layers.py --sparsity 0.9 --block 16 --threads 1 --json out.json
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

from edgesparse_sparcl import sparse

SHAPES = [(32, 32, 28), (32, 64, 14), (64, 64, 14), (64, 128, 7), (128, 128, 7)]  # 3x3, stride 1, pad 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for cin, cout, hw in SHAPES:
        conv = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        layer = sparse.PrunableLayer("conv", conv, "block", args.block)
        scores = torch.rand(layer.unit_shape)
        keep = scores >= scores.flatten().kthvalue(int(round(args.sparsity * scores.numel())) or 1).values
        layer.set_mask(keep)
        layer.apply_mask()
        x = torch.randn(args.batch, cin, hw, hw, requires_grad=True)
        dy = torch.randn(args.batch, cout, hw, hw)

        def run(fn):
            def once():
                x.grad, conv.weight.grad = None, None
                with torch.no_grad():
                    fn(x)
                y = fn(x)
                t0, c0 = time.perf_counter(), time.process_time()
                y.backward(dy)
                return time.perf_counter() - t0, time.process_time() - c0
            return once

        def fwd(fn):
            def once():
                with torch.no_grad():
                    t0, c0 = time.perf_counter(), time.process_time()
                    fn(x)
                    return time.perf_counter() - t0, time.process_time() - c0
            return once

        cases = {"dense_fwd": fwd(conv), "sparse_fwd": fwd(lambda v: sparse.sparse_forward(layer, v)),
                 "dense_bwd": run(conv), "sparse_bwd": run(lambda v: sparse.sparse_forward(layer, v))}
        got = {k: [] for k in cases}
        for r in range(args.repeats + 1):
            for k, f in cases.items():
                w, c = f()
                if r:
                    got[k].append((w, c))
        med = {k: (1e3 * statistics.median(w for w, _ in v), 1e3 * statistics.median(c for _, c in v))
               for k, v in got.items()}
        row = {"layer": f"{cin}->{cout} 3x3 @{hw}x{hw}", "density": layer.density(),
               **{f"{k}_wall_ms": v[0] for k, v in med.items()}, **{f"{k}_cpu_ms": v[1] for k, v in med.items()}}
        row["speedup_cpu"] = (med["dense_fwd"][1] + med["dense_bwd"][1]) / (med["sparse_fwd"][1] + med["sparse_bwd"][1])
        row["speedup_wall"] = (med["dense_fwd"][0] + med["dense_bwd"][0]) / (med["sparse_fwd"][0] + med["sparse_bwd"][0])
        rows.append(row)
        print(f"{row['layer']:22s} dense fwd {med['dense_fwd'][1]:6.2f} bwd {med['dense_bwd'][1]:6.2f} | sparse fwd "
              f"{med['sparse_fwd'][1]:6.2f} bwd {med['sparse_bwd'][1]:6.2f} ms CPU | x{row['speedup_cpu']:.2f} CPU, "
              f"x{row['speedup_wall']:.2f} wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
