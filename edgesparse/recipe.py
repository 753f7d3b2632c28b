"""Build requests from the command line and from recipe files. A recipe TOML holds everything the
flags can:

    model = "samples/minilm/model.py:build"
    target = "x86"
    output = "out/minilm"
    tolerance = 1e-4
    threads = 1
    calibration_batches = 8
    min_quality = { cosine = 0.98 }    # the quality budget (see edgesparse/quality.py)
    input_shapes = { x = [1, 3, 640, 640] }   # or ["x=1,3,640,640"], as --input-shape spells it

    [[passes]]
    name = "magnitude"
    sparsity = 0.75
    block = 16

A target with options is a table: `target = { name = "jetson", arches = ["sm_87", "sm_90"] }`
(the command line spells it `--target jetson:arches=sm_87;sm_90`).
Relative paths in a recipe are relative to the recipe's folder. Flags given on the command line
win over the recipe; `--pass` flags replace the recipe's passes.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from .errors import EdgesparseError

KEYS = {"model", "target", "output", "backend", "tolerance", "threads", "inputs", "calibration_batches", "passes",
        "name", "eval_inputs", "min_quality", "input_shapes", "calibration_text"}


def parse_pass(text: str, flag: str = "--pass") -> tuple[str, dict]:
    """'magnitude:sparsity=0.75,block=16' -> ('magnitude', {'sparsity': '0.75', 'block': '16'}).
    Values stay strings here; the pass's (or target's) declared option types convert them."""
    name, _, rest = text.partition(":")
    if not name:
        raise EdgesparseError(f"{flag} needs a name: {text!r}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise EdgesparseError(f"{flag} option must be key=value: {item!r} in {text!r}")
        options[key.strip()] = value.strip()
    return name.strip(), options


def parse_input_shapes(value) -> dict[str, list[int]]:
    """--input-shape flags (['x=1,3,640,640', ...]) or a recipe's table ({x = [1, 3, 640, 640]})
    -> {name: shape}."""
    from .inputs import parse_input_shape

    if isinstance(value, dict):
        value = [f"{name}={','.join(map(str, dims if isinstance(dims, list) else [dims]))}" for name, dims in value.items()]
    if not isinstance(value, (list, tuple)):
        raise EdgesparseError(f"input_shapes must be a table of name = [dims] or a list of 'NAME=d0,d1,...': {value!r}")
    shapes = {}
    for text in value:
        name, shape = parse_input_shape(text)
        if name in shapes:
            raise EdgesparseError(f"--input-shape gives input '{name}' twice")
        shapes[name] = shape
    return shapes


def parse_target(value) -> tuple[str, dict]:
    """A target as the command line ('jetson:arches=sm_87;sm_90') or a recipe (that string, or a
    table with a name) gives it -> (name, options)."""
    if isinstance(value, dict):
        if "name" not in value:
            raise EdgesparseError("a target table needs a name")
        options = dict(value)
        return str(options.pop("name")), options
    return parse_pass(str(value), "--target")


def load_recipe(path: Path) -> dict:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise EdgesparseError(f"recipe not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgesparseError(f"recipe {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise EdgesparseError(f"recipe {path}: unknown key '{unknown[0]}' (keys: {', '.join(sorted(KEYS))})")
    base = Path(path).parent
    for key in ("model", "output", "inputs", "eval_inputs", "calibration_text"):
        if key in data:
            data[key] = _relative(base, data[key])
    passes = []
    for entry in data.get("passes", []):
        if not isinstance(entry, dict) or "name" not in entry:
            raise EdgesparseError(f"recipe {path}: each [[passes]] entry needs a name")
        entry = dict(entry)
        passes.append((entry.pop("name"), entry))
    data["passes"] = passes
    if not isinstance(data.get("min_quality", {}), dict):
        raise EdgesparseError(f"recipe {path}: min_quality must be a table, e.g. min_quality = {{ cosine = 0.98 }}")
    return data


def _relative(base: Path, value: str) -> str:
    if str(value).startswith("hf:"):
        return "hf:" + _relative(base, str(value)[3:])
    spec, colon, func = str(value).partition(".py:")
    if colon:
        p = Path(spec + ".py")
        return f"{p if p.is_absolute() else base / p}:{func}"
    p = Path(value)
    return str(p if p.is_absolute() else base / p)
