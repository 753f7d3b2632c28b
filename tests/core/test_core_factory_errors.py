"""A model factory that refuses its input with an EdgesparseError (e.g. a checkpoint it cannot
read) gets its own message on the one error line, prefixed by the factory; any other exception
stays an error naming its type."""
from edgesparse_testing import run

FACTORY = """from edgesparse import EdgesparseError


def refuses():
    raise EdgesparseError("checkpoint /x: tensor w has shape [2], config.json implies [3]")


def crashes():
    return 1 / 0
"""


def test_factory_errors_are_one_line(tmp_path):
    (tmp_path / "model.py").write_text(FACTORY)
    for func, expect in (("refuses", "model.py:refuses: checkpoint /x: tensor w has shape [2], config.json implies [3]"),
                         ("crashes", "model.py:crashes failed: ZeroDivisionError: division by zero")):
        result = run("build", f"{tmp_path / 'model.py'}:{func}", "-t", "x86", "-o", tmp_path / "out", check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert lines[0].endswith(expect), lines[0]
        assert not (tmp_path / "out").exists()
