"""Classification metrics as pure functions (``specs/metrics.md`` §2.1, §2.2, §3).

Every function accepts 1-D integer tensors, numpy arrays or lists for labels and predictions, and
a count matrix ``cmx`` of shape ``[K, K+1]`` (rows = true class, the last column counts predictions
outside ``0…K-1``) or a plain ``[K, K]`` confusion matrix. Results are Python floats holding
fractions in [0, 1], NaN where the value is undefined (spec §1).

The ``_t`` helpers compute the same quantities as device tensors without leaving the device; the
streaming :class:`~openworld.metrics.engine.MetricsEngine` is built on them, so the one-shot
functions here and the engine share one implementation of every formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "NonFiniteError",
    "accuracy",
    "balanced_accuracy",
    "confusion_counts",
    "flat_confusion_index",
    "group_mean_accuracy",
    "group_micro_accuracy",
    "harmonic_mean",
    "per_class_accuracy",
    "target_rank",
    "topk_accuracy",
]


# -- errors ----------------------------------------------------------------------------------------

LOGITS_DETAIL = "NaN, +inf or all -inf"


class NonFiniteError(ValueError):
    """A strategy's outputs hold non-finite values, so the metrics would be silently wrong.

    Attributes:
        what: the offending input, e.g. ``"logits"`` or ``"unknown_score"``.
        rows: the number of (scored) rows holding a non-finite value.
        total: the number of (scored) rows seen.

    For logits a row is bad when it holds a NaN or a ``+inf``, or when every entry is ``-inf`` (no
    finite class score). Rows with some ``-inf`` entries are legitimate: the runner pads absent
    classes and masks classes outside the eval set with ``-inf``. For scores any NaN or ``±inf`` is
    bad. The message reads e.g. ``"non-finite logits in 2 of 3 rows (NaN, +inf or all -inf); the
    strategy produced invalid outputs"``.
    """

    def __init__(self, what: str, rows: int, total: int, detail: str = "NaN or inf",
                 note: str = "the strategy produced invalid outputs"):
        self.what, self.rows, self.total = str(what), int(rows), int(total)
        self.detail, self.note = str(detail), str(note)
        super().__init__(f"non-finite {self.what} in {self.rows} of {self.total} rows ({self.detail}); {self.note}")

    def __reduce__(self):  # picklable (the default would call __init__ with the message only)
        return type(self), (self.what, self.rows, self.total, self.detail, self.note)


def _nonfinite_rows_t(z: torch.Tensor) -> torch.Tensor:
    """Bool [N]: the row holds a NaN or ``+inf``, or has no finite entry (all ``-inf``).

    A 1-D input is a score per row: any NaN or ``±inf`` is bad. Element-wise, no host sync.
    """
    fin = torch.isfinite(z)
    if z.dim() == 1:
        return ~fin
    bad = (~(fin | (z == -math.inf))).any(dim=1)
    if z.shape[1]:
        bad = bad | ~fin.any(dim=1)
    return bad


def _raise_if_nonfinite_logits(z: torch.Tensor, rows: torch.Tensor | None = None,
                               note: str = "such rows cannot be ranked") -> None:
    """One-shot check (one read-back): :class:`NonFiniteError` for the bad rows among ``rows``."""
    bad = _nonfinite_rows_t(z)
    if rows is not None:
        bad = bad & rows
    nbad = int(bad.sum())
    if nbad:
        total = int(rows.sum()) if rows is not None else int(z.shape[0])
        raise NonFiniteError("logits", nbad, total, LOGITS_DETAIL, note)


# -- input conversion ------------------------------------------------------------------------------


def _as_long_1d(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A 1-D int64 tensor from a tensor, numpy array or sequence (no copy when already int64)."""
    if isinstance(x, torch.Tensor):
        t = x
    else:
        t = torch.as_tensor(np.asarray(x))
    if t.numel() == 0:
        t = t.long()
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    return t.long()


def _as_counts(cmx) -> torch.Tensor:
    """A 2-D count tensor ``[K, K+1]`` or ``[K, K]`` (any numeric dtype kept for the caller)."""
    t = cmx if isinstance(cmx, torch.Tensor) else torch.as_tensor(np.asarray(cmx))
    if t.dim() != 2 or t.shape[1] not in (t.shape[0], t.shape[0] + 1):
        raise ValueError(f"expected a count matrix of shape [K, K+1] or [K, K], got {tuple(t.shape)}")
    return t


# -- confusion counts (spec §2.1) --------------------------------------------------------------------


def flat_confusion_index(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Index of each sample in the flat buffer of length ``K(K+1)+1`` (spec §2.1).

    A valid label ``0 <= y < K`` goes to ``y*(K+1) + pc``, where ``pc`` is the prediction, or ``K``
    (the "outside" column) for a prediction outside ``0…K-1``; an invalid label (e.g. -1) goes to the
    trash bin ``K*(K+1)``. Pure element-wise ops: no host sync, no boolean indexing.
    """
    k = int(num_classes)
    valid = (y_true >= 0) & (y_true < k)
    pc = torch.where((y_pred >= 0) & (y_pred < k), y_pred, k)
    return torch.where(valid, y_true * (k + 1) + pc, k * (k + 1))


def confusion_counts(y_true, y_pred, num_classes: int) -> torch.Tensor:
    """Count matrix ``cmx`` [K, K+1] (int64; rows = true class, columns = prediction).

    Samples whose label is outside ``0…K-1`` (e.g. -1 for hidden labels) are ignored; a prediction
    outside ``0…K-1`` (a rejection) is counted in the last column, so it stays an error. The result
    lives on the device of ``y_true`` when that is a tensor, else on the CPU.
    """
    k = int(num_classes)
    if k <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    y = _as_long_1d(y_true, "y_true")
    p = _as_long_1d(y_pred, "y_pred", device=y.device)
    if y.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y.numel()} vs {p.numel()}")
    idx = flat_confusion_index(y, p, k)
    buf = torch.zeros(k * (k + 1) + 1, dtype=torch.int64, device=y.device)
    buf.scatter_add_(0, idx, torch.ones_like(idx))
    return buf[: k * (k + 1)].view(k, k + 1)


# -- tensor forms (stay on the device) ----------------------------------------------------------------


def _diag_t(cmx: torch.Tensor) -> torch.Tensor:
    k = cmx.shape[0]
    return torch.diagonal(cmx[:, :k]).to(torch.float64)


def _support_t(cmx: torch.Tensor) -> torch.Tensor:
    return cmx.sum(dim=1).to(torch.float64)


def _accuracy_t(cmx: torch.Tensor) -> torch.Tensor:
    """Micro accuracy: Σ_c cm[c,c] / Σ cmx (0-d float64; NaN when there is no sample)."""
    return _diag_t(cmx).sum() / cmx.sum().to(torch.float64)


def _per_class_t(cmx: torch.Tensor) -> torch.Tensor:
    """Per-class recall cm[c,c] / Σ_j cmx[c,j]; NaN (0/0) for rows without support."""
    return _diag_t(cmx) / _support_t(cmx)


def _masked_mean_t(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (float64 0/1, may be 2-D [G, K]); NaN for an empty mask."""
    v = torch.where(mask > 0, values, torch.zeros_like(values))
    return (v * mask).sum(dim=-1) / mask.sum(dim=-1)


def _balanced_t(cmx: torch.Tensor) -> torch.Tensor:
    """Mean per-class recall over classes with support > 0."""
    support = _support_t(cmx)
    return _masked_mean_t(_per_class_t(cmx), (support > 0).to(torch.float64))


def _harmonic_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2ab/(a+b), 0 when a+b == 0; NaN inputs propagate (NaN+x != 0)."""
    s = a + b
    return torch.where(s == 0, torch.zeros_like(s), 2 * a * b / torch.where(s == 0, torch.ones_like(s), s))


def target_rank(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Rank of the true class per sample (spec §2.2), int64 [N].

    ``rank_y = #{c: z_c > z_y} + #{c < y: z_c == z_y}``: exact ties go to the lower class id, as with
    ``torch.argmax``. A sample is top-k correct iff ``rank_y < k``. Labels outside ``0…C-1`` get an
    arbitrary rank; mask them yourself (the callers here do).

    Raises :class:`NonFiniteError` if a row holds a NaN or ``+inf`` or has no finite entry (a NaN row
    would otherwise get rank 0, a hit); rows with some ``-inf`` entries are fine. This check reads
    one count back to the host; the engine uses the unchecked device form.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    _raise_if_nonfinite_logits(logits)
    return _target_rank_t(logits, y)


def _target_rank_t(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`target_rank` without the finiteness check (device only, no sync)."""
    c = logits.shape[1]
    yc = y.clamp(0, max(c - 1, 0))
    zy = logits.gather(1, yc.unsqueeze(1))
    above = (logits > zy).sum(dim=1)
    cls = torch.arange(c, device=logits.device)
    tied_lower = ((logits == zy) & (cls.unsqueeze(0) < yc.unsqueeze(1))).sum(dim=1)
    return above + tied_lower


def _topk_hits_t(logits: torch.Tensor, y: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """Number of top-k correct samples per k in ``ks`` (int64 [len(ks)]), invalid labels excluded."""
    valid = (y >= 0) & (y < logits.shape[1])
    rank = _target_rank_t(logits, y)
    hits = (rank.unsqueeze(0) < ks.unsqueeze(1)) & valid.unsqueeze(0)
    return hits.sum(dim=1)


# -- public float forms ------------------------------------------------------------------------------


def accuracy(cmx) -> float:
    """Micro top-1 accuracy Σ_c cm[c,c] / N with N = Σ cmx (spec §3 ``acc``); NaN when N = 0."""
    return float(_accuracy_t(_as_counts(cmx)))


def per_class_accuracy(cmx) -> torch.Tensor:
    """Per-class recall (float64 tensor [K]); NaN for classes without a test sample."""
    return _per_class_t(_as_counts(cmx))


def balanced_accuracy(cmx) -> float:
    """Mean per-class recall over classes with support > 0 (= ``sklearn.balanced_accuracy_score``)."""
    return float(_balanced_t(_as_counts(cmx)))


def _class_mask(classes: Iterable[int], k: int, device) -> torch.Tensor:
    ids = [int(c) for c in (classes.tolist() if isinstance(classes, (torch.Tensor, np.ndarray)) else classes)]
    bad = [c for c in ids if not 0 <= c < k]
    if bad:
        raise ValueError(f"class ids {bad[:5]} are outside 0…{k - 1}")
    mask = torch.zeros(k, dtype=torch.float64, device=device)
    if ids:
        mask[torch.as_tensor(ids, dtype=torch.long, device=device)] = 1.0
    return mask


def group_mean_accuracy(cmx, classes: Sequence[int]) -> float:
    """Mean per-class recall over ``classes`` that have support > 0; NaN when there is none.

    This is the FSCIL ``acc_base`` / ``acc_novel`` and the long-tail many/medium/few form.
    """
    t = _as_counts(cmx)
    mask = _class_mask(classes, t.shape[0], t.device) * (_support_t(t) > 0).to(torch.float64)
    return float(_masked_mean_t(_per_class_t(t), mask))


def group_micro_accuracy(cmx, classes: Sequence[int]) -> float:
    """Sample-weighted accuracy over the samples whose true class is in ``classes``.

    Σ_{c∈C} cm[c,c] / Σ_{c∈C} Σ_k cmx[c,k]: the CIL entry R[t][j] for task j's classes C (spec §4).
    NaN when those classes have no sample.
    """
    t = _as_counts(cmx)
    mask = _class_mask(classes, t.shape[0], t.device)
    return float((_diag_t(t) * mask).sum() / (_support_t(t) * mask).sum())


def topk_accuracy(logits, y, k: int) -> float:
    """Fraction of samples whose true class has rank < k (tie rule of spec §2.2).

    Samples with a label outside ``0…C-1`` (C = number of logit columns) are ignored; NaN when no
    sample remains. Exact ties go to the lower class id, so top-1 equals ``argmax == y``.
    Float64 logits stay float64 (fp16/bf16 are up-cast to float32). Raises :class:`NonFiniteError`
    if a scored row (valid label) holds a NaN or ``+inf`` or only ``-inf`` entries.
    """
    z = logits if isinstance(logits, torch.Tensor) else torch.as_tensor(np.asarray(logits))
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    yt = _as_long_1d(y, "y", device=z.device)
    if z.dim() != 2 or z.shape[0] != yt.numel():
        raise ValueError(f"logits must be [N, C] with N = len(y); got {tuple(z.shape)} and {yt.numel()} labels")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    valid = (yt >= 0) & (yt < z.shape[1])
    _raise_if_nonfinite_logits(z, valid)
    hits = _topk_hits_t(z, yt, torch.tensor([int(k)], device=z.device))
    return float(hits[0].to(torch.float64) / valid.sum().to(torch.float64))


def harmonic_mean(a: float, b: float) -> float:
    """H(a, b) = 2ab/(a+b); 0 when a + b = 0; NaN if either input is NaN (spec §1)."""
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.nan
    s = a + b
    return 0.0 if s == 0 else 2.0 * a * b / s
