"""Long-tailed metrics (``specs/metrics.md`` §7): many / medium / few per-class means.

Groups come from the **training** counts n_c: many ``n > hi``, medium ``lo ≤ n ≤ hi``, few
``n < lo`` (SADE/MiSLAS ``(lo, hi) = (20, 100)``; configurable and recorded), or by rank (top / bottom
30 %). Each group value is the mean per-class accuracy over its classes **with test support** in the
evaluated set; an empty group is NaN. ``acc`` is micro top-1 on the set used and ``acc_balanced`` the
class mean. The engine :class:`LongTailEngine` (task ``"long_tail"``) streams exactly like the
classification engine (one integer scatter-add per batch, one host transfer at the end).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .classification import _as_counts, _masked_mean_t, _per_class_t, _support_t
from .engine import MetricsEngine, register_engine

__all__ = ["LongTailEngine", "long_tail_metrics", "shot_group_masks", "shot_group_means"]

GROUPS = ("many", "medium", "few")


def shot_group_masks(train_counts: Sequence[int], thresholds: Sequence[float] = (20, 100), mode: str = "thresholds",
                     rank_fraction: float = 0.3) -> dict[str, np.ndarray]:
    """Boolean masks [K] of the many / medium / few classes (see the module docstring)."""
    n = np.asarray(train_counts, dtype=np.float64).reshape(-1)
    if mode == "thresholds":
        if len(thresholds) != 2:
            raise ValueError(f"thresholds must be (low, high), got {thresholds!r}")
        lo, hi = (float(v) for v in thresholds)
        if lo > hi:
            raise ValueError(f"thresholds must be (low, high) with low <= high, got {tuple(thresholds)}")
        return {"many": n > hi, "medium": (n >= lo) & (n <= hi), "few": n < lo}
    if mode == "rank":
        order = np.argsort(-n, kind="stable")
        k = int(round(rank_fraction * len(n)))
        masks = {g: np.zeros(len(n), dtype=bool) for g in GROUPS}
        masks["many"][order[:k]] = True
        masks["medium"][order[k: len(n) - k]] = True
        masks["few"][order[len(n) - k:]] = True
        return masks
    raise ValueError(f"shot group mode must be 'thresholds' or 'rank', got {mode!r}")


def shot_group_means(per_class_acc: Sequence[float], train_counts: Sequence[int],
                     thresholds: Sequence[float] = (20, 100), mode: str = "thresholds",
                     rank_fraction: float = 0.3) -> dict[str, float]:
    """Mean of the per-class accuracies (NaN = class without test samples, skipped) per group.

    A group with no class that has a finite accuracy is NaN.
    """
    acc = np.asarray(per_class_acc, dtype=np.float64).reshape(-1)
    if len(acc) != len(train_counts):
        raise ValueError(f"{len(acc)} per-class accuracies but {len(train_counts)} training counts")
    out = {}
    for g, mask in shot_group_masks(train_counts, thresholds, mode, rank_fraction).items():
        vals = acc[mask & np.isfinite(acc)]
        out[g] = float(vals.mean()) if len(vals) else float("nan")
    return out


def long_tail_metrics(cmx, train_counts: Sequence[int], thresholds: Sequence[float] = (20, 100),
                      mode: str = "thresholds", rank_fraction: float = 0.3) -> dict[str, float]:
    """``acc``, ``acc_balanced``, ``many``, ``medium``, ``few`` from a count matrix ``cm`` [K, K] or
    ``cmx`` [K, K+1] (rows = true class)."""
    c = _as_counts(cmx)
    k = c.shape[0]
    if len(train_counts) != k:
        raise ValueError(f"train_counts has {len(train_counts)} entries for {k} classes")
    f64 = torch.float64
    n = c.sum().to(f64)
    diag = torch.diagonal(c[:, :k]).to(f64)
    support = c.sum(1).to(f64)
    pc = torch.where(support > 0, diag / support.clamp(min=1), torch.full_like(diag, float("nan")))
    acc = float(diag.sum() / n) if float(n) > 0 else float("nan")
    finite = pc[torch.isfinite(pc)]
    bal = float(finite.mean()) if len(finite) else float("nan")
    return {"acc": acc, "acc_balanced": bal,
            **shot_group_means(pc.tolist(), train_counts, thresholds, mode, rank_fraction)}


@register_engine("long_tail")
class LongTailEngine(MetricsEngine):
    """Streaming long-tail metrics for one eval set: ``acc``, ``acc_balanced``, ``many``, ``medium``,
    ``few`` (+ ``top<k>`` when asked) and per-class accuracy (:meth:`per_class`).

    Args:
        num_classes, device: as :class:`~openworld.metrics.engine.MetricsEngine`.
        train_counts: the **training** count per class (clean counts; the groups come from these).
        thresholds: ``(low, high)`` of the threshold rule (default ``(20, 100)``).
        shot_groups: ``"thresholds"`` (default) or ``"rank"``; ``rank_fraction`` for the latter.
        topk: top-k accuracies to add (default none).
    """

    def __init__(
        self,
        num_classes: int,
        device: str | torch.device = "cpu",
        train_counts: Sequence[int] | None = None,
        thresholds: Sequence[float] = (20, 100),
        shot_groups: str = "thresholds",
        rank_fraction: float = 0.3,
        topk: Sequence[int] = (),
        num_samples: int | None = None,
    ):
        if train_counts is None:
            raise ValueError("long_tail engine: train_counts (the training count per class) is required")
        if len(train_counts) != int(num_classes):
            raise ValueError(f"long_tail engine: {len(train_counts)} train_counts for {num_classes} classes")
        masks = shot_group_masks(train_counts, thresholds, shot_groups, rank_fraction)
        groups = {g: [int(c) for c in np.flatnonzero(m)] for g, m in masks.items()}
        super().__init__(num_classes, device, topk=topk, chunk_size=None, groups=groups, num_samples=num_samples)
        self.train_counts = [int(v) for v in train_counts]
        self.thresholds = tuple(float(v) for v in thresholds)
        self.shot_rule = shot_groups

    def metric_names(self) -> list[str]:
        return ["acc", "acc_balanced", *GROUPS] + [f"top{k}" for k in self.topk]

    def compute(self) -> dict[str, float]:
        cmx = self._cmx
        f64 = torch.float64
        n = cmx.sum().to(f64)
        diag = torch.diagonal(cmx[:, : self.num_classes]).to(f64)
        acc = diag.sum() / n
        support = (_support_t(cmx) > 0).to(f64)
        pc = _per_class_t(cmx)
        bal = _masked_mean_t(pc.unsqueeze(0), support.unsqueeze(0))[0]
        gvals = _masked_mean_t(pc.unsqueeze(0), self._gmask * support.unsqueeze(0))
        vals = [acc, bal, *gvals.unbind()]
        if self._nk:
            missing = self._aux[self._nk] > 0
            top = self._aux[: self._nk].to(f64) / n
            vals += list(torch.where(missing, torch.full_like(top, float("nan")), top).unbind())
        vals.append(n)
        vals += list(self._nonfinite_t().unbind())
        host = torch.stack([v.to(device=self.device, dtype=f64) for v in vals]).cpu().tolist()
        self._raise_nonfinite(host.pop(-2), host.pop())
        self.num_samples = int(host.pop())
        return dict(zip(self.metric_names(), host))
