"""Shared helpers for the sparsebytenn tests: run the pass outside a build, a tiny MobileNet-style
CNN trained briefly on a real Fashion-MNIST subset, and a registry able to verify conv packages."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "samples" / "sparsebytenn"


class StubTarget:
    """A target whose dispatch rule is a function (to test the pass's use of it)."""

    name = "stub"

    def __init__(self, rule=lambda op, shape, sparsity, block, threads: True):
        self.rule = rule
        self.calls = []

    def prefers_sparse(self, op, shape, sparsity, block, threads=1):
        self.calls.append((op, dict(shape), sparsity, block, threads))
        return self.rule(op, shape, sparsity, block, threads)

    def times_here(self):  # its packages run nowhere: nothing to time
        return False

    isa = "stub"


def make_ctx(calibration, target=None, train=None):
    from edgesparse.context import BuildContext
    from edgesparse.plugins import registry

    ctx = BuildContext(target or registry().get("targets", "x86"), registry(), calibration=calibration,
                       train=train, quiet=True)
    ctx.begin_pass("sparsebytenn")
    return ctx


def run_torch_stage(module, calibration, target=None, train=None, **options):
    from edgesparse_sparsebytenn import SparseByteNN

    p = SparseByteNN(**options)
    ctx = make_ctx(calibration, target, train)
    module = p.transform_module(module, ctx)
    return p, ctx, module


def export_and_rewrite(p, ctx, module, example: dict, dynamic=True):
    import onnx_ir as ir

    from edgesparse import TorchModel, export, kernels

    names = list(example)
    axes = {n: {0: "batch"} for n in names} | ({"out": {0: "batch"}} if dynamic else {})
    model = export.export_torch(TorchModel(module, example, ["out"], axes if dynamic else {}))
    graph = ir.from_proto(model)
    p.rewrite_graph(graph, ctx)
    sparse = ir.to_proto(graph)
    kernels.attach_functions(sparse)
    return model, sparse


def ort_session(model, library=True, threads=1):
    import onnxruntime as ort

    from edgesparse import kernels

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if library:
        so.register_custom_ops_library(str(kernels.build_library(kernels.X86_64)))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def verifying_registry():
    """The real registry; with the interim BlockSparseConv densify when the core lacks it."""
    from edgesparse.plugins import registry

    from edgesparse_sparsebytenn.compat import ensure_conv_densify

    reg = registry()
    ensure_conv_densify(reg)
    return reg


def tiny_cnn(width=32):
    """MobileNetV2-style: 3x3 stem (stride 2), two inverted residual blocks (one with a residual
    add), 1x1 head, pooling, Linear."""
    sys.path.insert(0, str(SAMPLE))
    import cnn

    return cnn.FashionMobileNet(blocks=((2, width, 1), (2, width, 1)), stem=width, head=2 * width)


@pytest.fixture(scope="session")
def fashion_subset():
    """(x_train, y_train, x_test, y_test): 3000 + 1000 real Fashion-MNIST images, 14x14 (2x2
    average-pooled to keep the tests fast)."""
    sys.path.insert(0, str(SAMPLE))
    import data

    def small(x):
        return x.reshape(len(x), 1, 14, 2, 14, 2).mean((3, 5)).astype(np.float32)

    x, y = data.load("train")
    xt, yt = data.load("test")
    rng = np.random.default_rng(0)
    i = rng.choice(len(x), 3000, replace=False)
    return small(x[i]), y[i], small(xt[:1000]), yt[:1000]


@pytest.fixture(scope="session")
def trained_tiny(fashion_subset):
    """The tiny CNN trained for 80 steps on the real subset, and its test accuracy."""
    sys.path.insert(0, str(SAMPLE))
    import cnn

    torch.manual_seed(0)
    x, y, xt, yt = fashion_subset
    model = tiny_cnn()
    cnn.train_steps(model, x, y, 80, lr=4e-3, batch=64)
    return model.eval(), cnn.accuracy(model, xt, yt)


def clone(model):
    import copy

    return copy.deepcopy(model).eval()


def outputs_close(a: nn.Module, b: nn.Module, x: torch.Tensor, tol=1e-4) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())
