"""The pass API. A pass can act at two points of the pipeline:

* `transform_module(module, ctx)`: before export, on the PyTorch module (surgery, calibration,
  fine-tuning). Returns the module to export (the same one or a new one).
* `rewrite_graph(model, ctx)`: after export, on the ONNX model as an `onnx_ir.Model`, edited in
  place (prune initializers, replace ops with the sparse operators of a kernel library).

A pass overrides one or both. A pass that overrides `transform_module` needs a PyTorch model as
input. Options are declared once, with types, defaults and checks, and validated before anything
runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from .errors import EdgesparseError

NEEDS = ("none", "calibration", "training")


@dataclass(frozen=True)
class Option:
    """One typed option of a pass. `check` returns an error message, or None when the value is fine."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    # words accepted besides values of `type`, kept as strings (e.g. "auto" for a float sparsity);
    # neither `choices` nor `check` applies to them
    words: tuple[str, ...] = ()

    def parse(self, value: Any, owner: str) -> Any:
        """Convert a value (a string from the command line or a TOML value) and validate it."""
        if isinstance(value, str) and value.strip() in self.words:
            return value.strip()
        value = self._convert(value, owner)
        if self.choices is not None and value not in self.choices:
            raise EdgesparseError(
                f"option {owner}.{self.name}={value!r} is not one of {', '.join(map(str, self.choices))}"
            )
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise EdgesparseError(f"option {owner}.{self.name}={value!r}: {problem}")
        return value

    def _convert(self, value: Any, owner: str) -> Any:
        also = "".join(f" or '{w}'" for w in self.words)
        wrong = EdgesparseError(
            f"option {owner}.{self.name} expects {self.type.__name__}{also}, got {value!r}"
        )
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise wrong
        if self.type is tuple:  # a list of strings: "a;b;c" on the command line, an array in TOML
            if isinstance(value, str):
                return tuple(v for v in value.split(";") if v)
            if isinstance(value, (list, tuple)):
                return tuple(str(v) for v in value)
            raise wrong
        if self.type in (int, float):
            if isinstance(value, bool):
                raise wrong
            try:
                converted = self.type(value)
            except (TypeError, ValueError):
                raise wrong from None
            if self.type is int and isinstance(value, float) and value != converted:
                raise wrong
            return converted
        if not isinstance(value, self.type):
            raise wrong
        return value


def in_range(lo: float, hi: float, *, hi_open: bool = False) -> Callable[[Any], str | None]:
    """A check for numbers in [lo, hi] (or [lo, hi) with hi_open)."""

    def check(value):
        if value < lo or value > hi or (hi_open and value == hi):
            return f"must be in [{lo}, {hi}{')' if hi_open else ']'}"
        return None

    return check


class Pass:
    """Base class of every sparsity pass. Subclasses set the class attributes and override
    `transform_module` and/or `rewrite_graph`."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    needs: ClassVar[str] = "none"          # one of NEEDS: what data the pass consumes
    emits: ClassVar[tuple[str, ...]] = ()  # custom ops it may emit, as "domain::Op"
    targets: ClassVar[tuple[str, ...] | None] = None  # targets that can run its ops; None: any

    def __init__(self, **values: Any):
        declared = {o.name: o for o in self.options}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise EdgesparseError(
                f"pass '{self.name}' has no option '{unknown[0]}' "
                f"(options: {', '.join(declared) or 'none'})"
            )
        self.config = {
            n: (o.parse(values[n], self.name) if n in values else o.default)
            for n, o in declared.items()
        }

    def __getattr__(self, item):  # options read as attributes: self.sparsity
        config = self.__dict__.get("config", {})
        if item in config:
            return config[item]
        raise AttributeError(item)

    @classmethod
    def stages(cls) -> tuple[str, ...]:
        found = []
        if cls.transform_module is not Pass.transform_module:
            found.append("torch")
        if cls.rewrite_graph is not Pass.rewrite_graph:
            found.append("onnx")
        return tuple(found)

    def requires_torch(self) -> bool:
        """Whether the pass, as configured, needs a PyTorch model. A pass whose torch stage is optional
        (it also works on ONNX inputs) overrides this."""
        return "torch" in self.stages()

    def transform_module(self, module, ctx):  # pragma: no cover - default does nothing
        return module

    def rewrite_graph(self, model, ctx) -> None:  # pragma: no cover - default does nothing
        return None

    @classmethod
    def describe(cls) -> dict:
        return {
            "name": cls.name,
            "summary": cls.summary,
            "stages": list(cls.stages()),
            "needs": cls.needs,
            "emits": list(cls.emits),
            "targets": list(cls.targets) if cls.targets is not None else "any",
            "options": [
                {"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help}
                | ({"choices": list(o.choices)} if o.choices else {})
                | ({"words": list(o.words)} if o.words else {})
                for o in cls.options
            ],
        }
