"""Content-addressed cache for expensive intermediate results (base-session models, features).

Keys are SHA-256 digests of everything that determines the content (scenario splits, backbone and
training blocks, seed, data fingerprint), so a hit is always the same result a fresh computation
would give. Entries are state dicts written atomically and read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Cache:
    """``<root>/<key[:2]>/<key>.pt`` plus a ``.json`` sidecar describing the entry."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.pt"

    def load(self, key: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated or foreign file is a miss, and is recomputed and overwritten
            return None

    def save(self, key: str, state: dict, meta: dict | None = None) -> Path:
        path = self.path(key)
        atomic_torch_save(state, path)
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta or {}, indent=2, default=str).encode())
        return path
