"""`edgesparse-continual`: sparse continual learning from the command line.

    edgesparse-continual train runs/sparcl90 --sparsity 0.9 --epochs 5 --train-per-task 2000
    edgesparse-continual show runs/sparcl90
    edgesparse-continual update-step runs/sparcl90 -o out/sparcl90.update

A `train` into a folder that holds an unfinished run resumes it after its last finished task;
with different options it refuses. Every failure is one line on stderr and exit status 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgesparse import EdgesparseError

from . import data as data_mod
from .trainer import METHODS, ContinualConfig


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgesparseError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="show tracebacks")
@click.pass_context
def main(ctx, debug):
    """Sparse continual learning (SparCL: DER++ with task-aware dynamic masking, dynamic data
    removal and dynamic gradient masking) on edgesparse's block-sparse kernels."""
    ctx.obj = {"debug": debug}


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(METHODS), default="sparcl", show_default=True,
              help="sparcl, or derpp for dense DER++")
@click.option("--sparsity", type=float, default=0.9, show_default=True, help="zero fraction of each pruned layer")
@click.option("--pattern", type=click.Choice(["block", "unstructured"]), default="block", show_default=True,
              help="block: B output channels x 1 input channel (runs on the sparse kernels); unstructured: the paper's")
@click.option("--block", type=click.Choice(["4", "8", "16"]), default="16", show_default=True)
@click.option("--epochs", type=int, default=50, show_default=True, help="epochs per task (the paper: 50)")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--buffer-size", type=int, default=500, show_default=True)
@click.option("--lr", type=float, default=0.03, show_default=True)
@click.option("--alpha", type=float, default=0.1, show_default=True, help="DER++ logit (MSE) weight")
@click.option("--beta", type=float, default=0.5, show_default=True, help="DER++ label (CE) weight")
@click.option("--tdm/--no-tdm", default=True, show_default=True, help="task-aware dynamic masking")
@click.option("--ddr/--no-ddr", default=True, show_default=True, help="dynamic data removal")
@click.option("--dgm/--no-dgm", default=True, show_default=True, help="dynamic gradient masking")
@click.option("--kernels/--no-kernels", default=True, show_default=True,
              help="run block-sparse layers on the sparse kernels (else masked dense)")
@click.option("--mask-every", type=int, default=0, help="epochs between mask updates (0: the paper's schedule, scaled)")
@click.option("--ddr-fraction", type=float, default=0.3, show_default=True)
@click.option("--ddr-epochs", default=None,
              help="comma-separated epochs that start with a data removal (default: the paper's schedule, scaled)")
@click.option("--gradient-sparsity", type=float, default=0.8, show_default=True)
@click.option("--dgm-refresh", type=int, default=30, show_default=True, help="batches between gradient-mask refreshes")
@click.option("--importance-lambda", type=float, default=0.5, show_default=True)
@click.option("--mask-old-classes/--no-mask-old-classes", default=True, show_default=True,
              help="current-batch loss over the current task's classes only")
@click.option("--bn-from-buffer/--bn-running", default=True, show_default=True,
              help="after each task re-estimate batch norm statistics over the buffer (else keep the running averages)")
@click.option("--prune-first-last", is_flag=True, help="also prune the first layer and the classifier")
@click.option("--prune-1x1", is_flag=True, help="also prune 1x1 convolutions")
@click.option("--tasks", default="0,1;2,3;4,5;6,7;8,9", show_default=True,
              help="classes of each task: comma-separated, tasks separated by ';'")
@click.option("--train-per-task", type=int, default=None, help="training examples per task (default: all)")
@click.option("--test-per-task", type=int, default=None, help="test examples per task (default: all)")
@click.option("--width", type=int, default=32, show_default=True, help="width of the small ResNet")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=None, help="CPU threads (torch and the kernels)")
@click.option("--quiet", is_flag=True, help="no progress bars")
def train(out, method, sparsity, pattern, block, epochs, batch_size, buffer_size, lr, alpha, beta, tdm, ddr, dgm, kernels,
          mask_every, ddr_fraction, ddr_epochs, gradient_sparsity, dgm_refresh, importance_lambda, mask_old_classes,
          bn_from_buffer, prune_first_last, prune_1x1, tasks, train_per_task, test_per_task, width, seed, threads, quiet):
    """Train a small ResNet on Split Fashion-MNIST, task after task, checkpointing into OUT."""
    import torch

    from .runs import train_run

    config = ContinualConfig(method=method, epochs=epochs, batch_size=batch_size, buffer_size=buffer_size, lr=lr,
                             alpha=alpha, beta=beta, mask_old_classes=mask_old_classes, sparsity=sparsity,
                             pattern=pattern, block=int(block), tdm=tdm, ddr=ddr, dgm=dgm, kernels=kernels,
                             importance_lambda=importance_lambda, mask_every=mask_every, ddr_fraction=ddr_fraction,
                             ddr_epochs=_epochs_list(ddr_epochs),
                             gradient_sparsity=gradient_sparsity, dgm_refresh=dgm_refresh, bn_from_buffer=bn_from_buffer,
                             prune_first_last=prune_first_last, prune_1x1=prune_1x1, seed=seed)
    if threads is not None:
        if threads < 1:
            raise EdgesparseError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if train_per_task is not None and train_per_task < 1 or test_per_task is not None and test_per_task < 1:
        raise EdgesparseError("--train-per-task and --test-per-task must be at least 1")
    summary = train_run(out, config, data_mod.parse_tasks(tasks), train_per_task, test_per_task, width,
                        progress=not quiet)
    _print_summary(summary)


@main.command()
@click.argument("run", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print results.json")
def show(run, as_json):
    """Results of a run: accuracy after the last task, forgetting, training time and FLOPs."""
    from .runs import read_results

    summary = read_results(run)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)


@main.command("update-step")
@click.argument("run", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--batch", type=int, default=8, show_default=True, help="examples per on-device update")
@click.option("--force", is_flag=True, help="replace OUTPUT if it exists")
def update_step(run, output, batch, force):
    """Export an ONNX update step (DER++ loss, SGD, the learned masks) for learning on the device."""
    from .ondevice import export_update_step
    from .runs import load_run

    model, masks, info = load_run(run)
    written = export_update_step(model, masks, output, batch=batch, num_classes=info["num_classes"],
                                 example_shape=info["example_shape"], force=force)
    click.echo(f"wrote {written}")


def _epochs_list(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(e) for e in text.split(",") if e.strip())
    except ValueError:
        raise EdgesparseError(f"--ddr-epochs {text!r}: expected comma-separated epoch numbers, e.g. 2,4") from None


def _print_summary(s: dict) -> None:
    o = s["options"]
    what = "dense DER++" if o["method"] == "derpp" else (
        f"SparCL {o['pattern']}{' B=' + str(o['block']) if o['pattern'] == 'block' else ''} at {o['sparsity']:.0%}")
    click.echo(f"{what}: {s['completed_tasks']}/{len(s['tasks'])} tasks on {s['data']}")
    if not s["completed_tasks"]:
        return
    f = s["train_flops"]
    click.echo(f"  class-IL {s['class_il']:.2f}%  task-IL {s['task_il']:.2f}%  forgetting {s['forgetting']:.2f} points")
    if s.get("options", {}).get("bn_from_buffer") and "class_il_running_bn" in s:
        click.echo(f"  (batch norm statistics from the buffer; with the running statistics: class-IL "
                   f"{s['class_il_running_bn']:.2f}%, task-IL {s['task_il_running_bn']:.2f}%)")
    cpu = f", {s['train_cpu_seconds']:.1f} s CPU at {s['threads']} thread(s)" if "train_cpu_seconds" in s else ""
    click.echo(f"  training {s['train_seconds']:.1f} s wall-clock{cpu}, {f['total'] / 1e12:.3f} TFLOPs "
               f"(forward {f['forward'] / 1e12:.3f}, dX {f['backward_input'] / 1e12:.3f}, dW {f['backward_weight'] / 1e12:.3f})")
    kern = [l["layer"] for l in s["layers"] if l["on_kernel"]]
    if kern:
        click.echo(f"  on the sparse kernels: {', '.join(kern)}")


if __name__ == "__main__":  # pragma: no cover
    main()
