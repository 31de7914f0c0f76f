"""Hyperparameter tuning without novel-class labels: hidden-class folds (card ``specs/gcd-ncd.md`` §2.6).

The K_old known classes are split into ``n_folds`` disjoint groups by a seeded permutation
(``RandomState(seed).permutation``, then ``array_split``; default 3 folds). In fold f the classes of
group f are **hidden**: their labelled samples join the unlabelled pool without labels, the other known
classes stay labelled, and the true novel classes (D_U) stay unlabelled. A candidate configuration is
trained on that split by the caller's ``fit_predict`` and scored by Hungarian accuracy (v2, one
assignment) on the hidden-class samples only, whose labels are D_L labels. Scores are averaged over
folds; the best configuration (the first one on ties) is returned, to be retrained on the full split.
Novel-class labels are never an input. It is the card's recommended way to choose δ, ε and β.

Everything is label-array based, so it serves the frozen-feature fast path (card §9 R4: ss-k-means or
an MLP on cached features) as well as full strategy runs built by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from openworld.metrics.clustering import cluster_accuracy

__all__ = ["FoldSplit", "TuningResult", "hidden_class_folds", "tune_hidden_classes"]


@dataclass(frozen=True)
class FoldSplit:
    """One hidden-class fold over the labelled set D_L (indices are positions in D_L).

    ``labels``: D_L's labels with every hidden-class entry replaced by -1 — what ``fit_predict`` may
    read. ``labelled``: rows that stay labelled. ``hidden_rows``: rows moved to the unlabelled pool.
    ``hidden``: the hidden class ids. ``known``: the classes that stay labelled.
    """

    fold: int
    hidden: tuple[int, ...]
    known: tuple[int, ...]
    labelled: np.ndarray
    hidden_rows: np.ndarray
    labels: np.ndarray


@dataclass
class TuningResult:
    best: Mapping[str, Any]
    best_index: int
    scores: list[float]  # mean hidden-class accuracy per candidate, in candidate order
    fold_scores: list[list[float]]  # [candidate][fold]
    folds: list[tuple[int, ...]] = field(default_factory=list)  # hidden classes per fold


def hidden_class_folds(
    y_labelled, n_folds: int = 3, seed: int = 0, known_classes: Sequence[int] | None = None
) -> list[FoldSplit]:
    """The card's §2.6 folds: the known classes (``known_classes``, default the labels present in
    ``y_labelled``, ascending) permuted by ``RandomState(seed)`` and split into ``n_folds`` groups
    (``np.array_split``, each group sorted)."""
    y = np.asarray(y_labelled, dtype=np.int64).reshape(-1)
    if (y < 0).any():
        raise ValueError("hidden_class_folds: y_labelled must hold the labels of D_L only (no -1)")
    known = sorted(int(c) for c in (np.unique(y) if known_classes is None else known_classes))
    if not 2 <= int(n_folds) <= len(known):
        raise ValueError(f"hidden_class_folds: n_folds must lie in 2…{len(known)} (the known classes), got {n_folds}")
    perm = np.asarray(known)[np.random.RandomState(int(seed)).permutation(len(known))]
    folds = []
    for f, group in enumerate(np.array_split(perm, int(n_folds))):
        hidden = tuple(sorted(int(c) for c in group))
        is_hidden = np.isin(y, hidden)
        labels = np.where(is_hidden, -1, y)
        folds.append(
            FoldSplit(
                fold=f,
                hidden=hidden,
                known=tuple(c for c in known if c not in hidden),
                labelled=np.flatnonzero(~is_hidden),
                hidden_rows=np.flatnonzero(is_hidden),
                labels=labels,
            )
        )
    return folds


def tune_hidden_classes(
    y_labelled,
    candidates: Sequence[Mapping[str, Any]],
    fit_predict: Callable[[Mapping[str, Any], FoldSplit], Any],
    *,
    n_folds: int = 3,
    seed: int = 0,
) -> TuningResult:
    """Choose among ``candidates`` by hidden-class folds (card §2.6).

    ``fit_predict(config, split)`` trains with ``config`` on the fold's split — labelled rows
    ``split.labelled`` with ``split.labels`` (hidden classes are -1 there), unlabelled pool = the rows
    ``split.hidden_rows`` plus the real D_U, which the caller closes over — and returns cluster ids
    (non-negative integers) for the ``split.hidden_rows``, in that order. The fold score is the v2
    Hungarian accuracy of those ids against the hidden rows' D_L labels; a candidate's score is the
    mean over folds. Returns the best candidate (first on ties) with every score.
    """
    if not candidates:
        raise ValueError("tune_hidden_classes: no candidate configurations")
    y = np.asarray(y_labelled, dtype=np.int64).reshape(-1)
    folds = hidden_class_folds(y, n_folds, seed)
    fold_scores: list[list[float]] = []
    for config in candidates:
        row = []
        for split in folds:
            pred = np.asarray(fit_predict(config, split), dtype=np.int64).reshape(-1)
            if pred.shape[0] != split.hidden_rows.shape[0]:
                raise ValueError(
                    f"fit_predict returned {pred.shape[0]} ids for {split.hidden_rows.shape[0]} hidden rows"
                )
            row.append(float(cluster_accuracy(y[split.hidden_rows], pred, old_classes=(), variant="v2")["all"]))
        fold_scores.append(row)
    scores = [float(np.mean(r)) for r in fold_scores]
    best = int(np.argmax(scores))
    return TuningResult(
        best=candidates[best], best_index=best, scores=scores, fold_scores=fold_scores, folds=[s.hidden for s in folds]
    )
