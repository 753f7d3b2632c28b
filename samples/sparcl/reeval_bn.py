"""Final accuracy of finished runs with batch norm statistics re-estimated over the buffer.

    python samples/sparcl/reeval_bn.py runs/dense-derpp-seed0 ... --json results/bn-reeval.json

Runs trained before the trainer re-estimated batch norm statistics (`bn_from_buffer`) hold the
running statistics in their checkpoint. Re-estimating does not change training (training
normalises with batch statistics; the re-estimation draws no random numbers), so loading the final
checkpoint, re-estimating over its buffer exactly as the trainer does after the last task, and
evaluating gives the final accuracy such a run would have reported. Forgetting needs the models
after every task, which the checkpoint does not hold.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

from edgesparse_sparcl import data as data_mod
from edgesparse_sparcl.runs import load_run
from edgesparse_sparcl.trainer import ContinualConfig, ContinualTrainer

RUNS = (Path(__file__).parent / "runs").resolve()


def reevaluate(run: Path) -> dict:
    model, _, info = load_run(run)
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    if state["results"]["completed_tasks"] != len(state["tasks"]):
        raise SystemExit(f"error: {run} is unfinished ({state['results']['completed_tasks']}/{len(state['tasks'])} tasks)")
    options = {k: v for k, v in state["options"].items() if k in ContinualConfig.__dataclass_fields__}
    options["ddr_epochs"] = tuple(options["ddr_epochs"]) if options.get("ddr_epochs") else None
    config = ContinualConfig(**{**options, "bn_from_buffer": True})
    tasks = tuple(tuple(t) for t in state["tasks"])
    stream = data_mod.split_fashion_mnist(tasks, info["train_per_task"], info["test_per_task"])
    trainer = ContinualTrainer(model, stream, config, progress=False, log=lambda m: None)
    trainer.model.load_state_dict(state["model"])
    for layer in trainer.pruned_layers():
        layer.set_mask(state["masks"][layer.name])
    if config.method == "sparcl":
        trainer._refresh_layers()
    trainer.buffer.load_state_dict(state["buffer"])
    last = len(tasks) - 1
    running = trainer.evaluate(last)
    trainer._recalibrate_bn(last)
    cil, til = trainer.evaluate(last)
    mean = lambda v: sum(v) / len(v)
    return {"run": run.name, "seed": config.seed, "class_il_running_bn": mean(running[0]), "class_il": mean(cil),
            "task_il": mean(til), "per_task_class_il": cil}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    old = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    for run in args.runs:
        r = reevaluate(run)
        old[str(run.resolve().relative_to(RUNS))] = r  # e.g. "e5/dense-derpp-seed0"
        print(f"{run.name:40s} running statistics {r['class_il_running_bn']:.2f}  buffer statistics {r['class_il']:.2f}",
              flush=True)
        if args.json:
            args.json.write_text(json.dumps(old, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
