"""Fixtures for the kernel tests: the library is built once per session (and
cached on disk by content hash, so later sessions only hash the sources)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from edgesparse.kernels import X86_64, attach_functions, build_library

OPSET = 21


@pytest.fixture(scope="session")
def kernel_lib():
    return build_library(X86_64)


def make_model(nodes, inits, inputs, outputs, opset=OPSET, functions=True):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    if functions:
        attach_functions(model)
    else:
        model.opset_import.append(helper.make_opsetid("com.edgesparse", 1))
    return model


def session(model, lib=None, threads=1, isa=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if lib is not None:
        so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def float_info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


ISAS = ("avx512", "avx2", "generic")


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Each compiled ISA variant in turn (the glue reads EDGESPARSE_ISA when a
    session creates its kernels); skipped where this machine cannot run it."""
    from edgesparse.kernels.dispatch import host_supports

    if not host_supports(request.param):
        pytest.skip(f"this machine cannot run the {request.param} kernels")
    monkeypatch.setenv("EDGESPARSE_ISA", request.param)
    return request.param
