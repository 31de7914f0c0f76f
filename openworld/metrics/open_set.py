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


def _check_finite(v: Tensor) -> None:
    if not bool(torch.isfinite(v).all()):
        raise ValueError("scores contain NaN or infinite values (as in scikit-learn, this is an error)")


def _tpr_fraction(tpr: float) -> tuple[int, int]:
    if not 0 < float(tpr) <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    fr = Fraction(float(tpr)).limit_denominator(10**6)
    return fr.numerator, fr.denominator


# --------------------------------------------------------------------------------------------------
# §2.5 — one sort, tie groups (device, static shapes)
# --------------------------------------------------------------------------------------------------
class _Sorted:
    """``v`` sorted once, ascending and stable, with its tie groups.

    ``is_end[i]``: sorted position i ends a tie group (``v[i] != v[i+1]``; the last position always
    does); ``start[i]``/``end[i]``: first/last position of the group holding position i. Every curve
    of §8 is read off this one sort: a curve ranking by **descending** v takes its points at the group
    ends in reverse order, with counts ``total − cumsum[start−1]``; one ranking by ascending v (i.e.
    descending s) uses ``cumsum[end]`` directly.
    """

    def __init__(self, v: Tensor):
        n = v.numel()
        vs, self.order = torch.sort(v, stable=True)
        dev = v.device
        self.n = n
        self.pos = torch.arange(n, device=dev)
        self.is_end = torch.ones(n, dtype=torch.bool, device=dev)
        if n > 1:
            self.is_end[:-1] = vs[:-1] != vs[1:]
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


def _auroc_t(srt: _Sorted, pos: Tensor) -> Tensor:
    """Integer rank form: 2·Σ_{x∈P} r_x = Σ_{x∈P} (start+1 + end+1) in ascending v; ties count ½."""
    p = pos[srt.order].long()
    n_p = p.sum()
    n_n = p.numel() - n_p
    num = ((p * (srt.start + srt.end + 2)).sum() - n_p * (n_p + 1)).to(F64)
    den = (2 * n_p * n_n).to(F64)
    return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, NAN))


def _points(srt: _Sorted, pos: Tensor, descending: bool):
    """Per sorted position (meaningful at group ends): ``(tp, fp, prev_tp, prev_fp, n_p, n_n)`` of the
    curve ranking ``pos`` by descending v (``descending=True``) or ascending v; ``prev_*`` is the
    previous curve point (the next-higher threshold; (0, 0) before the first)."""
    cp, cn = srt.cum(pos), srt.cum(~pos)
    n_p, n_n = cp[-1], cn[-1]
    if descending:
        tp, fp = n_p - srt.before(cp, srt.start), n_n - srt.before(cn, srt.start)
        prev_tp, prev_fp = n_p - cp[srt.end], n_n - cn[srt.end]
    else:
        tp, fp = cp[srt.end], cn[srt.end]
        prev_tp, prev_fp = srt.before(cp, srt.start), srt.before(cn, srt.start)
    return tp, fp, prev_tp, prev_fp, n_p, n_n


def _fpr_at_tpr_t(srt: _Sorted, pos: Tensor, num: int, den: int, descending: bool = True,
                  drop: bool = False) -> Tensor:
    """FP_{k*}/n_N, k* = the first curve point with den·TP ≥ num·n_P (integer test)."""
    tp, fp, prev_tp, prev_fp, n_p, n_n = _points(srt, pos, descending)
    keep = srt.is_end
    if drop:  # sklearn roc_curve(drop_intermediate=True): drop interior points with zero second difference
        if not descending:
            raise ValueError("curve 'sklearn_drop' is defined for the unknown-positive curve only")
        lower = (srt.start - 1).clamp(min=0)  # the next curve point is the group below (ascending order)
        next_tp, next_fp = tp[lower], fp[lower]
        first, last = srt.end == srt.n - 1, srt.start == 0
        d2_tp = (next_tp - tp) - (tp - prev_tp)
        d2_fp = (next_fp - fp) - (fp - prev_fp)
        keep = srt.is_end & (first | last | (d2_tp != 0) | (d2_fp != 0))
    cond = keep & (den * tp >= num * n_p)
    if descending:  # curve order = descending sorted position: the first point is the largest index
        k = torch.where(cond, srt.pos, torch.full_like(srt.pos, -1)).max().clamp(min=0)
    else:
        k = torch.argmax(cond.to(torch.int8))
    val = fp[k].to(F64) / n_n.clamp(min=1).to(F64)
    return torch.where((n_p > 0) & (n_n > 0), val, torch.full_like(val, NAN))


def _aupr_t(srt: _Sorted, pos: Tensor, descending: bool) -> tuple[Tensor, Tensor]:
    """(trapezoid AUPR, average precision); the curve starts at (R=0, P=1)."""
    tp, fp, prev_tp, prev_fp, n_p, _ = _points(srt, pos, descending)
    npf = n_p.clamp(min=1).to(F64)
    prec = tp.to(F64) / (tp + fp).clamp(min=1).to(F64)
    prev_n = prev_tp + prev_fp
    prev_prec = torch.where(prev_n > 0, prev_tp.to(F64) / prev_n.clamp(min=1).to(F64), torch.ones_like(prec))
    dr = torch.where(srt.is_end, (tp - prev_tp).to(F64) / npf, torch.zeros_like(prec))
    trap = (dr * (prec + prev_prec) / 2).sum()
    ap = (dr * prec).sum()
    nan = torch.full_like(trap, NAN)
    return torch.where(n_p > 0, trap, nan), torch.where(n_p > 0, ap, nan)


def _oscr_t(srt: _Sorted, unknown: Tensor, correct: Tensor) -> Tensor:
    """Area under CCR(θ) vs FPR(θ), θ = the distinct s = −v in descending order (ascending v)."""
    cu, cc = srt.cum(unknown), srt.cum(correct & ~unknown)
    n_u = cu[-1]
    n_k = srt.n - n_u
    fu, fk = n_u.clamp(min=1).to(F64), n_k.clamp(min=1).to(F64)
    fpr, ccr = cu[srt.end].to(F64) / fu, cc[srt.end].to(F64) / fk
    pfpr, pccr = srt.before(cu, srt.start).to(F64) / fu, srt.before(cc, srt.start).to(F64) / fk
    area = torch.where(srt.is_end, (fpr - pfpr) * (ccr + pccr) / 2, torch.zeros_like(fpr)).sum()
    return torch.where((n_u > 0) & (n_k > 0), area, torch.full_like(area, NAN))


def _oscr_arpl_t(v: Tensor, unknown: Tensor, correct: Tensor) -> Tensor:
    """ARPL-lineage OSCR (compat): knowns then unknowns, stable ascending sort on s = −v."""
    dev = v.device
    kidx = torch.nonzero(~unknown).reshape(-1)
    uidx = torch.nonzero(unknown).reshape(-1)
    idx = torch.cat([kidx, uidx])
    s = -v[idx]
    is_u = unknown[idx].long()
    is_c = (correct[idx] & ~unknown[idx]).long()
    n, n_k, n_u = idx.numel(), kidx.numel(), uidx.numel()
    if n_k == 0 or n_u == 0:
        return torch.tensor(NAN, dtype=F64, device=dev)
    o = torch.sort(s, stable=True).indices
    su, sc = is_u[o], is_c[o]
    suf_u = torch.flip(torch.cumsum(torch.flip(su, (0,)), 0), (0,))  # #unknowns at positions >= k
    suf_c = torch.flip(torch.cumsum(torch.flip(sc, (0,)), 0), (0,))
    k = torch.arange(n - 1, device=dev)
    fpr = suf_u[k].to(F64) / n_u
    ccr = torch.where(k + 1 < n, suf_c[(k + 1).clamp(max=n - 1)], 0).to(F64) / n_k
    z = torch.zeros(2, dtype=F64, device=dev)
    fpr = torch.cat([fpr, z, torch.ones(1, dtype=F64, device=dev)])
    ccr = torch.cat([ccr, z, torch.ones(1, dtype=F64, device=dev)])
    # sorted(zip(FPR, CCR), reverse=True): lexicographic descending
    o2 = torch.sort(ccr, descending=True, stable=True).indices
    o2 = o2[torch.sort(fpr[o2], descending=True, stable=True).indices]
    f, c = fpr[o2], ccr[o2]
    return ((f[:-1] - f[1:]) * (c[:-1] + c[1:]) / 2).sum()


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
    return float(_auroc_t(_Sorted(v), u)) if v.numel() else NAN


def fpr_at_tpr(scores, is_unknown, tpr: float = 0.95, curve: str = "full") -> float:
    """Fraction of known samples flagged at the highest threshold catching ≥ ``tpr`` of the unknowns
    (the spec's ``fpr95``). ``curve="sklearn_drop"`` reproduces ``roc_curve(drop_intermediate=True)``."""
    if curve not in ("full", "sklearn_drop"):
        raise ValueError(f"curve must be 'full' or 'sklearn_drop', got {curve!r}")
    v, u = _prep(scores, is_unknown)
    if not v.numel():
        return NAN
    num, den = _tpr_fraction(tpr)
    return float(_fpr_at_tpr_t(_Sorted(v), u, num, den, drop=curve == "sklearn_drop"))


def fpr_at_tpr_idpos(scores, is_unknown, tpr: float = 0.95) -> float:
    """Classic convention (``fpr95_idpos``): known = positive ranked by s = −scores; the fraction of
    unknowns accepted at the highest threshold accepting ≥ ``tpr`` of the knowns."""
    v, u = _prep(scores, is_unknown)
    if not v.numel():
        return NAN
    num, den = _tpr_fraction(tpr)
    return float(_fpr_at_tpr_t(_Sorted(v), ~u, num, den, descending=False))


def aupr_in(scores, is_unknown) -> float:
    """AUPR with known = positive ranked by s = −scores (``auc(recall, precision)``)."""
    v, u = _prep(scores, is_unknown)
    return float(_aupr_t(_Sorted(v), ~u, False)[0]) if v.numel() else NAN


def aupr_out(scores, is_unknown) -> float:
    """AUPR with unknown = positive ranked by the scores."""
    v, u = _prep(scores, is_unknown)
    return float(_aupr_t(_Sorted(v), u, True)[0]) if v.numel() else NAN


def ap_in(scores, is_unknown) -> float:
    """Average precision, known = positive (``average_precision_score(~is_unknown, -scores)``)."""
    v, u = _prep(scores, is_unknown)
    return float(_aupr_t(_Sorted(v), ~u, False)[1]) if v.numel() else NAN


def ap_out(scores, is_unknown) -> float:
    """Average precision, unknown = positive."""
    v, u = _prep(scores, is_unknown)
    return float(_aupr_t(_Sorted(v), u, True)[1]) if v.numel() else NAN


def oscr(scores, is_unknown, correct) -> float:
    """Area under CCR(θ) vs FPR(θ) (Dhamija et al.); ``correct``: pred_closed == y for known samples."""
    v, u = _prep(scores, is_unknown)
    c = _bool_1d(correct, "correct", v.numel(), v.device)
    return float(_oscr_t(_Sorted(v), u, c)) if v.numel() else NAN


def oscr_arpl(scores, is_unknown, correct) -> float:
    """The ARPL-lineage OSCR code (compat; differs from :func:`oscr` on ties, vector F)."""
    v, u = _prep(scores, is_unknown)
    c = _bool_1d(correct, "correct", v.numel(), v.device)
    return float(_oscr_arpl_t(v, u, c)) if v.numel() else NAN


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
def msp_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """max_c softmax(z/T)_c (Hendrycks & Gimpel)."""
    return torch.softmax(logits.float() / temperature, dim=1).max(dim=1).values


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T·logsumexp(z/T): the negative free energy (Liu et al.)."""
    return temperature * torch.logsumexp(logits.float() / temperature, dim=1)


# --------------------------------------------------------------------------------------------------
# §5 — label-free threshold rules on the known-ness score s (accept iff s >= τ)
# --------------------------------------------------------------------------------------------------
def threshold_source_quantile(s_val, q: float = 0.05) -> float:
    """τ = ``torch.quantile(s_val, q, interpolation='linear')`` on held-out source known samples."""
    s = _scores_1d(s_val).to(F64)
    if s.numel() == 0:
        raise ValueError("source_quantile: the source validation split is empty")
    return float(torch.quantile(s, float(q), interpolation="linear"))


def threshold_otsu(s) -> float:
    """Otsu on ``numpy.histogram(s, 256, (min, max))``; τ = the right edge of the last class-0 bin."""
    x = _scores_1d(s).to(F64).cpu().numpy()
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return lo
    h, e = np.histogram(x, bins=256, range=(lo, hi))
    h = h.astype(np.float64)
    c = (e[:-1] + e[1:]) / 2
    w0 = np.cumsum(h)[:-1]
    w1 = h.sum() - w0
    m0 = np.cumsum(h * c)[:-1]
    m1 = (h * c).sum() - m0
    with np.errstate(invalid="ignore", divide="ignore"):
        mu0, mu1 = m0 / w0, m1 / w1
        var = np.where((w0 > 0) & (w1 > 0), w0 * w1 * (mu0 - mu1) ** 2, 0.0)
    k = int(np.argmax(var))
    return float(e[k + 1])


def threshold_gmm(s) -> float:
    """2-component 1-D Gaussian mixture, EM in float64 for exactly 100 iterations (card §5)."""
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
    """ROS: on s̃ = (s−min)/(max−min), known iff s̃ ≥ min((⌊10·mean s̃⌋+1)/10, 1); τ returned on s."""
    x = _scores_1d(s).to(F64).cpu().numpy()
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return lo
    st = (x - lo) / (hi - lo)
    t = min((math.floor(10 * float(st.mean())) + 1) / 10, 1.0)
    return lo + t * (hi - lo)


def threshold_reject_count(s, n_r: int) -> float:
    """OSLPP: samples with s ≤ the n_r-th smallest score are unknown; τ = the next larger value."""
    x = np.sort(_scores_1d(s).to(F64).cpu().numpy())
    if not 1 <= int(n_r) <= len(x):
        raise ValueError(f"reject_count: n_r must be in 1…{len(x)}, got {n_r}")
    cut = x[int(n_r) - 1]
    return float(np.nextafter(cut, np.inf))


THRESHOLDS = ("auto", "zero", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count")


# --------------------------------------------------------------------------------------------------
# one-shot evaluation (the engine's compute, usable alone)
# --------------------------------------------------------------------------------------------------
def _threshold_on_s(rule: str, s: Tensor, tau: float | None, n_r: int | None) -> float:
    if rule in ("zero",):
        return 0.0
    if rule == "fixed":
        if tau is None:
            raise ValueError("threshold 'fixed' needs tau")
        return float(tau)
    if rule == "target_otsu":
        return threshold_otsu(s)
    if rule == "target_gmm":
        return threshold_gmm(s)
    if rule == "ros_mean":
        return threshold_ros_mean(s)
    if rule == "reject_count":
        if n_r is None:
            raise ValueError("threshold 'reject_count' needs n_r")
        return threshold_reject_count(s, n_r)
    raise ValueError(f"unknown threshold rule {rule!r}; allowed: {', '.join(THRESHOLDS)}")


def _all_metrics_t(v: Tensor, ym: Tensor, yo_unk: Tensor, pc: Tensor, k: int, tau_s: float,
                   curve: str, n_unk_classes: int) -> tuple[list[str], list[Tensor], Tensor]:
    """Every metric as device scalars. ``v`` unknown scores, ``ym`` y_merged (0…k, k = u),
    ``yo_unk`` index of the original unknown class (−1 for knowns), ``pc`` pred_closed (0…k-1)."""
    dev = v.device
    unknown = ym == k
    known = ~unknown
    s = -v
    accept = s.to(F64) >= tau_s  # exact: every float32 value is a float64 value
    pred_open = torch.where(accept, pc, torch.full_like(pc, k))
    idx = ym * (k + 1) + pred_open
    cm = torch.zeros((k + 1) * (k + 1), dtype=torch.int64, device=dev).scatter_add_(
        0, idx, torch.ones_like(idx)).view(k + 1, k + 1)
    rec = _recalls_t(cm)
    os_star_t = _nanmean_t(rec[:-1])
    unk_t = rec[-1]
    os_t = _nanmean_t(rec)
    n_k = known.sum()
    acc_k = torch.diagonal(cm)[:-1].sum().to(F64) / n_k.clamp(min=1).to(F64)
    acc_k = torch.where(n_k > 0, acc_k, torch.full_like(acc_k, NAN))
    correct = known & (pc == ym)
    closed = torch.where(n_k > 0, correct.sum().to(F64) / n_k.clamp(min=1).to(F64), torch.tensor(NAN, dtype=F64,
                                                                                                   device=dev))
    overall = torch.diagonal(cm).sum().to(F64) / torch.tensor(max(ym.numel(), 1), dtype=F64, device=dev)
    if n_unk_classes:
        ui = torch.where(unknown, yo_unk, torch.full_like(yo_unk, n_unk_classes))
        hit = torch.zeros(n_unk_classes + 1, dtype=F64, device=dev).scatter_add_(
            0, ui, (pred_open == k).to(F64))
        cnt = torch.zeros(n_unk_classes + 1, dtype=F64, device=dev).scatter_add_(0, ui, torch.ones_like(v, dtype=F64))
        rate = torch.where(cnt[:-1] > 0, hit[:-1] / cnt[:-1].clamp(min=1), torch.full_like(cnt[:-1], NAN))
        unk_cm = _nanmean_t(rate)
    else:
        unk_cm = torch.tensor(NAN, dtype=F64, device=dev)
    names = ["closed_acc", "os_star", "unk", "os", "hos", "unk_classmean", "hos_classmean", "h_instance",
             "overall_acc", "auroc", "fpr95", "fpr95_idpos", "aupr_in", "aupr_out", "ap_in", "ap_out", "oscr",
             "oscr_arpl"]
    if v.numel():
        srt = _Sorted(v)  # the one sort every curve metric shares
        auc = _auroc_t(srt, unknown)
        fpr = _fpr_at_tpr_t(srt, unknown, 19, 20, drop=curve == "sklearn_drop")
        fpr_id = _fpr_at_tpr_t(srt, known, 19, 20, descending=False)
        pr_in, ap_i = _aupr_t(srt, known, False)
        pr_out, ap_o = _aupr_t(srt, unknown, True)
        osc = _oscr_t(srt, unknown, correct)
        osc_a = _oscr_arpl_t(v, unknown, correct)
    else:
        auc = fpr = fpr_id = pr_in = ap_i = pr_out = ap_o = osc = osc_a = torch.tensor(NAN, dtype=F64, device=dev)
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
    :meth:`compute` picks τ by the ``threshold`` rule, builds ``cm_open`` with one scatter-add and
    evaluates every metric into one float64 tensor, transferred once (the target rules ``target_*``,
    ``ros_mean`` and ``reject_count`` read the score buffer to the host once more).

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
        self.tau_used: float | None = None

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
        self._score[sl] = v.to(dtype)
        self._ym[sl] = torch.where(valid, self._merged[yc], torch.full_like(y, -1))
        self._yu[sl] = torch.where(valid, self._uidx[yc], torch.full_like(y, -1))
        self._pc[sl] = z.argmax(1)
        self._offset += b

    def _rule(self) -> str:
        if self.threshold != "auto":
            return self.threshold
        return "zero" if self._source == "strategy" else "target_otsu"

    def compute(self) -> dict[str, float]:
        """Every metric (fractions, NaN where undefined); samples with ignored labels are dropped."""
        n = self._offset
        ym = self._ym[:n]
        keep = ym >= 0
        # one boolean selection per evaluation (not per batch)
        v, ym, yu, pc = self._score[:n][keep], ym[keep], self._yu[:n][keep], self._pc[:n][keep]
        _check_finite(v)
        k = len(self.known_classes)
        rule = self._rule()
        tau = _threshold_on_s(rule, -v, self.tau, self.n_r) if v.numel() else 0.0
        self.tau_used = tau
        names, vals, cm = _all_metrics_t(v, ym, yu, pc, k, tau, self.curve, len(self.unknown_classes))
        self._cm = cm
        out = dict(zip(names, torch.stack([x.to(F64) for x in vals]).cpu().tolist()))
        self.num_samples = int(v.numel())
        return out

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
        """``cm_open`` [|K|+1, |K|+1] (int64, CPU) of the last :meth:`compute`; rows = y_merged."""
        return self._cm.cpu() if hasattr(self, "_cm") else None

    def per_class(self) -> Tensor | None:
        """Open-set recall per row of :meth:`confusion` (|K| known classes, then u)."""
        return _recalls_t(self._cm).cpu() if hasattr(self, "_cm") else None

    def reset(self) -> None:
        self._offset = 0
        self._source = None
        self.tau_used = None
