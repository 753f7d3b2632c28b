"""What a pass sees of the build: the target, the data, and where to report."""
from __future__ import annotations

import sys
from typing import Callable, Iterable

import numpy as np

from .errors import EdgesparseError


class BuildContext:
    def __init__(self, target, registry, *, calibration: list[dict], train: Callable | None = None,
                 threads: int = 1, quiet: bool = False, evaluation: list[dict] | None = None):
        self.target = target
        self.registry = registry
        self.threads = threads
        self._calibration = calibration
        self._evaluation = evaluation or []
        self._train = train
        self._quiet = quiet
        self.reports: dict[str, dict] = {}
        self.warnings: list[str] = []
        self.files: dict[str, bytes] = {}
        self._current = None
        self._budget: dict = {}
        self._baseline = None  # a callable giving the quality.Baseline (the build sets it), then the Baseline
        self._evaluate = None

    # -- quality (what sparsity=auto searches within) ----------------------------------------
    def set_quality(self, budget: dict, baseline, evaluate: Callable | None = None) -> None:
        """Called by the build: the quality budget, the original model's held-out outputs (a
        quality.Baseline, or a callable that measures it when first needed) and the factory's
        evaluate()."""
        self._budget, self._baseline, self._evaluate = dict(budget), baseline, evaluate

    @property
    def quality_budget(self) -> dict[str, float]:
        """The build's quality budget ({metric: value}, --min-quality); {} when it has none."""
        return dict(self._budget)

    def measure_quality(self, run_batch: Callable, factory_metrics: bool | None = None) -> dict:
        """A candidate (run by `run_batch`: input batch {name: array} -> list of outputs, in the
        original model's output order) against the original model on the build's held-out batches,
        as the manifest's quality section measures the package, plus `budget` ({metric: {limit,
        value, passed}}), `passed` and `missed` (the first miss as text, or None).
        factory_metrics: call the factory's evaluate() too (default: when the budget holds one of
        its metrics; it can be slow)."""
        from . import quality

        if self._baseline is None:
            raise EdgesparseError("quality is not measurable here (no original model to compare with)")
        if callable(self._baseline):
            self._baseline = self._baseline()
        base = self._baseline
        if factory_metrics is None:
            factory_metrics = quality.needs_evaluate(self._budget)
        evaluate = self._evaluate if factory_metrics else None
        result = quality.compare(base, run_batch, base.names, evaluate)
        budget = {k: v for k, v in self._budget.items() if evaluate is not None or k in quality.METRICS}
        result["budget"], result["missed"] = quality.budget_results(result, budget)
        result["passed"] = result["missed"] is None
        return result

    # -- data -----------------------------------------------------------------
    def calibration_inputs(self) -> list[dict[str, np.ndarray]]:
        """Real inputs when the model factory provides them, else generated ones."""
        return self._calibration

    def evaluation_inputs(self) -> list[dict[str, np.ndarray]]:
        """Held-out batches (the factory's evaluation(), or --eval-inputs), never the calibration
        ones; [] when the build has none. For measuring what a pass costs, never for training."""
        return self._evaluation

    @property
    def train(self) -> Callable:
        """The user's training loop: train(module, steps). Raises when the factory has none."""
        if self._train is None:
            raise EdgesparseError(
                f"pass '{self._current}' needs a training loop: add train= to the TorchModel"
            )
        return self._train

    @property
    def has_train(self) -> bool:
        return self._train is not None

    # -- recovery -------------------------------------------------------------
    def recover(self, module, teacher, **options) -> dict:
        """Recover a module the pass pruned in place towards `teacher` (its copy from before the
        pruning), masks kept; returns the report of what ran. See edgesparse.recovery.recover."""
        from .recovery import recover

        options.setdefault("label", f"{self._current}: recovery" if self._current else "recovery")
        return recover(module, teacher, self, **options)

    # -- reporting ------------------------------------------------------------
    def begin_pass(self, name: str) -> None:
        self._current = name
        self.reports.setdefault(name, {})

    def end_passes(self) -> None:
        """The passes are done: later warnings (compile, verification) belong to the build, not to
        the last pass that ran."""
        self._current = None

    def report(self, key: str, value) -> None:
        """Record a figure in the current pass's section of the manifest."""
        self.reports[self._current][key] = value

    def add_file(self, name: str, data: bytes) -> None:
        """Ship an extra file in the package (e.g. a second graph a pass needs at run time), at
        `<pass name>/<name>`; it is checksummed in the manifest like every other file."""
        parts = name.replace("\\", "/").split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise EdgesparseError(f"pass '{self._current}': bad package file name '{name}'")
        self.files[f"{self._current}/{name}"] = bytes(data)

    def warn(self, message: str) -> None:
        text = f"{self._current}: {message}" if self._current else message
        self.warnings.append(text)
        self.log(f"warning: {text}")

    def log(self, message: str) -> None:
        if not self._quiet:
            print(message, file=sys.stderr)

    def progress(self, iterable: Iterable, label: str, length: int | None = None):
        """Wrap a long loop in a progress bar (on stderr, only when it is a terminal)."""
        if self._quiet or not sys.stderr.isatty():
            return iter(iterable)
        import click

        def bar():
            with click.progressbar(iterable, length=length, label=label, file=sys.stderr) as items:
                yield from items

        return bar()

    def kernel_library(self, domain: str):
        for lib in self.registry.kernels.values():
            if lib.domain == domain:
                return lib
        raise EdgesparseError(f"no kernel library provides domain '{domain}'")
