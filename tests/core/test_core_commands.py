"""Plugins add `edgesparse` subcommands (register_commands), imported only when they run."""
import subprocess
import sys

from edgesparse_testing import run


def test_plugin_command_is_listed_without_importing_it():
    code = ("import sys; from click.testing import CliRunner; from edgesparse.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'continual' in r.output, r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_plugin_command_runs_and_fails_in_one_line(tmp_path):
    assert "update-step" in run("continual", "--help").stdout
    result = run("continual", "train", tmp_path / "run", "--sparsity", "1.5", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sparsity" in lines[0], lines


def test_unknown_command_is_still_an_error():
    result = run("nosuchcommand", check=False)
    assert result.returncode != 0 and "No such command" in result.stderr


def test_loading_every_plugin_does_not_import_torch():
    code = ("import sys; from edgesparse.plugins import load_registry; r = load_registry(); "
            "assert not [p.name for p in r.plugins if p.error]; print(sorted(m for m in ('torch', 'tvm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_core_command_errors_stay_one_line_beside_plugin_commands(tmp_path):
    result = run("build", tmp_path / "nope.onnx", "-t", "x86", "-o", tmp_path / "out", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: model file not found: {tmp_path / 'nope.onnx'}"]
