"""The number of calibration batches a build takes from the model factory is an option, recorded in the manifest."""
import textwrap

import pytest
from click.testing import CliRunner

from edgesparse.cli import main
from edgesparse import runtime


@pytest.fixture
def factory(tmp_path):
    path = tmp_path / "model.py"
    path.write_text(textwrap.dedent("""
        import torch
        from edgesparse import TorchModel

        def batches():
            for seed in range(100):  # more than any build takes
                yield {"x": torch.randn(2, 16, generator=torch.Generator().manual_seed(seed))}

        def build():
            torch.manual_seed(0)
            net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
            return TorchModel(net, {"x": torch.randn(2, 16)}, ["y"], {"x": {0: "batch"}, "y": {0: "batch"}},
                              calibration=batches)
    """))
    return f"{path}:build"


@pytest.mark.parametrize("count", [None, 3])
def test_calibration_batches_option(tmp_path, factory, count):
    out = tmp_path / "pkg"
    args = ["build", factory, "--target", "x86", "-o", str(out)]
    if count:
        args += ["--calibration-batches", str(count)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    verification = runtime.load(out).manifest["verification"]
    assert verification["inputs"] == "calibration"
    assert verification["calibration_batches"] == (count or 8)


def test_zero_calibration_batches_is_one_line_error(tmp_path, factory):
    result = CliRunner().invoke(main, ["build", factory, "--target", "x86", "-o", str(tmp_path / "pkg"),
                                       "--calibration-batches", "0"])
    assert result.exit_code != 0
    assert "calibration batches must be at least 1" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "pkg").exists()
