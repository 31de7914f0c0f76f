"""Scenario, Session, EvalSet, ClassInfo — what every setting yields — and split hashing.

A scenario turns data sources into a sequence of sessions. The runner hands a strategy only
``session.visible()``: the same session without its evaluation sets and without oracle data
(``Session.oracle``, kept only by ``visible(oracle=True)``), whose unlabelled part carries targets of -1
by construction (see :meth:`openworld.data.views.TensorData.hide_labels`).
"""

from __future__ import annotations

import hashlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from openworld.data.views import FileData, TensorData

Data = TensorData | FileData


@dataclass(frozen=True)
class ClassInfo:
    """The label space as of one session.

    ``num_classes`` is K, the size of the whole scenario's label space (ids 0…K-1, fixed from the
    start). ``seen`` are the classes a prediction may use now, ``new`` those introduced in this
    session, ``base`` the base-session classes, ``known`` those whose labels have been given so far.
    ``train_counts[c]`` is the number of labelled training samples of class c in this session.
    """

    num_classes: int
    seen: tuple[int, ...]
    new: tuple[int, ...]
    base: tuple[int, ...] = ()
    known: tuple[int, ...] = ()
    train_counts: tuple[int, ...] = ()
    names: tuple[str, ...] = ()

    @property
    def num_seen(self) -> int:
        return len(self.seen)


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: data with true labels, held by the runner only.

    ``classes``: the class ids a prediction is restricted to (the runner masks the other logits);
    empty = no restriction (e.g. cluster ids in discovery).
    ``groups``: named class subsets for grouped metrics, e.g. ``{"base": …, "novel": …}``.
    ``task``: which metrics engine scores it (``openworld.metrics.create_engine``):
    ``"classification"`` (default), or another registered engine kind.
    ``options``: engine keyword arguments (e.g. ``{"old_classes": …}`` for clustering). The key
    ``"tasks"`` (a list of class-id lists, one per task seen) makes the runner record the row R[t][·]
    of the class-incremental accuracy matrix.
    """

    data: Data
    classes: tuple[int, ...]
    groups: dict[str, tuple[int, ...]] = field(default_factory=dict)
    task: str = "classification"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Session:
    index: int
    name: str
    classes: ClassInfo
    labeled: Data | None = None
    unlabeled: Data | None = None
    validation: Data | None = None  # labelled, carved from training data: for model selection
    eval_sets: dict[str, EvalSet] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    # Oracle data, labelled: training data the protocol withholds (FSCIL: every training image of the
    # session's new classes, for ``joint`` with ``data: full``). Only ``visible(oracle=True)`` keeps it.
    oracle: Data | None = None

    def visible(self, oracle: bool = False) -> Session:
        """The session as a strategy may see it.

        No evaluation sets; unlabelled targets all -1; no dataset keeps a link (``origin``) to the
        full source it was cut from, whose targets would include hidden labels. No oracle data unless
        ``oracle=True``: the runner passes ``strategy.uses_oracle_data()`` and flags such runs.
        """
        unlabeled = self.unlabeled.hide_labels() if self.unlabeled is not None else None
        info = {k: _detached(v) for k, v in self.info.items()}
        return replace(
            self,
            eval_sets={},
            labeled=_detached(self.labeled),
            unlabeled=unlabeled,
            validation=_detached(self.validation),
            info=info,
            oracle=_detached(self.oracle) if oracle else None,
        )


def _detached(value):
    return value.detach_origin() if isinstance(value, (TensorData, FileData)) else value


class Scenario(ABC):
    """Yields sessions. Subclasses are constructed from keyword parameters only (recipe fields)."""

    kind: ClassVar[str]
    # Episodic scenarios (e.g. DA-FSOS meta-test) make each session an independent episode: the run's
    # summary is the mean over sessions with a 95 % interval, and only the last checkpoint is kept.
    episodic: bool = False

    @property
    @abstractmethod
    def num_sessions(self) -> int: ...

    @property
    @abstractmethod
    def num_classes(self) -> int: ...

    @abstractmethod
    def sessions(self) -> Iterator[Session]:
        """All sessions in order; deterministic for given parameters."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Class order, split hashes, index source, data fingerprints: written to splits.json."""

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters by name (scikit-learn style; lists and dicts copied): what a run
        records and fingerprints. A subclass that stores a parameter under another name overrides this."""
        params = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name == "self":
                continue
            value = getattr(self, name)
            if isinstance(value, dict):
                value = dict(value)
            elif isinstance(value, (list, tuple)):
                value = list(value)
            params[name] = value
        return params

    def session(self, index: int) -> Session:
        for s in self.sessions():
            if s.index == index:
                return s
        raise IndexError(f"scenario has {self.num_sessions} sessions, asked for {index}")


def hash_indices(indices: Sequence[int] | np.ndarray) -> str:
    """SHA-256 of the indices written one per line (the index-list file format)."""
    arr = np.asarray(indices, dtype=np.int64).reshape(-1)
    text = "".join(f"{int(i)}\n" for i in arr)
    return hashlib.sha256(text.encode()).hexdigest()


def hash_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("".join(f"{line}\n" for line in lines).encode()).hexdigest()
