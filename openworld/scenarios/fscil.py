"""Few-shot class-incremental learning (FSCIL): a base session, then N-way K-shot sessions.

The protocol is the one of the FSCIL/TEEN card (``specs/fscil-teen.md`` §1):

* Session 0 trains on every training image of the base classes ``0…B-1`` (selected **by label**),
  minus a validation split carved per base class (§1.6). Session ``i ≥ 1`` trains only on the
  ``W·K`` shots of classes ``B+(i-1)W … B+iW-1``.
* The shots come from the standard CEC/TOPIC index lists (``split_files="cec"`` or a directory of
  ``session_<k>.txt`` files, checked line by line, §1.3) or from the seeded, library-independent
  fallback (§1.5) built on :func:`pick`.
* Session ``i`` is evaluated on **all** test images of classes ``0…B+iW-1``, ascending class then
  dataset order (§1.4).
* Session ``i ≥ 1`` also carries ``Session.oracle``: every training image of its W classes (§2.1's
  ``joint.data: full`` oracle). ``Session.visible()`` drops it; only a strategy whose
  ``uses_oracle_data()`` is True gets it, via ``visible(oracle=True)``. The base session has none: its
  labelled data is already every base training image but the validation split (the selection set).
* ``holdout_unknown: H`` (default 0, off) never teaches the last H classes of the class order and adds
  an ``open`` eval set per session (``task="open_set"``): the seen classes' test images plus those of
  the H held-out classes, so the open-set metrics (``specs/metrics.md`` §8) are reported after every
  session.

Everything is computed lazily on first use and cached; the constructor only stores parameters.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openworld.registry import DATASETS, register_scenario
from openworld.scenarios.base import ClassInfo, EvalSet, Scenario, Session, hash_indices

#: Source name -> sub-directory of ``<data root>/fscil_index_list`` holding its CEC lists.
CEC_LIST_DIRS = {"cifar100": "cifar100", "mini_imagenet": "mini_imagenet", "cub200": "cub200"}
CLASS_ORDERS = ("natural", "shuffled")


# §1.5 seeded selection lives in the data layer (strategies use it too); re-exported here.
from openworld.data.splits import fallback_key, pick  # noqa: E402,F401


def class_order(num_classes: int, kind: str = "natural", seed: int = 0) -> list[int]:
    """``order[k]`` = the original class id relabelled ``k`` (card §1.2).

    ``"shuffled"`` with seed > 0 is Python's ``random.seed(seed); random.shuffle(list(range(C)))``
    (computed on a private :class:`random.Random`, so the global stream is left untouched); seed 0
    keeps the natural order.
    """
    if kind not in CLASS_ORDERS:
        raise ValueError(f"class_order must be one of {', '.join(CLASS_ORDERS)}; got {kind!r}")
    order = list(range(int(num_classes)))
    if kind == "shuffled" and int(seed) > 0:
        random.Random(int(seed)).shuffle(order)
    return order


def _rows_by_class(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Original class id -> its row indices, ascending."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    rows = np.argsort(labels, kind="stable")
    sorted_labels = labels[rows]
    classes, starts = np.unique(sorted_labels, return_index=True)
    ends = list(starts[1:]) + [len(rows)]
    return {int(c): rows[s:e] for c, s, e in zip(classes, starts, ends)}


def fallback_index_lists(
    labels: Sequence[int] | np.ndarray,
    base_classes: int,
    ways: int,
    shots: int,
    num_sessions: int,
    seed: int = 0,
    order: Sequence[int] | None = None,
) -> list[list[int]]:
    """The §1.5 lists ``session_1 … session_S`` as training-array row indices.

    ``labels`` are the original training labels; ``order[k]`` is the original class relabelled k
    (``None``: natural order). session_1 = every row whose label is in ``order[:B]``, ascending;
    session_{i+1} = concatenation over ``c in order[B+(i-1)W : B+iW]`` of
    ``pick(rows of c, K, "fscil", seed, c)``.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if order is None:
        order = list(range(int(labels.max()) + 1 if len(labels) else 0))
    order = [int(c) for c in order]
    _check_layout(len(order), base_classes, ways, num_sessions)
    by_class = _rows_by_class(labels)
    empty = np.zeros(0, dtype=np.int64)
    base = np.flatnonzero(np.isin(labels, order[:base_classes]))
    lists = [[int(x) for x in base]]
    for i in range(1, num_sessions):
        session: list[int] = []
        for c in order[base_classes + (i - 1) * ways : base_classes + i * ways]:
            session.extend(pick(by_class.get(c, empty), shots, "fscil", seed, c))
        lists.append(session)
    return lists


def validation_split(
    labels: Sequence[int] | np.ndarray,
    classes: Sequence[int],
    val_frac: float,
    seed: int = 0,
    pool: Sequence[int] | np.ndarray | None = None,
) -> tuple[list[int], list[int]]:
    """§1.6: per class c hold out ``pick(rows of c, max(1, floor(val_frac·n_c)), "val", seed, c)``.

    ``pool`` restricts the candidate rows (default: all rows of ``classes``). Returns
    ``(train rows, validation rows)``, both ascending. A class left without a training row is an error.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    rows = np.arange(len(labels)) if pool is None else np.asarray(pool, dtype=np.int64).reshape(-1)
    by_class = _rows_by_class_subset(labels, rows)
    empty = np.zeros(0, dtype=np.int64)
    held: list[int] = []
    for c in classes:
        c_rows = by_class.get(int(c), empty)
        n_val = max(1, math.floor(val_frac * len(c_rows)))
        chosen = pick(c_rows, n_val, "val", seed, int(c))
        if len(chosen) >= len(c_rows):
            raise ValueError(
                f"validation split: class {c} has {len(c_rows)} training samples; holding out {n_val} leaves none"
            )
        held.extend(chosen)
    held_set = set(held)
    in_classes = np.isin(labels[rows], np.asarray(list(classes), dtype=np.int64))
    train = sorted(int(x) for x in rows[in_classes] if int(x) not in held_set)
    return train, sorted(held)


def _rows_by_class_subset(labels: np.ndarray, rows: np.ndarray) -> dict[int, np.ndarray]:
    rows = np.sort(rows)
    sub = _rows_by_class(labels[rows])
    return {c: rows[r] for c, r in sub.items()}


def _check_layout(num_classes: int, base_classes: int, ways: int, num_sessions: int) -> None:
    if num_sessions < 1:
        raise ValueError(f"num_sessions must be >= 1, got {num_sessions}")
    need = base_classes + (num_sessions - 1) * ways
    if need > num_classes:
        raise ValueError(
            f"base_classes {base_classes} + (num_sessions {num_sessions} - 1) x ways {ways} = {need} "
            f"classes, but the data has {num_classes}"
        )


# --------------------------------------------------------------------------------------------------
# §1.3 — CEC/TOPIC index lists
# --------------------------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_lines(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [line.strip() for line in lines]


def _line_key(line: str, key_to_row: dict[str, int]) -> int | None:
    """Row of a path line: the whole line (CUB), else its 4th '/'-field (miniImageNet file name)."""
    row = key_to_row.get(line)
    if row is None:
        parts = line.split("/")
        if len(parts) >= 4:
            row = key_to_row.get(parts[3])
    return row


def _resolve_lines(
    path: Path,
    lines: list[str],
    num_train: int,
    key_to_row: dict[str, int] | None,
    test_keys: set[str] | None,
) -> list[int]:
    """Index-list lines -> training-array rows; errors name the file, the line and the check."""
    rows: list[int] = []
    integer = all(line.lstrip("-").isdigit() for line in lines)
    if integer:
        for n, line in enumerate(lines, 1):
            x = int(line)
            if not 0 <= x < num_train:
                raise ValueError(
                    f"{path}: line {n}: row index {x} is outside the training array (0…{num_train - 1})"
                )
            rows.append(x)
        return rows
    if key_to_row is None:
        raise ValueError(
            f"{path}: holds image paths, but the data source gives no train_keys to match them "
            "(integer row indices were expected)"
        )
    for n, line in enumerate(lines, 1):
        if test_keys is not None and (line in test_keys or _tail_key(line) in test_keys):
            raise ValueError(f"{path}: line {n}: {line!r} is a test image (check: no test image)")
        row = _line_key(line, key_to_row)
        if row is None:
            raise ValueError(
                f"{path}: line {n}: {line!r} is not a training image of the source "
                "(check: every line names a training image, none a test image)"
            )
        rows.append(row)
    return rows


def _tail_key(line: str) -> str:
    parts = line.split("/")
    return parts[3] if len(parts) >= 4 else line


def load_index_lists(
    directory: str | Path,
    labels: Sequence[int] | np.ndarray,
    base_classes: int,
    ways: int,
    shots: int,
    num_sessions: int,
    order: Sequence[int] | None = None,
    train_keys: Sequence[str] | None = None,
    test_keys: Sequence[str] | None = None,
) -> tuple[list[list[int]], dict[str, str | None]]:
    """Read and check ``session_1 … session_S`` of ``directory``; return rows and file SHA-256s.

    session_1 (base) is selected **by label** — every training row of ``order[:B]``, ascending — and,
    when the file is present, asserted equal (as a set, without duplicates) to it. Each incremental
    file must hold exactly ``W·K`` lines, naming training images only, whose labels are the
    session's W classes with K lines each. Rows of an incremental session keep the file's order.
    """
    directory = Path(directory)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if order is None:
        order = list(range(int(labels.max()) + 1 if len(labels) else 0))
    order = [int(c) for c in order]
    _check_layout(len(order), base_classes, ways, num_sessions)
    key_to_row: dict[str, int] | None = None
    if train_keys is not None:
        key_to_row = {}
        for row, key in enumerate(train_keys):
            if key in key_to_row:
                raise ValueError(f"data source: training key {key!r} occurs twice (rows {key_to_row[key]} and {row})")
            key_to_row[str(key)] = row
    tkeys = set(map(str, test_keys)) if test_keys is not None else None

    hashes: dict[str, str | None] = {}
    base = np.flatnonzero(np.isin(labels, order[:base_classes]))
    lists = [[int(x) for x in base]]
    first = directory / "session_1.txt"
    if first.is_file():
        hashes[first.name] = _file_sha256(first)
        lines = _read_lines(first)
        rows = _resolve_lines(first, lines, len(labels), key_to_row, tkeys)
        if len(set(rows)) != len(rows):
            raise ValueError(f"{first}: lists a training image twice (check: base list equals label-selected base)")
        if set(rows) != set(lists[0]):
            extra = len(set(rows) - set(lists[0]))
            missing = len(set(lists[0]) - set(rows))
            raise ValueError(
                f"{first}: differs from the label-selected base set of classes {order[:base_classes][:3]}… "
                f"({extra} rows outside the base classes, {missing} base rows missing; check: base list "
                "equals label-selected base)"
            )
    else:
        hashes[first.name] = None
    for k in range(2, num_sessions + 1):
        path = directory / f"session_{k}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: index list for session {k - 1} not found")
        hashes[path.name] = _file_sha256(path)
        lines = _read_lines(path)
        if len(lines) != ways * shots:
            raise ValueError(f"{path}: {len(lines)} lines, expected exactly W·K = {ways}·{shots} = {ways * shots}")
        rows = _resolve_lines(path, lines, len(labels), key_to_row, tkeys)
        if len(set(rows)) != len(rows):
            raise ValueError(f"{path}: lists a training image twice (check: K distinct lines per class)")
        expected = order[base_classes + (k - 2) * ways : base_classes + (k - 1) * ways]
        found = labels[np.asarray(rows, dtype=np.int64)]
        classes, counts = np.unique(found, return_counts=True)
        if sorted(int(c) for c in classes) != sorted(expected):
            raise ValueError(
                f"{path}: label set {sorted(int(c) for c in classes)} differs from session {k - 1}'s classes "
                f"{sorted(expected)} (check: the session's W classes)"
            )
        bad = {int(c): int(n) for c, n in zip(classes, counts) if n != shots}
        if bad:
            raise ValueError(f"{path}: classes {bad} do not have exactly K = {shots} lines (check: K lines per class)")
        lists.append(rows)
    return lists, hashes


# --------------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Everything derived from the source and the parameters; computed once per scenario object."""

    order: list[int]
    num_classes: int
    lists: list[list[int]]  # session_1 … session_S, training rows (original data)
    index_source: str
    file_hashes: dict[str, str | None]
    base_pool: list[int]  # base rows after base_subsample (train + val)
    base_train: list[int]
    val: list[int]
    test_sorted: np.ndarray  # kept test rows, ascending new class then row
    test_sorted_labels: np.ndarray  # their new labels
    names: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)
    # per session i >= 1: every training row of its W new classes, ascending (the oracle data of
    # ``joint`` with ``data: full``); session 0 has none (its classes' rows are base_train + val)
    full_rows: list[list[int]] = field(default_factory=list)


@register_scenario("fscil")
class FSCILScenario(Scenario):
    """Few-shot class-incremental scenario (card ``fscil-teen`` §1).

    Parameters (keyword-only, each with a default — the recipe's ``scenario:`` block):

    data: ``{"source": name, "root": path | None, "download": bool, **source options}``.
    base_classes, ways, shots: B, W, K.
    num_sessions: S including the base session; default ``1 + (C - B) / W`` (must divide exactly).
    split_files: ``None`` — the seeded fallback (§1.5); ``"cec"`` — the standard lists under
        ``<data root>/fscil_index_list/<cifar100|mini_imagenet|cub200>``; any other string — a
        directory holding ``session_<k>.txt``.
    class_order: ``"natural"`` or ``"shuffled"`` (by the run ``seed``; seed 0 stays natural).
    split_seed: seed of the fallback lists, the validation split and the subsampling picks.
    val_frac: fraction of each base class held out for model selection (§1.6).
    base_subsample: keep ``pick(rows of c, n, "base_sub", split_seed, c)`` per base class before the
        validation split (card §9 ``fscil_cifar_lite``).
    test_subsample: cap per class on test images, chosen by ``pick(…, "test_sub", split_seed, c)``
        over test-array rows (small CPU recipes only; recorded).
    seed: the run seed (used only by ``class_order="shuffled"``).
    """

    kind = "fscil"

    def __init__(
        self,
        *,
        data: dict | None = None,
        base_classes: int = 60,
        ways: int = 5,
        shots: int = 5,
        num_sessions: int | None = None,
        split_files: str | None = None,
        class_order: str = "natural",
        split_seed: int = 0,
        val_frac: float = 0.1,
        base_subsample: int | None = None,
        test_subsample: int | None = None,
        holdout_unknown: int = 0,
        seed: int = 0,
    ):
        self.data = dict(data) if data is not None else {"source": "synth_hier"}
        self.base_classes = base_classes
        self.ways = ways
        self.shots = shots
        self.num_sessions_ = num_sessions
        self.split_files = split_files
        self.class_order = class_order
        self.split_seed = split_seed
        self.val_frac = val_frac
        self.base_subsample = base_subsample
        self.test_subsample = test_subsample
        self.holdout_unknown = holdout_unknown
        self.seed = seed
        self._source = None
        self._plan: _Plan | None = None
        self._train = None
        self._test = None
        self._input_shape: tuple[int, ...] | None = None

    # -- parameters ---------------------------------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        return {
            "data": dict(self.data),
            "base_classes": self.base_classes,
            "ways": self.ways,
            "shots": self.shots,
            "num_sessions": self.num_sessions_,
            "split_files": self.split_files,
            "class_order": self.class_order,
            "split_seed": self.split_seed,
            "val_frac": self.val_frac,
            "base_subsample": self.base_subsample,
            "test_subsample": self.test_subsample,
            "seed": self.seed,
            # only when on, so existing recipes keep their split fingerprints (and cached base models)
            **({"holdout_unknown": self.holdout_unknown} if self.holdout_unknown else {}),
        }

    def _validate_params(self) -> None:
        if not isinstance(self.data, dict) or not self.data.get("source"):
            raise ValueError("scenario.data.source: a dataset name is required, e.g. {source: cifar100}")
        for name in ("base_classes", "ways", "shots"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"scenario.{name}: a positive integer is required, got {value!r}")
        for name in ("base_subsample", "test_subsample"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"scenario.{name}: a positive integer or null is required, got {value!r}")
        h = self.holdout_unknown
        if not isinstance(h, int) or isinstance(h, bool) or h < 0:
            raise ValueError(f"scenario.holdout_unknown: a non-negative integer is required, got {h!r}")
        if self.num_sessions_ is not None and (not isinstance(self.num_sessions_, int) or self.num_sessions_ < 1):
            raise ValueError(
                f"scenario.num_sessions: a positive integer or null is required, got {self.num_sessions_!r}"
            )
        if self.class_order not in CLASS_ORDERS:
            raise ValueError(
                f"scenario.class_order: allowed values are {', '.join(CLASS_ORDERS)}; got {self.class_order!r}"
            )
        if not (isinstance(self.val_frac, (int, float)) and 0 < self.val_frac < 1):
            raise ValueError(f"scenario.val_frac: a number in (0, 1) is required, got {self.val_frac!r}")
        if self.split_files is not None and not isinstance(self.split_files, (str, os.PathLike)):
            raise ValueError(f"scenario.split_files: null, 'cec' or a directory path; got {self.split_files!r}")
        if self.split_files is not None and self.class_order == "shuffled" and int(self.seed) > 0:
            raise ValueError(
                "scenario.class_order: 'shuffled' (seed > 0) cannot be combined with split_files, whose lists "
                "fix the natural class order; use split_files: null (the seeded fallback)"
            )

    # -- lazy loading --------------------------------------------------------------------------------
    @property
    def source(self):
        """The loaded data source (``DATASETS.get(name)(root=…, download=…, **options)``), cached."""
        if self._source is None:
            self._validate_params()
            options = {k: v for k, v in self.data.items() if k not in ("source", "root", "download")}
            loader = DATASETS.get(self.data["source"])
            download = bool(self.data.get("download", False))
            self._source = loader(root=self.data.get("root"), download=download, **options)
        return self._source

    def _data_roots(self) -> list[Path]:
        roots: list[Path] = []
        info = getattr(self.source, "info", None) or {}
        for candidate in (self.data.get("root"), info.get("root"), os.environ.get("OPENWORLD_DATA"), "data"):
            if candidate:
                path = Path(candidate).expanduser()
                if path not in roots:
                    roots.append(path)
        return roots

    def _index_dir(self) -> Path:
        if self.split_files != "cec":
            path = Path(self.split_files).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"scenario.split_files: directory {path} not found")
            return path
        name = str(self.data["source"])
        sub = CEC_LIST_DIRS.get(name) or CEC_LIST_DIRS.get(str(getattr(self.source, "name", "")))
        if sub is None:
            raise ValueError(
                f"scenario.split_files: no standard CEC index lists for source {name!r} "
                f"(known: {', '.join(CEC_LIST_DIRS)}); give a directory or null for the seeded fallback"
            )
        tried = []
        for root in self._data_roots():
            path = root / "fscil_index_list" / sub
            if path.is_dir():
                return path
            tried.append(str(path))
        raise FileNotFoundError(
            f"scenario.split_files: 'cec' lists for {name!r} not found; looked in {', '.join(tried)}"
        )

    def _build(self) -> _Plan:
        if self._plan is not None:
            return self._plan
        src = self.source
        train_labels = _labels(src.train)
        test_labels = _labels(src.test)
        classes = list(getattr(src, "classes", None) or [])
        num_classes = len(classes) if classes else int(max(train_labels.max(), test_labels.max())) + 1
        for what, lab in (("training", train_labels), ("test", test_labels)):
            if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
                raise ValueError(f"data source {self.data['source']!r}: {what} labels outside 0…{num_classes - 1}")
        B, W = self.base_classes, self.ways
        H = int(self.holdout_unknown)
        num_taught = num_classes - H  # the last H classes of the order are never taught (open-set eval)
        if self.num_sessions_ is None:
            if B > num_taught or (num_taught - B) % W:
                raise ValueError(
                    f"scenario: {num_taught} classes{' (after holdout_unknown)' if H else ''} - base_classes {B} "
                    f"is not a multiple of ways {W}; "
                    "set num_sessions explicitly"
                )
            num_sessions = 1 + (num_taught - B) // W
        else:
            num_sessions = self.num_sessions_
        _check_layout(num_taught, B, W, num_sessions)
        order = class_order(num_classes, self.class_order, self.seed)

        if self.split_files is None:
            lists = fallback_index_lists(train_labels, B, W, self.shots, num_sessions, self.split_seed, order)
            index_source = f"fallback({self.split_seed})"
            file_hashes = {f"session_{k + 1}.txt": hash_indices(rows) for k, rows in enumerate(lists)}
        else:
            directory = self._index_dir()
            train_keys = getattr(src, "train_keys", None)
            lists, file_hashes = load_index_lists(
                directory, train_labels, B, W, self.shots, num_sessions, order,
                train_keys=train_keys, test_keys=getattr(src, "test_keys", None),
            )
            index_source = f"cec:{directory}"

        base_classes = order[:B]
        base_pool = lists[0]
        if self.base_subsample is not None:
            by_class = _rows_by_class_subset(train_labels, np.asarray(base_pool, dtype=np.int64))
            empty = np.zeros(0, dtype=np.int64)
            kept: list[int] = []
            for c in base_classes:
                kept.extend(pick(by_class.get(c, empty), self.base_subsample, "base_sub", self.split_seed, c))
            base_pool = sorted(kept)
        base_train, val = validation_split(train_labels, base_classes, float(self.val_frac), self.split_seed, base_pool)

        mapping = np.empty(num_classes, dtype=np.int64)
        mapping[np.asarray(order, dtype=np.int64)] = np.arange(num_classes)
        test_rows = np.arange(len(test_labels))
        if self.test_subsample is not None:
            kept = []
            for c, rows in _rows_by_class(test_labels).items():
                n = min(self.test_subsample, len(rows))
                kept.extend(pick(rows, n, "test_sub", self.split_seed, c))
            test_rows = np.asarray(sorted(kept), dtype=np.int64)
        new_test = mapping[test_labels[test_rows]]
        perm = np.lexsort((test_rows, new_test))
        names = tuple(str(classes[c]) if classes else str(c) for c in order)
        full_rows: list[list[int]] = [[]]
        for i in range(1, len(lists)):
            new_original = np.asarray(order[B + (i - 1) * W : B + i * W], dtype=np.int64)
            full_rows.append([int(x) for x in np.flatnonzero(np.isin(train_labels, new_original))])
        self._plan = _Plan(
            order=order,
            num_classes=num_classes,
            lists=lists,
            index_source=index_source,
            file_hashes=file_hashes,
            base_pool=list(base_pool),
            base_train=base_train,
            val=val,
            test_sorted=test_rows[perm],
            test_sorted_labels=new_test[perm],
            names=names,
            extra={"mapping": mapping},
            full_rows=full_rows,
        )
        return self._plan

    def _views(self):
        """The source's train/test data relabelled to the scenario's class order (cached)."""
        if self._train is None:
            plan = self._build()
            src = self.source
            if plan.order == list(range(plan.num_classes)):
                self._train, self._test = src.train, src.test
            else:
                mapping = torch.as_tensor(plan.extra["mapping"], dtype=torch.long)
                self._train, self._test = src.train.relabel(mapping), src.test.relabel(mapping)
        return self._train, self._test

    # -- public properties ---------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        if self.num_sessions_ is not None:
            return self.num_sessions_
        return len(self._build().lists)

    @property
    def num_classes(self) -> int:
        return self._build().num_classes

    @property
    def class_order_list(self) -> list[int]:
        """``order[k]`` = original class id of scenario class k."""
        return list(self._build().order)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample after the test transform."""
        if self._input_shape is None:
            _, test = self._views()
            data = test if len(test) else self._views()[0]
            if hasattr(data, "x"):
                x = data.x[:1]
                tf = getattr(data, "transforms", None)
                if tf is not None:
                    x = tf.test(x)
                self._input_shape = tuple(int(s) for s in x.shape[1:])
            else:
                sample = data[0][0]
                self._input_shape = tuple(int(s) for s in np.asarray(sample).shape)
        return self._input_shape

    def index_lists(self) -> list[list[int]]:
        """session_1 … session_S as training-array rows (session_1 = the full label-selected base)."""
        return [list(rows) for rows in self._build().lists]

    def validation_indices(self) -> list[int]:
        return list(self._build().val)

    def session_classes(self, index: int) -> tuple[int, ...]:
        B, W = self.base_classes, self.ways
        if index == 0:
            return tuple(range(B))
        return tuple(range(B + (index - 1) * W, B + index * W))

    def base_prototype_data(self):
        """All base-class training images (base training + validation), labelled: the prototype set."""
        plan = self._build()
        train, _ = self._views()
        return train.subset(plan.base_pool)

    # -- sessions ------------------------------------------------------------------------------------
    def sessions(self) -> Iterator[Session]:
        for i in range(self.num_sessions):
            yield self.session(i)

    def session(self, index: int) -> Session:
        plan = self._build()
        S = len(plan.lists)
        if not 0 <= index < S:
            raise IndexError(f"scenario has {S} sessions, asked for {index}")
        B, W, C = self.base_classes, self.ways, plan.num_classes
        train, test = self._views()
        seen_n = B + index * W
        seen = tuple(range(seen_n))
        new = self.session_classes(index)
        info: dict[str, Any] = {"index_source": plan.index_source}
        oracle = None
        if index == 0:
            labeled = train.subset(plan.base_train)
            validation = train.subset(plan.val)
            info["prototype_data"] = train.subset(plan.base_pool)
            info["num_validation"] = len(plan.val)
            info["num_prototype"] = len(plan.base_pool)
            info["index_hash"] = hash_indices(plan.base_train)
        else:
            labeled = train.subset(plan.lists[index])
            validation = None
            info["index_hash"] = hash_indices(plan.lists[index])
            # oracle data: all training images of the new classes (none held out; disjoint from the
            # base validation split, which holds base classes only). Session.visible() drops it.
            oracle = train.subset(plan.full_rows[index])
        n_test = int(np.searchsorted(plan.test_sorted_labels, seen_n, side="left"))
        test_set = test.subset(plan.test_sorted[:n_test])
        counts = np.bincount(labeled.targets.numpy(), minlength=C)
        info["num_labeled"] = len(labeled)
        info["num_test"] = n_test
        info["classes_new"] = list(new)
        classes = ClassInfo(
            num_classes=C,
            seen=seen,
            new=new,
            base=tuple(range(B)),
            known=seen,
            train_counts=tuple(int(n) for n in counts),
            names=plan.names,
        )
        eval_sets = {
            "test": EvalSet(
                data=test_set,
                classes=seen,
                groups={"base": tuple(range(B)), "novel": tuple(range(B, seen_n))},
            )
        }
        H = int(self.holdout_unknown)
        if H:  # open-set evaluation: seen classes + the never-taught last H classes (metrics.md §8)
            first_unknown = int(np.searchsorted(plan.test_sorted_labels, C - H, side="left"))
            rows = np.concatenate([plan.test_sorted[:n_test], plan.test_sorted[first_unknown:]])
            eval_sets["open"] = EvalSet(
                data=test.subset(rows),
                classes=(),
                task="open_set",
                options={"known_classes": list(seen), "unknown_classes": list(range(C - H, C)),
                         "num_samples": len(rows)},
            )
            info["num_open"] = len(rows)
        return Session(
            index=index,
            name=f"session_{index}",
            classes=classes,
            labeled=labeled,
            unlabeled=None,
            validation=validation,
            eval_sets=eval_sets,
            info=info,
            oracle=oracle,
        )

    # -- record --------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        plan = self._build()
        src = self.source
        B, W = self.base_classes, self.ways
        test_sizes = [
            int(np.searchsorted(plan.test_sorted_labels, B + i * W, side="left")) for i in range(len(plan.lists))
        ]
        return _jsonable(
            {
                "kind": self.kind,
                "params": self.get_params(),
                "source": {
                    "name": getattr(src, "name", self.data["source"]),
                    "family": getattr(src, "family", None),
                    "num_train": len(src.train),
                    "num_test": len(src.test),
                    "info": getattr(src, "info", None) or {},
                },
                "num_classes": plan.num_classes,
                "num_sessions": len(plan.lists),
                "class_order": plan.order,
                "index_source": plan.index_source,
                "index_files": plan.file_hashes,
                "session_index_hashes": [hash_indices(rows) for rows in plan.lists],
                "base_subsample_hash": hash_indices(plan.base_pool),
                "base_train_hash": hash_indices(plan.base_train),
                "val_hash": hash_indices(plan.val),
                "val_size": len(plan.val),
                "base_train_size": len(plan.base_train),
                "test_sizes": test_sizes,
                "test_hash": hash_indices(plan.test_sorted),
                **({"holdout_unknown_classes": list(range(plan.num_classes - int(self.holdout_unknown),
                                                          plan.num_classes))} if self.holdout_unknown else {}),
            }
        )


def _labels(data) -> np.ndarray:
    y = data.targets
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    return np.asarray(y, dtype=np.int64).reshape(-1)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only (dict keys as str); anything else is recorded by its repr."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, (os.PathLike,)):
        return os.fspath(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    return repr(obj)
