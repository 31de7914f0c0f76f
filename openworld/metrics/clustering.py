"""Clustering metrics for category discovery (``specs/metrics.md`` §6, ``specs/gcd-ncd.md`` §5).

Pure functions on 1-D integer label arrays, all computed from one count matrix ``w[ŷ, y]`` built by a
vectorised scatter-add (``np.bincount`` on the flat index ``ŷ·D + y``), never a per-sample loop:

* :func:`cluster_accuracy` — Hungarian accuracy ``v2`` (one global assignment, SimGCD
  ``split_cluster_acc_v2``), ``v2b`` (same assignment, per-class balanced) and ``v1`` (separate
  assignments for the old-class and new-class rows, GCD ``split_cluster_acc_v1``), split into
  All / Old / New by the **ground-truth** class.
* :func:`nmi` (arithmetic normalisation, scikit-learn's default) and :func:`ari`, from the same counts.

:class:`ClusteringEngine` (engine task ``"clustering"``) streams predictions into a device-resident
int64 count matrix ``[K_true, K_pred+1]`` (one integer ``scatter_add_`` per batch, no host sync) and
runs one ``scipy.optimize.linear_sum_assignment`` on the small matrix per evaluation. Options:

* ``head_offset`` (NCD task-aware evaluation, card §1.4): the prediction is the argmax over the
  logit columns ``head_offset…`` only (the novel head, whatever its width K̂), reported as that column id.
* ``publish_assignment`` / ``use_assignment`` (card §1.5 ``inductive_mapping: from_transductive``): a
  shared :class:`SharedAssignment`; the engine of the transductive set stores its class→cluster
  assignment there at :meth:`ClusteringEngine.compute`, and the engine of the inductive set scores
  with that fixed assignment (:func:`cluster_accuracy_with_assignment`) instead of a fresh Hungarian.

:class:`HeadClassificationEngine` (engine task ``"head_classification"``) is plain classification on
a slice of the logit columns (NCD ``test_known`` when the novel head has K̂ ≠ K_new columns).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .classification import LOGITS_DETAIL, NonFiniteError, _nonfinite_rows_t
from .engine import register_engine

__all__ = [
    "VARIANTS",
    "ClusteringEngine",
    "HeadClassificationEngine",
    "SharedAssignment",
    "ari",
    "ari_from_counts",
    "assignment_from_counts",
    "cluster_accuracy",
    "cluster_accuracy_from_counts",
    "cluster_accuracy_with_assignment",
    "count_matrix",
    "hungarian_map",
    "nmi",
    "nmi_from_counts",
]

VARIANTS = ("v2", "v2b", "v1")
_NAN = float("nan")


def _as_int_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.size == 0:
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer ids, got dtype {a.dtype}")
    a = a.reshape(-1) if a.ndim == 0 else a
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(a.shape)}")
    if a.size and a.min() < 0:
        raise ValueError(f"{name} holds negative ids (min {int(a.min())}); discovery metrics need ids >= 0")
    return a.astype(np.int64, copy=False)


def count_matrix(y_true, y_pred) -> np.ndarray:
    """``w[i, j]`` = #samples with prediction i and true class j; shape D×D, ``D = max(ŷ, y) + 1``."""
    y = _as_int_array(y_true, "y_true")
    p = _as_int_array(y_pred, "y_pred")
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y.size} vs {p.size}")
    if y.size == 0:
        return np.zeros((0, 0), dtype=np.int64)
    d = int(max(y.max(), p.max())) + 1
    return np.bincount(p * d + y, minlength=d * d).reshape(d, d).astype(np.int64, copy=False)


def hungarian_map(w: np.ndarray) -> np.ndarray:
    """``m[j]`` = the cluster matched to true class j by ``linear_sum_assignment(w.max() - w)``.

    ``w`` is the square count matrix ``w[cluster, class]`` (SimGCD/GCD convention, scipy's tie-breaking).
    """
    w = np.asarray(w, dtype=np.int64)
    if w.size == 0:
        return np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(w.max() - w)
    m = np.full(w.shape[1], -1, dtype=np.int64)
    m[cols] = rows
    return m


def _old_mask(d: int, old_classes) -> np.ndarray:
    mask = np.zeros(d, dtype=bool)
    old = np.asarray(list(old_classes), dtype=np.int64).reshape(-1)
    if old.size and old.min() < 0:
        raise ValueError(f"old_classes holds negative ids: {sorted(set(old.tolist()))}")
    old = old[old < d]
    mask[old] = True
    return mask


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else _NAN


def _matched_count(w_sub: np.ndarray) -> int:
    """Optimal one-to-one matched count of a (possibly rectangular) count matrix."""
    if w_sub.size == 0:
        return 0
    rows, cols = linear_sum_assignment(w_sub, maximize=True)
    return int(w_sub[rows, cols].sum())


def cluster_accuracy_from_counts(w: np.ndarray, old_classes, variant: str = "v2") -> dict[str, float]:
    """:func:`cluster_accuracy` on a square count matrix ``w[cluster, class]``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown cluster-accuracy variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    w = np.asarray(w, dtype=np.int64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"count matrix must be square [D, D], got shape {tuple(w.shape)}")
    d = w.shape[0]
    support = w.sum(axis=0)  # n_j per true class
    present = support > 0
    old = _old_mask(d, old_classes)
    n_old, n_new = int(support[old].sum()), int(support[~old].sum())
    n = n_old + n_new
    if variant == "v1":
        hit_old = _matched_count(w[:, old & present])
        hit_new = _matched_count(w[:, ~old & present])
        return {"all": _div(hit_old + hit_new, n), "old": _div(hit_old, n_old), "new": _div(hit_new, n_new)}
    m = hungarian_map(w)
    hits = w[m, np.arange(d)] if d else np.zeros(0, dtype=np.int64)
    if variant == "v2":
        return {
            "all": _div(int(hits.sum()), n),
            "old": _div(int(hits[old].sum()), n_old),
            "new": _div(int(hits[~old].sum()), n_new),
        }
    acc = np.where(present, hits / np.maximum(support, 1), np.nan)  # v2b

    def mean(mask: np.ndarray) -> float:
        sel = mask & present
        return float(acc[sel].mean()) if sel.any() else _NAN

    return {"all": mean(np.ones(d, dtype=bool)), "old": mean(old), "new": mean(~old)}


def assignment_from_counts(w: np.ndarray, old_classes, variant: str = "v2") -> np.ndarray:
    """The class→cluster assignment behind :func:`cluster_accuracy_from_counts`: ``m[j]`` = the cluster
    matched to true class j (-1: none), for j < D.

    ``v2``/``v2b``: the one global Hungarian (:func:`hungarian_map`); ``v1``: the old-class columns and
    the new-class columns (classes with support) matched separately, as v1 scores them.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown cluster-accuracy variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    w = np.asarray(w, dtype=np.int64)
    d = w.shape[0]
    if variant != "v1":
        return hungarian_map(w)
    m = np.full(d, -1, dtype=np.int64)
    present = w.sum(axis=0) > 0
    old = _old_mask(d, old_classes)
    for cols in (np.flatnonzero(old & present), np.flatnonzero(~old & present)):
        if cols.size:
            rows, c = linear_sum_assignment(w[:, cols], maximize=True)
            m[cols[c]] = rows
    return m


def cluster_accuracy_with_assignment(w: np.ndarray, old_classes, assignment, variant: str = "v2") -> dict[str, float]:
    """Cluster accuracy of the count matrix ``w[cluster, class]`` under a **fixed** assignment.

    ``assignment[j]`` = the cluster credited to true class j (e.g. computed on another set by
    :func:`assignment_from_counts`; card §1.5 ``from_transductive``). A class beyond the assignment,
    or assigned -1 or a cluster id absent from ``w``, scores no hit. ``v2``/``v1``: hits over rows;
    ``v2b``: mean per-class hit rate. Old/New by ground truth; NaN for an empty subset. With the
    assignment computed on ``w`` itself this equals :func:`cluster_accuracy_from_counts`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown cluster-accuracy variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    w = np.asarray(w, dtype=np.int64)
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"count matrix must be square [D, D], got shape {tuple(w.shape)}")
    d = w.shape[0]
    a = np.asarray(assignment, dtype=np.int64).reshape(-1)
    m = np.full(d, -1, dtype=np.int64)
    m[: min(d, a.size)] = a[:d]
    valid = (m >= 0) & (m < d)
    hits = np.zeros(d, dtype=np.int64)
    cols = np.flatnonzero(valid)
    hits[cols] = w[m[cols], cols]
    support = w.sum(axis=0)
    present = support > 0
    old = _old_mask(d, old_classes)
    n_old, n_new = int(support[old].sum()), int(support[~old].sum())
    if variant in ("v2", "v1"):
        return {
            "all": _div(int(hits.sum()), n_old + n_new),
            "old": _div(int(hits[old].sum()), n_old),
            "new": _div(int(hits[~old].sum()), n_new),
        }
    acc = np.where(present, hits / np.maximum(support, 1), np.nan)

    def mean(mask: np.ndarray) -> float:
        sel = mask & present
        return float(acc[sel].mean()) if sel.any() else _NAN

    return {"all": mean(np.ones(d, dtype=bool)), "old": mean(old), "new": mean(~old)}


class SharedAssignment:
    """Holds the class→cluster assignments of one transductive eval set, per variant, for reuse on
    another eval set (card §1.5 ``inductive_mapping: from_transductive``).

    Created by the scenario once per session and passed in both eval sets' engine options (the
    runner scores eval sets in the order the session lists them, the transductive one first).
    """

    def __init__(self, source: str = "unlabelled"):
        self.source = source
        self.assignments: dict[str, np.ndarray] = {}

    def get(self, variant: str) -> np.ndarray:
        if variant not in self.assignments:
            raise RuntimeError(
                f"inductive_mapping 'from_transductive': no {variant} assignment from eval set {self.source!r} yet; "
                f"that set must be scored before the sets that reuse its assignment"
            )
        return self.assignments[variant]

    def __repr__(self) -> str:
        return f"SharedAssignment(source={self.source!r}, variants={sorted(self.assignments)})"


def cluster_accuracy(y_true, y_pred, old_classes: Sequence[int], variant: str = "v2") -> dict[str, float]:
    """Hungarian clustering accuracy ``{"all", "old", "new"}`` (fractions; NaN for an empty subset).

    ``y_true``/``y_pred``: 1-D integer tensors or arrays (cluster ids need not be < K: the count
    matrix is ``D×D`` with ``D = max(ŷ, y) + 1``). ``old_classes``: the labelled (known) class ids;
    Old/New membership comes from the ground-truth class. ``variant``: ``"v2"`` (default), ``"v2b"``
    or ``"v1"`` (``specs/metrics.md`` §6).
    """
    return cluster_accuracy_from_counts(count_matrix(y_true, y_pred), old_classes, variant)


def _entropy(counts: np.ndarray, n: int) -> float:
    c = counts[counts > 0].astype(np.float64)
    return float(-(c / n * (np.log(c) - math.log(n))).sum())


def nmi_from_counts(w: np.ndarray) -> float:
    """NMI with arithmetic normalisation, from a contingency matrix (any orientation)."""
    w = np.asarray(w, dtype=np.int64)
    n = int(w.sum())
    if n == 0:
        return _NAN
    a, b = w.sum(axis=1), w.sum(axis=0)
    ha, hb = _entropy(a, n), _entropy(b, n)
    if (a > 0).sum() == 1 and (b > 0).sum() == 1 or (ha == 0 and hb == 0):
        return 1.0
    nz = np.nonzero(w)
    nij = w[nz].astype(np.float64)
    mi = float((nij / n * (np.log(nij) + math.log(n) - np.log(a[nz[0]]) - np.log(b[nz[1]]))).sum())
    mi = max(mi, 0.0)
    denom = (ha + hb) / 2.0
    return float(mi / denom) if denom > 0 else 1.0


def _comb2(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x * (x - 1.0) / 2.0


def ari_from_counts(w: np.ndarray) -> float:
    """Adjusted Rand index from a contingency matrix (1 when N < 2 or the denominator is 0)."""
    w = np.asarray(w, dtype=np.int64)
    n = int(w.sum())
    if n == 0:
        return _NAN
    if n < 2:
        return 1.0
    sum_ij = float(_comb2(w[w > 0]).sum())
    sum_a = float(_comb2(w.sum(axis=1)).sum())
    sum_b = float(_comb2(w.sum(axis=0)).sum())
    expected = sum_a * sum_b / (n * (n - 1) / 2.0)
    denom = 0.5 * (sum_a + sum_b) - expected
    if denom == 0:
        return 1.0
    return float((sum_ij - expected) / denom)


def nmi(y_true, y_pred) -> float:
    """Normalized mutual information (arithmetic mean normalisation = scikit-learn's default)."""
    return nmi_from_counts(count_matrix(y_true, y_pred))


def ari(y_true, y_pred) -> float:
    """Adjusted Rand index (= ``sklearn.metrics.adjusted_rand_score``)."""
    return ari_from_counts(count_matrix(y_true, y_pred))


@register_engine("clustering")
class ClusteringEngine:
    """Streaming Hungarian accuracy / NMI / ARI for one discovery eval set.

    Args:
        num_classes: K_true; labels outside ``0…K_true-1`` (e.g. -1) go to a trash bin.
        device: where the counts live.
        old_classes: the known (labelled) class ids; Old/New split by ground truth.
        num_clusters: K_pred, the width of the count matrix. ``None``: taken from the width of the
            first ``logits`` observed (a host integer: no sync). Cluster ids ``>= K_pred`` are
            counted in an overflow column and make :meth:`compute` raise.
        variants: which Hungarian variants to report (``"v2"`` always; add ``"v2b"``, ``"v1"``).
        mode: ``"gcd"`` → ``all_v2``, ``old_v2``, ``new_v2`` (+ variants), ``acc`` (= ``all_v2``),
            ``nmi``, ``ari``;
            ``"ncd"`` → ``acc`` (one Hungarian over the eval set, micro), ``nmi``, ``ari``.
        head_offset: if > 0, the cluster id is ``head_offset + argmax(logits[:, head_offset:])`` (NCD
            task-aware evaluation over the novel head, of any width).
        publish_assignment: a :class:`SharedAssignment` that receives this set's assignment (per
            variant) at every :meth:`compute`.
        use_assignment: a :class:`SharedAssignment` whose assignment replaces the fresh Hungarian
            (``inductive_mapping: from_transductive``); NMI/ARI need no assignment and are unchanged.

    Selection diagnostics: when :meth:`observe` gets a ``selected`` mask (a strategy's pseudo-label
    rule, e.g. LegoGCD's LER selection on inputs treated as unlabelled), :meth:`compute` adds
    ``sel_rate`` (selected / labelled-valid samples), ``sel_old`` (selected samples whose true class is
    old: the released code's "true selections") and ``sel_correct`` (selected samples whose predicted
    class equals the true class). Labels stay in the evaluator (card pitfall 1).

    Keys are the ``specs/metrics.md`` §10 names. ``confusion()``/``per_class()`` return ``None``
    (clusters are not classes); :meth:`counts` gives the raw ``[K_true, K_pred]`` matrix.
    """

    scores_selection = True  # observe() takes a strategy's `selected` mask (runner contract)

    def __init__(
        self,
        num_classes: int,
        device: str | torch.device = "cpu",
        old_classes: Sequence[int] = (),
        num_clusters: int | None = None,
        variants: Sequence[str] = ("v2",),
        mode: str = "gcd",
        head_offset: int = 0,
        publish_assignment: SharedAssignment | None = None,
        use_assignment: SharedAssignment | None = None,
    ):
        k = int(num_classes)
        if k <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown cluster-accuracy variants {bad}; allowed: {', '.join(VARIANTS)}")
        if mode not in ("gcd", "ncd"):
            raise ValueError(f"clustering engine mode must be 'gcd' or 'ncd', got {mode!r}")
        old = [int(c) for c in old_classes]
        if any(c < 0 or c >= k for c in old):
            raise ValueError(f"old_classes must lie in 0…{k - 1}, got {old}")
        self.num_classes = k
        self.device = torch.device(device)
        self.old_classes = tuple(old)
        self.variants = tuple(dict.fromkeys(["v2", *variants]))
        self.mode = mode
        if int(head_offset) < 0:
            raise ValueError(f"head_offset must be >= 0, got {head_offset}")
        self.head_offset = int(head_offset)
        self.publish_assignment = publish_assignment
        self.use_assignment = use_assignment
        self.num_clusters: int | None = None
        self._buf: torch.Tensor | None = None
        self._sel: torch.Tensor | None = None  # [valid, selected, selected ∧ old, selected ∧ correct]
        if num_clusters is not None:
            self._allocate(int(num_clusters))

    def _allocate(self, kp: int) -> None:
        if kp <= 0:
            raise ValueError(f"num_clusters must be positive, got {kp}")
        self.num_clusters = kp
        # counts [K_true × (K_pred + 1)], one slot for invalid labels, then (bad logit rows, rows checked)
        self._buf = torch.zeros(self.num_classes * (kp + 1) + 3, dtype=torch.int64, device=self.device)

    def update(self, preds: torch.Tensor, targets) -> None:
        """Add one batch of cluster ids ``preds`` [B] and true labels ``targets`` [B] (no host sync)."""
        if self._buf is None:
            raise RuntimeError("ClusteringEngine: num_clusters unknown; pass it or call observe(logits, …) first")
        k, kp = self.num_classes, self.num_clusters
        y = torch.as_tensor(targets, device=self.device).reshape(-1).long()
        p = torch.as_tensor(preds, device=self.device).reshape(-1).long()
        if y.shape != p.shape:
            raise ValueError(f"targets and predictions differ in length: {y.numel()} vs {p.numel()}")
        yv = (y >= 0) & (y < k)
        pc = torch.where((p >= 0) & (p < kp), p, kp)
        idx = torch.where(yv, y.clamp(0, k - 1) * (kp + 1) + pc, k * (kp + 1))
        self._buf.scatter_add_(0, idx, torch.ones_like(idx))

    def observe(
        self,
        logits: torch.Tensor,
        targets,
        unknown_score: torch.Tensor | None = None,
        selected: torch.Tensor | None = None,
    ) -> None:
        """Cluster id = ``argmax`` of ``logits`` [B, K_pred] (or 1-D integer ids given directly);
        ``selected``: optional [B] bool mask counted by the selection diagnostics."""
        if logits.dim() == 1 and not logits.is_floating_point():
            preds = logits
        else:
            if self._buf is None:
                self._allocate(int(logits.shape[1]))
            off = self.head_offset
            if off:
                if logits.shape[1] <= off:
                    raise ValueError(f"ClusteringEngine: head_offset {off} leaves no logit column of {logits.shape[1]}")
                preds = logits[:, off:].argmax(1) + off
            else:
                preds = logits.argmax(1)
            # rows with a valid label whose logits are unusable (NaN, +inf, all -inf): counted, no sync
            y = torch.as_tensor(targets, device=self.device).reshape(-1).long()
            valid = (y >= 0) & (y < self.num_classes)
            bad = _nonfinite_rows_t(logits[:, off:].to(self.device)) & valid
            self._buf[-2:] += torch.stack([bad.sum(), valid.sum()])
        if self._buf is None:
            raise RuntimeError("ClusteringEngine: num_clusters unknown for integer predictions; pass num_clusters")
        self.update(preds, targets)
        if selected is not None:
            self._count_selected(preds, targets, selected)

    def _count_selected(self, preds: torch.Tensor, targets, selected: torch.Tensor) -> None:
        y = torch.as_tensor(targets, device=self.device).reshape(-1).long()
        sel = torch.as_tensor(selected, device=self.device).reshape(-1).bool()
        if sel.shape != y.shape:
            raise ValueError(f"selected mask and targets differ in length: {sel.numel()} vs {y.numel()}")
        valid = (y >= 0) & (y < self.num_classes)
        old = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        if self.old_classes:
            old[list(self.old_classes)] = True
        is_old = old[y.clamp(0, self.num_classes - 1)] & valid
        s = sel & valid
        batch = torch.stack([valid.sum(), s.sum(), (s & is_old).sum(), (s & (preds.reshape(-1) == y)).sum()])
        self._sel = batch if self._sel is None else self._sel + batch

    def counts(self) -> torch.Tensor:
        """``[K_true, K_pred + 1]`` int64 counts on the CPU (last column: cluster ids out of range)."""
        if self._buf is None:
            return torch.zeros(self.num_classes, 1, dtype=torch.int64)
        kp = self.num_clusters
        return self._buf[: self.num_classes * (kp + 1)].view(self.num_classes, kp + 1).cpu()

    def square_counts(self) -> np.ndarray:
        """``w[cluster, class]`` cut/zero-padded to D×D, D = 1 + the largest id that has a sample.

        Raises :class:`NonFiniteError` when logits given to :meth:`observe` had unusable rows."""
        if self._buf is None:
            cmc = self.counts().numpy()
        else:
            host = self._buf.cpu()  # the one host transfer: counts and the non-finite tally
            bad, checked = int(host[-2]), int(host[-1])
            if bad:
                raise NonFiniteError("logits", bad, checked, LOGITS_DETAIL)
            kp = self.num_clusters
            cmc = host[: self.num_classes * (kp + 1)].view(self.num_classes, kp + 1).numpy()
        if cmc.shape[1] > 1 and cmc[:, -1].any():
            raise ValueError(
                f"clustering metrics: {int(cmc[:, -1].sum())} predictions are cluster ids outside "
                f"0…{self.num_clusters - 1}; discovery metrics are undefined for them"
            )
        w = cmc[:, :-1].T  # [K_pred, K_true]
        rows = np.flatnonzero(w.sum(axis=1))
        cols = np.flatnonzero(w.sum(axis=0))
        d = int(max(rows.max(initial=-1), cols.max(initial=-1))) + 1
        out = np.zeros((d, d), dtype=np.int64)
        r, c = min(d, w.shape[0]), min(d, w.shape[1])
        out[:r, :c] = w[:r, :c]
        return out

    def _accuracy(self, w: np.ndarray, old_classes, variant: str) -> dict[str, float]:
        if self.publish_assignment is not None:
            self.publish_assignment.assignments[variant] = assignment_from_counts(w, old_classes, variant)
        if not w.size:
            return {"all": _NAN, "old": _NAN, "new": _NAN}
        if self.use_assignment is not None:
            return cluster_accuracy_with_assignment(w, old_classes, self.use_assignment.get(variant), variant)
        return cluster_accuracy_from_counts(w, old_classes, variant)

    def compute(self) -> dict[str, float]:
        w = self.square_counts()
        if self.mode == "ncd":
            acc = self._accuracy(w, (), "v2")["all"]
            return {"acc": acc, "nmi": nmi_from_counts(w), "ari": ari_from_counts(w)}
        out: dict[str, float] = {}
        for v in self.variants:
            r = self._accuracy(w, self.old_classes, v)
            out.update({f"all_{v}": r["all"], f"old_{v}": r["old"], f"new_{v}": r["new"]})
        out["acc"] = out["all_v2"]  # the single-Hungarian micro accuracy (UNO/NCD key; = all_v2)
        out["nmi"] = nmi_from_counts(w)
        out["ari"] = ari_from_counts(w)
        out.update(self._selection_metrics())
        return out

    def _selection_metrics(self) -> dict[str, float]:
        if self._sel is None:
            return {}
        valid, sel, sel_old, sel_correct = (int(v) for v in self._sel.cpu())
        return {
            "sel_rate": sel / valid if valid else _NAN,
            "sel_old": sel_old / sel if sel else _NAN,
            "sel_correct": sel_correct / sel if sel else _NAN,
        }

    def confusion(self):
        return None

    def per_class(self):
        return None

    def reset(self) -> None:
        if self._buf is not None:
            self._buf.zero_()


@register_engine("head_classification")
class HeadClassificationEngine:
    """Classification accuracy on a slice ``[start, stop)`` of the logit columns, classes relabelled
    ``c - start`` (NCD ``test_known``: the known-class head ``0…K_old-1`` of a model whose novel head
    has K̂ columns, card §1.4/§2.7). Keys as the classification engine's (``acc``, ``acc_balanced``).

    Args: ``num_classes`` (the scenario's K, unused beyond validation), ``device``, ``head`` =
    ``(start, stop)``; further keyword arguments go to :class:`~openworld.metrics.engine.MetricsEngine`
    (default: no top-k, no batch-mean chunks).
    """

    def __init__(
        self,
        num_classes: int,
        device: str | torch.device = "cpu",
        head: Sequence[int] = (0, 1),
        topk: Sequence[int] = (),
        chunk_size: int | None = None,
        **kwargs,
    ):
        from .engine import MetricsEngine

        start, stop = (int(v) for v in head)
        if not 0 <= start < stop <= int(num_classes):
            raise ValueError(f"head must satisfy 0 <= start < stop <= {num_classes}, got {list(head)}")
        self.start, self.stop = start, stop
        self.inner = MetricsEngine(stop - start, device, topk=topk, chunk_size=chunk_size, **kwargs)

    def observe(self, logits: torch.Tensor, targets, unknown_score: torch.Tensor | None = None) -> None:
        if logits.shape[1] < self.stop:
            raise ValueError(f"head_classification: {logits.shape[1]} logit columns, the head needs {self.stop}")
        y = torch.as_tensor(targets, device=logits.device).reshape(-1).long()
        y = torch.where((y >= self.start) & (y < self.stop), y - self.start, torch.full_like(y, -1))
        self.inner.observe(logits[:, self.start : self.stop], y)

    def compute(self) -> dict[str, float]:
        return self.inner.compute()

    def confusion(self):
        return self.inner.confusion()

    def per_class(self):
        return self.inner.per_class()

    def reset(self) -> None:
        self.inner.reset()
