"""Open-set metrics (``specs/metrics.md`` §8, ``specs/open-set.md`` §§5–6) and the ``open_set`` engine.

Conventions of this module:

* ``scores`` / ``unknown_score``: **higher = more likely unknown** (the spec's v = −s, with s the
  known-ness score). Inputs are 1-D torch tensors, numpy arrays or sequences.
* Every function returns fractions (NaN where undefined).
* Curve metrics follow the spec's device form (§2.5): one stable sort, tie groups marked by
  ``v[i] != v[i+1]`` (the last element always ends a group), int64 cumulative counts, AUROC in the
  integer rank form, and integer tests (``den·TP >= num·n_P``, 20·TP ≥ 19·n_P at 95%) for the
  FPR@TPR selection. No host loop; everything stays on the input's device until the final scalar.

The engine (:class:`OpenSetEngine`, task ``"open_set"``) takes the runner's
``observe(logits, targets, unknown_score)``: logits of the eval set (columns outside
``known_classes`` are ignored), targets with the **original** class ids (known or unknown), and the
strategy's unknown score (or, if ``None``, a detector derived from the known-class logits). How an
eval set declares its open-set layout — ``EvalSet(task="open_set", options={...})``:

* ``known_classes``: the known class ids K (in order; known index k ↔ ``known_classes[k]``);
* ``unknown_classes``: the original ids of the unknown classes (default: every other id in
  ``0…num_classes-1``). They are merged to u = |K| (y_merged) and kept for ``unk_classmean`` (y_orig).
* ``threshold``: how known/unknown is decided (see :data:`THRESHOLDS`); ``curve``:
  ``"full"`` (default) or ``"sklearn_drop"`` (OpenOOD parity for ``fpr95``); ``detector`` (used only
  when the strategy gives no unknown score): ``"msp"`` or ``"energy"``; ``num_samples`` to preallocate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

from .classification import LOGITS_DETAIL, NonFiniteError, _nonfinite_rows_t
from .engine import register_engine

__all__ = [
    "THRESHOLDS",
    "OpenSetEngine",
    "ap_in",
    "ap_out",
    "aupr_in",
    "aupr_out",
    "auroc",
    "closed_acc",
    "energy_score",
    "fpr_at_tpr",
    "fpr_at_tpr_idpos",
    "h_instance",
    "hos",
    "msp_score",
    "open_set_metrics",
    "os_score",
    "os_star",
    "oscr",
    "oscr_arpl",
    "overall_acc",
    "threshold_gmm",
    "threshold_otsu",
    "threshold_reject_count",
    "threshold_ros_mean",
    "threshold_source_quantile",
    "unk",
    "unk_classmean",
]

F64 = torch.float64
NAN = math.nan


# --------------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------------
def _scores_1d(scores, name: str = "scores", device=None) -> Tensor:
    t = scores if isinstance(scores, Tensor) else torch.as_tensor(np.asarray(scores))
    if device is not None:
        t = t.to(device)
    t = t.reshape(-1)
    if t.dtype in (torch.float16, torch.bfloat16) or not t.is_floating_point():
        t = t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.to(F64)
    return t


def _bool_1d(x, name: str, n: int, device) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    t = t.to(device).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"{name} has {t.numel()} entries, scores have {n}")
    return t.to(torch.bool)


def _check_finite(v: Tensor, what: str = "scores") -> None:
    """One-shot check (one read-back): :class:`NonFiniteError` if a score is NaN or ±inf."""
    nbad = int((~torch.isfinite(v)).sum())
    if nbad:
        raise NonFiniteError(what, nbad, v.numel(), "NaN or inf", "as in scikit-learn, this is an error")


def _tpr_fraction(tpr: float) -> tuple[int, int]:
    if not 0 < float(tpr) <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    fr = Fraction(float(tpr)).limit_denominator(10**6)
    return fr.numerator, fr.denominator


# --------------------------------------------------------------------------------------------------
# §2.5 — one sort, tie groups (device, static shapes)
# --------------------------------------------------------------------------------------------------
def _tree_sum_t(x: Tensor) -> Tensor:
    """Sum over dim 0 by pairwise halving after zero-padding the length to a power of two.

    Deterministic and identical on every device (element-wise adds only), and unchanged by zeros
    appended at the end: a right half that is all zero adds ``+0`` exactly. The curve metrics sum
    their per-position terms with it, so rows pushed to the end with zero terms (ignored labels)
    leave every float metric bit-identical to the run without those rows.
    """
    n = x.shape[0]
    if n == 0:
        return x.new_zeros(x.shape[1:])
    p = 1 << (n - 1).bit_length()
    if p != n:
        x = torch.cat([x, x.new_zeros((p - n, *x.shape[1:]))])
    while x.shape[0] > 1:
        x = x[0::2] + x[1::2]
    return x[0]


class _Sorted:
    """``v`` sorted once, ascending and stable, with its tie groups.

    ``is_end[i]``: sorted position i ends a tie group (``v[i] != v[i+1]``; the last position always
    does); ``start[i]``/``end[i]``: first/last position of the group holding position i. Every curve
    of §8 is read off this one sort: a curve ranking by **descending** v takes its points at the group
    ends in reverse order, with counts ``total − cumsum[start−1]``; one ranking by ascending v (i.e.
    descending s) uses ``cumsum[end]`` directly.

    With ``valid`` (rows with an ignored label are False), a second stable sort moves the ignored
    rows behind every valid one, and a validity change also ends a tie group. The valid rows then
    hold positions ``0…n_valid−1`` in the order (and with the tie groups) of a sort of the valid rows
    alone, with no boolean selection; ``vmask`` is the validity per sorted position and ``nv`` the
    number of valid rows (a device scalar).
    """

    def __init__(self, v: Tensor, valid: Tensor | None = None):
        n = v.numel()
        dev = v.device
        if valid is None:
            vs, self.order = torch.sort(v, stable=True)
            self.vmask = torch.ones(n, dtype=torch.bool, device=dev)
            self.nv = torch.full((), n, dtype=torch.long, device=dev)
        else:
            o = torch.sort(v, stable=True).indices
            self.order = o[torch.sort((~valid[o]).to(torch.uint8), stable=True).indices]
            vs = v[self.order]
            self.vmask = valid[self.order]
            self.nv = valid.sum()
        self.n = n
        self.pos = torch.arange(n, device=dev)
        self.is_end = torch.ones(n, dtype=torch.bool, device=dev)
        if n > 1:
            self.is_end[:-1] = (vs[:-1] != vs[1:]) | (self.vmask[:-1] != self.vmask[1:])
        is_start = torch.ones_like(self.is_end)
        if n > 1:
            is_start[1:] = self.is_end[:-1]
        self.start = torch.cummax(torch.where(is_start, self.pos, torch.zeros_like(self.pos)), 0).values
        flipped = torch.flip(torch.where(self.is_end, self.pos, torch.full_like(self.pos, n)), (0,))
        self.end = torch.flip(torch.cummin(flipped, 0).values, (0,))

    def cum(self, mask: Tensor) -> Tensor:
        """int64 cumulative count of ``mask`` (original order) along the ascending sort."""
        return torch.cumsum(mask[self.order].long(), 0)

    def before(self, c: Tensor, idx: Tensor) -> Tensor:
        """``c[idx − 1]``, and 0 where idx = 0 (the count strictly below a group starting at idx)."""
        return torch.where(idx > 0, c[(idx - 1).clamp(min=0)], torch.zeros_like(c))


def _at(x: Tensor, i: Tensor) -> Tensor:
    """``x[i]`` for a 0-d index tensor without the host read that ``x[tensor]`` does."""
    return x.gather(0, i.reshape(1).to(torch.long)).reshape(())


def _auroc_t(srt: _Sorted, pos: Tensor, neg: Tensor) -> Tensor:
    """Integer rank form: 2·Σ_{x∈P} r_x = Σ_{x∈P} (start+1 + end+1) in ascending v; ties count ½."""
    p = pos[srt.order].long()
    n_p = p.sum()
    n_n = neg.sum()
    num = ((p * (srt.start + srt.end + 2)).sum() - n_p * (n_p + 1)).to(F64)
    den = (2 * n_p * n_n).to(F64)
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, NAN))


def _points(srt: _Sorted, pos: Tensor, neg: Tensor, descending: bool):
    """Per sorted position (meaningful at group ends): ``(tp, fp, prev_tp, prev_fp, n_p, n_n)`` of the
    curve ranking ``pos`` against ``neg`` by descending v (``descending=True``) or ascending v;
    ``prev_*`` is the previous curve point (the next-higher threshold; (0, 0) before the first)."""
    cp, cn = srt.cum(pos), srt.cum(neg)
    n_p, n_n = cp[-1], cn[-1]
    if descending:
        tp, fp = n_p - srt.before(cp, srt.start), n_n - srt.before(cn, srt.start)
        prev_tp, prev_fp = n_p - cp[srt.end], n_n - cn[srt.end]
    else:
        tp, fp = cp[srt.end], cn[srt.end]
        prev_tp, prev_fp = srt.before(cp, srt.start), srt.before(cn, srt.start)
    return tp, fp, prev_tp, prev_fp, n_p, n_n


def _fpr_at_tpr_t(srt: _Sorted, pos: Tensor, neg: Tensor, num: int, den: int, descending: bool = True,
                  drop: bool = False) -> Tensor:
    """FP_{k*}/n_N, k* = the first curve point with den·TP ≥ num·n_P (integer test)."""
    tp, fp, prev_tp, prev_fp, n_p, n_n = _points(srt, pos, neg, descending)
    keep = srt.is_end & srt.vmask
    if drop:  # sklearn roc_curve(drop_intermediate=True): drop interior points with zero second difference
        if not descending:
            raise ValueError("curve 'sklearn_drop' is defined for the unknown-positive curve only")
        lower = (srt.start - 1).clamp(min=0)  # the next curve point is the group below (ascending order)
        next_tp, next_fp = tp[lower], fp[lower]
        first, last = srt.end == srt.nv - 1, srt.start == 0
        d2_tp = (next_tp - tp) - (tp - prev_tp)
        d2_fp = (next_fp - fp) - (fp - prev_fp)
        keep = keep & (first | last | (d2_tp != 0) | (d2_fp != 0))
    cond = keep & (den * tp >= num * n_p)
    if descending:  # curve order = descending sorted position: the first point is the largest index
        k = torch.where(cond, srt.pos, torch.full_like(srt.pos, -1)).max().clamp(min=0)
    else:
        k = torch.argmax(cond.to(torch.int8))
    val = _at(fp, k).to(F64) / n_n.clamp(min=1).to(F64)
    return torch.where((n_p > 0) & (n_n > 0), val, torch.full_like(val, NAN))


def _aupr_t(srt: _Sorted, pos: Tensor, neg: Tensor, descending: bool) -> tuple[Tensor, Tensor]:
    """(trapezoid AUPR, average precision); the curve starts at (R=0, P=1)."""
    tp, fp, prev_tp, prev_fp, n_p, _ = _points(srt, pos, neg, descending)
    npf = n_p.clamp(min=1).to(F64)
    prec = tp.to(F64) / (tp + fp).clamp(min=1).to(F64)
    prev_n = prev_tp + prev_fp
    prev_prec = torch.where(prev_n > 0, prev_tp.to(F64) / prev_n.clamp(min=1).to(F64), torch.ones_like(prec))
    dr = torch.where(srt.is_end & srt.vmask, (tp - prev_tp).to(F64) / npf, torch.zeros_like(prec))
    trap = _tree_sum_t(dr * (prec + prev_prec) / 2)
    ap = _tree_sum_t(dr * prec)
    nan = torch.full_like(trap, NAN)
    return torch.where(n_p > 0, trap, nan), torch.where(n_p > 0, ap, nan)


def _oscr_t(srt: _Sorted, unknown: Tensor, known: Tensor, correct: Tensor) -> Tensor:
    """Area under CCR(θ) vs FPR(θ), θ = the distinct s = −v in descending order (ascending v)."""
    cu, cc = srt.cum(unknown), srt.cum(correct & known)
    n_u = cu[-1]
    n_k = known.sum()
    fu, fk = n_u.clamp(min=1).to(F64), n_k.clamp(min=1).to(F64)
    fpr, ccr = cu[srt.end].to(F64) / fu, cc[srt.end].to(F64) / fk
    pfpr, pccr = srt.before(cu, srt.start).to(F64) / fu, srt.before(cc, srt.start).to(F64) / fk
    area = _tree_sum_t(torch.where(srt.is_end & srt.vmask, (fpr - pfpr) * (ccr + pccr) / 2, torch.zeros_like(fpr)))
    return torch.where((n_u > 0) & (n_k > 0), area, torch.full_like(area, NAN))


def _oscr_arpl_t(v: Tensor, unknown: Tensor, known: Tensor, correct: Tensor, valid: Tensor) -> Tensor:
    """ARPL-lineage OSCR (compat): knowns then unknowns, stable ascending sort on s = −v.

    The concatenation is a stable sort on the group (known 0, unknown 1) before the stable sort on
    s; a last stable sort moves ignored rows to the end, and their points are set to (0, 0), which
    sorts last and adds no area. No ``nonzero``: static shapes, no host read."""
    dev = v.device
    n = v.numel()
    o = torch.sort(unknown.to(torch.uint8), stable=True).indices
    o = o[torch.sort(-v[o], stable=True).indices]
    o = o[torch.sort((~valid[o]).to(torch.uint8), stable=True).indices]
    su, sc = unknown[o].long(), (correct & known)[o].long()
    suf_u = torch.flip(torch.cumsum(torch.flip(su, (0,)), 0), (0,))  # #unknowns at positions >= k
    suf_c = torch.flip(torch.cumsum(torch.flip(sc, (0,)), 0), (0,))
    n_u, n_k = unknown.sum(), known.sum()
    k = torch.arange(max(n - 1, 0), device=dev)
    inside = k <= valid.sum() - 2  # k = 0 … n_valid − 2
    zero = torch.zeros(k.numel(), dtype=F64, device=dev)
    fpr = torch.where(inside, suf_u[k].to(F64) / n_u.clamp(min=1).to(F64), zero)
    ccr = torch.where(inside, suf_c[k + 1].to(F64) / n_k.clamp(min=1).to(F64), zero)
    z = torch.zeros(2, dtype=F64, device=dev)
    fpr = torch.cat([fpr, z, torch.ones(1, dtype=F64, device=dev)])
    ccr = torch.cat([ccr, z, torch.ones(1, dtype=F64, device=dev)])
    # sorted(zip(FPR, CCR), reverse=True): lexicographic descending
    o2 = torch.sort(ccr, descending=True, stable=True).indices
    o2 = o2[torch.sort(fpr[o2], descending=True, stable=True).indices]
    f, c = fpr[o2], ccr[o2]
    area = _tree_sum_t((f[:-1] - f[1:]) * (c[:-1] + c[1:]) / 2)
    return torch.where((n_u > 0) & (n_k > 0), area, torch.full_like(area, NAN))


# --------------------------------------------------------------------------------------------------
# public threshold-free functions (scores: higher = more likely unknown)
# --------------------------------------------------------------------------------------------------
def _prep(scores, is_unknown) -> tuple[Tensor, Tensor]:
    v = _scores_1d(scores)
    _check_finite(v)
    return v, _bool_1d(is_unknown, "is_unknown", v.numel(), v.device)


def auroc(scores, is_unknown) -> float:
    """AUROC with unknown = positive (= ``roc_auc_score(is_unknown, scores)``); NaN without both kinds."""
    v, u = _prep(scores, is_unknown)
    return float(_auroc_t(_Sorted(v), u, ~u)) if v.numel() else NAN


def fpr_at_tpr(scores, is_unknown, tpr: float = 0.95, curve: str = "full") -> float:
    """Fraction of known samples flagged at the highest threshold catching ≥ ``tpr`` of the unknowns
    (the spec's ``fpr95``). ``curve="sklearn_drop"`` reproduces ``roc_curve(drop_intermediate=True)``."""
    if curve not in ("full", "sklearn_drop"):
        raise ValueError(f"curve must be 'full' or 'sklearn_drop', got {curve!r}")
    v, u = _prep(scores, is_unknown)
    if not v.numel():
        return NAN
    num, den = _tpr_fraction(tpr)
    return float(_fpr_at_tpr_t(_Sorted(v), u, ~u, num, den, drop=curve == "sklearn_drop"))


def fpr_at_tpr_idpos(scores, is_unknown, tpr: float = 0.95) -> float:
    """Classic convention (``fpr95_idpos``): known = positive ranked by s = −scores; the fraction of
    unknowns accepted at the highest threshold accepting ≥ ``tpr`` of the knowns."""
    v, u = _prep(scores, is_unknown)
    if not v.numel():
        return NAN
    num, den = _tpr_fraction(tpr)
    return float(_fpr_at_tpr_t(_Sorted(v), ~u, u, num, den, descending=False))


def aupr_in(scores, is_unknown) -> float:
    """AUPR with known = positive ranked by s = −scores (``auc(recall, precision)``)."""
    v, u = _prep(scores, is_unknown)
    return float(_aupr_t(_Sorted(v), ~u, u, False)[0]) if v.numel() else NAN


def aupr_out(scores, is_unknown) -> float:
    """AUPR with unknown = positive ranked by the scores."""
    v, u = _prep(scores, is_unknown)
    return float(_aupr_t(_Sorted(v), u, ~u, True)[0]) if v.numel() else NAN


def ap_in(scores, is_unknown) -> float:
    """Average precision, known = positive (``average_precision_score(~is_unknown, -scores)``)."""
    v, u = _prep(scores, is_unknown)
    return float(_aupr_t(_Sorted(v), ~u, u, False)[1]) if v.numel() else NAN


def ap_out(scores, is_unknown) -> float:
    """Average precision, unknown = positive."""
    v, u = _prep(scores, is_unknown)
    return float(_aupr_t(_Sorted(v), u, ~u, True)[1]) if v.numel() else NAN


def oscr(scores, is_unknown, correct) -> float:
    """Area under CCR(θ) vs FPR(θ) (Dhamija et al.); ``correct``: pred_closed == y for known samples."""
    v, u = _prep(scores, is_unknown)
    c = _bool_1d(correct, "correct", v.numel(), v.device)
    return float(_oscr_t(_Sorted(v), u, ~u, c)) if v.numel() else NAN


def oscr_arpl(scores, is_unknown, correct) -> float:
    """The ARPL-lineage OSCR code (compat; differs from :func:`oscr` on ties, vector F)."""
    v, u = _prep(scores, is_unknown)
    c = _bool_1d(correct, "correct", v.numel(), v.device)
    return float(_oscr_arpl_t(v, u, ~u, c, torch.ones_like(u))) if v.numel() else NAN


# --------------------------------------------------------------------------------------------------
# thresholded metrics (from cm_open [|K|+1, |K|+1], rows = y_merged, cols = pred_open)
# --------------------------------------------------------------------------------------------------
def hos(os_star: float, unk: float) -> float:
    """Harmonic mean 2·OS*·UNK/(OS*+UNK); 0 when both are 0; NaN propagates."""
    a, b = float(os_star), float(unk)
    if math.isnan(a) or math.isnan(b):
        return NAN
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _harm_t(a: Tensor, b: Tensor) -> Tensor:
    s = a + b
    h = torch.where(s > 0, 2 * a * b / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
    return torch.where(torch.isnan(a) | torch.isnan(b), torch.full_like(h, NAN), h)


def _recalls_t(cm: Tensor) -> Tensor:
    rows = cm.sum(1).to(F64)
    diag = torch.diagonal(cm).to(F64)
    return torch.where(rows > 0, diag / rows.clamp(min=1), torch.full_like(rows, NAN))


def _nanmean_t(x: Tensor) -> Tensor:
    ok = ~torch.isnan(x)
    n = ok.sum()
    m = torch.where(ok, x, torch.zeros_like(x)).sum() / n.clamp(min=1).to(F64)
    return torch.where(n > 0, m, torch.full_like(m, NAN))


def _as_cm(cm_open) -> Tensor:
    t = cm_open if isinstance(cm_open, Tensor) else torch.as_tensor(np.asarray(cm_open))
    if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] < 2:
        raise ValueError(f"cm_open must be a square [|K|+1, |K|+1] matrix, got shape {tuple(t.shape)}")
    return t.to(torch.int64)


def os_star(cm_open) -> float:
    """Mean recall over the known classes with support (the last row/column is u)."""
    return float(_nanmean_t(_recalls_t(_as_cm(cm_open))[:-1]))


def unk(cm_open) -> float:
    """Micro UNK: fraction of unknown samples predicted u."""
    return float(_recalls_t(_as_cm(cm_open))[-1])


def os_score(cm_open) -> float:
    """OS: mean of the |K|+1 recalls (classes with support)."""
    return float(_nanmean_t(_recalls_t(_as_cm(cm_open))))


def overall_acc(cm_open) -> float:
    cm = _as_cm(cm_open)
    n = cm.sum()
    return float(torch.diagonal(cm).sum().to(F64) / n.to(F64)) if int(n) else NAN


def h_instance(cm_open) -> float:
    """DCC's H: H(known instance accuracy, UNK), known accuracy = Σ_{c∈K} cm[c,c] / |𝒦|."""
    cm = _as_cm(cm_open)
    known = cm[:-1].sum()
    acc_k = float(torch.diagonal(cm)[:-1].sum()) / float(known) if int(known) else NAN
    return hos(acc_k, unk(cm))


def unk_classmean(y_orig, pred_open, unknown_id: int) -> float:
    """ROS's UNK: mean over the original unknown classes present of their rate of ``pred_open == u``.

    ``y_orig``: original labels of the **unknown** samples only; ``unknown_id``: u."""
    y = torch.as_tensor(np.asarray(y_orig)).reshape(-1).long()
    p = torch.as_tensor(np.asarray(pred_open)).reshape(-1).long()
    if y.numel() == 0:
        return NAN
    classes, inv = torch.unique(y, return_inverse=True)
    hit = torch.zeros(len(classes), dtype=F64).index_add_(0, inv, (p == unknown_id).to(F64))
    cnt = torch.zeros(len(classes), dtype=F64).index_add_(0, inv, torch.ones_like(p, dtype=F64))
    return float((hit / cnt).mean())


def closed_acc(pred_closed, y_merged, unknown_id: int) -> float:
    """Accuracy of ``pred_closed`` on the known samples (y_merged != u), no rejection."""
    p = torch.as_tensor(np.asarray(pred_closed)).reshape(-1)
    y = torch.as_tensor(np.asarray(y_merged)).reshape(-1)
    known = y != unknown_id
    n = int(known.sum())
    return float(((p == y) & known).sum()) / n if n else NAN


# --------------------------------------------------------------------------------------------------
# detectors from logits (card §4, vector I) — known-ness s, higher = known
# --------------------------------------------------------------------------------------------------
def _detector_input(logits: Tensor) -> Tensor:
    """float32 and float64 logits keep their dtype (metrics.md §1); fp16/bf16 and integers → float32."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def msp_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """max_c softmax(z/T)_c (Hendrycks & Gimpel). Float64 logits give float64 scores (in float32 the
    MSP saturates to exactly 1.0 for logit margins above ~17)."""
    return torch.softmax(_detector_input(logits) / temperature, dim=1).max(dim=1).values


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T·logsumexp(z/T): the negative free energy (Liu et al.); keeps float32/float64."""
    return temperature * torch.logsumexp(_detector_input(logits) / temperature, dim=1)


# --------------------------------------------------------------------------------------------------
# §5 — label-free threshold rules on the known-ness score s (accept iff s >= τ)
#
# Device forms (``_*_t``): float64 torch, static shapes, no host read, so the engine's compute() stays
# at one transfer. ``valid`` (bool, or None for all rows) masks rows with ignored labels out of every
# count without a boolean selection. Otsu, ros_mean and reject_count reproduce the numpy reference
# bit for bit (numpy's histogram bin assignment, linspace edges, sequential cumsum and pairwise sum
# are replicated); the GMM follows the numpy EM step by step, but exp/log (numpy's SIMD vs torch's
# Sleef/libdevice) and the M-step sums (sequential in numpy, a pairwise tree here) round differently,
# so it agrees with :func:`threshold_gmm` to ~1e-12, not bit for bit.
# --------------------------------------------------------------------------------------------------
_PW_BLOCK = 128  # numpy's PW_BLOCKSIZE (pairwise summation leaf size)


def _np_sum_t(a: Tensor, n: Tensor | int) -> Tensor:
    """``numpy.add.reduce(a[:n])`` bit for bit, for a 1-D float64 ``a`` and a device count ``n``.

    numpy sums a contiguous float64 array as ``0.0 + pairwise(a, n)``: below 8 elements a plain loop;
    up to 128 eight accumulators over full blocks of 8, combined ``((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))``,
    then the rest one by one; above 128 the halves ``n2 = n//2 − (n//2)%8`` and ``n − n2``, summed
    recursively. The recursion tree depends on n, which lives on the device here, so it is built
    breadth-first with static shapes: a node that does not split passes itself on with an empty
    sibling (adding +0 is exact). Entries at or beyond n are not read."""
    size = a.shape[0]
    dev = a.device
    if size == 0:
        return torch.zeros((), dtype=F64, device=dev)
    # an int count becomes a device fill (no host→device copy); a device count stays where it is
    if isinstance(n, Tensor):
        n = n.to(device=dev, dtype=torch.long).reshape(1)
    else:
        n = torch.full((1,), int(n), dtype=torch.long, device=dev)
    depth, m = 0, size
    while m > _PW_BLOCK:  # the largest child of a node of length l is ≤ ⌈l/2⌉ + 7
        m, depth = -(-m // 2) + 7, depth + 1
    start, length = torch.zeros(1, dtype=torch.long, device=dev), n.clamp(0, size)
    for _ in range(depth):
        split = length > _PW_BLOCK
        half = length // 2
        n2 = half - half % 8
        left = torch.where(split, n2, length)
        right = torch.where(split, length - n2, torch.zeros_like(length))
        start = torch.stack([start, start + left], 1).reshape(-1)
        length = torch.stack([left, right], 1).reshape(-1)
    cols = torch.arange(_PW_BLOCK, device=dev)
    vals = a[(start.unsqueeze(1) + cols).clamp(max=size - 1)]
    vals = torch.where(cols < length.unsqueeze(1), vals, torch.zeros_like(vals))  # [leaves, 128]
    small = torch.zeros_like(length, dtype=F64)
    for i in range(8):  # n < 8: res = 0; res += a[i]
        small = small + vals[:, i]
    blocks = vals.view(-1, _PW_BLOCK // 8, 8)
    nfull = length // 8
    r = blocks[:, 0, :]
    for b in range(1, _PW_BLOCK // 8):
        r = r + torch.where((b < nfull).unsqueeze(1), blocks[:, b, :], torch.zeros_like(r))
    res = ((r[:, 0] + r[:, 1]) + (r[:, 2] + r[:, 3])) + ((r[:, 4] + r[:, 5]) + (r[:, 6] + r[:, 7]))
    rest = length - 8 * nfull
    for q in range(7):  # the non-multiple-of-8 tail, one by one
        at = (8 * nfull + q).clamp(max=_PW_BLOCK - 1).unsqueeze(1)
        res = res + torch.where(q < rest, vals.gather(1, at).squeeze(1), torch.zeros_like(res))
    x = torch.where(length < 8, small, res)
    for _ in range(depth):
        x = x.view(-1, 2)
        x = x[:, 0] + x[:, 1]
    return 0.0 + x[0]


def _valid_or_all(s: Tensor, valid: Tensor | None) -> Tensor:
    return torch.ones_like(s, dtype=torch.bool) if valid is None else valid


def _minmax_t(s: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    lo = torch.where(valid, s, torch.full_like(s, math.inf)).amin()
    hi = torch.where(valid, s, torch.full_like(s, -math.inf)).amax()
    return lo, hi


def _compact_t(s: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """The valid entries first, in their order (a stable sort on the validity flag), and the mask
    ``arange < n_valid`` of the result. Invalid entries become 0."""
    o = torch.sort((~valid).to(torch.uint8), stable=True).indices
    vc = valid[o]
    return torch.where(vc, s[o], torch.zeros_like(s)), vc


def _otsu_t(s: Tensor, valid: Tensor | None = None) -> Tensor:
    """:func:`threshold_otsu` on the device (float64 ``s``); bit-identical to the numpy form."""
    valid = _valid_or_all(s, valid)
    nb = 256
    lo, hi = _minmax_t(s, valid)
    same = hi == lo
    delta = hi - lo
    # numpy.linspace(lo, hi, 257): arange·step + lo (step = Δ/256; (arange/256)·Δ if step underflows),
    # last edge = hi
    ar = torch.arange(nb + 1, dtype=F64, device=s.device)
    step = delta / nb
    e = torch.where(step == 0, (ar / nb) * delta, ar * step) + lo
    e = torch.cat([e[:-1], hi.reshape(1)])
    # numpy.histogram's bin assignment: ((x − lo)/Δ)·256 truncated, == 256 → 255, then the ±1 ULP
    # corrections against the edges (the last bin includes its right edge)
    x = torch.where(valid, s, lo)
    denom = torch.where(same, torch.ones_like(delta), delta)
    idx = (((x - lo) / denom) * nb).clamp(-1, nb).long().clamp(0, nb)
    idx = torch.where(idx == nb, idx - 1, idx)
    idx = torch.where(x < e[idx], idx - 1, idx).clamp(min=0)
    idx = torch.where((x >= e[idx + 1]) & (idx != nb - 1), idx + 1, idx)
    idx = torch.where(valid, idx, torch.full_like(idx, nb))  # ignored rows: a trash bin
    h = torch.zeros(nb + 1, dtype=torch.long, device=s.device).scatter_add_(0, idx, torch.ones_like(idx))
    h = h[:nb].to(F64)
    c = (e[:-1] + e[1:]) / 2
    hc = h * c
    # cumsum along dim 0 of a [256, 2] tensor is a sequential scan on CPU and CUDA (numpy's accumulate)
    cs = torch.cumsum(torch.stack([h, hc], 1), 0)[:-1]
    w0, m0 = cs[:, 0], cs[:, 1]
    w1 = _np_sum_t(h, nb) - w0
    m1 = _np_sum_t(hc, nb) - m0
    mu0, mu1 = m0 / w0, m1 / w1
    d = mu0 - mu1
    var = torch.where((w0 > 0) & (w1 > 0), w0 * w1 * (d * d), torch.zeros_like(d))
    k = torch.argmax(var)  # the first maximiser, as numpy
    tau = _at(e, k + 1)
    return torch.where(same, lo, tau)


def _ros_mean_t(s: Tensor, valid: Tensor | None = None) -> Tensor:
    """:func:`threshold_ros_mean` on the device; bit-identical (numpy's pairwise mean replicated)."""
    valid = _valid_or_all(s, valid)
    lo, hi = _minmax_t(s, valid)
    same = hi == lo
    span = torch.where(same, torch.ones_like(hi), hi - lo)
    sc, vc = _compact_t(s, valid)
    n = valid.sum()
    st = torch.where(vc, (sc - lo) / span, torch.zeros_like(sc))
    mean = _np_sum_t(st, n) / n.to(F64)
    t = torch.clamp((torch.floor(10 * mean) + 1) / 10, max=1.0)
    return torch.where(same, lo, lo + t * (hi - lo))


def _reject_count_t(s: Tensor, n_r: int, valid: Tensor | None = None) -> Tensor:
    """:func:`threshold_reject_count` on the device (the caller checks 1 ≤ n_r ≤ n_valid)."""
    valid = _valid_or_all(s, valid)
    srt = torch.sort(torch.where(valid, s, torch.full_like(s, math.inf))).values
    cut = srt[min(max(int(n_r) - 1, 0), max(s.numel() - 1, 0))]
    return torch.nextafter(cut, torch.full_like(cut, math.inf))


def _percentile_t(srt: Tensor, n: Tensor, q: float) -> Tensor:
    """``numpy.percentile(x, 100·q)`` (linear) on ``srt`` = x sorted ascending in its first n entries."""
    nf = n.to(F64)
    vi = (nf - 1) * q
    prev = torch.floor(vi)
    above = vi >= nf - 1
    top = srt.numel() - 1
    pi = torch.where(above, nf - 1, prev).long().clamp(0, top)
    ni = torch.where(above, nf - 1, prev + 1).long().clamp(0, top)
    gamma = vi - prev
    a, b = _at(srt, pi), _at(srt, ni)
    diff = b - a
    return torch.where(gamma >= 0.5, b - diff * (1 - gamma), a + diff * gamma)


def _gmm_t(s: Tensor, valid: Tensor | None = None) -> Tensor:
    """:func:`threshold_gmm` on the device: the same EM (100 iterations, float64), initialisation,
    variance floor and root rule. Rows with ignored labels get zero responsibility, and the valid
    rows are moved first so every sum is the one of the valid rows alone."""
    valid = _valid_or_all(s, valid)
    dev = s.device
    x, vc = _compact_t(s, valid)
    n = valid.sum()
    nf = n.to(F64)
    srt = torch.sort(torch.where(valid, s, torch.full_like(s, math.inf))).values
    mu = torch.stack([_percentile_t(srt, n, 0.25), _percentile_t(srt, n, 0.75)])
    mean = _np_sum_t(x, n) / nf
    dx = torch.where(vc, x - mean, torch.zeros_like(x))
    v0 = torch.clamp(_np_sum_t(dx * dx, n) / nf, min=1e-6)
    var = torch.stack([v0, v0])
    w = torch.full((2,), 0.5, dtype=F64, device=dev)
    x2, keep = x.unsqueeze(1), vc.unsqueeze(1)
    two_pi = 2 * np.pi
    for _ in range(100):
        dd = x2 - mu
        logp = -0.5 * (dd * dd) / var - 0.5 * torch.log(two_pi * var) + torch.log(w)
        logp = logp - logp.amax(dim=1, keepdim=True)
        r = torch.exp(logp)
        r = r / (r[:, :1] + r[:, 1:])
        r = torch.where(keep, r, torch.zeros_like(r))
        nk = _tree_sum_t(r)
        w = nk / nf
        mu = _tree_sum_t(r * x2) / torch.clamp(nk, min=1e-300)
        dd = x2 - mu
        var = torch.clamp(_tree_sum_t(r * (dd * dd)) / torch.clamp(nk, min=1e-300), min=1e-6)
    # π1 N(τ; μ1, σ1²) = π2 N(τ; μ2, σ2²) ⇔ a τ² + b τ + c = 0
    a = 1 / (2 * var[1]) - 1 / (2 * var[0])
    b = mu[0] / var[0] - mu[1] / var[1]
    c = (mu[1] ** 2 / (2 * var[1]) - mu[0] ** 2 / (2 * var[0])
         + torch.log(w[0] / torch.sqrt(var[0])) - torch.log(w[1] / torch.sqrt(var[1])))
    mid = (mu[0] + mu[1]) / 2
    lo, hi = torch.minimum(mu[0], mu[1]), torch.maximum(mu[0], mu[1])
    linear = a.abs() < 1e-300
    disc = b * b - 4 * a * c
    sq = torch.sqrt(disc.abs())
    # real roots (stable form); a complex pair counts as real (its real part) when |Im| < 1e-12, as the
    # numpy rule does with np.roots
    qq = -0.5 * (b + torch.where(b >= 0, sq, -sq))
    r1 = torch.where(disc >= 0, qq / a, -b / (2 * a))
    r2 = torch.where(disc >= 0, torch.where(qq != 0, c / qq, r1), r1)
    real = (disc >= 0) | (sq / (2 * a).abs() < 1e-12)
    r1 = torch.where(linear, -c / b, r1)
    ok1 = torch.where(linear, b != 0, real) & (lo <= r1) & (r1 <= hi)
    ok2 = ~linear & real & (lo <= r2) & (r2 <= hi)
    d1 = torch.where(ok1, (r1 - mid).abs(), torch.full_like(mid, math.inf))
    d2 = torch.where(ok2, (r2 - mid).abs(), torch.full_like(mid, math.inf))
    best = torch.where(d2 < d1, r2, r1)
    return torch.where(ok1 | ok2, best, mid)


def _scores_f64(s, name: str) -> Tensor:
    x = _scores_1d(s).to(F64)
    if x.numel() == 0:
        raise ValueError(f"{name}: no score")
    _check_finite(x)
    return x


def threshold_source_quantile(s_val, q: float = 0.05) -> float:
    """τ = ``torch.quantile(s_val, q, interpolation='linear')`` on held-out source known samples."""
    s = _scores_1d(s_val).to(F64)
    if s.numel() == 0:
        raise ValueError("source_quantile: the source validation split is empty")
    return float(torch.quantile(s, float(q), interpolation="linear"))


def threshold_otsu(s) -> float:
    """Otsu on ``numpy.histogram(s, 256, (min, max))``; τ = the right edge of the last class-0 bin.

    Computed by the device form (bit-identical to the numpy computation it replaces)."""
    return float(_otsu_t(_scores_f64(s, "target_otsu")))


def threshold_gmm(s) -> float:
    """2-component 1-D Gaussian mixture, EM in float64 for exactly 100 iterations (card §5).

    The numpy reference; the engine uses the device form :func:`_gmm_t` (agrees to ~1e-12)."""
    x = _scores_1d(s).to(F64).cpu().numpy()
    mu = np.array([np.percentile(x, 25), np.percentile(x, 75)])
    v0 = max(float(np.var(x)), 1e-6)
    var = np.array([v0, v0])
    w = np.array([0.5, 0.5])
    for _ in range(100):
        logp = -0.5 * (x[:, None] - mu) ** 2 / var - 0.5 * np.log(2 * np.pi * var) + np.log(w)
        logp -= logp.max(1, keepdims=True)
        r = np.exp(logp)
        r /= r.sum(1, keepdims=True)
        nk = r.sum(0)
        w = nk / len(x)
        mu = (r * x[:, None]).sum(0) / np.maximum(nk, 1e-300)
        var = np.maximum((r * (x[:, None] - mu) ** 2).sum(0) / np.maximum(nk, 1e-300), 1e-6)
    # π1 N(τ; μ1, σ1²) = π2 N(τ; μ2, σ2²) ⇔ a τ² + b τ + c = 0
    a = 1 / (2 * var[1]) - 1 / (2 * var[0])
    b = mu[0] / var[0] - mu[1] / var[1]
    c = (mu[1] ** 2 / (2 * var[1]) - mu[0] ** 2 / (2 * var[0])
         + np.log(w[0] / np.sqrt(var[0])) - np.log(w[1] / np.sqrt(var[1])))
    mid = (mu[0] + mu[1]) / 2
    lo, hi = min(mu), max(mu)
    roots = [-c / b] if abs(a) < 1e-300 and b != 0 else ([] if abs(a) < 1e-300 else list(np.roots([a, b, c])))
    real = [float(np.real(r)) for r in roots if abs(np.imag(r)) < 1e-12 and lo <= np.real(r) <= hi]
    return min(real, key=lambda r: abs(r - mid)) if real else float(mid)


def threshold_ros_mean(s) -> float:
    """ROS: on s̃ = (s−min)/(max−min), known iff s̃ ≥ min((⌊10·mean s̃⌋+1)/10, 1); τ returned on s.

    Computed by the device form (bit-identical to the numpy computation it replaces)."""
    return float(_ros_mean_t(_scores_f64(s, "ros_mean")))


def threshold_reject_count(s, n_r: int) -> float:
    """OSLPP: samples with s ≤ the n_r-th smallest score are unknown; τ = the next larger value."""
    x = _scores_1d(s).to(F64)
    if not 1 <= int(n_r) <= x.numel():
        raise ValueError(f"reject_count: n_r must be in 1…{x.numel()}, got {n_r}")
    _check_finite(x)
    return float(_reject_count_t(x, int(n_r)))


THRESHOLDS = ("auto", "zero", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count")


# --------------------------------------------------------------------------------------------------
# one-shot evaluation (the engine's compute, usable alone)
# --------------------------------------------------------------------------------------------------
def _threshold_t(rule: str, s: Tensor, valid: Tensor | None, tau: float | None, n_r: int | None) -> Tensor:
    """τ on the known-ness score s (float64 device 0-d tensor; no host read)."""
    dev = s.device
    if rule == "zero":
        return torch.zeros((), dtype=F64, device=dev)
    if rule == "fixed":
        if tau is None:
            raise ValueError("threshold 'fixed' needs tau")
        return torch.full((), float(tau), dtype=F64, device=dev)
    if rule == "reject_count" and n_r is None:
        raise ValueError("threshold 'reject_count' needs n_r")
    if rule == "reject_count" and int(n_r) < 1:
        raise ValueError(f"reject_count: n_r must be >= 1, got {n_r}")
    if s.numel() == 0:
        return torch.zeros((), dtype=F64, device=dev)
    if rule == "target_otsu":
        return _otsu_t(s, valid)
    if rule == "target_gmm":
        return _gmm_t(s, valid)
    if rule == "ros_mean":
        return _ros_mean_t(s, valid)
    if rule == "reject_count":
        return _reject_count_t(s, int(n_r), valid)
    raise ValueError(f"unknown threshold rule {rule!r}; allowed: {', '.join(THRESHOLDS)}")


def _all_metrics_t(v: Tensor, ym: Tensor, yo_unk: Tensor, pc: Tensor, k: int, tau_s: float | Tensor,
                   curve: str, n_unk_classes: int,
                   valid: Tensor | None = None) -> tuple[list[str], list[Tensor], Tensor]:
    """Every metric as device scalars. ``v`` unknown scores, ``ym`` y_merged (0…k, k = u),
    ``yo_unk`` index of the original unknown class (−1 for knowns), ``pc`` pred_closed (0…k-1).

    ``valid`` (bool, default all): rows that count. The others are pushed out of every count and
    sorted behind the valid rows (their own tie group), so the values equal, bit for bit, those of
    the valid rows alone, with no boolean selection and no host read."""
    dev = v.device
    n = v.numel()
    if valid is None:
        valid = torch.ones(n, dtype=torch.bool, device=dev)
    n_valid = valid.sum()
    unknown = valid & (ym == k)
    known = valid & (ym != k)
    s = -v
    accept = s.to(F64) >= tau_s  # exact: every float32 value is a float64 value
    pred_open = torch.where(accept, pc, torch.full_like(pc, k))
    trash = (k + 1) * (k + 1)
    idx = torch.where(valid, ym * (k + 1) + pred_open, torch.full_like(ym, trash))
    cm = torch.zeros(trash + 1, dtype=torch.int64, device=dev).scatter_add_(
        0, idx, torch.ones_like(idx))[:trash].view(k + 1, k + 1)
    rec = _recalls_t(cm)
    os_star_t = _nanmean_t(rec[:-1])
    unk_t = rec[-1]
    os_t = _nanmean_t(rec)
    n_k = known.sum()
    nan = torch.full((), NAN, dtype=F64, device=dev)
    acc_k = torch.diagonal(cm)[:-1].sum().to(F64) / n_k.clamp(min=1).to(F64)
    acc_k = torch.where(n_k > 0, acc_k, nan)
    correct = known & (pc == ym)
    closed = torch.where(n_k > 0, correct.sum().to(F64) / n_k.clamp(min=1).to(F64), nan)
    overall = torch.diagonal(cm).sum().to(F64) / n_valid.clamp(min=1).to(F64)
    if n_unk_classes:
        ui = torch.where(unknown, yo_unk, torch.full_like(yo_unk, n_unk_classes))
        hit = torch.zeros(n_unk_classes + 1, dtype=torch.int64, device=dev).scatter_add_(
            0, ui, (pred_open == k).long())
        cnt = torch.zeros(n_unk_classes + 1, dtype=torch.int64, device=dev).scatter_add_(0, ui, torch.ones_like(ui))
        hit, cnt = hit[:-1].to(F64), cnt[:-1].to(F64)
        rate = torch.where(cnt > 0, hit / cnt.clamp(min=1), torch.full_like(cnt, NAN))
        unk_cm = _nanmean_t(rate)
    else:
        unk_cm = nan
    names = ["closed_acc", "os_star", "unk", "os", "hos", "unk_classmean", "hos_classmean", "h_instance",
             "overall_acc", "auroc", "fpr95", "fpr95_idpos", "aupr_in", "aupr_out", "ap_in", "ap_out", "oscr",
             "oscr_arpl"]
    if n:
        srt = _Sorted(v, valid)  # the one sort every curve metric shares
        auc = _auroc_t(srt, unknown, known)
        fpr = _fpr_at_tpr_t(srt, unknown, known, 19, 20, drop=curve == "sklearn_drop")
        fpr_id = _fpr_at_tpr_t(srt, known, unknown, 19, 20, descending=False)
        pr_in, ap_i = _aupr_t(srt, known, unknown, False)
        pr_out, ap_o = _aupr_t(srt, unknown, known, True)
        osc = _oscr_t(srt, unknown, known, correct)
        osc_a = _oscr_arpl_t(v, unknown, known, correct, valid)
    else:
        auc = fpr = fpr_id = pr_in = ap_i = pr_out = ap_o = osc = osc_a = nan
    vals = [closed, os_star_t, unk_t, os_t, _harm_t(os_star_t, unk_t), unk_cm, _harm_t(os_star_t, unk_cm),
            _harm_t(acc_k, unk_t), overall, auc, fpr, fpr_id, pr_in, pr_out, ap_i, ap_o, osc, osc_a]
    return names, vals, cm


def open_set_metrics(unknown_score, y_merged, pred_closed, num_known: int, *, tau: float = 0.0,
                     y_orig=None, curve: str = "full") -> dict[str, float]:
    """Every metric of §8 at once. Accept iff s = −unknown_score ≥ ``tau``.

    ``y_merged``: known index 0…|K|-1 or u = |K|; ``y_orig`` (optional): original ids, used for
    ``unk_classmean`` (entries of known samples are ignored)."""
    v = _scores_1d(unknown_score)
    _check_finite(v)
    ym = torch.as_tensor(np.asarray(y_merged)).reshape(-1).long().to(v.device)
    pc = torch.as_tensor(np.asarray(pred_closed)).reshape(-1).long().to(v.device)
    if not (ym.numel() == pc.numel() == v.numel()):
        raise ValueError("unknown_score, y_merged and pred_closed must have the same length")
    k = int(num_known)
    if bool(((ym < 0) | (ym > k)).any()) or bool(((pc < 0) | (pc >= k)).any()):
        raise ValueError(f"y_merged must be in 0…{k} and pred_closed in 0…{k - 1}")
    n_uc = 0
    yo = torch.full_like(ym, -1)
    if y_orig is not None:
        yorig = torch.as_tensor(np.asarray(y_orig)).reshape(-1).long().to(v.device)
        classes, inv = torch.unique(torch.where(ym == k, yorig, torch.full_like(yorig, -(2**62))), return_inverse=True)
        has_pad = bool((ym != k).any())
        n_uc = len(classes) - int(has_pad)
        yo = torch.where(ym == k, inv - int(has_pad), torch.full_like(ym, -1))
    names, vals, _ = _all_metrics_t(v, ym, yo, pc, k, float(tau), curve, n_uc)
    return dict(zip(names, torch.stack([x.to(F64) for x in vals]).cpu().tolist()))


# --------------------------------------------------------------------------------------------------
# the streaming engine
# --------------------------------------------------------------------------------------------------
@register_engine("open_set")
class OpenSetEngine:
    """Streaming open-set metrics of one eval set (``specs/metrics.md`` §§2.3, 8).

    Score, y_merged, original-unknown index and pred_closed are written into preallocated device
    buffers at host offsets (grown by doubling when ``num_samples`` was not given): no per-batch sync.
    Each batch also counts, on the device, its rows (with a counted label) whose known-class logits
    hold a NaN or ``+inf`` or only ``-inf`` entries, and whose score is NaN or ``±inf``.
    :meth:`compute` picks τ by the ``threshold`` rule on the device (every rule, the target ones
    included), builds ``cm_open`` with one scatter-add and evaluates every metric, τ, the sample count
    and the two bad-row counts into one float64 tensor: **one** device→host transfer per evaluation.
    Rows with an ignored label are masked, not selected. It raises :class:`NonFiniteError` when a
    bad-row count is > 0.

    Args:
        num_classes: size of the scenario's label space (targets are original ids 0…num_classes-1).
        known_classes: the known ids, in order (known index k = ``known_classes[k]``).
        unknown_classes: original ids merged to u (default: every other id).
        threshold: ``"auto"`` (default: ``"zero"`` when the strategy gives an unknown score — the
            openworld detectors return ``τ − s`` so 0 is their own label-free decision — else
            ``"target_otsu"`` on the engine's detector), ``"zero"``, ``"fixed"`` (with ``tau`` on s),
            ``"target_otsu"``, ``"target_gmm"``, ``"ros_mean"``, ``"reject_count"`` (with ``n_r``).
        detector: known-ness score built from the known-class logits when the strategy has none:
            ``"msp"`` (default) or ``"energy"``; ``temperature`` T.
        curve: ``"full"`` or ``"sklearn_drop"`` (``fpr95`` exactly as OpenOOD).
    """

    def __init__(self, num_classes: int, device: str | torch.device = "cpu", *,
                 known_classes: Sequence[int], unknown_classes: Sequence[int] | None = None,
                 threshold: str = "auto", tau: float | None = None, n_r: int | None = None,
                 detector: str = "msp", temperature: float = 1.0, curve: str = "full",
                 num_samples: int | None = None):
        c = int(num_classes)
        known = [int(x) for x in known_classes]
        if not known:
            raise ValueError("open_set engine: known_classes is empty")
        if len(set(known)) != len(known) or min(known) < 0 or max(known) >= c:
            raise ValueError(f"open_set engine: known_classes must be distinct ids in 0…{c - 1}, got {known}")
        if unknown_classes is None:
            unknown = [x for x in range(c) if x not in set(known)]
        else:
            unknown = [int(x) for x in unknown_classes]
        if set(unknown) & set(known) or (unknown and (min(unknown) < 0 or max(unknown) >= c)):
            raise ValueError(f"open_set engine: unknown_classes must be ids in 0…{c - 1} disjoint from the known ones")
        if threshold not in THRESHOLDS:
            raise ValueError(f"open_set engine: unknown threshold {threshold!r}; allowed: {', '.join(THRESHOLDS)}")
        if detector not in ("msp", "energy"):
            raise ValueError(f"open_set engine: detector must be 'msp' or 'energy', got {detector!r}")
        if curve not in ("full", "sklearn_drop"):
            raise ValueError(f"open_set engine: curve must be 'full' or 'sklearn_drop', got {curve!r}")
        self.num_classes, self.device = c, torch.device(device)
        self.known_classes, self.unknown_classes = tuple(known), tuple(unknown)
        self.threshold, self.tau, self.n_r = threshold, tau, n_r
        self.detector, self.temperature, self.curve = detector, float(temperature), curve
        k = len(known)
        dev = self.device
        merged = torch.full((c,), -1, dtype=torch.long)
        merged[torch.tensor(known)] = torch.arange(k)
        uidx = torch.full((c,), -1, dtype=torch.long)
        if unknown:
            merged[torch.tensor(unknown)] = k
            uidx[torch.tensor(unknown)] = torch.arange(len(unknown))
        self._merged, self._uidx = merged.to(dev), uidx.to(dev)
        self._known_t = torch.tensor(known, dtype=torch.long, device=dev)
        self._cap = max(int(num_samples or 0), 1)
        self._alloc(self._cap, torch.float32)
        self._offset = 0
        self._source: str | None = None  # "strategy" or "engine"
        self._bad = torch.zeros(2, dtype=torch.long, device=dev)  # rows with bad [logits, score]
        self._cm: Tensor | None = None
        self.tau_used: float | None = None
        self.num_samples: int | None = None

    def _alloc(self, n: int, dtype) -> None:
        dev = self.device
        self._score = torch.zeros(n, dtype=dtype, device=dev)
        self._ym = torch.full((n,), -1, dtype=torch.long, device=dev)
        self._yu = torch.full((n,), -1, dtype=torch.long, device=dev)
        self._pc = torch.zeros(n, dtype=torch.long, device=dev)

    def _grow(self, need: int, dtype) -> None:
        if need <= self._cap and dtype == self._score.dtype:
            return
        old = (self._score, self._ym, self._yu, self._pc)
        cap = max(need, 2 * self._cap) if need > self._cap else self._cap
        self._alloc(cap, dtype)
        n = self._offset
        self._score[:n] = old[0][:n].to(dtype)
        self._ym[:n], self._yu[:n], self._pc[:n] = old[1][:n], old[2][:n], old[3][:n]
        self._cap = cap

    def observe(self, logits: Tensor, targets, unknown_score: Tensor | None = None) -> None:
        dev = self.device
        z = logits.to(dev)
        if z.dim() != 2 or z.shape[1] < max(self.known_classes) + 1:
            raise ValueError(f"open_set engine: logits must be [B, ≥{max(self.known_classes) + 1}], "
                             f"got {tuple(z.shape)}")
        z = z.index_select(1, self._known_t)
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()
        y = torch.as_tensor(targets).to(dev).long().reshape(-1)
        b = y.numel()
        source = "strategy" if unknown_score is not None else "engine"
        if self._source is None:
            self._source = source
        elif self._source != source:
            raise ValueError("open_set engine: some batches have an unknown_score and some do not")
        if unknown_score is not None:
            v = unknown_score.to(dev).reshape(-1)
            if v.numel() != b:
                raise ValueError(f"open_set engine: unknown_score has {v.numel()} entries for {b} targets")
            if v.dtype in (torch.float16, torch.bfloat16) or not v.is_floating_point():
                v = v.float()
        else:
            s = msp_score(z, self.temperature) if self.detector == "msp" else energy_score(z, self.temperature)
            v = -s
        dtype = torch.float64 if (v.dtype == torch.float64 or self._score.dtype == torch.float64) else torch.float32
        self._grow(self._offset + b, dtype)
        sl = slice(self._offset, self._offset + b)
        valid = (y >= 0) & (y < self.num_classes)
        yc = y.clamp(0, self.num_classes - 1)
        ym = torch.where(valid, self._merged[yc], torch.full_like(y, -1))
        scored = ym >= 0
        # unusable outputs on counted rows: counted on the device, raised by compute() (no sync here)
        self._bad += torch.stack([(_nonfinite_rows_t(z) & scored).sum(), (~torch.isfinite(v) & scored).sum()])
        self._score[sl] = v.to(dtype)
        self._ym[sl] = ym
        self._yu[sl] = torch.where(valid, self._uidx[yc], torch.full_like(y, -1))
        self._pc[sl] = z.argmax(1)
        self._offset += b

    @property
    def threshold_rule(self) -> str:
        """The rule that decides known/unknown in :meth:`compute` (``auto`` resolved)."""
        return self._rule()

    def _rule(self) -> str:
        if self.threshold != "auto":
            return self.threshold
        return "zero" if self._source == "strategy" else "target_otsu"

    def compute(self) -> dict[str, float]:
        """Every metric (fractions, NaN where undefined); samples with ignored labels do not count.

        One device→host transfer: the metrics, τ, the sample count and the bad-row counts are
        stacked into one float64 tensor. Raises :class:`NonFiniteError` if a counted row had
        non-finite logits or scores (checked before τ and the metrics are stored)."""
        n = self._offset
        k = len(self.known_classes)
        ym = self._ym[:n]
        valid = ym >= 0
        v, yu, pc = self._score[:n], self._yu[:n], self._pc[:n]
        s = torch.where(valid, -v.to(F64), torch.zeros((), dtype=F64, device=v.device))
        n_valid = valid.sum()
        rule = self._rule()
        tau = _threshold_t(rule, s, valid, self.tau, self.n_r)
        tau = torch.where(n_valid > 0, tau, torch.zeros_like(tau))  # no sample: τ = 0
        names, vals, cm = _all_metrics_t(v, ym, yu, pc, k, tau, self.curve, len(self.unknown_classes), valid=valid)
        extra = [tau, n_valid, self._bad[0], self._bad[1]]
        host = torch.stack([x.to(F64) for x in vals + extra]).cpu().tolist()  # the one transfer
        bad_score, bad_logits, n_ok, tau_used = (host.pop() for _ in range(4))
        n_ok = int(n_ok)
        if bad_logits:
            raise NonFiniteError("logits", int(bad_logits), n_ok, LOGITS_DETAIL)
        if bad_score:
            what = "unknown_score" if self._source == "strategy" else f"{self.detector} score"
            raise NonFiniteError(what, int(bad_score), n_ok)
        if rule == "reject_count" and n_ok and int(self.n_r) > n_ok:
            raise ValueError(f"reject_count: n_r must be in 1…{n_ok}, got {self.n_r}")
        self._cm = cm
        self.tau_used = tau_used
        self.num_samples = n_ok
        return dict(zip(names, host))

    def roc_points(self, max_points: int = 256) -> dict[str, list[float]] | None:
        """The ROC of §8.2 (unknown = positive, higher score = more unknown) as ``{"fpr", "tpr"}``,
        thinned to at most ``max_points`` points for plotting; None without both kinds of sample."""
        n = self._offset
        ym = self._ym[:n]
        keep = ym >= 0
        v, pos = self._score[:n][keep], ym[keep] == len(self.known_classes)
        n_pos = int(pos.sum())
        n_neg = int(pos.numel()) - n_pos
        if n_pos == 0 or n_neg == 0:
            return None
        order = torch.sort(v, descending=True, stable=True).indices
        vs, ps = v[order], pos[order].long()
        ends = torch.ones_like(ps, dtype=torch.bool)
        ends[:-1] = vs[:-1] != vs[1:]
        tp, fp = torch.cumsum(ps, 0)[ends], torch.cumsum(1 - ps, 0)[ends]
        fpr = torch.cat([tp.new_zeros(1), fp]).double() / n_neg
        tpr = torch.cat([tp.new_zeros(1), tp]).double() / n_pos
        if len(fpr) > max_points:
            idx = torch.linspace(0, len(fpr) - 1, max_points, device=fpr.device).round().long()
            fpr, tpr = fpr[idx], tpr[idx]
        return {"fpr": fpr.cpu().tolist(), "tpr": tpr.cpu().tolist()}

    def confusion(self) -> Tensor | None:
        """``cm_open`` [|K|+1, |K|+1] (int64, CPU) of the last :meth:`compute`; rows = y_merged.
        None before the first compute after construction or :meth:`reset`."""
        return None if self._cm is None else self._cm.cpu()

    def per_class(self) -> Tensor | None:
        """Open-set recall per row of :meth:`confusion` (|K| known classes, then u); None likewise."""
        return None if self._cm is None else _recalls_t(self._cm).cpu()

    def reset(self) -> None:
        """Forget every sample, the last confusion matrix, τ and the bad-row counts."""
        self._offset = 0
        self._source = None
        self._bad.zero_()
        self._cm = None
        self.tau_used = None
        self.num_samples = None
