"""Wall-clock of one DER++ training step: dense vs SparCL on the block-sparse kernels, measured
interleaved in one process (blocks of steps alternate, so both see the same machine load).

    python samples/sparcl/bench_step.py --threads 1 --threads 2 --rounds 12 --json out.json

A step is one batch of 32 new examples plus two buffer samples of 32 (96 images through the
model), forward, backward, SGD update and mask upkeep: what the trainer does per batch. Per-step
time times the number of steps (fewer with dynamic data removal) gives a run's training time.
"""
import argparse
import json
import platform
import statistics
import time

import torch

from edgesparse_sparcl.data import split_fashion_mnist
from edgesparse_sparcl.models import SmallResNet
from edgesparse_sparcl.trainer import ContinualConfig, ContinualTrainer, _ForgettingStats


def make(stream, width, **options):
    torch.manual_seed(0)
    config = ContinualConfig(epochs=1, buffer_size=500, **options)
    trainer = ContinualTrainer(SmallResNet(width=width), stream, config, progress=False, log=lambda m: None)
    if config.method == "sparcl":
        trainer._init_masks()
    idx = stream.task_indices(0, "train")[:500]
    with torch.no_grad():
        logits = trainer.model(stream.x_train[idx])
    trainer.buffer.add(stream.x_train[idx], stream.y_train[idx], logits, 0)
    return trainer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, action="append")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=4, help="steps per block")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--only", help="comma-separated names of configurations to time (dense is always timed)")
    ap.add_argument("--json")
    args = ap.parse_args()
    stream = split_fashion_mnist(tasks=((0, 1), (2, 3)), train_per_task=640, test_per_task=10)
    configs = {
        "dense DER++": dict(method="derpp"),
        "SparCL block16 75%": dict(method="sparcl", pattern="block", block=16, sparsity=0.75),
        "SparCL block16 90%": dict(method="sparcl", pattern="block", block=16, sparsity=0.9),
        "SparCL block4 75%": dict(method="sparcl", pattern="block", block=4, sparsity=0.75),
        "SparCL block4 90%": dict(method="sparcl", pattern="block", block=4, sparsity=0.9),
        "SparCL unstructured 90% (masked dense)": dict(method="sparcl", pattern="unstructured", sparsity=0.9),
    }
    if args.only:
        wanted = {"dense DER++", *(n.strip() for n in args.only.split(","))}
        unknown = wanted - set(configs)
        if unknown:
            raise SystemExit(f"error: unknown configuration {sorted(unknown)[0]!r} (known: {', '.join(configs)})")
        configs = {n: o for n, o in configs.items() if n in wanted}
    results = {"cpu": platform.processor() or platform.machine(), "width": args.width, "rounds": args.rounds,
               "steps_per_block": args.steps, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "by_threads": {}}
    for threads in args.threads or [1]:
        torch.set_num_threads(threads)
        trainers = {name: make(stream, args.width, **o) for name, o in configs.items()}
        other = torch.ones(10, dtype=torch.bool)
        other[torch.tensor([2, 3])] = False
        task_idx = stream.task_indices(1, "train")
        wall = {n: [] for n in trainers}
        cpu = {n: [] for n in trainers}
        names = list(trainers)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                tr = trainers[name]
                opt = torch.optim.SGD(tr.model.parameters(), lr=0.03)
                stats = _ForgettingStats(len(task_idx))
                for s in range(args.steps):
                    local = torch.randint(0, len(task_idx), (32,))
                    t0, c0 = time.perf_counter(), time.process_time()
                    tr._step(opt, task_idx[local], local, 1, other, stats, full_grad=(s == 0 and r % 8 == 0))
                    if r > 0:  # round 0 warms up
                        wall[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.process_time() - c0)
        base = statistics.median(wall["dense DER++"])
        rows = {}
        for name in names:
            w, c = statistics.median(wall[name]), statistics.median(cpu[name])
            rows[name] = {"wall_ms": 1e3 * w, "cpu_ms": 1e3 * c, "wall_speedup_vs_dense": base / w,
                          "wall_ms_quartiles": [1e3 * q for q in statistics.quantiles(wall[name], n=4)],
                          "steps_measured": len(wall[name])}
            print(f"threads={threads} {name:40s} wall {1e3 * w:7.1f} ms/step (x{base / w:.2f})  cpu {1e3 * c:7.1f} ms")
        results["by_threads"][str(threads)] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
