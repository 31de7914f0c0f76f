"""Class-incremental learning (CIL): T tasks of disjoint classes, no task id at test time.

The protocol is the one of the CIL/OVOR card (``specs/cil-ovor.md`` §1):

* Class order (§1.2): seed 0 keeps the natural order; seed > 0 is Python's
  ``random.seed(seed); random.shuffle(list(range(C)))`` (:func:`openworld.scenarios.fscil.class_order`,
  on a private ``random.Random``). Original class ``order[i]`` is relabelled ``i``, so task t owns
  the labels ``t·m … (t+1)·m − 1`` (or a first task of ``first_task_classes`` labels, then equal tasks).
* Task t trains on the training images of its classes only (no exemplars, no old data).
* After task t the runner evaluates on the test images of every task j ≤ t, predicting among all
  seen classes; ``EvalSet.options["tasks"]`` makes it record the row R[t][·] of the accuracy matrix
  (``eval/test/task_<jj>/acc``) and the running ``avg_acc_tasks``, ``forgetting``, ``bwt``, ``aia``.
* ``task_aware: true`` adds one evaluation set per seen task, ``til_<jj>``, whose predictions are
  restricted to that task's classes (TIL accuracy a_{t,j}^{TIL} = ``eval/til_<jj>/acc``).
* Reduced-scale subsampling (card §9): ``train_per_class`` / ``test_per_class`` keep per class the
  rows ``pick(rows, n, "cil", split_seed, c)`` (FSCIL card hash, x = row index within its split).
* ``eval_split: validation`` evaluates on held-out *training* images instead of the test split: per
  class, ``test_per_class`` rows drawn (tag ``"cil-val"``) from the training rows that no task trains on.
  This is the split to choose hyper-parameters on; the evaluation set keeps its name ``test`` so every
  metric, table and plot works unchanged, and ``describe()`` records ``eval_split``.

Everything is computed lazily on first use and cached; the constructor only stores parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from openworld.params import Bool, ConfigError, NonNegInt, PosInt, param_error
from openworld.registry import DATASETS, register_scenario
from openworld.scenarios.base import ClassInfo, EvalSet, Scenario, Session, hash_indices
from openworld.scenarios.fscil import _jsonable, _labels, _rows_by_class, class_order, pick

CIL_CLASS_ORDERS = ("shuffled", "natural")
CIL_EVAL_SPLITS = ("test", "validation")


def task_layout(num_classes: int, num_tasks: int, first_task_classes: int | None = None) -> list[list[int]]:
    """Label lists of the tasks: ``[0…f−1], [f…f+m−1], …`` with m = (C − f) / (T − 1).

    ``first_task_classes`` None: equal tasks of C / T classes. Raises ``ValueError`` naming the
    numbers when the classes do not divide evenly.
    """
    C, T = int(num_classes), int(num_tasks)
    if T < 1:
        raise ValueError(f"scenario.num_tasks: a positive integer is required, got {num_tasks!r}")
    if first_task_classes is None:
        if C % T:
            raise ValueError(
                f"scenario: {C} classes do not split into num_tasks {T} equal tasks; "
                "change num_tasks or set first_task_classes"
            )
        sizes = [C // T] * T
    else:
        f = int(first_task_classes)
        if not 1 <= f <= C:
            raise ValueError(f"scenario.first_task_classes: must be in 1…{C}, got {first_task_classes!r}")
        if T == 1:
            if f != C:
                raise ValueError(f"scenario: one task must hold all {C} classes, first_task_classes is {f}")
            sizes = [C]
        else:
            if (C - f) % (T - 1) or C == f:
                raise ValueError(
                    f"scenario: {C} classes − first_task_classes {f} = {C - f} do not split into "
                    f"{T - 1} equal tasks"
                )
            sizes = [f] + [(C - f) // (T - 1)] * (T - 1)
    out, start = [], 0
    for n in sizes:
        out.append(list(range(start, start + n)))
        start += n
    return out


def cil_class_order(num_classes: int, seed: int, kind: str = "shuffled") -> list[int]:
    """``order[i]`` = original class relabelled i (card §1.2): natural for seed 0 or ``kind="natural"``."""
    if kind not in CIL_CLASS_ORDERS:
        raise ValueError(f"scenario.class_order: allowed values are {', '.join(CIL_CLASS_ORDERS)}; got {kind!r}")
    return class_order(num_classes, "shuffled" if kind == "shuffled" else "natural", seed)


@dataclass
class _Plan:
    order: list[int]
    num_classes: int
    tasks: list[list[int]]  # scenario labels per task
    train_rows: list[np.ndarray]  # per task, training-array rows (ascending)
    test_rows: np.ndarray  # test rows sorted by (new label, row)
    test_labels: np.ndarray  # their new labels
    names: tuple[str, ...]
    mapping: np.ndarray


@register_scenario("cil")
class ClassIncrementalScenario(Scenario):
    """Class-incremental scenario ``cil`` (card ``specs/cil-ovor.md`` §1).

    Args:
        data: the data source block (``{source: cifar100, root: …, <loader options>}``).
        num_tasks: T.
        first_task_classes: size of task 0 when it differs from the others (null: C / T each).
        class_order: ``shuffled`` (the card: natural at seed 0, Python ``random.shuffle`` at seed > 0)
            or ``natural`` at every seed.
        train_per_class, test_per_class: keep this many samples per class (hashed ``pick``); null keeps all.
        split_seed: the seed of those picks (the card fixes 0 for every repeat).
        task_aware: also evaluate task-aware (TIL) accuracy, one eval set ``til_<jj>`` per seen task.
        eval_split: ``test`` (the data set's test split) or ``validation`` (held-out training images,
            ``test_per_class`` per class, disjoint from every task's training rows; requires
            ``train_per_class`` so that rows are left over).
        seed: the run seed (set by the runner): selects the class order.
    """

    kind = "cil"

    def __init__(
        self,
        *,
        data: dict,
        num_tasks: PosInt = 10,
        first_task_classes: PosInt | None = None,
        class_order: Literal["shuffled", "natural"] = "shuffled",
        train_per_class: PosInt | None = None,
        test_per_class: PosInt | None = None,
        split_seed: NonNegInt = 0,
        task_aware: Bool = False,
        eval_split: Literal["test", "validation"] = "test",
        seed: int = 0,
    ):
        self.data = dict(data)
        self.num_tasks = num_tasks
        self.first_task_classes = first_task_classes
        self.class_order = class_order
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.split_seed = split_seed
        self.task_aware = task_aware
        self.eval_split = eval_split
        self.seed = seed
        self._source = None
        self._plan: _Plan | None = None
        self._views_cache = None
        self._input_shape: tuple[int, ...] | None = None

    @classmethod
    def check_config(cls, params: dict, *, num_classes: int | None = None, seeds: Sequence[int] = ()) -> None:
        """Cross-field rules (``openworld validate``, and again when the data is read): the C classes
        must split into ``num_tasks`` equal tasks, or a first task of ``first_task_classes`` and
        ``num_tasks − 1`` equal ones. Raises :class:`ConfigError` naming the key."""
        if params.get("eval_split", "test") == "validation" and params.get("train_per_class") is None:
            raise param_error("eval_split", "validation",
                              "needs train_per_class (validation images are the training images no task uses)")
        if num_classes is None:
            return
        C, T, f = int(num_classes), params["num_tasks"], params.get("first_task_classes")
        if f is None:
            if T > C:
                raise param_error("num_tasks", T, f"at most the {C} classes of the data (one class per task)")
            if C % T:
                divisors = [d for d in range(1, C + 1) if C % d == 0]
                raise param_error(
                    "num_tasks", T, f"the {C} classes do not split into {T} equal tasks; use a divisor of {C} "
                    f"({', '.join(map(str, divisors))}) or set first_task_classes"
                )
            return
        if not 1 <= f <= C:
            raise param_error("first_task_classes", f, f"must be in 1…{C} (the data has {C} classes)")
        if T == 1:
            if f != C:
                raise param_error("first_task_classes", f, f"one task must hold all {C} classes (num_tasks is 1)")
            return
        if C == f or (C - f) % (T - 1):
            raise param_error(
                "first_task_classes", f, f"{C} classes − {f} = {C - f} do not split into num_tasks − 1 = {T - 1} "
                "equal tasks"
            )

    def _validate_params(self) -> None:
        if not isinstance(self.data, dict) or not self.data.get("source"):
            raise ValueError("scenario.data.source: a dataset name is required, e.g. {source: cifar100}")
        if not isinstance(self.num_tasks, int) or isinstance(self.num_tasks, bool) or self.num_tasks < 1:
            raise ValueError(f"scenario.num_tasks: a positive integer is required, got {self.num_tasks!r}")
        for name in ("first_task_classes", "train_per_class", "test_per_class"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"scenario.{name}: a positive integer or null is required, got {value!r}")
        if self.class_order not in CIL_CLASS_ORDERS:
            raise ValueError(
                f"scenario.class_order: allowed values are {', '.join(CIL_CLASS_ORDERS)}; got {self.class_order!r}"
            )
        if self.eval_split not in CIL_EVAL_SPLITS:
            raise ValueError(
                f"scenario.eval_split: allowed values are {', '.join(CIL_EVAL_SPLITS)}; got {self.eval_split!r}"
            )

    # -- lazy loading --------------------------------------------------------------------------------
    @property
    def source(self):
        if self._source is None:
            self._validate_params()
            options = {k: v for k, v in self.data.items() if k not in ("source", "root", "download")}
            loader = DATASETS.get(self.data["source"])
            self._source = loader(root=self.data.get("root"), download=bool(self.data.get("download", False)),
                                  **options)
        return self._source

    def _subsample(self, labels: np.ndarray, n: int | None, tag: str) -> np.ndarray:
        if n is None:
            return np.arange(len(labels))
        kept: list[int] = []
        for c, rows in _rows_by_class(labels).items():
            if len(rows) < n:
                key = "train_per_class" if tag == "training" else "test_per_class"
                raise param_error(key, n, f"class {c} has only {len(rows)} {tag} samples")
            kept.extend(pick(rows, n, "cil", self.split_seed, c))
        return np.asarray(sorted(kept), dtype=np.int64)

    def _holdout(self, labels: np.ndarray, used: np.ndarray) -> np.ndarray:
        """Validation rows: per class, ``test_per_class`` (null: all) training rows no task trains on."""
        free = np.ones(len(labels), dtype=bool)
        free[used] = False
        kept: list[int] = []
        for c, rows in _rows_by_class(labels).items():
            rows = rows[free[rows]]
            n = self.test_per_class
            if n is None:
                kept.extend(int(r) for r in rows)
                continue
            if len(rows) < n:
                raise param_error("test_per_class", n, f"class {c} has only {len(rows)} training samples left "
                                  "for validation after train_per_class")
            kept.extend(pick(rows, n, "cil-val", self.split_seed, c))
        return np.asarray(sorted(kept), dtype=np.int64)

    def _build(self) -> _Plan:
        if self._plan is not None:
            return self._plan
        src = self.source
        train_labels, test_labels = _labels(src.train), _labels(src.test)
        classes = list(getattr(src, "classes", None) or [])
        C = len(classes) if classes else int(max(train_labels.max(), test_labels.max())) + 1
        self.check_config(self.get_params(), num_classes=C)
        tasks = task_layout(C, self.num_tasks, self.first_task_classes)
        order = cil_class_order(C, int(self.seed), self.class_order)
        mapping = np.empty(C, dtype=np.int64)
        mapping[np.asarray(order, dtype=np.int64)] = np.arange(C)
        train_keep = self._subsample(train_labels, self.train_per_class, "training")
        new_train = mapping[train_labels[train_keep]]
        task_of = np.empty(C, dtype=np.int64)
        for t, labels in enumerate(tasks):
            task_of[labels] = t
        train_rows = [np.sort(train_keep[task_of[new_train] == t]) for t in range(len(tasks))]
        for t, rows in enumerate(train_rows):
            if len(rows) == 0:
                raise ConfigError(f"scenario: task {t} has no training samples (its classes {tasks[t]} have none)")
        if self.eval_split == "validation":
            test_keep = self._holdout(train_labels, train_keep)
            new_test = mapping[train_labels[test_keep]]
        else:
            test_keep = self._subsample(test_labels, self.test_per_class, "test")
            new_test = mapping[test_labels[test_keep]]
        perm = np.lexsort((test_keep, new_test))
        names = tuple(str(classes[c]) if classes else str(c) for c in order)
        self._plan = _Plan(order, C, tasks, train_rows, test_keep[perm], new_test[perm], names, mapping)
        return self._plan

    def _views(self):
        if self._views_cache is None:
            plan = self._build()
            src = self.source
            evaluated = src.train if self.eval_split == "validation" else src.test
            if plan.order == list(range(plan.num_classes)):
                self._views_cache = (src.train, evaluated)
            else:
                m = torch.as_tensor(plan.mapping, dtype=torch.long)
                train = src.train.relabel(m)
                self._views_cache = (train, train if self.eval_split == "validation" else evaluated.relabel(m))
        return self._views_cache

    # -- public properties ---------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        return int(self.num_tasks)

    @property
    def num_classes(self) -> int:
        return self._build().num_classes

    @property
    def class_order_list(self) -> list[int]:
        return list(self._build().order)

    @property
    def tasks(self) -> list[list[int]]:
        """Scenario labels of every task (task t owns ``tasks[t]``)."""
        return [list(t) for t in self._build().tasks]

    @property
    def input_shape(self) -> tuple[int, ...]:
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
                self._input_shape = tuple(int(s) for s in np.asarray(data[0][0]).shape)
        return self._input_shape

    # -- sessions ------------------------------------------------------------------------------------
    def sessions(self) -> Iterator[Session]:
        for i in range(self.num_sessions):
            yield self.session(i)

    def session(self, index: int) -> Session:
        plan = self._build()
        T = len(plan.tasks)
        if not 0 <= index < T:
            raise IndexError(f"scenario has {T} sessions, asked for {index}")
        train, test = self._views()
        new = tuple(plan.tasks[index])
        seen_n = new[-1] + 1
        seen = tuple(range(seen_n))
        labeled = train.subset(plan.train_rows[index])
        n_test = int(np.searchsorted(plan.test_labels, seen_n, side="left"))
        test_set = test.subset(plan.test_rows[:n_test])
        task_lists = [list(t) for t in plan.tasks[: index + 1]]
        eval_sets = {
            "test": EvalSet(
                data=test_set,
                classes=seen,
                groups={"old": tuple(range(new[0])), "new": new} if index else {},
                options={"tasks": task_lists},
            )
        }
        if self.task_aware:
            for j, task in enumerate(plan.tasks[: index + 1]):
                lo = int(np.searchsorted(plan.test_labels, task[0], side="left"))
                hi = int(np.searchsorted(plan.test_labels, task[-1] + 1, side="left"))
                eval_sets[f"til_{j:02d}"] = EvalSet(data=test.subset(plan.test_rows[lo:hi]), classes=tuple(task))
        counts = np.bincount(labeled.targets.numpy(), minlength=plan.num_classes)
        info: dict[str, Any] = {
            "task": index,
            "num_labeled": len(labeled),
            "num_test": n_test,
            "classes_new": list(new),
            "index_hash": hash_indices(plan.train_rows[index]),
        }
        classes = ClassInfo(
            num_classes=plan.num_classes,
            seen=seen,
            new=new,
            base=tuple(plan.tasks[0]),
            known=seen,
            train_counts=tuple(int(n) for n in counts),
            names=plan.names,
        )
        return Session(index=index, name=f"task_{index}", classes=classes, labeled=labeled,
                       eval_sets=eval_sets, info=info)

    # -- record --------------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        plan = self._build()
        src = self.source
        test_sizes = []
        for task in plan.tasks:
            lo = int(np.searchsorted(plan.test_labels, task[0], side="left"))
            hi = int(np.searchsorted(plan.test_labels, task[-1] + 1, side="left"))
            test_sizes.append(hi - lo)
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
                "eval_split": self.eval_split,
                "num_classes": plan.num_classes,
                "num_sessions": len(plan.tasks),
                "class_order": plan.order,
                "tasks_original_classes": [[plan.order[c] for c in task] for task in plan.tasks],
                "task_train_hashes": [hash_indices(rows) for rows in plan.train_rows],
                "task_train_sizes": [len(rows) for rows in plan.train_rows],
                "task_test_sizes": test_sizes,
                "test_hash": hash_indices(plan.test_rows),
            }
        )
