"""Fixtures of the snapdragon target's tests. Everything runs for real: the cross compiler,
qemu-aarch64-static and ONNX Runtime's aarch64 build (fetched from PyPI into the edgesparse cache)."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from snapdragon_helpers import cli, mlp

from edgesparse_snapdragon import toolchains


@pytest.fixture(scope="session", autouse=True)
def arm_tools():
    """The tests need the cross toolchain and qemu: fail (not skip) with the install command."""
    missing = toolchains.missing_debian_tools()
    if missing:
        pytest.fail(f"missing {', '.join(w for w, _ in missing)}; install with: {toolchains.SETUP_COMMAND} "
                    f"(Debian packages {' '.join(sorted({p for _, p in missing}))})", pytrace=False)


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "mlp.onnx"
    onnx.save(mlp(), str(path))
    return path


@pytest.fixture(scope="session")
def snapdragon_package(mlp_onnx, tmp_path_factory) -> Path:
    """`edgesparse build mlp.onnx --target snapdragon --pass magnitude`, verified under qemu."""
    out = tmp_path_factory.mktemp("pkg") / "mlp"
    cli("build", mlp_onnx, "--target", "snapdragon", "--pass", "magnitude", "-o", out)
    return out
