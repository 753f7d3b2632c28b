"""Targets take typed options (`--target NAME:key=value`, or a recipe's target table)."""
import json

import pytest

from edgesparse import EdgesparseError, Option, Target
from edgesparse.recipe import load_recipe, parse_target
from edgesparse_testing import run


class Board(Target):
    name = "board"
    options = (Option("cores", int, 4, "cores to use"), Option("arches", tuple, ("a",), "architectures"))


def test_configure_parses_checks_and_leaves_the_registered_target_alone():
    registered = Board()
    configured = registered.configure({"cores": "8", "arches": "x;y"})
    assert configured.config == {"cores": 8, "arches": ("x", "y")}
    assert registered.config == {"cores": 4, "arches": ("a",)}
    assert configured.describe()["config"]["cores"] == 8
    with pytest.raises(EdgesparseError, match="target 'board' has no option 'speed'"):
        registered.configure({"speed": "1"})
    with pytest.raises(EdgesparseError, match="target board.cores expects int"):
        registered.configure({"cores": "many"})


def test_target_spellings(tmp_path):
    assert parse_target("jetson:arches=sm_87;sm_90") == ("jetson", {"arches": "sm_87;sm_90"})
    assert parse_target("x86") == ("x86", {})
    recipe = tmp_path / "r.toml"
    recipe.write_text('model = "m.onnx"\ntarget = { name = "jetson", arches = ["sm_87", "sm_90"] }\n')
    assert parse_target(load_recipe(recipe)["target"]) == ("jetson", {"arches": ["sm_87", "sm_90"]})
    with pytest.raises(EdgesparseError, match="--target option must be key=value"):
        parse_target("x86:fast")


def test_unknown_target_option_is_one_line(mlp_onnx, tmp_path):
    result = run("build", mlp_onnx, "--target", "x86:turbo=1", "-o", tmp_path / "out", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: target 'x86' has no option 'turbo'")
    assert not (tmp_path / "out").exists()


def test_targets_command_lists_options():
    described = json.loads(run("targets", "--json").stdout)
    snapdragon = next(d for d in described if d["name"] == "snapdragon")
    assert {o["name"] for o in snapdragon["options"]} >= {"ndk", "api"}
