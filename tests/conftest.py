"""Fixtures shared by the core tests (helpers live in edgesparse_testing: a module name of its own,
since every test folder of the repository has a conftest)."""
from pathlib import Path

import onnx
import pytest

from edgesparse_testing import mlp_model, run


@pytest.fixture
def mlp_onnx(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), str(path))
    return path


@pytest.fixture(scope="session")
def built_mlp(tmp_path_factory) -> Path:
    """One magnitude-pruned MLP package shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("pkg")
    onnx.save(mlp_model(), str(tmp / "mlp.onnx"))
    run("build", tmp / "mlp.onnx", "--target", "x86", "--pass", "magnitude:sparsity=0.75,block=16,dispatch=off", "-o", tmp / "mlp")
    return tmp / "mlp"
