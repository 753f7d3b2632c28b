"""The peers' own virtual environments, created on demand and cached.

DeepSparse 1.8.0 pins onnx 1.14 and numpy 1.26, so neither peer is ever installed into the
project's venv. Each peer gets `<cache>/peers/<name>-venv` (`<cache>` = $EDGESPARSE_CACHE or
~/.cache/edgesparse). A venv is built under a temporary name and renamed into place once its
packages import, so an interrupted install never leaves a half-made venv behind; a marker file
records the spec, and a changed spec rebuilds it. A lock file serialises concurrent callers
(a test and a benchmark run, say).

Peer processes always run with NM_DISABLE_ANALYTICS=1 / NM_VERSION_CHECK=false (DeepSparse's
telemetry and update check) and with their own venv's bin first on PATH. MNN's converter is called
through its C extension `_tools` only: importing `MNN.tools` runs `pip install` and tries to upload
usage logs (see worker.py, which also blocks that import).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# name -> (pip argument lists, installed in order; a module that must import afterwards)
SPECS = {
    "deepsparse": ([["deepsparse==1.8.0"]], "deepsparse"),
    # --no-deps: mnn's wheel declares no runtime dependency it needs beyond numpy
    "mnn": ([["--no-deps", "mnn==3.6.1"], ["numpy==2.4.6"]], "MNN"),
}
MARKER = "edgesparse-peer.json"


def cache_root() -> Path:
    base = os.environ.get("EDGESPARSE_CACHE") or str(Path.home() / ".cache" / "edgesparse")
    return Path(base) / "peers"


def venv_dir(name: str) -> Path:
    return cache_root() / f"{name}-venv"


def peer_env(name: str) -> dict:
    """The environment a peer process runs with: no telemetry, no update checks, its venv first."""
    env = dict(os.environ)
    env.update(NM_DISABLE_ANALYTICS="1", NM_VERSION_CHECK="false", PYTHONNOUSERSITE="1",
               PIP_NO_INPUT="1", PYTHONDONTWRITEBYTECODE="1")
    env["PATH"] = f"{venv_dir(name) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


def _base_python() -> str:
    """The interpreter to build venvs from (the one under the project's venv, if any)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _spec_record(name: str) -> dict:
    installs, module = SPECS[name]
    return {"name": name, "installs": installs, "module": module,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def _is_ready(path: Path, record: dict) -> bool:
    try:
        return json.loads((path / MARKER).read_text()) == record and (path / "bin" / "python").exists()
    except (OSError, ValueError):
        return False


def ensure(name: str, log=print) -> Path:
    """The peer's venv python, creating the venv first if needed. Idempotent; safe to call from
    several processes at once."""
    if name not in SPECS:
        raise ValueError(f"unknown peer '{name}' (known: {', '.join(SPECS)})")
    path = venv_dir(name)
    record = _spec_record(name)
    if _is_ready(path, record):
        return path / "bin" / "python"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_ready(path, record):
            return path / "bin" / "python"
        tmp = path.parent / f".{name}-venv.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"creating the {name} venv at {path} (once; about a minute)")
        try:
            _run([_base_python(), "-m", "venv", str(tmp)], name)
            python = tmp / "bin" / "python"
            for args in record["installs"]:
                _run(["nice", "-n", "19", str(python), "-m", "pip", "install", "-q",
                      "--disable-pip-version-check", *args], name)
            _run([str(python), "-c", f"import {record['module']}"], name, env=peer_env(name))
            (tmp / MARKER).write_text(json.dumps(record))
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path / "bin" / "python"


def _run(cmd: list[str], name: str, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"creating the {name} venv failed at `{' '.join(cmd[:6])}`: " + " | ".join(tail))


if __name__ == "__main__":
    for peer in sys.argv[1:] or list(SPECS):
        print(peer, ensure(peer))
