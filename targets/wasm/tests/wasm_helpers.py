"""Shared helpers of the wasm target's tests (a uniquely named module, not a conftest, so that it
never collides with other test folders' modules)."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
SETUP = "sh targets/wasm/setup_env.sh"
EDGESPARSE = [sys.executable, "-m", "edgesparse"]


def require_toolchain() -> None:
    """Fail (never skip) when the machine lacks what the wasm target needs."""
    from edgesparse import EdgesparseError
    from edgesparse_wasm import toolchain

    try:
        toolchain.check_tools(need_node=True)
    except EdgesparseError as exc:
        pytest.fail(f"{exc}\ninstall with: {SETUP}")


def require_chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail(f"headless Chromium (Debian package chromium) is missing; install with: {SETUP}")
    return exe


def root_conftest():
    """The suite's tests/conftest.py (mlp_model), loaded by path under a name of its own."""
    name = "edgesparse_root_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def cli(*args, check: bool = True, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([*EDGESPARSE, *map(str, args)], capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"edgesparse {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result
