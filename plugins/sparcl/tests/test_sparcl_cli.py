"""`edgesparse-continual`: bad input gets one line on stderr and exit status 1."""
from click.testing import CliRunner

from edgesparse_sparcl.cli import main


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_overlapping_tasks_one_line(tmp_path):
    r = _run("train", tmp_path / "r", "--tasks", "0,1;1,2", "--quiet")
    assert r.exit_code == 1
    assert r.output.strip() == "error: tasks 0 and 1 both contain class 1: tasks must not overlap"


def test_buffer_larger_than_data_one_line(tmp_path):
    r = _run("train", tmp_path / "r", "--tasks", "0,1;2,3", "--train-per-task", "50", "--buffer-size", "101",
             "--quiet")
    assert r.exit_code == 1
    assert "buffer of 101 examples is larger than the 100 training examples" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_show_without_results(tmp_path):
    r = _run("show", tmp_path)
    assert r.exit_code == 1 and "holds no results" in r.output
