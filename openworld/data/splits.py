"""Seeded, library-version-independent sample selection (FSCIL card §1.5).

``pick`` ranks candidates by a SHA-256 key of ``"tag|seed|c|x"``, so the same indices come out on
any machine, numpy or torch version. Used by scenarios (fallback lists, validation splits,
subsampling) and by the pre-training stage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def fallback_key(tag: str, seed: int, c: int, x: int) -> int:
    """First 8 bytes (big-endian, unsigned) of SHA-256 of the ASCII text ``"tag|seed|c|x"``.

    ``c`` is the dataset's original class id and ``x`` the row index in the (training) array.
    """
    text = f"{tag}|{int(seed)}|{int(c)}|{int(x)}"
    return int.from_bytes(hashlib.sha256(text.encode("ascii")).digest()[:8], "big")


def pick(pool: Sequence[int] | np.ndarray, n: int, tag: str, seed: int, c: int) -> list[int]:
    """The ``n`` indices of ``pool`` with the smallest ``(fallback_key(tag, seed, c, x), x)``, ascending."""
    xs = [int(x) for x in np.asarray(pool, dtype=np.int64).reshape(-1)]
    n = int(n)
    if n < 0:
        raise ValueError(f"pick({tag!r}, seed {seed}): class {c}: cannot pick {n} samples")
    if n > len(xs):
        raise ValueError(
            f"pick({tag!r}, seed {seed}): class {c} has only {len(xs)} samples, {n} requested"
        )
    ranked = sorted(xs, key=lambda x: (fallback_key(tag, seed, c, x), x))
    return sorted(ranked[:n])
