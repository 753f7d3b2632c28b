"""Plugin discovery. Built-in passes and targets are separate distributions that declare the same
`edgesparse` entry point group a third-party package would, so there is one path for both.

Environment:
  EDGESPARSE_PLUGINS          comma-separated allow-list of entry-point names (empty: none load)
  EDGESPARSE_DISABLE_PLUGINS  comma-separated deny-list of entry-point names
A plugin that fails to import, or raises while registering, is recorded with its error and skipped.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from functools import lru_cache

import pluggy

from . import hookspecs
from .errors import EdgesparseError

GROUP = "edgesparse"


@dataclass
class PluginInfo:
    name: str
    version: str
    registered: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class Registry:
    """Everything the loaded plugins contributed, by name."""

    passes: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)
    backends: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)
    commands: dict = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)

    def get(self, kind: str, name: str):
        table = getattr(self, kind)
        if name not in table:
            known = ", ".join(sorted(table)) or "none installed"
            raise EdgesparseError(f"unknown {_SINGULAR[kind]} '{name}' (known: {known})")
        return table[name]


def _names(var: str) -> set[str] | None:
    value = os.environ.get(var)
    if value is None:
        return None
    return {n.strip() for n in value.split(",") if n.strip()}


def _entry_points():
    allow, deny = _names("EDGESPARSE_PLUGINS"), _names("EDGESPARSE_DISABLE_PLUGINS") or set()
    for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
        if (allow is None or ep.name in allow) and ep.name not in deny:
            yield ep


# (hook name, registry table, what one registered object is called)
_KINDS = (
    ("register_passes", "passes", "pass"),
    ("register_targets", "targets", "target"),
    ("register_backends", "backends", "backend"),
    ("register_kernels", "kernels", "kernel"),
    ("register_commands", "commands", "command"),
)
_SINGULAR = {table: kind for _, table, kind in _KINDS}


def load_registry(extra_modules=()) -> Registry:
    """Discover entry-point plugins (plus `extra_modules`, used by tests) and collect what they
    register. Never raises for a broken plugin: its PluginInfo carries the error."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    infos: dict[str, PluginInfo] = {}

    candidates = []
    for ep in _entry_points():
        version = ep.dist.version if ep.dist else "?"
        try:
            candidates.append((ep.name, version, ep.load()))
        except Exception as exc:  # a broken plugin must not take the host down
            registry.plugins.append(PluginInfo(ep.name, version, error=_describe(exc)))
    for module in extra_modules:
        candidates.append((module.__name__, getattr(module, "__version__", "?"), module))

    for name, version, module in candidates:
        info = PluginInfo(name, version)
        registry.plugins.append(info)
        try:
            pm.register(module, name=name)
        except Exception as exc:
            info.error = _describe(exc)
            continue
        infos[name] = info
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise EdgesparseError(f"plugin implements an unknown hook: {exc}") from exc

    for hook_name, table_name, kind in _KINDS:
        table = getattr(registry, table_name)
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = infos[impl.plugin_name]

            def register(obj, _info=info, _table=table, _kind=kind):
                if obj.name in _table:
                    raise EdgesparseError(f"{_kind} '{obj.name}' is registered twice")
                _table[obj.name] = obj
                _info.registered.append(f"{_kind}:{obj.name}")

            try:
                impl.function(register=register)
            except Exception as exc:
                info.error = _describe(exc)
    return registry


@dataclass(frozen=True)
class Command:
    """A plugin's `edgesparse NAME ...` subcommand: `target` is "module:attribute" of a click command,
    imported when the subcommand runs."""

    name: str
    target: str
    help: str = ""

    def load(self):
        import importlib

        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry, loaded once."""
    return load_registry()
