"""Registries for datasets, scenarios, strategies and backbones.

One obvious way to get a component: ``STRATEGIES.get("teen")`` / ``create_backbone("resnet20", ...)``.

Built-ins are declared in ``pyproject.toml`` under the entry-point groups ``openworld.<kind>`` —
exactly the way an installed plugin declares itself — and are imported only when first asked for,
so ``openworld --help`` stays fast. Code may also register with the decorator
(``@register_strategy("name")``), and any registry accepts ``"package.module:ClassName"``.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any


class RegistryError(LookupError):
    """Unknown name: the message lists what is available."""


class Registry:
    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._objects: dict[str, Any] = {}
        self._entry_points: dict[str, metadata.EntryPoint] | None = None

    # -- discovery -----------------------------------------------------------------------------
    def _eps(self) -> dict[str, metadata.EntryPoint]:
        if self._entry_points is None:
            self._entry_points = {ep.name: ep for ep in metadata.entry_points(group=self.group)}
        return self._entry_points

    def names(self) -> list[str]:
        return sorted(set(self._objects) | set(self._eps()))

    def __contains__(self, name: str) -> bool:
        return name in self._objects or name in self._eps() or ":" in name

    # -- registration --------------------------------------------------------------------------
    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            key = name or getattr(obj, "name", None) or obj.__name__
            existing = self._objects.get(key)
            if existing is not None and existing is not obj and _qualname(existing) != _qualname(obj):
                raise RegistryError(f"{self.kind} {key!r} is already registered by {_qualname(existing)}")
            self._objects[key] = obj
            if isinstance(obj, type) and not getattr(obj, "__dict__", {}).get("name"):
                try:
                    obj.name = key
                except (AttributeError, TypeError):
                    pass
            return obj

        return decorator

    # -- lookup --------------------------------------------------------------------------------
    def get(self, name: str) -> Any:
        if name in self._objects:
            return self._objects[name]
        eps = self._eps()
        if name in eps:
            obj = eps[name].load()
            self._objects.setdefault(name, obj)
            if isinstance(obj, type) and not getattr(obj, "__dict__", {}).get("name"):
                obj.name = name
            return self._objects[name]
        if ":" in name:
            return load_object(name)
        raise RegistryError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        names = self.names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; allowed: {', '.join(names)} or 'package.module:ClassName'"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def load_object(spec: str) -> Any:
    """Import ``"package.module:Attr"``; errors say which part is missing."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RegistryError(f"{spec!r} is not of the form 'package.module:ClassName'")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            # Like `python -m`, resolve modules relative to the working directory too (the console
            # script's sys.path does not contain it).
            if os.getcwd() in sys.path:
                raise
            sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RegistryError(f"cannot import module {module_name!r} named in {spec!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RegistryError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


STRATEGIES = Registry("strategy", "openworld.strategies")
SCENARIOS = Registry("scenario", "openworld.scenarios")
DATASETS = Registry("dataset", "openworld.datasets")
BACKBONES = Registry("backbone", "openworld.backbones")

REGISTRIES = {
    "strategies": STRATEGIES,
    "scenarios": SCENARIOS,
    "datasets": DATASETS,
    "backbones": BACKBONES,
}

register_strategy = STRATEGIES.register
register_scenario = SCENARIOS.register
register_dataset = DATASETS.register
register_backbone = BACKBONES.register
