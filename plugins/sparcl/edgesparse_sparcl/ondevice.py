"""Learning on the device with a stock ONNX Runtime (the pip runtime has no training API): one
ONNX graph that *is* an update step.

    inputs : x, y (a new batch), buf_x, buf_y, buf_logits (a rehearsal sample), logit_bias (added
             to the new batch's logits: 0 for the current task's classes, -1e9 for the others),
             lr, alpha, beta, then every trainable parameter, then every batch norm's running
             mean and variance
    outputs: loss, then every parameter after one SGD step, then the running statistics updated
             with the batch's (momentum as in the model)

The step computes the DER++ loss, its gradient (the backward graph is traced with torch's
make_fx and exported like any model), and multiplies the pruned weights' gradients and values by
the learned masks, so the model stays exactly as sparse as it was trained. Batch norm normalises
with the statistics of the step's batch, as in training (with the frozen running statistics the
trained sparse model diverged within three steps at lr 0.03: channels with few kept inputs have
tiny running variances), and the running statistics follow, as in training. The graph is checked
against torch's own step before it is written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgesparse import EdgesparseError

STEP_FILE = "update_step.onnx"
PARAMS_FILE = "params.npz"
INFO_FILE = "update_step.json"
INPUTS = ("x", "y", "buf_x", "buf_y", "buf_logits", "logit_bias", "lr", "alpha", "beta")

APP_SNIPPET = """\
# One on-device update with onnxruntime + numpy (see update_step.json for names and shapes).
import json, numpy as np, onnxruntime as ort
info = json.load(open("update_step.json"))
step = ort.InferenceSession("update_step.onnx")
params = dict(np.load("params.npz"))
def update(x, y, buf_x, buf_y, buf_logits, logit_bias, lr=0.03, alpha=0.1, beta=0.5):
    feeds = {"x": x, "y": y, "buf_x": buf_x, "buf_y": buf_y, "buf_logits": buf_logits,
             "logit_bias": logit_bias, "lr": np.array(lr, np.float32), "alpha": np.array(alpha, np.float32),
             "beta": np.array(beta, np.float32)}
    feeds.update({info["param_inputs"][n]: params[n] for n in info["params"]})
    loss, *new = step.run(None, feeds)
    params.update(zip(info["params"], new))
    return float(loss)
"""


def _translations():
    """ONNX translations for the two backward ops torch's ONNX exporter has no function for."""
    from onnxscript import opset18 as op

    def _static_shape(value, what):
        shape = getattr(value, "shape", None)
        dims = None if shape is None else [d if isinstance(d, int) else None for d in shape]
        if dims is None or None in dims:
            raise EdgesparseError(f"update step: {what} needs a static shape")
        return dims

    def convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                             output_padding, groups, output_mask):
        if transposed or groups != 1:
            raise EdgesparseError("update step: only group=1, non-transposed convolutions are supported")
        x_shape = _static_shape(input, "a convolution's input")
        w_shape = _static_shape(weight, "a convolution's weight")
        g_shape = _static_shape(grad_output, "a convolution's output gradient")
        kh, kw = w_shape[2], w_shape[3]
        pads = [padding[0], padding[1], padding[0], padding[1]]
        # outputs torch does not ask for get a placeholder (nothing reads them)
        grad_input = grad_weight = grad_bias = op.Constant(value_float=0.0)
        if output_mask[0]:
            extra = [x_shape[2 + i] - (stride[i] * (g_shape[2 + i] - 1) + dilation[i] * (w_shape[2 + i] - 1) + 1
                                       - 2 * padding[i]) for i in range(2)]
            grad_input = op.ConvTranspose(grad_output, weight, strides=list(stride), pads=pads,
                                          dilations=list(dilation), output_padding=extra)
        if output_mask[1]:
            xt = op.Transpose(input, perm=[1, 0, 2, 3])
            gt = op.Transpose(grad_output, perm=[1, 0, 2, 3])
            full = op.Conv(xt, gt, strides=list(dilation), dilations=list(stride), pads=pads)
            full = op.Transpose(full, perm=[1, 0, 2, 3])
            grad_weight = op.Slice(full, op.Constant(value_ints=[0, 0]), op.Constant(value_ints=[kh, kw]),
                                   op.Constant(value_ints=[2, 3]))
        if output_mask[2]:
            grad_bias = op.ReduceSum(grad_output, op.Constant(value_ints=[0, 2, 3]), keepdims=0)
        return grad_input, grad_weight, grad_bias

    def avg_pool2d_backward(grad_output, self, kernel_size, stride, padding, ceil_mode, count_include_pad,
                            divisor_override=None):
        kernel = list(kernel_size)
        stride = list(stride) if stride else kernel
        if any(padding) or ceil_mode or divisor_override is not None:
            raise EdgesparseError("update step: average pooling backward supports no padding, floor mode, no divisor")
        x_shape = _static_shape(self, "an average pooling input")
        g_shape = _static_shape(grad_output, "an average pooling output gradient")
        c = x_shape[1]
        ones = np.full((c, 1, kernel[0], kernel[1]), 1.0 / (kernel[0] * kernel[1]), np.float32)
        import onnx

        w = op.Constant(value=onnx.numpy_helper.from_array(ones))
        extra = [x_shape[2 + i] - (stride[i] * (g_shape[2 + i] - 1) + kernel[i]) for i in range(2)]
        return op.ConvTranspose(grad_output, w, strides=stride, group=c, output_padding=extra)

    return {torch.ops.aten.convolution_backward.default: convolution_backward,
            torch.ops.aten.avg_pool2d_backward.default: avg_pool2d_backward}


class _Step(nn.Module):
    def __init__(self, graph_module):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, *args):
        return self.graph_module(*args)


class _BatchStatsNorm(nn.Module):
    """BatchNorm2d over the batch's statistics that also returns its updated running statistics."""

    def __init__(self, bn: nn.BatchNorm2d, name: str):
        super().__init__()
        self.weight, self.bias, self.eps, self.name = bn.weight, bn.bias, bn.eps, name
        self.momentum = 0.1 if bn.momentum is None else bn.momentum
        self.stats: dict = {}

    def forward(self, x):
        mean = x.mean((0, 2, 3))
        var = x.var((0, 2, 3), unbiased=False)
        n = x.numel() / x.shape[1]
        running_mean, running_var = self.stats["in"][self.name]
        self.stats["out"][self.name] = (
            (1 - self.momentum) * running_mean + self.momentum * mean.detach(),
            (1 - self.momentum) * running_var + self.momentum * var.detach() * n / max(n - 1, 1))
        y = (x - mean[None, :, None, None]) / torch.sqrt(var[None, :, None, None] + self.eps)
        if self.weight is not None:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def _with_batch_stats(model: nn.Module):
    """A copy of the model whose BatchNorm2d layers use batch statistics; (copy, stats, bn names)."""
    import copy

    model = copy.deepcopy(model)
    stats = {"in": {}, "out": {}}
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.BatchNorm2d):
                if not child.track_running_stats:
                    raise EdgesparseError(f"update step: batch norm '{full}' keeps no running statistics")
                wrapped = _BatchStatsNorm(child, full)
                wrapped.stats = stats
                setattr(module, child_name, wrapped)
                names.append(full)
            elif isinstance(child, nn.modules.batchnorm._NormBase):
                raise EdgesparseError(f"update step: {type(child).__name__} '{full}' is not supported (BatchNorm2d is)")
    return model, stats, names


def _step_function(model: nn.Module, names: list[str], masks: dict[str, torch.Tensor], bn_names: list[str],
                   stats: dict):
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    mask_values = {n: masks[n].to(torch.float32) for n in names if n in masks}
    n_params = len(names)

    def step(x, y, buf_x, buf_y, buf_logits, logit_bias, lr, alpha, beta, *state):
        params, running = state[:n_params], state[n_params:]
        stats["in"] = {bn: (running[2 * i], running[2 * i + 1]) for i, bn in enumerate(bn_names)}
        stats["out"] = {}
        p = {n: (t if t.requires_grad else t.detach().requires_grad_()) for n, t in zip(names, params)}
        n = x.shape[0]
        out = torch.func.functional_call(model, {**p, **buffers}, (torch.cat([x, buf_x]),))
        loss = (F.cross_entropy(out[:n] + logit_bias, y) + alpha * F.mse_loss(out[n:], buf_logits)
                + beta * F.cross_entropy(out[n:], buf_y))
        grads = torch.autograd.grad(loss, list(p.values()))
        new = []
        for name, value, g in zip(names, p.values(), grads):
            if name in mask_values:
                new.append((value.detach() - lr * (g * mask_values[name])) * mask_values[name])
            else:
                new.append(value.detach() - lr * g)
        new_stats = [t.detach() for bn in bn_names for t in stats["out"][bn]]
        return (loss.detach(), *new, *new_stats)

    return step


def export_update_step(model: nn.Module, masks: dict[str, torch.Tensor], output: Path, batch: int = 8,
                       num_classes: int | None = None, example_shape=(1, 28, 28), force: bool = False,
                       tolerance: float = 1e-4) -> Path:
    """Write OUTPUT/update_step.onnx, params.npz (the starting parameters), update_step.json and
    RUN_UPDATE.py.txt; the step is checked against torch before anything is written."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch._decomp import core_aten_decompositions

    output = Path(output)
    if output.exists() and not force:
        raise EdgesparseError(f"{output} exists (use --force to replace it)")
    if batch < 1:
        raise EdgesparseError(f"batch must be at least 1, got {batch}")
    model = model.eval()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unknown = sorted(set(masks) - set(names))
    if unknown:
        raise EdgesparseError(f"mask for '{unknown[0]}', which is not a trainable parameter of the model")
    if num_classes is None:
        with torch.no_grad():
            num_classes = model(torch.zeros(1, *example_shape)).shape[1]
    running = {n: b for n, b in model.named_buffers()}
    work, stats, bn_names = _with_batch_stats(model)
    work.train()
    params = [p.detach().clone() for n, p in work.named_parameters() if p.requires_grad]
    if [n for n, p in work.named_parameters() if p.requires_grad] != names:
        raise EdgesparseError("update step: the model's parameters changed names when batch norm was replaced")
    stat_names = [f"{bn}.{kind}" for bn in bn_names for kind in ("running_mean", "running_var")]
    params += [running[n].detach().clone().float() for n in stat_names]
    g = torch.Generator().manual_seed(0)
    example = (torch.randn(batch, *example_shape, generator=g), torch.randint(0, num_classes, (batch,), generator=g),
               torch.randn(batch, *example_shape, generator=g), torch.randint(0, num_classes, (batch,), generator=g),
               torch.randn(batch, num_classes, generator=g), torch.zeros(num_classes), torch.tensor(0.03),
               torch.tensor(0.1), torch.tensor(0.5))
    step = _step_function(work, names, masks, bn_names, stats)
    traced = make_fx(step, decomposition_table=core_aten_decompositions())(*example, *params)
    state_names = names + stat_names
    param_inputs = {n: "p_" + n.replace(".", "_") for n in state_names}
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent if output.parent.exists() else None))
    try:
        onnx_log = logging.getLogger("torch.onnx")
        level = onnx_log.level
        onnx_log.setLevel(logging.ERROR)  # the exporter logs optional-package notices
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(_Step(traced), (*example, *params), str(tmp / STEP_FILE), dynamo=True,
                                  opset_version=18, input_names=[*INPUTS, *param_inputs.values()],
                                  output_names=["loss", *("new_" + param_inputs[n] for n in state_names)],
                                  custom_translation_table=_translations(), external_data=False, verbose=False)
            except EdgesparseError:
                raise
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise EdgesparseError(f"exporting the update step failed: {first}") from exc
            finally:
                onnx_log.setLevel(level)
        error = _check_against_torch(tmp / STEP_FILE, step, example, params, state_names, param_inputs)
        if error > tolerance:
            raise EdgesparseError(f"the exported update step differs from torch's by {error:.3g} (tolerance {tolerance})")
        np.savez(tmp / PARAMS_FILE, **{n: p.numpy() for n, p in zip(state_names, params)})
        info = {
            "inputs": {"x": [batch, *example_shape], "y": [batch], "buf_x": [batch, *example_shape], "buf_y": [batch],
                       "buf_logits": [batch, num_classes], "logit_bias": [num_classes], "lr": [], "alpha": [],
                       "beta": []},
            "params": state_names,
            "trainable": names,
            "running_statistics": stat_names,
            "param_inputs": param_inputs,
            "masked": {n: {"density": float(masks[n].float().mean())} for n in names if n in masks},
            "batch_norm": "normalises with the batch's statistics (as in training); running statistics are inputs and outputs",
            "checked_against_torch": {"max_abs_error": error},
            "sha256": {f: hashlib.sha256((tmp / f).read_bytes()).hexdigest() for f in (STEP_FILE, PARAMS_FILE)},
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "RUN_UPDATE.py.txt").write_text(APP_SNIPPET)
        os.chmod(tmp, 0o755)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return output


def _check_against_torch(path: Path, step, example, params, names, param_inputs) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in zip(INPUTS, example)}
    feeds.update({param_inputs[n]: p.numpy() for n, p in zip(names, params)})
    got = session.run(None, feeds)
    want = step(*example, *[p.clone() for p in params])
    return max(float(np.abs(np.asarray(a, np.float64) - b.detach().numpy().astype(np.float64)).max())
               for a, b in zip(got, want))
