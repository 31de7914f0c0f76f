"""Category discovery: generalized (``gcd``) and novel (``ncd``) class discovery.

Protocol of the GCD/NCD card (``specs/gcd-ncd.md`` §1):

* Old/new split per dataset (§1.2); labels are remapped so the old classes are ``0…K_old-1`` (in
  the listed order) and the new ones ``K_old…K-1``.
* ``gcd`` (§1.3): the old-class training samples are taken **in dataset order**; the legacy NumPy
  generator seeded with ``split_seed`` draws ``floor(p_lab·N_old)`` positions
  (``RandomState(split_seed).choice(N_old, n, replace=False)`` = the first n entries of
  ``permutation(N_old)``, in that order). ``D_L`` = those samples; ``D_U`` = every other training
  sample (unselected old + all new).
* ``ncd`` (§1.4, UNO): ``D_L`` = every old-class training sample, ``D_U`` = every new-class one.
* The strategy gets ``session.labeled`` (D_L) and ``session.unlabeled`` (D_U); ``Session.visible()``
  replaces every D_U target by -1. The true D_U labels exist only in the eval sets, held by the runner.
* Eval sets: ``gcd`` — ``unlabelled`` (transductive: D_U with its labels) and ``test`` (inductive:
  the test split), both scored by the ``clustering`` engine (v2 All/Old/New, NMI, ARI; no logit
  restriction: predictions are cluster ids). ``ncd`` — ``unlabelled`` and ``test_novel`` (task-aware:
  the clustering engine takes the argmax over the novel head, logit columns ``K_old…``, of whatever
  width K̂; ``acc``/``nmi``/``ari``) and ``test_known`` (classification over the old classes).
* ``k_mode: estimated`` (§2.7): ``session.info["num_clusters"]`` is ``None`` and strategies estimate
  K̂ (gcd: the total; ncd: the number of novel clusters K̂_u, head ``K_old + K̂_u``) from D_L labels
  and D_U features only. Metrics accept any number of clusters.
* ``inductive_mapping: from_transductive`` (§1.5): the inductive set (``test``; ncd ``test_novel``)
  is scored with the class→cluster assignment computed on ``unlabelled`` (a
  :class:`~openworld.metrics.clustering.SharedAssignment` in both sets' engine options; the runner
  scores ``unlabelled`` first, as the session lists it). NMI/ARI need no assignment.

Everything is computed lazily on first use; the constructor only stores parameters.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from openworld.metrics.clustering import SharedAssignment  # also registers the "clustering" metrics engine
from openworld.params import NonNegInt, PosInt, Seed32, param_error
from openworld.registry import DATASETS, register_scenario
from openworld.scenarios.base import ClassInfo, EvalSet, Scenario, Session, hash_indices
from openworld.scenarios.fscil import _jsonable, _labels, pick

#: Card §1.2: number of old classes (the first ones, natural order) per offline/standard dataset.
DEFAULT_OLD_CLASSES = {"cifar10": 5, "cifar100": 80, "fashion_mnist": 5, "mnist": 5, "digits": 5}
K_MODES = ("known", "estimated")
INDUCTIVE_MAPPINGS = ("own", "from_transductive")
VARIANTS = ("v2", "v2b", "v1")

# Constrained parameter types (``openworld validate`` checks recipe values against them).
LabFraction = Annotated[float, Field(strict=True, gt=0, le=1)]  # (0, 1]
ValFraction = Annotated[float, Field(strict=True, ge=0, lt=1)]  # [0, 1)


def draw_labelled(n_old: int, p_lab: float, split_seed: int = 0) -> np.ndarray:
    """Card §1.3: positions (into the old-class samples in dataset order) of the labelled draw.

    ``floor(p_lab·n_old)`` distinct positions from the legacy generator ``RandomState(split_seed)``:
    the first entries of ``permutation(n_old)``, in drawn order (= ``choice(n_old, n, replace=False)``).
    """
    size = int(math.floor(p_lab * n_old))
    return np.random.RandomState(int(split_seed)).permutation(int(n_old))[:size].astype(np.int64)


def read_class_split(path: str | os.PathLike) -> tuple[list[int], list[int]]:
    """``(old, new)`` class ids from an SSB-style split file.

    Formats: ``.json``/``.yaml``/``.yml`` or the SSB ``.pkl`` with keys ``known_classes`` (list) and
    ``unknown_classes`` (a list, or a dict whose ``Hard``, ``Medium``, ``Easy`` lists are concatenated
    in that order, card §1.2). Ids are 0-based dataset labels.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"scenario.class_split: file {p} not found")
    if p.suffix == ".json":
        info = json.loads(p.read_text())
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        info = yaml.safe_load(p.read_text())
    elif p.suffix == ".pkl":
        with p.open("rb") as f:  # the SSB splits are distributed as pickles; only load files you trust
            info = pickle.load(f)
    else:
        raise ValueError(f"scenario.class_split: unsupported file type {p.suffix!r} (use .json, .yaml or .pkl)")
    if not isinstance(info, dict) or "known_classes" not in info or "unknown_classes" not in info:
        raise ValueError(f"scenario.class_split: {p} must hold 'known_classes' and 'unknown_classes'")
    unknown = info["unknown_classes"]
    if isinstance(unknown, dict):
        missing = [k for k in ("Hard", "Medium", "Easy") if k not in unknown]
        if missing:
            raise ValueError(f"scenario.class_split: unknown_classes lacks {missing} in {p}")
        unknown = [*unknown["Hard"], *unknown["Medium"], *unknown["Easy"]]
    return [int(c) for c in info["known_classes"]], [int(c) for c in unknown]


@dataclass
class _Plan:
    order: list[int]  # order[k] = original class id of scenario class k
    num_old: int
    num_classes: int
    labelled: np.ndarray  # training rows (original array), drawn order
    unlabelled: np.ndarray  # training rows, dataset order
    validation: np.ndarray  # training rows carved from D_L (labelled_val_frac)
    test_rows: np.ndarray  # test rows kept, dataset order
    train_pool: np.ndarray  # training rows of the scenario's classes after subsampling
    names: tuple[str, ...]


class _DiscoveryScenario(Scenario):
    """Shared machinery of ``gcd`` and ``ncd`` (see the module docstring).

    Parameters (keyword-only, each with a default — the recipe's ``scenario:`` block):

    data: ``{"source": name, "root": path | None, "download": bool, **source options}``.
    old_classes: original class ids of the old (labelled) classes, in order; an integer n = the
        first n classes; ``None`` = the card's per-dataset default (§1.2).
    new_classes: original ids of the new classes, in order; ``None`` = every other class, ascending.
    class_split: an SSB split file (``.pkl``/``.json``/``.yaml``) giving old and new classes (CUB,
        Cars, Aircraft); excludes ``old_classes``/``new_classes``.
    p_lab: labelled fraction of the old-class samples (gcd only; card: 0.5).
    split_seed: seed of the labelled draw (independent of the training seed).
    labelled_val_frac: fraction of each labelled class carved off as ``session.validation`` (the
        only legal source for model selection; card default 0).
    k_mode: ``"known"`` (K given to strategies in ``session.info["num_clusters"]``) or
        ``"estimated"`` (strategies estimate K̂ — gcd: K, ncd: the novel-cluster count; metrics accept
        any number of clusters).
    variants: Hungarian variants reported besides v2 (``"v2b"``, ``"v1"``).
    inductive_mapping: ``"own"`` (fresh assignment on the test predictions, the default) or
        ``"from_transductive"`` (reuse the assignment computed on ``unlabelled``).
    train_subsample / test_subsample: keep at most n samples per class (hashed pick over the rows,
        dataset order kept), for small CPU recipes; recorded in ``describe()``.
    seed: the run seed (unused by the splits, which depend on ``split_seed`` only).
    """

    kind = "gcd"

    def __init__(
        self,
        *,
        data: dict | None = None,
        old_classes: PosInt | Sequence[NonNegInt] | None = None,
        new_classes: Sequence[NonNegInt] | None = None,
        class_split: str | None = None,
        p_lab: LabFraction = 0.5,
        split_seed: Seed32 = 0,
        labelled_val_frac: ValFraction = 0.0,
        k_mode: Literal["known", "estimated"] = "known",
        variants: Sequence[Literal["v2", "v2b", "v1"]] = (),
        inductive_mapping: Literal["own", "from_transductive"] = "own",
        train_subsample: PosInt | None = None,
        test_subsample: PosInt | None = None,
        seed: int = 0,
    ):
        self.data = dict(data) if data is not None else {"source": "digits"}
        self.old_classes = old_classes if old_classes is None or isinstance(old_classes, int) else list(old_classes)
        self.new_classes = None if new_classes is None else list(new_classes)
        self.class_split = class_split
        self.p_lab = p_lab
        self.split_seed = split_seed
        self.labelled_val_frac = labelled_val_frac
        self.k_mode = k_mode
        self.variants = list(variants)
        self.inductive_mapping = inductive_mapping
        self.train_subsample = train_subsample
        self.test_subsample = test_subsample
        self.seed = seed
        self._source = None
        self._plan: _Plan | None = None
        self._views_cache = None
        self._input_shape: tuple[int, ...] | None = None

    # -- validation ----------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, params: dict, *, num_classes: int | None = None, seeds: Sequence[int] = ()) -> None:
        """Cross-field rules (``openworld validate``, and again when the data is read). Raises
        :class:`~openworld.config.ConfigError` naming the key. ``num_classes``: the source's class
        count, when known (class ids must lie below it; ``new_classes`` null takes the rest)."""
        old, new, split = params.get("old_classes"), params.get("new_classes"), params.get("class_split")
        if split is not None:
            if old is not None or new is not None:
                raise param_error(
                    "class_split", split, "give either a split file or old_classes/new_classes, not both"
                )
            return  # the classes come from the file (read with the data)
        if old is None:
            source = str((params.get("data") or {}).get("source"))
            if source not in DEFAULT_OLD_CLASSES:
                raise param_error(
                    "old_classes", None, f"no default old-class split for source {source!r} (defaults exist for "
                    f"{', '.join(DEFAULT_OLD_CLASSES)}); give old_classes or class_split"
                )
            old_list = list(range(DEFAULT_OLD_CLASSES[source]))
        elif isinstance(old, int):
            if old < 1:
                raise param_error("old_classes", old, "a positive number of old classes (the first n) is required")
            old_list = list(range(old))
        else:
            old_list = [int(c) for c in old]
            if not old_list:
                raise param_error("old_classes", old, "at least one old class is required")
            if len(set(old_list)) != len(old_list):
                raise param_error("old_classes", old, "class ids repeat")
        if new is not None:
            new_list = [int(c) for c in new]
            if not new_list:
                raise param_error("new_classes", new, "at least one new class is required (null: every other class)")
            if len(set(new_list)) != len(new_list) or set(new_list) & set(old_list):
                raise param_error("new_classes", new, f"old and new classes overlap or repeat (old {old_list})")
        if cls.kind == "ncd" and params.get("p_lab") not in (0.5, 1, 1.0):
            raise param_error("p_lab", params.get("p_lab"), "ncd labels every old-class sample; leave p_lab unset")
        if num_classes is None:
            return
        top = f"class ids must lie in 0…{num_classes - 1} (the data has {num_classes} classes)"
        if isinstance(old, int) and old > num_classes:
            raise param_error("old_classes", old, f"at most the {num_classes} classes of the data")
        if not isinstance(old, int) and max(old_list) >= num_classes:
            raise param_error("old_classes", old, top)
        if new is not None and max(new_list) >= num_classes:
            raise param_error("new_classes", new, top)
        if new is None and len(old_list) >= num_classes:
            key = "old_classes" if old is not None else "data.source"
            raise param_error(key, old if old is not None else params["data"]["source"],
                              f"leaves no new class (the data has {num_classes} classes)")

    def _validate_params(self) -> None:
        if not isinstance(self.data, dict) or not self.data.get("source"):
            raise ValueError("scenario.data.source: a dataset name is required, e.g. {source: cifar10}")
        if not (isinstance(self.p_lab, (int, float)) and 0 < self.p_lab <= 1):
            raise ValueError(f"scenario.p_lab: a number in (0, 1] is required, got {self.p_lab!r}")
        if not (isinstance(self.labelled_val_frac, (int, float)) and 0 <= self.labelled_val_frac < 1):
            raise ValueError(
                f"scenario.labelled_val_frac: a number in [0, 1) is required, got {self.labelled_val_frac!r}"
            )
        if self.k_mode not in K_MODES:
            raise ValueError(f"scenario.k_mode: allowed values are {', '.join(K_MODES)}; got {self.k_mode!r}")
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"scenario.variants: unknown {bad}; allowed: v2b, v1")
        if self.inductive_mapping not in INDUCTIVE_MAPPINGS:
            raise ValueError(
                f"scenario.inductive_mapping: allowed values are {', '.join(INDUCTIVE_MAPPINGS)}; "
                f"got {self.inductive_mapping!r}"
            )
        for name in ("train_subsample", "test_subsample"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"scenario.{name}: a positive integer or null is required, got {value!r}")
        self.check_config(self.get_params())

    # -- lazy loading --------------------------------------------------------------------------------
    @property
    def source(self):
        if self._source is None:
            self._validate_params()
            options = {k: v for k, v in self.data.items() if k not in ("source", "root", "download")}
            loader = DATASETS.get(self.data["source"])
            self._source = loader(
                root=self.data.get("root"), download=bool(self.data.get("download", False)), **options
            )
        return self._source

    def _class_lists(self, num_source_classes: int) -> tuple[list[int], list[int]]:
        if self.class_split is not None:
            old, new = read_class_split(self.class_split)
        else:
            if self.old_classes is None:
                name = str(self.data["source"])
                if name not in DEFAULT_OLD_CLASSES:
                    raise ValueError(
                        f"scenario.old_classes: no default old-class split for source {name!r} "
                        f"(defaults exist for {', '.join(DEFAULT_OLD_CLASSES)}); give old_classes or class_split"
                    )
                old = list(range(DEFAULT_OLD_CLASSES[name]))
            elif isinstance(self.old_classes, int):
                old = list(range(self.old_classes))
            else:
                old = [int(c) for c in self.old_classes]
            if self.new_classes is None:
                new = [c for c in range(num_source_classes) if c not in set(old)]
            else:
                new = [int(c) for c in self.new_classes]
        every = old + new
        if len(set(every)) != len(every):
            raise ValueError(f"scenario: old and new classes overlap or repeat: old={old}, new={new}")
        if any(c < 0 or c >= num_source_classes for c in every):
            raise ValueError(f"scenario: class ids must lie in 0…{num_source_classes - 1}; old={old}, new={new}")
        if not old or not new:
            raise ValueError(f"scenario: both old and new classes are required; old={old}, new={new}")
        return old, new

    def _build(self) -> _Plan:
        if self._plan is not None:
            return self._plan
        src = self.source
        train_labels, test_labels = _labels(src.train), _labels(src.test)
        names_src = list(getattr(src, "classes", None) or [])
        n_src = len(names_src) if names_src else int(max(train_labels.max(), test_labels.max())) + 1
        self.check_config(self.get_params(), num_classes=n_src)
        old, new = self._class_lists(n_src)
        order = old + new
        in_scope = np.isin(train_labels, order)
        pool = np.flatnonzero(in_scope)
        if self.train_subsample is not None:
            pool = _subsample(train_labels, pool, self.train_subsample, "gcd_train_sub", self.split_seed)
        is_old = np.isin(train_labels[pool], old)
        old_rows = pool[is_old]
        if self.kind == "gcd":
            labelled = old_rows[draw_labelled(len(old_rows), float(self.p_lab), self.split_seed)]
        else:
            labelled = old_rows
        unl_mask = np.ones(len(train_labels), dtype=bool)
        unl_mask[labelled] = False
        unlabelled = pool[unl_mask[pool]]
        validation = np.zeros(0, dtype=np.int64)
        if self.labelled_val_frac > 0:
            val: list[int] = []
            for c in old:
                rows = labelled[train_labels[labelled] == c]
                n = int(math.floor(self.labelled_val_frac * len(rows)))
                val.extend(pick(rows, n, "gcd_val", self.split_seed, c))
            validation = np.asarray(sorted(val), dtype=np.int64)
            keep = ~np.isin(labelled, validation)
            labelled = labelled[keep]
        test_rows = np.flatnonzero(np.isin(test_labels, order))
        if self.test_subsample is not None:
            test_rows = _subsample(test_labels, test_rows, self.test_subsample, "gcd_test_sub", self.split_seed)
        names = tuple(str(names_src[c]) if names_src else str(c) for c in order)
        self._plan = _Plan(
            order=order,
            num_old=len(old),
            num_classes=len(order),
            labelled=labelled,
            unlabelled=unlabelled,
            validation=validation,
            test_rows=test_rows,
            train_pool=pool,
            names=names,
        )
        return self._plan

    def _views(self):
        """Train/test data relabelled to the scenario's ids (classes outside the split map to -1)."""
        if self._views_cache is None:
            plan = self._build()
            src = self.source
            n_src = int(max(_labels(src.train).max(), _labels(src.test).max())) + 1
            mapping = torch.full((max(n_src, max(plan.order) + 1),), -1, dtype=torch.long)
            mapping[torch.as_tensor(plan.order)] = torch.arange(plan.num_classes)
            self._views_cache = (src.train.relabel(mapping), src.test.relabel(mapping))
        return self._views_cache

    # -- public properties ---------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        return 1

    @property
    def num_classes(self) -> int:
        return self._build().num_classes

    @property
    def num_old(self) -> int:
        return self._build().num_old

    @property
    def class_order_list(self) -> list[int]:
        return list(self._build().order)

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

    def split_indices(self) -> dict[str, list[int]]:
        """Training-array rows of D_L (drawn order), D_U, validation, and the kept test rows."""
        plan = self._build()
        return {
            "labelled": plan.labelled.tolist(),
            "unlabelled": plan.unlabelled.tolist(),
            "validation": plan.validation.tolist(),
            "test": plan.test_rows.tolist(),
        }

    # -- sessions ------------------------------------------------------------------------------------
    def sessions(self) -> Iterator[Session]:
        yield self.session(0)

    def _mapping_options(self) -> tuple[dict, dict]:
        """Engine options of the transductive and the inductive set for ``inductive_mapping``."""
        if self.inductive_mapping != "from_transductive":
            return {}, {}
        shared = SharedAssignment(source="unlabelled")
        return {"publish_assignment": shared}, {"use_assignment": shared}

    def _eval_sets(self, train, test, plan: _Plan) -> dict[str, EvalSet]:
        old = tuple(range(plan.num_old))
        options = {"old_classes": list(old), "variants": list(self.variants), "mode": "gcd"}
        publish, use = self._mapping_options()
        return {  # order matters for from_transductive: the runner scores `unlabelled` first
            "unlabelled": EvalSet(
                data=train.subset(plan.unlabelled), classes=(), task="clustering", options={**options, **publish}
            ),
            "test": EvalSet(
                data=test.subset(plan.test_rows), classes=(), task="clustering", options={**options, **use}
            ),
        }

    def session(self, index: int) -> Session:
        if index != 0:
            raise IndexError(f"scenario has 1 session, asked for {index}")
        plan = self._build()
        train, test = self._views()
        K, k_old = plan.num_classes, plan.num_old
        labeled = train.subset(plan.labelled)
        validation = train.subset(plan.validation) if len(plan.validation) else None
        unlabeled = train.subset(plan.unlabelled)
        counts = np.bincount(labeled.targets.numpy(), minlength=K)
        classes = ClassInfo(
            num_classes=K,
            seen=tuple(range(K)),
            new=tuple(range(k_old, K)),
            base=tuple(range(k_old)),
            known=tuple(range(k_old)),
            train_counts=tuple(int(n) for n in counts),
            names=plan.names,
        )
        info = {
            "old_classes": list(range(k_old)),
            "num_old": k_old,
            "num_clusters": K if self.k_mode == "known" else None,
            "k_mode": self.k_mode,
            "num_labeled": len(labeled),
            "num_unlabeled": len(unlabeled),
            "labelled_hash": hash_indices(plan.labelled),
            "unlabelled_hash": hash_indices(plan.unlabelled),
        }
        return Session(
            index=0,
            name="discovery",
            classes=classes,
            labeled=labeled,
            unlabeled=unlabeled,
            validation=validation,
            eval_sets=self._eval_sets(train, test, plan),
            info=info,
        )

    def describe(self) -> dict[str, Any]:
        plan = self._build()
        src = self.source
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
                "num_old": plan.num_old,
                "class_order": plan.order,
                "sizes": {
                    "labelled": len(plan.labelled),
                    "unlabelled": len(plan.unlabelled),
                    "validation": len(plan.validation),
                    "test": len(plan.test_rows),
                },
                "labelled_hash": hash_indices(plan.labelled),
                "unlabelled_hash": hash_indices(plan.unlabelled),
                "validation_hash": hash_indices(plan.validation),
                "test_hash": hash_indices(plan.test_rows),
                "train_pool_hash": hash_indices(plan.train_pool),
            }
        )


def _subsample(labels: np.ndarray, rows: np.ndarray, n: int, tag: str, seed: int) -> np.ndarray:
    """At most n rows per class (hashed :func:`pick`), returned in dataset order."""
    kept: list[int] = []
    sub = labels[rows]
    for c in np.unique(sub):
        r = rows[sub == c]
        kept.extend(pick(r, min(n, len(r)), tag, seed, int(c)))
    return np.asarray(sorted(kept), dtype=np.int64)


@register_scenario("gcd")
class GCDScenario(_DiscoveryScenario):
    __doc__ = _DiscoveryScenario.__doc__
    kind = "gcd"


@register_scenario("ncd")
class NCDScenario(_DiscoveryScenario):
    """Novel class discovery (UNO protocol, card §1.4): D_L = all old-class training samples, D_U = all
    new-class ones. Eval sets ``unlabelled`` and ``test_novel`` (task-aware: argmax over the novel head,
    logit columns ``K_old…``, of any width; ``acc``/``nmi``/``ari``) and ``test_known`` (accuracy over
    the old classes). ``p_lab`` is ignored (must stay 1 or its default). With ``k_mode: estimated``
    strategies choose the number of novel clusters K̂_u (silhouette, card §2.7); the head has
    ``K_old + K̂_u`` columns. Parameters as for ``gcd``."""

    kind = "ncd"

    def _eval_sets(self, train, test, plan: _Plan) -> dict[str, EvalSet]:
        k_old = plan.num_old
        # Task-aware: the engine takes the argmax over the novel head (columns K_old…, any width K̂_u),
        # so the runner applies no class restriction (which would cap the head at K columns).
        opts = {"old_classes": [], "mode": "ncd", "head_offset": k_old}
        publish, use = self._mapping_options()
        test_sub = test.subset(plan.test_rows)
        test_y = test_sub.targets.numpy()
        known_rows = test_sub.subset(np.flatnonzero(test_y < k_old))
        if self.k_mode == "known":
            test_known = EvalSet(data=known_rows, classes=tuple(range(k_old)))
        else:  # head of K_old + K̂_u columns: classify with the known head 0…K_old-1 only
            test_known = EvalSet(data=known_rows, classes=(), task="head_classification", options={"head": [0, k_old]})
        return {
            "unlabelled": EvalSet(
                data=train.subset(plan.unlabelled), classes=(), task="clustering", options={**opts, **publish}
            ),
            "test_novel": EvalSet(
                data=test_sub.subset(np.flatnonzero(test_y >= k_old)),
                classes=(),
                task="clustering",
                options={**opts, **use},
            ),
            "test_known": test_known,
        }
