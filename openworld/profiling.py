"""Per-phase wall-clock accounting for ``openworld run --profile``.

A :class:`PhaseTimer` accumulates, per named phase, the wall seconds and the number of times the phase
was entered (``with timer.phase("train"): ...``). Phases nest: time is *exclusive* — while an inner
phase runs, only the inner one is charged (``metrics`` inside ``eval`` counts as ``metrics``, and
``eval`` keeps what is left) — and each phase also keeps its *inclusive* time (nested phases added
back; a phase re-entered inside itself is counted once). ``other`` = total − the sum of the exclusive
times, so a report adds up to the wall time between :meth:`PhaseTimer.start` and :meth:`PhaseTimer.stop`.

With ``sync`` (e.g. ``torch.cuda.synchronize``) the timer calls it at every phase boundary, so queued
device work is charged to the phase that queued it. :data:`NULL_TIMER` is the timer of a run without
``--profile``: every method is a no-op, nothing is synchronised, wrapped callables and iterables are
returned unchanged.

This module is the lowest layer: standard library only (the runner passes the clock and ``sync``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# The phases every table lists (in this order, zero when unused), then any others, then ``other``.
PHASES = ("data", "train", "eval", "metrics", "checkpoint", "logging")
OTHER = "other"
ACCOUNTING = (
    "seconds are exclusive: time in a nested phase (e.g. metrics inside eval) is charged to the inner "
    "phase only; inclusive_seconds adds nested phases back; other = total - sum of the phases"
)


class _Phase:
    """The context manager of one phase entry (a class: cheaper than a generator-based one)."""

    __slots__ = ("timer", "name")

    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.timer.enter(self.name)

    def __exit__(self, *exc) -> None:
        self.timer.exit()


class PhaseTimer:
    """Exclusive and inclusive wall seconds and call counts per phase; see the module docstring."""

    enabled = True

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sync: Callable[[], Any] | None = None):
        self._clock = clock
        self._sync = sync
        self.exclusive: dict[str, float] = {}
        self.inclusive: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[tuple[str, float]] = []  # (phase, time it was entered)
        self._mark = 0.0  # last boundary: the top of the stack is charged from here
        self._t0: float | None = None
        self._t1: float | None = None

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()  # charge queued device work to the phase that queued it
        return self._clock()

    # -- accounting ----------------------------------------------------------------------------------
    def start(self) -> PhaseTimer:
        self._t0 = self._mark = self._now()
        self._t1 = None
        return self

    def backdate(self, since: float, name: str) -> None:
        """Move the start back to ``since`` (a reading of the same clock), charging the time from then to
        :meth:`start` to the top-level phase ``name`` (e.g. the command's imports before the timer existed)."""
        if self._t0 is None or self._stack:
            raise RuntimeError("PhaseTimer.backdate() right after start() only")
        early = self._t0 - since
        self._t0 = since
        self.exclusive[name] = self.exclusive.get(name, 0.0) + early
        self.inclusive[name] = self.inclusive.get(name, 0.0) + early
        self.calls[name] = self.calls.get(name, 0) + 1

    def enter(self, name: str) -> None:
        now = self._now()
        if self._stack:
            top = self._stack[-1][0]
            self.exclusive[top] = self.exclusive.get(top, 0.0) + (now - self._mark)
        self._stack.append((name, now))
        self.calls[name] = self.calls.get(name, 0) + 1
        self._mark = now

    def exit(self) -> None:
        now = self._now()
        name, began = self._stack.pop()
        self.exclusive[name] = self.exclusive.get(name, 0.0) + (now - self._mark)
        if all(n != name for n, _ in self._stack):  # re-entered inside itself: inclusive counted once
            self.inclusive[name] = self.inclusive.get(name, 0.0) + (now - began)
        self._mark = now

    def unwind(self) -> None:
        """Close every open phase now (one entered with :meth:`enter` that an exception skipped the
        :meth:`exit` of), so what follows is charged at the top level again."""
        while self._stack:
            self.exit()

    def stop(self) -> float:
        """Close any phase still open and return the total wall seconds."""
        self.unwind()
        if self._t0 is None:
            raise RuntimeError("PhaseTimer.stop() before start()")
        if self._t1 is None:
            self._t1 = self._now()
        return self._t1 - self._t0

    # -- instrumentation helpers ---------------------------------------------------------------------
    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    def wrap(self, name: str, fn: Callable) -> Callable:
        """``fn`` with every call timed as ``name``."""

        def timed(*args, **kwargs):
            with _Phase(self, name):
                return fn(*args, **kwargs)

        return timed

    def iterate(self, name: str, iterable: Iterable) -> Iterator:
        """``iterable`` with each ``next()`` (producing the item, not using it) timed as ``name``."""
        it = iter(iterable)
        while True:
            with _Phase(self, name):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    # -- results -------------------------------------------------------------------------------------
    def report(self, **meta: Any) -> dict:
        """The machine-readable profile (``profile.json``); ``meta`` is stored alongside."""
        if self._t0 is None or self._t1 is None:
            raise RuntimeError("PhaseTimer.report() needs start() and stop()")
        return make_report(self._t1 - self._t0, self.exclusive, self.inclusive, self.calls,
                           synchronized=self._sync is not None, **meta)


class NullTimer:
    """The timer of an unprofiled run: does nothing, synchronises nothing, wraps nothing."""

    enabled = False
    _PHASE = None  # set below: one shared no-op context manager

    def start(self) -> NullTimer:
        return self

    def stop(self) -> float:
        return 0.0

    def enter(self, name: str) -> None:
        pass

    def exit(self) -> None:
        pass

    def unwind(self) -> None:
        pass

    def phase(self, name: str):
        return self._PHASE

    def wrap(self, name: str, fn: Callable) -> Callable:
        return fn

    def iterate(self, name: str, iterable: Iterable) -> Iterable:
        return iterable


class _NoPhase:
    __slots__ = ()

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc) -> None:
        pass


NullTimer._PHASE = _NoPhase()
NULL_TIMER = NullTimer()


def _ordered(names: Iterable[str]) -> list[str]:
    extra = sorted(set(names) - set(PHASES) - {OTHER})
    return [*PHASES, *extra]


def make_report(total: float, exclusive: dict, inclusive: dict, calls: dict, **meta: Any) -> dict:
    """``{"total_seconds", "accounting", "phases": {name: {seconds, inclusive_seconds, calls, share}}, …}``
    with every phase of :data:`PHASES` present and ``other`` last."""
    phases: dict[str, dict] = {}
    for name in _ordered([*exclusive, *calls]):
        sec = float(exclusive.get(name, 0.0))
        phases[name] = {
            "seconds": sec,
            "inclusive_seconds": float(inclusive.get(name, sec)),
            "calls": int(calls.get(name, 0)),
            "share": sec / total if total > 0 else 0.0,
        }
    other = total - sum(p["seconds"] for p in phases.values())
    phases[OTHER] = {"seconds": other, "inclusive_seconds": other, "calls": None,
                     "share": other / total if total > 0 else 0.0}
    return {"total_seconds": float(total), "accounting": ACCOUNTING, "phases": phases, **meta}


def combine(reports: list[dict], total: float | None = None, **meta: Any) -> dict:
    """Several profiles as one: seconds and calls summed per phase. ``total`` (default: the sum of the
    totals) is the wall time they are shares of; what no report covers lands in ``other``."""
    exclusive: dict[str, float] = {}
    inclusive: dict[str, float] = {}
    calls: dict[str, int] = {}
    for rep in reports:
        for name, p in rep["phases"].items():
            if name == OTHER:
                continue
            exclusive[name] = exclusive.get(name, 0.0) + p["seconds"]
            inclusive[name] = inclusive.get(name, 0.0) + p["inclusive_seconds"]
            calls[name] = calls.get(name, 0) + p["calls"]
        # a report's own "other" stays "other" of the combination: carried through the total
    if total is None:
        total = sum(rep["total_seconds"] for rep in reports)
    return make_report(total, exclusive, inclusive, calls, synchronized=any(r.get("synchronized") for r in reports),
                       **meta)


def _pct(share: float) -> str:
    return f"{100 * share:.1f} %"


def to_table(report: dict, title: str) -> str:
    """A small aligned Markdown table of one profile (``profile.md``)."""
    total = report["total_seconds"]
    rows = [("phase", "seconds (excl.)", "share", "calls", "inclusive s")]
    for name, p in report["phases"].items():
        rows.append((name, f"{p['seconds']:.3f}", _pct(p["share"]), "" if p["calls"] is None else str(p["calls"]),
                     f"{p['inclusive_seconds']:.3f}"))
    rows.append(("total", f"{total:.3f}", _pct(1.0 if total > 0 else 0.0), "", ""))
    sync = "; device work synchronised at phase boundaries" if report.get("synchronized") else ""
    lines = [f"# {title}", "", f"Wall time {total:.3f} s. {ACCOUNTING[0].upper()}{ACCOUNTING[1:]}{sync}.", "",
             *_aligned(rows)]
    return "\n".join(lines) + "\n"


def summary_line(report: dict, path: Any = None) -> str:
    """``profile: train 71 % · eval 12 % · … → <path>``: phases that took time, largest first, then other."""
    phases = [(n, p) for n, p in report["phases"].items() if n != OTHER and p["calls"]]
    phases.sort(key=lambda item: -item[1]["seconds"])
    parts = [f"{n} {100 * p['share']:.0f} %" for n, p in phases]
    parts.append(f"{OTHER} {100 * report['phases'][OTHER]['share']:.0f} %")
    where = f" → {path}" if path is not None else ""
    return f"profile ({report['total_seconds']:.1f} s): " + " · ".join(parts) + where


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Markdown table lines, first column left-aligned, the others right-aligned, padded to width."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells) -> str:
        padded = [cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return [line(rows[0]), sep, *(line(r) for r in rows[1:])]


def runs_table(items: list[tuple[str, dict]]) -> str:
    """One row per run: its wall time and each phase's share (``profile.md`` of a recipe)."""
    names = _ordered(n for _, rep in items for n in rep["phases"]) + [OTHER]
    rows = [("run", "wall s", *names)]
    for label, rep in items:
        rows.append((label, f"{rep['total_seconds']:.3f}",
                     *(_pct(rep["phases"][n]["share"]) if n in rep["phases"] else "" for n in names)))
    return "\n".join(["## Runs (share of each run's wall time, exclusive)", "", *_aligned(rows)]) + "\n"
