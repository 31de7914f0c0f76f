"""Domain-adaptive open-set scenario ``open_set`` (``specs/open-set.md`` §§1–3, 7).

A labelled **source** domain holding only the known classes, and an unlabelled **target** domain
holding known and unknown classes. Each target domain is one session (one task): the strategy gets
the source (``labeled``, with a stratified ``validation`` split carved from it) and the target set
with hidden labels (``unlabeled``); it is evaluated on that same target set (transductive OSDA,
card §1) by the ``open_set`` metrics engine. Where the target domain comes from:

* ``target: {source: <dataset>, …}`` — a second dataset (e.g. MNIST → ``digits28``), all of its
  samples (``target_split``);
* ``corruptions: [gaussian_noise:3, contrast:5, clean, …]`` — the source's **test** split under each
  CIFAR-10-C corruption × severity (:mod:`openworld.data.corruptions`), one session per domain, noise
  from ``numpy.random.default_rng(seed·1000 + task_index)`` in test-set order;
* neither — the data source is itself a domain pair (``office_home``, ``office31``, ``domainnet`` of
  :mod:`openworld.data.domains`): its ``train`` is the source domain, its ``test`` the target domain.

Labels: known classes ``known_classes`` (original ids, in order) become 0…|K|-1; the unknown classes
``unknown_classes`` become |K|, |K|+1, … (so the engine keeps y_orig for ``unk_classmean`` and merges
them to u = |K|). Every other class is dropped. Eval sets (card §8), in this order:

* ``target`` — every scored target sample: ``EvalSet(data, classes=(), task="open_set",
  options={"known_classes": [0…|K|-1], "unknown_classes": [|K|…], "num_samples": n})``;
* ``target_known`` — the known-class samples of ``target`` (same rows, same order), scored by the
  classification engine over the known classes (``classes=(0…|K|-1)``): closed-set ``acc`` (= the
  ``closed_acc`` of ``target``), ``acc_balanced``, top-k and per-class accuracy;
* ``source_val`` — the labelled source validation split, classified over the known classes.

Few-shot variant: ``target_shots: K`` draws K labelled target samples per known class (a |K|-way
K-shot support, seeded) and adds them to ``labeled``; the target eval set is the remaining queries.

``protocol: dafsos`` — episodic domain-adaptive few-shot open set (card §3.2). The sorted classes
split into ``meta_train_classes`` (the first n) and meta-test classes (the rest). **Each meta-test
episode is one session** (E = ``episodes`` sessions): a strategy must see the episode's support to
predict its queries, and :meth:`Strategy.learn` is the only way the runner hands a strategy data, so
an episode cannot be one slice of a shared eval set. Episode e draws, with
``numpy.random.Generator(PCG64(seed + e))``, N = ``n_way`` support classes and M = ``n_unknown``
other classes from the meta-test classes, then per support class K + Q target images without
replacement (the first K = ``shots`` are the support, the other Q = ``queries`` are queries), Q target
images per unknown class, and ``source_support_shots`` source images per support class. Labels are
**episode-local**: support classes 0…N-1 (in drawn order), unknown classes N…N+M-1. The session:

* ``labeled``: the support (target, plus the optional source shots), labels 0…N-1;
* ``unlabeled``: the episode's queries (hidden labels); ``validation``: ``None``;
* ``eval_sets``: ``{"episodes": EvalSet(queries, task="open_set", known 0…N-1, unknown N…N+M-1)}``;
* ``info``: ``protocol: "dafsos"``, ``episode``, ``source`` (the labelled source of the meta-train
  classes, labels 0…n-1, a stratified ``val_fraction`` carved off as ``source_validation``),
  ``target_train`` (labelled target images of the meta-train classes: the few-shot target domain of
  meta-training, for strategies that meta-train with :func:`meta_train_episode`), ``num_source_classes``
  and the drawn original class ids.

``num_classes`` = max(N + M, n): one label space holds an episode's ids and the source's. The
runner scores every episode on its own; the card's aggregate (mean over episodes and
``1.96·std/√E``) is :func:`episode_summary` over the sessions of ``results.json``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch

import openworld.data.domains  # noqa: F401  (registers digits28, office_home, office31, domainnet)
from openworld.data.corruptions import corrupt, parse_domain
from openworld.data.views import TensorData, concat
from openworld.metrics.engine import mean_ci95
from openworld.params import NonNegInt, OpenUnit, PosInt, param_error
from openworld.registry import DATASETS, register_scenario
from openworld.scenarios.base import ClassInfo, EvalSet, Scenario, Session, hash_indices
from openworld.scenarios.fscil import _jsonable, _labels

PROTOCOLS = ("osda", "dafsos")
DAFSOS_PARAMS = ("meta_train_classes", "n_way", "n_unknown", "shots", "queries", "episodes", "source_support_shots")
EPISODE_METRICS = ("closed_acc", "auroc", "os_star", "unk", "hos", "os", "fpr95", "aupr_in", "aupr_out", "oscr")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _load(spec: dict, what: str):
    if not isinstance(spec, dict) or not spec.get("source"):
        raise ValueError(f"scenario.{what}.source: a dataset name is required, e.g. {{source: mnist}}")
    options = {k: v for k, v in spec.items() if k not in ("source", "root", "download")}
    return DATASETS.get(spec["source"])(root=spec.get("root"), download=bool(spec.get("download", False)), **options)


def first_per_class(labels: np.ndarray, classes: Sequence[int], n: int | None) -> np.ndarray:
    """Rows of ``classes``, the first ``n`` per class in dataset order (all if ``n`` is None), ascending."""
    rows = np.flatnonzero(np.isin(labels, np.asarray(list(classes), dtype=np.int64)))
    if n is None:
        return rows
    keep = [rows[labels[rows] == c][:n] for c in classes]
    return np.sort(np.concatenate(keep)) if keep else rows[:0]


def stratified_split(labels: np.ndarray, rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class (ascending id): ``numpy.random.default_rng(seed)`` permutation of its rows; the first
    ``round(fraction·n_c)`` go to the held-out part. Returns ``(kept, held)``, both ascending."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels[rows]):
        r = rows[labels[rows] == c]
        n_val = int(round(fraction * len(r)))
        if n_val >= len(r):
            raise ValueError(f"validation split: class {c} has {len(r)} samples; holding out {n_val} leaves none")
        held.append(r[rng.permutation(len(r))[:n_val]])
    held_a = np.sort(np.concatenate(held)) if held else rows[:0]
    return np.setdiff1d(rows, held_a), held_a


def _join(a, b):
    """Source data + target support; in-memory images of different dtypes meet as float in [0, 1]."""
    if type(a) is not type(b):
        raise ValueError("scenario.target_shots: source and target must both be in-memory or both file-based")
    if isinstance(a, TensorData) and a.x.dtype != b.x.dtype:

        def f(x):
            return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

        a = TensorData(f(a.x), a.targets, a.transforms, a.name)
        b = TensorData(f(b.x), b.targets, b.transforms, b.name)
    return concat([a, b])


def meta_test_episode(
    labels: np.ndarray,
    classes: Sequence[int],
    *,
    n_way: int,
    n_unknown: int,
    shots: int,
    queries: int,
    seed: int,
    episode: int,
    source_labels: np.ndarray | None = None,
    source_shots: int = 0,
) -> dict[str, np.ndarray]:
    """One meta-test episode (card §3.2) over target rows labelled ``labels``, drawn from ``classes``
    with ``numpy.random.Generator(PCG64(seed + episode))``.

    Returns ``known`` / ``unknown`` (original class ids, drawn order), ``support`` / ``query`` (target
    rows; support ∩ query = ∅), ``support_y`` / ``query_y`` (episode-local labels: known k ↦ k,
    unknown j ↦ N + j) and ``source_support`` / ``source_support_y`` (``source_shots`` source rows per
    known class, from ``source_labels``).
    """
    rng = np.random.Generator(np.random.PCG64(int(seed) + int(episode)))
    classes = np.asarray(list(classes), dtype=np.int64)
    perm = rng.permutation(len(classes))
    known, unknown = classes[perm[:n_way]], classes[perm[n_way : n_way + n_unknown]]
    sup, sup_y, qry, qry_y = [], [], [], []
    for k, c in enumerate(known):
        rows = np.flatnonzero(labels == c)
        pick = rows[rng.choice(len(rows), shots + queries, replace=False)]
        sup.append(pick[:shots])
        qry.append(pick[shots:])
        sup_y.append(np.full(shots, k))
        qry_y.append(np.full(queries, k))
    for j, c in enumerate(unknown):
        rows = np.flatnonzero(labels == c)
        qry.append(rows[rng.choice(len(rows), queries, replace=False)])
        qry_y.append(np.full(queries, n_way + j))
    src, src_y = [], []
    if source_shots:
        for k, c in enumerate(known):
            rows = np.flatnonzero(source_labels == c)
            src.append(rows[rng.choice(len(rows), source_shots, replace=False)])
            src_y.append(np.full(source_shots, k))

    def cat(parts):
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    return {
        "known": known,
        "unknown": unknown,
        "support": cat(sup),
        "support_y": cat(sup_y),
        "query": cat(qry),
        "query_y": cat(qry_y),
        "source_support": cat(src),
        "source_support_y": cat(src_y),
    }


def meta_train_episode(
    source_labels: np.ndarray,
    target_labels: np.ndarray,
    classes: Sequence[int],
    *,
    cs: int,
    cq: int,
    ss: int,
    sd: int,
    qsk: int,
    qdk: int,
    qsu: int,
    qdu: int,
    seed: int,
    episode: int,
) -> dict[str, np.ndarray]:
    """One meta-train episode (card §3.1, bugs fixed, §3.2), ``PCG64(seed + episode)``.

    2·CS classes: the first CS give Ss source-support + Qsk source-query images each (``source_support``,
    ``source_query``), the other CS give Sd target-support + Qdk target-query images each (``target_*``);
    support and query rows of a class are disjoint. Then exactly CQ source-unknown classes (Qsu source
    images each) and CQ target-unknown classes (Qdu target images each), drawn from the remaining
    classes. Labels are episode-local: source-support classes 0…CS-1, target-support classes 0…CS-1
    (their own label sets, disjoint as classes), unknown queries −1. Original ids in ``*_classes``.
    """
    rng = np.random.Generator(np.random.PCG64(int(seed) + int(episode)))
    classes = np.asarray(list(classes), dtype=np.int64)
    if len(classes) < 2 * cs + 2 * cq:
        raise ValueError(f"meta_train_episode: {len(classes)} classes, need 2·CS + 2·CQ = {2 * cs + 2 * cq}")
    perm = classes[rng.permutation(len(classes))]
    s_cls, t_cls = perm[:cs], perm[cs : 2 * cs]
    su_cls, tu_cls = perm[2 * cs : 2 * cs + cq], perm[2 * cs + cq : 2 * cs + 2 * cq]
    out: dict[str, list] = {
        k: []
        for k in (
            "source_support",
            "source_support_y",
            "source_query",
            "source_query_y",
            "target_support",
            "target_support_y",
            "target_query",
            "target_query_y",
        )
    }
    for dom, lab, cls, n_s, n_q in (
        ("source", source_labels, s_cls, ss, qsk),
        ("target", target_labels, t_cls, sd, qdk),
    ):
        for k, c in enumerate(cls):
            rows = np.flatnonzero(lab == c)
            pick = rows[rng.choice(len(rows), n_s + n_q, replace=False)]
            out[f"{dom}_support"].append(pick[:n_s])
            out[f"{dom}_support_y"].append(np.full(n_s, k))
            out[f"{dom}_query"].append(pick[n_s:])
            out[f"{dom}_query_y"].append(np.full(n_q, k))
    for dom, lab, cls, n_q in (("source", source_labels, su_cls, qsu), ("target", target_labels, tu_cls, qdu)):
        for c in cls:
            rows = np.flatnonzero(lab == c)
            out[f"{dom}_query"].append(rows[rng.choice(len(rows), n_q, replace=False)])
            out[f"{dom}_query_y"].append(np.full(n_q, -1))
    res = {k: np.concatenate(v).astype(np.int64) for k, v in out.items()}
    res.update(source_classes=s_cls, target_classes=t_cls, source_unknown_classes=su_cls, target_unknown_classes=tu_cls)
    return res


def episode_summary(
    sessions: Sequence[dict], eval_set: str = "episodes", metrics: Sequence[str] = EPISODE_METRICS
) -> dict[str, float]:
    """Card §3.2 aggregate over episodes: ``<metric>`` = mean over the sessions' ``eval_set`` values and
    ``<metric>_ci95`` = 1.96·std/√E (std with ddof = 0). ``sessions``: the ``sessions`` list of a
    ``results.json`` (or any dicts with ``metrics[eval_set][metric]``); episodes lacking a metric are
    skipped for it."""
    out: dict[str, float] = {}
    for name in metrics:
        vals = [
            s["metrics"][eval_set][name]
            for s in sessions
            if s.get("metrics", {}).get(eval_set, {}).get(name) is not None
        ]
        if vals:
            out[name], out[f"{name}_ci95"] = mean_ci95(vals)
    out["episodes"] = float(len(sessions))
    return out


@register_scenario("open_set")
class OpenSetScenario(Scenario):
    """Open-set domain adaptation: source (known classes, labelled) → target (known + unknown).

    Parameters
    ----------
    data: the source dataset (``{source: mnist, root: …}``); a domain-pair dataset when neither
        ``target`` nor ``corruptions`` is given.
    known_classes: original class ids of the known classes, in order; an int n means ``0…n-1``.
    unknown_classes: original ids of the target-unknown classes; ``None`` = every other class.
    target: a second dataset for the target domain; ``target_split``: ``all`` | ``train`` | ``test``.
    corruptions: target domains as ``name:severity`` (or ``clean``), one session each.
    source_per_class / target_per_class: keep the first n samples per class (dataset order).
    val_fraction, split_seed: the stratified source validation split (card §7.1).
    target_shots: K labelled target samples per known class (few-shot variant; 0 = unlabelled).
    transforms: ``source`` (the dataset's own) or ``cifar10`` (CIFAR-10 mean/std, crop+flip, card §7.2).
    protocol: ``osda`` or ``dafsos`` (episodic; see the module docstring). ``dafsos`` options:
        ``meta_train_classes`` (n: the first n sorted classes; the rest are meta-test classes), ``n_way``
        (N), ``n_unknown`` (M), ``shots`` (K), ``queries`` (Q), ``episodes`` (E),
        ``source_support_shots`` (K_s, default 0). ``known_classes`` / ``unknown_classes`` do not apply.
    seed: the run seed (set by the runner): corruption noise, the few-shot support draw, the episodes.
    """

    kind = "open_set"

    def __init__(
        self,
        *,
        data: dict | None = None,
        known_classes: PosInt | Sequence[NonNegInt] = 6,
        unknown_classes: Sequence[NonNegInt] | None = None,
        target: dict | None = None,
        target_split: Literal["all", "train", "test"] = "all",
        corruptions: Sequence[Any] | None = None,
        source_per_class: PosInt | None = None,
        target_per_class: PosInt | None = None,
        val_fraction: OpenUnit = 0.1,
        split_seed: NonNegInt = 0,
        target_shots: NonNegInt = 0,
        transforms: Literal["source", "cifar10"] = "source",
        protocol: Literal["osda", "dafsos"] = "osda",
        meta_train_classes: PosInt | None = None,
        n_way: PosInt = 5,
        n_unknown: NonNegInt = 5,
        shots: PosInt = 1,
        queries: PosInt = 15,
        episodes: PosInt = 600,
        source_support_shots: NonNegInt = 0,
        seed: int = 0,
    ):
        self.data = dict(data) if data is not None else {"source": "mnist"}
        self.known_classes = known_classes
        self.unknown_classes = unknown_classes
        self.target = dict(target) if target is not None else None
        self.target_split = target_split
        self.corruptions = list(corruptions) if corruptions is not None else None
        self.source_per_class = source_per_class
        self.target_per_class = target_per_class
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.target_shots = target_shots
        self.transforms = transforms
        self.protocol = protocol
        self.meta_train_classes = meta_train_classes
        self.n_way = n_way
        self.n_unknown = n_unknown
        self.shots = shots
        self.queries = queries
        self.episodes = episodes
        self.source_support_shots = source_support_shots
        self.seed = seed
        self._plan: dict | None = None
        self._corrupted: dict = {}

    def get_params(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "data",
                "known_classes",
                "unknown_classes",
                "target",
                "target_split",
                "corruptions",
                "source_per_class",
                "target_per_class",
                "val_fraction",
                "split_seed",
                "target_shots",
                "transforms",
                "protocol",
                *(DAFSOS_PARAMS if self.protocol == "dafsos" else ()),
                "seed",
            )
        }

    # -- validation ----------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, params: dict, *, num_classes: int | None = None, seeds: Sequence[int] = ()) -> None:
        """Cross-field rules (``openworld validate``, and again when the data is read). Raises
        :class:`~openworld.config.ConfigError` naming the key. ``num_classes``: the source's class
        count, when known (class ids must lie below it; DA-FSOS needs enough meta-test classes)."""
        target, corruptions = params.get("target"), params.get("corruptions")
        if target is not None and corruptions is not None:
            raise param_error(
                "corruptions", corruptions, "give either `target` (a second dataset) or `corruptions`, not both"
            )
        if corruptions is not None:
            if not list(corruptions):
                raise param_error("corruptions", corruptions, "at least one domain is required")
            for c in corruptions:
                try:
                    parse_domain(c)
                except ValueError as exc:
                    raise param_error("corruptions", corruptions, " ".join(str(exc).split())) from None
        if params.get("protocol") == "dafsos":
            for key in ("corruptions", "target_shots"):
                if params.get(key):
                    raise param_error(
                        key, params[key], "does not apply to protocol 'dafsos' (the target is a second dataset or "
                        "a domain pair; shots per episode: `shots`)"
                    )
            n_train = params.get("meta_train_classes")
            if n_train is None:
                raise param_error(
                    "meta_train_classes", None, "protocol 'dafsos' needs the number n of meta-train classes (the "
                    "first n sorted classes)"
                )
            if num_classes is not None:
                n_way, n_unknown = params.get("n_way", 5), params.get("n_unknown", 5)
                n_test = num_classes - int(n_train)
                if n_test < n_way + n_unknown:
                    raise param_error(
                        "n_unknown", n_unknown, f"{n_test} meta-test classes ({num_classes} − meta_train_classes "
                        f"{n_train}), n_way {n_way} + n_unknown {n_unknown} = {n_way + n_unknown} needed"
                    )
            return
        known, unknown = params.get("known_classes", 6), params.get("unknown_classes")
        if isinstance(known, int):
            if known < 1:
                raise param_error("known_classes", known, "a positive number of known classes (the first n)")
            known_ids = list(range(known))
        else:
            known_ids = [int(c) for c in known]
            if not known_ids or len(set(known_ids)) != len(known_ids) or min(known_ids) < 0:
                raise param_error("known_classes", known, "distinct class ids >= 0 are required (at least one)")
        if unknown is not None:
            unknown_ids = [int(c) for c in unknown]
            if len(set(unknown_ids)) != len(unknown_ids) or set(unknown_ids) & set(known_ids) or (
                unknown_ids and min(unknown_ids) < 0
            ):
                raise param_error(
                    "unknown_classes", unknown, f"distinct class ids >= 0, disjoint from known_classes {known_ids}"
                )
        if num_classes is None:
            return
        if isinstance(known, int) and known > num_classes:
            raise param_error("known_classes", known, f"at most the {num_classes} classes of the data")
        if max(known_ids) >= num_classes:
            raise param_error(
                "known_classes", known, f"ids in 0…{num_classes - 1} required (the data has {num_classes})"
            )
        if unknown is not None and unknown_ids and max(unknown_ids) >= num_classes:
            raise param_error(
                "unknown_classes", unknown, f"ids in 0…{num_classes - 1} required (the data has {num_classes})"
            )

    def _validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"scenario.protocol: allowed values are {', '.join(PROTOCOLS)}; got {self.protocol!r}")
        if self.protocol == "dafsos":
            if not isinstance(self.meta_train_classes, (int, type(None))) or (self.meta_train_classes or 1) < 1:
                raise ValueError(
                    "scenario.meta_train_classes: protocol 'dafsos' needs the number n of meta-train "
                    f"classes (the first n sorted classes), got {self.meta_train_classes!r}"
                )
            for name in ("n_way", "shots", "queries", "episodes"):
                v = getattr(self, name)
                if not isinstance(v, int) or v < 1:
                    raise ValueError(f"scenario.{name}: a positive integer is required, got {v!r}")
            for name in ("n_unknown", "source_support_shots"):
                v = getattr(self, name)
                if not isinstance(v, int) or v < 0:
                    raise ValueError(f"scenario.{name}: a non-negative integer is required, got {v!r}")
        if self.target_split not in ("all", "train", "test"):
            raise ValueError(f"scenario.target_split: allowed values are all, train, test; got {self.target_split!r}")
        if self.transforms not in ("source", "cifar10"):
            raise ValueError(f"scenario.transforms: allowed values are source, cifar10; got {self.transforms!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise ValueError(f"scenario.val_fraction: a number in (0, 1) is required, got {self.val_fraction!r}")
        if not isinstance(self.target_shots, int) or self.target_shots < 0:
            raise ValueError(f"scenario.target_shots: a non-negative integer is required, got {self.target_shots!r}")
        for name in ("source_per_class", "target_per_class"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"scenario.{name}: a positive integer or null is required, got {v!r}")
        self.check_config(self.get_params())

    # -- plan ------------------------------------------------------------------------------------------
    def _build(self) -> dict:
        if self._plan is not None:
            return self._plan
        self._validate()
        src = _load(self.data, "data")
        if self.transforms == "cifar10":
            from openworld.data.transforms import BatchTransform
            from openworld.data.views import TransformPair

            norm = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}
            pair = TransformPair(
                BatchTransform(name="cifar10/crop_flip:train", pad=4, flip=True, **norm),
                BatchTransform(name="cifar10:test", **norm),
                batched=True,
                name="cifar10/crop_flip",
            )
            src = src.with_transforms(pair)
        tgt_src = _load(self.target, "target") if self.target is not None else None
        n_cls = len(src.classes)
        self.check_config(self.get_params(), num_classes=n_cls)
        if self.protocol == "dafsos":
            self._plan = self._build_dafsos(src, tgt_src)
            return self._plan
        known = (
            list(range(self.known_classes))
            if isinstance(self.known_classes, int)
            else [int(c) for c in self.known_classes]
        )
        if not known or len(set(known)) != len(known) or min(known) < 0 or max(known) >= n_cls:
            raise ValueError(
                f"scenario.known_classes: distinct ids in 0…{n_cls - 1} required, got {self.known_classes}"
            )
        if self.unknown_classes is None:
            unknown = [c for c in range(n_cls) if c not in set(known)]
        else:
            unknown = [int(c) for c in self.unknown_classes]
            if set(unknown) & set(known) or (unknown and (min(unknown) < 0 or max(unknown) >= n_cls)):
                raise ValueError(
                    f"scenario.unknown_classes: ids in 0…{n_cls - 1} disjoint from known_classes, "
                    f"got {self.unknown_classes}"
                )
        k = len(known)
        mapping = np.full(n_cls, -1, dtype=np.int64)
        mapping[known] = np.arange(k)
        mapping[unknown] = k + np.arange(len(unknown))

        s_labels = _labels(src.train)
        s_rows = first_per_class(s_labels, known, self.source_per_class)
        s_train, s_val = stratified_split(s_labels, s_rows, float(self.val_fraction), int(self.split_seed))
        if self.corruptions is not None:
            t_data = src.test
            domains = [parse_domain(c) for c in self.corruptions]
        elif tgt_src is not None:
            if len(tgt_src.classes) != n_cls:
                raise ValueError(f"scenario.target: {len(tgt_src.classes)} classes, the source has {n_cls}")
            parts = {"all": [tgt_src.train, tgt_src.test], "train": [tgt_src.train], "test": [tgt_src.test]}
            t_data = concat([p for p in parts[self.target_split] if len(p)])
            domains = [(f"{tgt_src.name}", -1)]
        else:
            t_data = src.test
            domains = [(str(src.info.get("dataset", src.name)) + "_target", -1)]
        t_labels = _labels(t_data)
        t_rows = first_per_class(t_labels, known + unknown, self.target_per_class)
        support = np.zeros(0, dtype=np.int64)
        if self.target_shots:
            rng = np.random.default_rng([int(self.seed), 7])
            picks = []
            for c in known:
                r = t_rows[t_labels[t_rows] == c]
                if len(r) <= self.target_shots:
                    raise ValueError(
                        f"scenario.target_shots: class {c} has {len(r)} target samples, "
                        f"{self.target_shots} shots leave no query"
                    )
                picks.append(np.sort(rng.choice(r, self.target_shots, replace=False)))
            support = np.sort(np.concatenate(picks))
            t_rows = np.setdiff1d(t_rows, support)
        t_known = np.flatnonzero(np.isin(t_labels[t_rows], known))  # positions in t_rows of known samples
        names = tuple(str(src.classes[c]) for c in known + unknown)
        self._plan = {
            "src": src,
            "tgt_src": tgt_src,
            "t_data": t_data,
            "known": known,
            "unknown": unknown,
            "k": k,
            "mapping": torch.as_tensor(mapping),
            "s_train": s_train,
            "s_val": s_val,
            "t_rows": t_rows,
            "t_known": t_known,
            "support": support,
            "domains": domains,
            "names": names,
        }
        return self._plan

    def _build_dafsos(self, src, tgt_src) -> dict:
        n_cls = len(src.classes)
        order = sorted(range(n_cls), key=lambda c: str(src.classes[c]))
        n_train = int(self.meta_train_classes)
        meta_train, meta_test = order[:n_train], order[n_train:]
        if len(meta_test) < self.n_way + self.n_unknown:
            raise ValueError(
                f"scenario: {len(meta_test)} meta-test classes, n_way + n_unknown = "
                f"{self.n_way + self.n_unknown} needed"
            )
        if tgt_src is not None:
            if len(tgt_src.classes) != n_cls:
                raise ValueError(f"scenario.target: {len(tgt_src.classes)} classes, the source has {n_cls}")
            parts = {"all": [tgt_src.train, tgt_src.test], "train": [tgt_src.train], "test": [tgt_src.test]}
            t_data = concat([p for p in parts[self.target_split] if len(p)])
        else:
            t_data = src.test
        s_labels, t_labels = _labels(src.train), _labels(t_data)
        s_rows = first_per_class(s_labels, meta_train, self.source_per_class)
        s_train, s_val = stratified_split(s_labels, s_rows, float(self.val_fraction), int(self.split_seed))
        t_train_rows = first_per_class(t_labels, meta_train, self.target_per_class)
        t_test_rows = first_per_class(t_labels, meta_test, self.target_per_class)
        t_pool = np.full_like(t_labels, -1)
        t_pool[t_test_rows] = t_labels[t_test_rows]  # per-class caps apply to the episode pools too
        need = self.shots + self.queries
        for c in meta_test:
            if int((t_pool == c).sum()) < need:
                raise ValueError(
                    f"scenario: meta-test class {c} has {int((t_pool == c).sum())} target samples, "
                    f"shots + queries = {need} needed"
                )
        s_pool = np.full_like(s_labels, -1)
        if self.source_support_shots:
            s_test_rows = first_per_class(s_labels, meta_test, self.source_per_class)
            s_pool[s_test_rows] = s_labels[s_test_rows]
        src_map = np.full(n_cls, -1, dtype=np.int64)
        src_map[meta_train] = np.arange(n_train)
        num_classes = max(self.n_way + self.n_unknown, n_train)
        return {
            "src": src,
            "tgt_src": tgt_src,
            "t_data": t_data,
            "meta_train": meta_train,
            "meta_test": meta_test,
            "s_train": s_train,
            "s_val": s_val,
            "t_train_rows": t_train_rows,
            "t_pool": t_pool,
            "s_pool": s_pool,
            "src_map": torch.as_tensor(src_map),
            "num_classes": num_classes,
            "n_cls": n_cls,
            "episodes": {},
        }

    def episode(self, index: int) -> dict[str, np.ndarray]:
        """The index arrays of meta-test episode ``index`` (:func:`meta_test_episode`), cached."""
        plan = self._build()
        if index not in plan["episodes"]:
            plan["episodes"][index] = meta_test_episode(
                plan["t_pool"],
                plan["meta_test"],
                n_way=self.n_way,
                n_unknown=self.n_unknown,
                shots=self.shots,
                queries=self.queries,
                seed=int(self.seed),
                episode=index,
                source_labels=plan["s_pool"],
                source_shots=self.source_support_shots,
            )
        return plan["episodes"][index]

    def _episode_session(self, index: int) -> Session:
        plan = self._build()
        ep = self.episode(index)
        n, m = self.n_way, self.n_unknown
        local = np.full(plan["n_cls"], -1, dtype=np.int64)
        local[ep["known"]] = np.arange(n)
        local[ep["unknown"]] = n + np.arange(m)
        local_t = torch.as_tensor(local)
        target = plan["t_data"].relabel(local_t)
        support = target.subset(ep["support"])
        queries = target.subset(ep["query"])
        labeled = support
        if len(ep["source_support"]):
            labeled = _join(plan["src"].train.relabel(local_t).subset(ep["source_support"]), support)
        src_train = plan["src"].train.relabel(plan["src_map"])
        n_train = len(plan["meta_train"])
        t_train_map = torch.full((plan["n_cls"],), -1, dtype=torch.long)
        t_train_map[torch.as_tensor(plan["meta_train"])] = torch.arange(n_train)
        src = plan["src"]
        names = tuple(str(src.classes[c]) for c in [*ep["known"], *ep["unknown"]])
        names += tuple(f"unused_{i}" for i in range(len(names), plan["num_classes"]))
        known = tuple(range(n))
        counts = np.bincount(labeled.targets.numpy(), minlength=plan["num_classes"])
        classes = ClassInfo(
            num_classes=plan["num_classes"],
            seen=known,
            new=known,
            base=(),
            known=known,
            train_counts=tuple(int(c) for c in counts),
            names=names,
        )
        info: dict[str, Any] = {
            "protocol": "dafsos",
            "episode": index,
            "domain": f"episode_{index:04d}",
            "source": src_train.subset(plan["s_train"]),
            "source_validation": src_train.subset(plan["s_val"]),
            "target_train": plan["t_data"].relabel(t_train_map).subset(plan["t_train_rows"]),
            "num_source_classes": n_train,
            "known_original": [int(c) for c in ep["known"]],
            "unknown_original": [int(c) for c in ep["unknown"]],
            "num_support": len(labeled),
            "num_queries": len(queries),
        }
        options = {"known_classes": list(known), "unknown_classes": list(range(n, n + m)), "num_samples": len(queries)}
        eval_sets = {"episodes": EvalSet(data=queries, classes=(), task="open_set", options=options)}
        return Session(
            index=index,
            name=f"episode_{index:04d}",
            classes=classes,
            labeled=labeled,
            unlabeled=queries,
            validation=None,
            eval_sets=eval_sets,
            info=info,
        )

    # -- target domains ------------------------------------------------------------------------------------
    def _target(self, index: int):
        """Target data of domain ``index``, relabelled (corrupted copies cached per (name, severity, seed))."""
        plan = self._build()
        name, severity = plan["domains"][index]
        data = plan["t_data"]
        if self.corruptions is not None and name != "clean":
            key = (name, severity, int(self.seed))
            if key not in self._corrupted:
                if not isinstance(data, TensorData) or data.x.dtype != torch.uint8 or data.x.dim() != 4:
                    raise ValueError("scenario.corruptions: needs an in-memory uint8 image source (e.g. cifar10)")
                rng = np.random.default_rng(int(self.seed) * 1000 + index)
                x = data.x.numpy()
                nchw = x.shape[1] in (1, 3)
                out = corrupt(x, name, severity, rng, layout="NCHW" if nchw else "NHWC")
                self._corrupted[key] = TensorData(
                    torch.from_numpy(out), data.targets, data.transforms, f"{data.name}@{name}:{severity}"
                )
            data = self._corrupted[key]
        return data.relabel(plan["mapping"])

    def domain_name(self, index: int) -> str:
        name, severity = self._build()["domains"][index]
        return name if severity <= 0 else f"{name}_s{severity}"

    # -- Scenario API ------------------------------------------------------------------------------------
    @property
    def episodic(self) -> bool:
        return self.protocol == "dafsos"

    @property
    def num_sessions(self) -> int:
        if self.protocol == "dafsos":
            return int(self.episodes)
        return len(self.corruptions) if self.corruptions is not None else 1

    @property
    def num_classes(self) -> int:
        plan = self._build()
        if self.protocol == "dafsos":
            return plan["num_classes"]
        return plan["k"] + len(plan["unknown"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        plan = self._build()
        train = plan["src"].train
        if hasattr(train, "x"):
            x = train.x[:1]
            if train.transforms is not None:
                x = train.transforms.test(x)
            return tuple(int(s) for s in x.shape[1:])
        return tuple(int(s) for s in np.asarray(train[0][0]).shape)

    def sessions(self) -> Iterator[Session]:
        for i in range(self.num_sessions):
            yield self.session(i)

    def session(self, index: int) -> Session:
        plan = self._build()
        if not 0 <= index < self.num_sessions:
            raise IndexError(f"scenario has {self.num_sessions} sessions, asked for {index}")
        if self.protocol == "dafsos":
            return self._episode_session(index)
        k, n_unk = plan["k"], len(plan["unknown"])
        src_train = plan["src"].train.relabel(plan["mapping"])
        labeled = src_train.subset(plan["s_train"])
        validation = src_train.subset(plan["s_val"])
        target = self._target(index)
        queries = target.subset(plan["t_rows"])
        # the known-class part of the scored target set, same rows in the same order (one root with
        # `queries`, so the runner's feature cache serves both)
        queries_known = target.subset(plan["t_rows"][plan["t_known"]])
        info: dict[str, Any] = {
            "domain": self.domain_name(index),
            "num_source": len(labeled),
            "num_validation": len(validation),
            "num_target": len(queries),
            "num_target_known": len(queries_known),
        }
        if len(plan["support"]):
            shots = target.subset(plan["support"])
            info["target_support"] = shots
            info["num_target_support"] = len(shots)
            labeled = _join(labeled, shots)
        known = tuple(range(k))
        counts = np.bincount(labeled.targets.numpy(), minlength=k + n_unk)
        classes = ClassInfo(
            num_classes=k + n_unk,
            seen=known,
            new=known if index == 0 else (),
            base=known,
            known=known,
            train_counts=tuple(int(c) for c in counts),
            names=plan["names"],
        )
        options = {
            "known_classes": list(known),
            "unknown_classes": list(range(k, k + n_unk)),
            "num_samples": len(queries),
        }
        eval_sets = {
            "target": EvalSet(data=queries, classes=(), task="open_set", options=options),
            # card §8: closed-set classification of the known-class target samples over the known
            # classes (metrics.md §3: acc, acc_balanced, top-k, per_class_acc; acc = target's closed_acc)
            "target_known": EvalSet(data=queries_known, classes=known),
            "source_val": EvalSet(data=validation, classes=known),
        }
        return Session(
            index=index,
            name=self.domain_name(index),
            classes=classes,
            labeled=labeled,
            unlabeled=queries,
            validation=validation,
            eval_sets=eval_sets,
            info=info,
        )

    def describe(self) -> dict[str, Any]:
        plan = self._build()
        src = plan["src"]
        if self.protocol == "dafsos":
            eps = [self.episode(i) for i in range(self.num_sessions)]
            return _jsonable(
                {
                    "kind": self.kind,
                    "params": self.get_params(),
                    "source": {
                        "name": src.name,
                        "num_train": len(src.train),
                        "num_test": len(src.test),
                        "info": src.info,
                    },
                    "target_source": None
                    if plan["tgt_src"] is None
                    else {"name": plan["tgt_src"].name, "info": plan["tgt_src"].info},
                    "meta_train_classes": plan["meta_train"],
                    "meta_test_classes": plan["meta_test"],
                    "class_names": [str(c) for c in src.classes],
                    "num_classes": plan["num_classes"],
                    "source_train_hash": hash_indices(plan["s_train"]),
                    "source_val_hash": hash_indices(plan["s_val"]),
                    "target_train_hash": hash_indices(plan["t_train_rows"]),
                    "episodes_support_hash": hash_indices(np.concatenate([e["support"] for e in eps])),
                    "episodes_query_hash": hash_indices(np.concatenate([e["query"] for e in eps])),
                    "episodes_source_support_hash": hash_indices(np.concatenate([e["source_support"] for e in eps])),
                    "sizes": {
                        "source_train": len(plan["s_train"]),
                        "source_val": len(plan["s_val"]),
                        "target_train": len(plan["t_train_rows"]),
                        "episodes": len(eps),
                        "support": self.n_way * self.shots,
                        "queries": (self.n_way + self.n_unknown) * self.queries,
                    },
                }
            )
        t_labels = _labels(plan["t_data"])[plan["t_rows"]]
        return _jsonable(
            {
                "kind": self.kind,
                "params": self.get_params(),
                "source": {"name": src.name, "num_train": len(src.train), "num_test": len(src.test), "info": src.info},
                "target_source": None
                if plan["tgt_src"] is None
                else {"name": plan["tgt_src"].name, "info": plan["tgt_src"].info},
                "known_classes": plan["known"],
                "unknown_classes": plan["unknown"],
                "class_names": list(plan["names"]),
                "domains": [self.domain_name(i) for i in range(self.num_sessions)],
                "source_train_hash": hash_indices(plan["s_train"]),
                "source_val_hash": hash_indices(plan["s_val"]),
                "target_hash": hash_indices(plan["t_rows"]),
                "target_support_hash": hash_indices(plan["support"]),
                "sizes": {
                    "source_train": len(plan["s_train"]),
                    "source_val": len(plan["s_val"]),
                    "target": len(plan["t_rows"]),
                    "target_known": int((np.isin(t_labels, plan["known"])).sum()),
                    "target_support": len(plan["support"]),
                },
            }
        )
