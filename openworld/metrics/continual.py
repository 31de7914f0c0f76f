"""Continual-learning metrics: FSCIL per session and per run (spec §5), CIL accuracy matrix (spec §4).

All values are fractions (or differences of fractions); the formulas are linear, so percentages in
give percentages out. Undefined values are NaN.

**Accuracy matrix.** ``acc_matrix`` is R with ``R[t][j]`` (j <= t) the accuracy on task j's test
samples after session t. It may be a ragged list of rows (``[[90], [80, 85], …]``) or a T×T (or
wider) array; entries above the diagonal are ignored, so they may be NaN or future-task values. The
CIL functions evaluate at the **last row** t = T-1: pass ``R[:t+1]`` for an earlier session (the
:class:`~openworld.metrics.engine.History` does this for the running values).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .classification import (
    _as_counts,
    accuracy,
    balanced_accuracy,
    group_mean_accuracy,
    group_micro_accuracy,
    harmonic_mean,
)

__all__ = [
    "acc_a_triangle",
    "aia",
    "aia_tasks",
    "average_accuracy",
    "average_session_accuracy",
    "batch_mean_accuracy",
    "bwt",
    "cil_running_metrics",
    "forgetting",
    "fscil_run_metrics",
    "fscil_session_metrics",
    "fwt",
    "performance_drop",
    "pooled_accuracy",
    "task_accuracies",
]

FORGETTING_VARIANTS = ("max", "mammoth", "first_last")
BWT_VARIANTS = ("default", "all_pairs")


# -- FSCIL (spec §5) ---------------------------------------------------------------------------------


def _class_list(classes: int | Sequence[int]) -> list[int]:
    if isinstance(classes, (int, np.integer)):
        return list(range(int(classes)))
    return [int(c) for c in classes]


def fscil_session_metrics(
    cmx, base_classes: int | Sequence[int], novel_classes: Sequence[int] = ()
) -> dict[str, float]:
    """One FSCIL session from its count matrix over the seen classes.

    ``base_classes``: the base class ids, or an int B meaning ``range(B)``. ``novel_classes``: every
    novel class seen so far (empty at session 0). Returns ``acc`` (micro), ``acc_balanced`` (mean
    recall over seen classes with support), ``acc_base``/``acc_novel`` (per-class means over the
    group, as in TEEN) and ``hm`` = H(acc_base, acc_novel); ``acc_novel`` and ``hm`` are NaN when
    there is no novel class (or none with a test sample).
    """
    t = _as_counts(cmx)
    base = _class_list(base_classes)
    novel = _class_list(novel_classes)
    acc_base = group_mean_accuracy(t, base)
    acc_novel = group_mean_accuracy(t, novel) if novel else math.nan
    return {
        "acc": accuracy(t),
        "acc_balanced": balanced_accuracy(t),
        "acc_base": acc_base,
        "acc_novel": acc_novel,
        "hm": harmonic_mean(acc_base, acc_novel),
    }


def _as_1d_float(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def performance_drop(accs: Sequence[float]) -> float:
    """PD = acc_0 − acc_{S−1} (0 after one session; NaN for no session)."""
    a = _as_1d_float(accs, "accs")
    return float(a[0] - a[-1]) if a.size else math.nan


def average_session_accuracy(accs: Sequence[float]) -> float:
    """AVG = (1/S) Σ_i acc_i (NaN for no session)."""
    a = _as_1d_float(accs, "accs")
    return float(a.mean()) if a.size else math.nan


def fscil_run_metrics(accs: Sequence[float]) -> dict[str, float]:
    """The running FSCIL run metrics ``pd``, ``avg``, ``last`` from session accuracies so far."""
    a = _as_1d_float(accs, "accs")
    return {
        "pd": performance_drop(a),
        "avg": average_session_accuracy(a),
        "last": float(a[-1]) if a.size else math.nan,
    }


def batch_mean_accuracy(correct_per_chunk: Sequence[int], chunk_sizes: Sequence[int]) -> float:
    """Unweighted mean of chunk accuracies (TEEN's batch-mean ``acc``; spec §5 compat).

    Chunks of size 0 are skipped; every other chunk, a short last one included, has equal weight.
    """
    c = _as_1d_float(correct_per_chunk, "correct_per_chunk")
    n = _as_1d_float(chunk_sizes, "chunk_sizes")
    if c.shape != n.shape:
        raise ValueError(f"correct_per_chunk and chunk_sizes differ in length: {c.size} vs {n.size}")
    keep = n > 0
    if not keep.any():
        return math.nan
    return float(np.mean(c[keep] / n[keep]))


# -- CIL accuracy matrix (spec §4) ---------------------------------------------------------------------


def _lower(acc_matrix) -> np.ndarray:
    """R as a float64 T×T array with NaN above the diagonal (ragged rows accepted)."""
    if hasattr(acc_matrix, "detach"):
        acc_matrix = acc_matrix.detach().cpu().numpy()
    if isinstance(acc_matrix, np.ndarray):
        a = acc_matrix.astype(np.float64)
        if a.ndim != 2 or a.shape[1] < a.shape[0]:
            raise ValueError(f"acc_matrix must be T×T (or wider), got shape {a.shape}")
        rows = [a[i, : i + 1] for i in range(a.shape[0])]
    else:
        rows = [np.asarray(r, dtype=np.float64).reshape(-1) for r in acc_matrix]
    t = len(rows)
    out = np.full((t, t), np.nan)
    for i, r in enumerate(rows):
        if r.size < i + 1:
            raise ValueError(f"acc_matrix row {i} needs at least {i + 1} entries (R[{i}][0…{i}]), got {r.size}")
        out[i, : i + 1] = r[: i + 1]
    return out


def pooled_accuracy(acc_matrix, task_sizes: Sequence[int]) -> float:
    """Pooled ``acc`` at the last row t: Σ_j n_j R[t][j] / Σ_j n_j over the tasks j <= t."""
    r = _lower(acc_matrix)
    if not len(r):
        return math.nan
    t = len(r) - 1
    n = _as_1d_float(task_sizes, "task_sizes")[: t + 1]
    if n.size < t + 1:
        raise ValueError(f"need {t + 1} task sizes, got {n.size}")
    return float((r[t, : t + 1] * n).sum() / n.sum())


def average_accuracy(acc_matrix) -> float:
    """A_t = (1/(t+1)) Σ_{j<=t} R[t][j] at the last row (``avg_acc_tasks``; GEM ACC, OVOR A_N)."""
    r = _lower(acc_matrix)
    if not len(r):
        return math.nan
    t = len(r) - 1
    return float(r[t, : t + 1].mean())


def aia(pooled_accs: Sequence[float]) -> float:
    """Average incremental accuracy (iCaRL): the mean of the pooled session accuracies acc_s."""
    return average_session_accuracy(pooled_accs)


def aia_tasks(acc_matrix) -> float:
    """(1/(t+1)) Σ_{s<=t} A_s: the mean of the per-task averages of every row (OVOR's Ā)."""
    r = _lower(acc_matrix)
    if not len(r):
        return math.nan
    return float(np.mean([r[s, : s + 1].mean() for s in range(len(r))]))


def acc_a_triangle(acc_matrix) -> float:
    """Mean of every lower-triangle entry R[s][j], j <= s <= t (Continuum ``accuracy_A``)."""
    r = _lower(acc_matrix)
    if not len(r):
        return math.nan
    return float(r[np.tril_indices(len(r))].mean())


def forgetting(acc_matrix, variant: str = "max") -> float:
    """Average forgetting F_t at the last row t (NaN for t = 0).

    - ``"max"`` (default; Chaudhry et al. 2018): (1/t) Σ_{j<t} [max_{l∈{j…t−1}} R[l][j] − R[t][j]].
    - ``"mammoth"``: the max runs over l ∈ {j…t}, so each term is >= 0.
    - ``"first_last"`` (Avalanche): (1/t) Σ_{j<t} (R[j][j] − R[t][j]).
    """
    if variant not in FORGETTING_VARIANTS:
        raise ValueError(f"forgetting variant must be one of {FORGETTING_VARIANTS}, got {variant!r}")
    r = _lower(acc_matrix)
    t = len(r) - 1
    if t < 1:
        return math.nan
    terms = []
    for j in range(t):
        if variant == "max":
            ref = r[j:t, j].max()
        elif variant == "mammoth":
            ref = r[j : t + 1, j].max()
        else:
            ref = r[j, j]
        terms.append(ref - r[t, j])
    return float(np.mean(terms))


def bwt(acc_matrix, variant: str = "default") -> float:
    """Backward transfer at the last row t (NaN for t = 0).

    - ``"default"`` (GEM): (1/t) Σ_{j<t} (R[t][j] − R[j][j]) = −forgetting(first_last).
    - ``"all_pairs"`` (Continuum): mean over all pairs j < i <= t of (R[i][j] − R[j][j]).
    """
    if variant not in BWT_VARIANTS:
        raise ValueError(f"bwt variant must be one of {BWT_VARIANTS}, got {variant!r}")
    r = _lower(acc_matrix)
    t = len(r) - 1
    if t < 1:
        return math.nan
    if variant == "default":
        return float(np.mean([r[t, j] - r[j, j] for j in range(t)]))
    return float(np.mean([r[i, j] - r[j, j] for i in range(1, t + 1) for j in range(i)]))


def fwt(R_future, b) -> float:
    """Forward transfer (1/t) Σ_{i=1..t} (R[i−1][i] − b_i).

    ``R_future``: either a 2-D matrix whose super-diagonal R[i−1][i] is read for every i it holds
    (i = 1…min(rows, cols−1)), or the 1-D sequence [R[0][1], R[1][2], …, R[t−1][t]].
    ``b``: the accuracy of the model at initialisation on each task: a scalar (same for every task),
    a sequence of length t aligned with the terms (b_1…b_t), or a per-task sequence b_0…b_T (b_0 is
    not used). NaN when t = 0 or a needed entry is NaN.
    """
    sup = _superdiagonal(R_future)
    t = sup.size
    if t == 0:
        return math.nan
    bb = np.asarray(b, dtype=np.float64)
    if bb.ndim == 0:
        bb = np.full(t, float(bb))
    elif bb.size == t:
        pass
    elif bb.size > t:
        bb = bb[1 : t + 1]
    else:
        raise ValueError(f"b must be a scalar or hold >= {t} values, got {bb.size}")
    return float(np.mean(sup - bb))


def _superdiagonal(R_future) -> np.ndarray:
    """[R[0][1], R[1][2], …] from a matrix / list of rows, or the values themselves when 1-D."""
    if hasattr(R_future, "detach"):
        R_future = R_future.detach().cpu().numpy()
    if isinstance(R_future, (list, tuple)) and R_future and all(np.ndim(r) == 1 for r in R_future):
        rows = [np.asarray(r, dtype=np.float64) for r in R_future]
    else:
        a = np.asarray(R_future, dtype=np.float64)
        if a.ndim == 1:
            return a
        if a.ndim != 2:
            raise ValueError(f"R_future must be 1-D or 2-D, got shape {a.shape}")
        rows = list(a)
    sup = []
    for i in range(1, len(rows) + 1):
        if rows[i - 1].size <= i:
            break
        sup.append(rows[i - 1][i])
    return np.asarray(sup, dtype=np.float64)


def task_accuracies(cmx, task_classes: Sequence[Sequence[int]]) -> list[float]:
    """One row of R from a single session's count matrix: R[t][j] for each task's class list C_j.

    R[t][j] = Σ_{c∈C_j} cm[c,c] / Σ_{c∈C_j} Σ_k cmx[c,k] (sample-weighted within the task; spec §4).
    """
    t = _as_counts(cmx)
    return [group_micro_accuracy(t, classes) for classes in task_classes]


def cil_running_metrics(acc_matrix, pooled_accs: Sequence[float] | None = None) -> dict[str, float]:
    """Every CIL metric defined at the last row t of R (names as in spec §10.1).

    ``avg_acc_tasks``, ``aia_tasks``, ``acc_A_triangle`` always; ``forgetting`` (+ ``_mammoth``,
    ``_first_last``) and ``bwt`` (+ ``_all_pairs``) from t >= 1; ``aia`` when pooled accuracies
    (one per session up to t) are given.
    """
    r = _lower(acc_matrix)
    out: dict[str, float] = {
        "avg_acc_tasks": average_accuracy(r),
        "aia_tasks": aia_tasks(r),
        "acc_A_triangle": acc_a_triangle(r),
    }
    if pooled_accs is not None:
        out["aia"] = aia(pooled_accs)
    if len(r) >= 2:
        out["forgetting"] = forgetting(r, "max")
        out["forgetting_mammoth"] = forgetting(r, "mammoth")
        out["forgetting_first_last"] = forgetting(r, "first_last")
        out["bwt"] = bwt(r, "default")
        out["bwt_all_pairs"] = bwt(r, "all_pairs")
    return out
