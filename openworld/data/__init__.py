"""Data: sources (dataset loaders), transforms per family, and views (TensorData / FileData).

Names are imported lazily so that ``import openworld.data`` stays cheap (no torchvision, no sklearn).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TensorData": "views",
    "FileData": "views",
    "TransformPair": "views",
    "batches": "views",
    "concat": "views",
    "HIDDEN": "views",
    "SourceData": "sources",
    "DataNotFoundError": "sources",
    "resolve_root": "sources",
    "cache_dir": "sources",
    "load_source": "sources",
    "hash_key": "sources",
    "stratified_carve": "sources",
    "get_transforms": "transforms",
    "FAMILIES": "transforms",
}

__all__ = [  # noqa: RUF022 - grouped by module
    "TensorData",
    "FileData",
    "TransformPair",
    "batches",
    "concat",
    "HIDDEN",
    "SourceData",
    "DataNotFoundError",
    "resolve_root",
    "cache_dir",
    "load_source",
    "hash_key",
    "stratified_carve",
    "get_transforms",
    "FAMILIES",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'openworld.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"openworld.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
