"""Keep large CPU tensors' memory in the process between batches (glibc only).

By default glibc returns every allocation above ``M_MMAP_THRESHOLD`` (at most 32 MiB, adjusted
dynamically) to the kernel when it is freed, so each training or evaluation batch whose activations are
large gets fresh zeroed pages again: on a 32×32 CNN at batch 1000 a quarter of the wall time went to
page faults (``sys`` time). Raising the mmap and trim thresholds lets freed blocks be reused. The numbers
a run computes do not change; only where the memory comes from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_allocator"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def tune_allocator(limit_bytes: int = 1 << 30) -> bool:
    """Raise glibc's mmap/trim thresholds to ``limit_bytes`` (default 1 GiB) once per process.

    Returns True when the allocator was tuned. Does nothing (False) off Linux, without glibc, when the
    user set any ``MALLOC_*`` variable themselves, or when ``OPENWORLD_MALLOC=default``.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("OPENWORLD_MALLOC", "") == "default":
        return False
    if any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, int(limit_bytes))) and bool(mallopt(_M_TRIM_THRESHOLD, int(limit_bytes)))
    mallopt(_M_TOP_PAD, 64 << 20)
    _done = ok
    return ok
