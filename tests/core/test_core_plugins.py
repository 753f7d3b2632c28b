"""The plugin host: discovery, broken plugins, allow/deny lists, and a third-party plugin
installed with pip from the tutorial in docs/writing-a-pass.md."""
import os
import re
import subprocess
import sys
import types

import pytest

from edgesparse_testing import ROOT, run, run_json
from edgesparse import Pass, hookimpl
from edgesparse.plugins import load_registry


def test_builtins_register_through_entry_points():
    registry = load_registry()
    assert "magnitude" in registry.passes and "x86" in registry.targets
    assert "ort" in registry.backends and registry.kernels
    names = {p.name: p for p in registry.plugins}
    assert names["magnitude"].version == "0.1.0" and names["magnitude"].error is None


def test_plugin_that_raises_is_reported_and_the_rest_works():
    broken = types.ModuleType("broken_plugin")

    @hookimpl
    def register_passes(register):
        raise RuntimeError("boom")

    broken.register_passes = register_passes
    registry = load_registry(extra_modules=[broken])
    info = {p.name: p for p in registry.plugins}["broken_plugin"]
    assert info.error == "RuntimeError: boom"
    assert "magnitude" in registry.passes


def test_plugin_that_fails_to_import(tmp_path, monkeypatch):
    dist = tmp_path / "broken_dist-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-dist\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[edgesparse]\nbroken = no_such_module_here\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    plugins = {p["name"]: p for p in run_json("plugins", env=env)}
    assert "ModuleNotFoundError" in plugins["broken"]["error"]
    assert plugins["broken"]["version"] == "0.1"
    assert "magnitude" in {p["name"] for p in run_json("passes", env=env)}
    assert "FAILED" in run("plugins", env=env).stdout


def test_unknown_hook_is_refused():
    from edgesparse.errors import EdgesparseError

    odd = types.ModuleType("odd_plugin")
    odd.register_wombats = hookimpl(lambda register: None)
    with pytest.raises(EdgesparseError, match="unknown hook"):
        load_registry(extra_modules=[odd])


def test_allow_and_deny_lists(monkeypatch):
    monkeypatch.setenv("EDGESPARSE_PLUGINS", "core,x86")
    registry = load_registry()
    assert "magnitude" not in registry.passes and "x86" in registry.targets
    monkeypatch.delenv("EDGESPARSE_PLUGINS")
    monkeypatch.setenv("EDGESPARSE_DISABLE_PLUGINS", "magnitude")
    assert "magnitude" not in load_registry().passes


def test_pass_options_are_validated_before_running():
    from edgesparse import Option
    from edgesparse.errors import EdgesparseError

    class P(Pass):
        name = "p"
        options = (Option("n", int, 3, "a count"), Option("flag", bool, False, "a flag"))

    assert P(n="7", flag="yes").config == {"n": 7, "flag": True}
    with pytest.raises(EdgesparseError, match="expects int"):
        P(n="7.5")
    with pytest.raises(EdgesparseError, match="expects bool"):
        P(flag="maybe")


def _tutorial_files() -> dict[str, str]:
    text = (ROOT / "docs" / "writing-a-pass.md").read_text()
    blocks = re.findall(r"`([\w.]+)`:\n\n```\w+\n(.*?)```", text, re.S)
    return dict(blocks)


def test_third_party_plugin_from_the_docs(tmp_path, mlp_onnx):
    files = _tutorial_files()
    assert set(files) == {"pyproject.toml", "edgesparse_threshold.py"}
    src = tmp_path / "edgesparse-threshold"
    src.mkdir()
    for name, body in files.items():
        (src / name).write_text(body)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    passes = {p["name"]: p for p in run_json("passes", env=env)}
    assert passes["threshold"]["options"][0]["name"] == "threshold"
    manifest = run_json("build", mlp_onnx, "-t", "x86", "-p", "threshold:threshold=0.15", "-o", tmp_path / "out", env=env)
    assert manifest["passes"][0]["name"] == "threshold"
    assert manifest["verification"]["passed"] and manifest["verification"]["sparse_nodes_on_kernel"] >= 1
    assert min(manifest["passes"][0]["report"]["sparsity"]) > 0.5
