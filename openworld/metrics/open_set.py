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

Besides §8 the engine reports selective classification (:mod:`openworld.metrics.selective`) with confidence
−unknown_score and "correct" = a known sample whose closed prediction is right (an unknown is never right):
``aurc``, ``e_aurc`` (lower is better) and ``acc@cov0.5``/``0.8``/``0.9``/``0.95``, from the curves' own sort.
"""

from __future__ import annotations

import functools
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
# selective classification over confidence −unknown_score (metrics/selective.py): accuracy at these coverages
SELECTIVE_COVERAGES = tuple(Fraction(c) for c in ("1/2", "4/5", "9/10", "19/20"))
SELECTIVE_NAMES = ("aurc", "e_aurc", "acc@cov0.5", "acc@cov0.8", "acc@cov0.9", "acc@cov0.95")

CPU_THREADS: int | None = 1
"""Intra-op threads for the metric computations on CPU tensors (``None``: torch's own setting).

They are ~100 short memory-bound kernels over the score buffer (a few ms each at 10⁶ rows): extra
threads gain little on them, and on a shared or oversubscribed CPU every parallel kernel waits for
its second thread to be scheduled (measured on 2 shared cores: ~12 ms per kernel with 2 threads,
~0.5 ms with 1). The previous setting is restored on exit; CUDA tensors are not affected."""


def _cpu_threads(fn):
    """Run ``fn`` with at most :data:`CPU_THREADS` intra-op threads (restored afterwards)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        want, old = CPU_THREADS, torch.get_num_threads()
        if want is None or old <= want:
            return fn(*args, **kwargs)
        torch.set_num_threads(want)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(old)

    return wrapper


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


def _tree_sum_rows(x: Tensor) -> Tensor:
    """:func:`_tree_sum_t` of every row of an ``[m, 2^k]`` tensor at once (the same adds per row)."""
    while x.shape[1] > 1:
        x = x[:, 0::2] + x[:, 1::2]
    return x[:, 0]


def _at(x: Tensor, i: Tensor) -> Tensor:
    """``x[i]`` for a 0-d index tensor without the host read that ``x[tensor]`` does."""
    return x.gather(0, i.reshape(1).to(torch.long)).reshape(())


class _Curves:
    """Every curve of §8 read off **one** stable ascending sort of ``v`` and one cumulative count.

    Rows with ``valid`` False get the key +inf, so the stable sort puts them behind every (finite)
    valid row, and position ``nv − 1`` (the last valid one) always ends a tie group: the valid rows
    hold positions ``0…nv−1`` in the order and with the tie groups of a sort of the valid rows alone,
    without a boolean selection. Ties keep the input order (the ARPL OSCR depends on it).

    Counts are float64 holding exact integers (< 2^53), so they feed the float metrics without casts,
    and rows ``K, U, C`` (known, unknown, correct known) share each op on one ``[3, n]`` tensor:
    ``cum`` = the count at positions ≤ i, ``prev`` = the count strictly before i's tie group (the
    previous curve point), ``ce`` = ``cum`` at a group end and ``prev`` elsewhere, so differences
    ``ce − prev`` vanish off the group ends and no per-metric mask is needed. A curve ranking by
    descending v reads ``total − prev`` / ``total − ce``, one ranking by ascending v ``ce`` / ``prev``.
    """

    K, U, C = 0, 1, 2

    def __init__(self, v: Tensor, unknown: Tensor, known: Tensor, correct: Tensor | None = None,
                 valid: Tensor | None = None):
        n = v.numel()
        dev = v.device
        self.n = n
        if valid is None:
            vs, order = torch.sort(v, stable=True)
            self.nv = torch.full((), n, dtype=torch.long, device=dev)
        else:
            vs, order = torch.sort(torch.where(valid, v, torch.full_like(v, math.inf)), stable=True)
            self.nv = valid.sum()
        is_end = torch.empty(n, dtype=torch.bool, device=dev)
        torch.ne(vs[:-1], vs[1:], out=is_end[:-1])
        is_end[-1] = True
        if valid is not None:  # the validity change ends a group too
            is_end.scatter_(0, (self.nv - 1).clamp(min=0).reshape(1), True)
        self.is_end = is_end
        correct = torch.zeros_like(known) if correct is None else correct
        self.flags = torch.stack([known, unknown, correct]).gather(1, order.expand(3, n))  # sorted, [3, n] bool
        self.cum = cum = torch.cumsum(self.flags, 1, dtype=F64)
        # prev[i] = cum at the last group end before i: a running max (each row is nondecreasing) of the
        # group-end counts, shifted by one position
        ends = torch.empty_like(cum)
        ends[:, 0] = 0
        torch.where(is_end[:-1], cum[:, :-1], cum.new_zeros(()), out=ends[:, 1:])
        self.prev = torch.cummax(ends, 1).values
        self.ce = torch.where(is_end, cum, self.prev, out=ends)  # (reuses the buffer)
        self.tot = self.cum[:, -1]  # n_k, n_u, n_c
        self.n_k, self.n_u = self.tot[0], self.tot[1]

    def auroc(self) -> Tensor:
        """Integer rank form (§8.3): 2·Σ_{x∈𝒰} r_x − n_u(n_u+1) = Σ_groups u_g·(pk + ck); ties count ½."""
        d_u, k2 = self.ce[1] - self.prev[1], self.prev[0] + self.ce[0]
        if self.n <= 1 << 26:  # every partial sum is an integer < 2^53: exact in float64
            num = (d_u * k2).sum()
        else:
            num = (d_u.long() * k2.long()).sum().to(F64)
        den = (2 * self.n_u.long() * self.n_k.long()).to(F64)
        return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, NAN))

    def fpr_unknown_pos(self, num: int, den: int, drop: bool = False) -> Tensor:
        """P = unknown ranked by descending v: FP_{k*}/n_k, k* = the first curve point with den·TP ≥ num·n_u.

        TP = n_u − prev_U at a group end, so the test is prev_U ≤ thr = n_u − ⌈num·n_u/den⌉; prev_U is
        nondecreasing and constant inside a group, so the last position passing it is a group end and
        one binary search finds it."""
        n_u, n_k = self.n_u, self.n_k
        nu = n_u.long()
        thr = (nu - (num * nu + den - 1) // den).to(F64)
        if not drop:
            k = torch.searchsorted(self.prev[1], thr.reshape(1), right=True).reshape(()) - 1
        else:  # sklearn roc_curve(drop_intermediate=True): drop interior points with zero second difference
            pos = torch.arange(self.n, device=thr.device)
            tp, fp = n_u - self.prev[1], n_k - self.prev[0]
            prev_tp, prev_fp = n_u - self.ce[1], n_k - self.ce[0]
            start = self.prev[0] + self.prev[1]
            lower = (start - 1).clamp(min=0).long()  # the next curve point is the group below (ascending order)
            next_tp, next_fp = tp.gather(0, lower), fp.gather(0, lower)
            d2_tp = (next_tp - tp) - (tp - prev_tp)
            d2_fp = (next_fp - fp) - (fp - prev_fp)
            cond = self.is_end & (pos < self.nv) & (self.prev[1] <= thr)
            cond = cond & ((pos == self.nv - 1) | (start == 0) | (d2_tp != 0) | (d2_fp != 0))
            k = torch.where(cond, pos, -1).max()  # curve order = descending position
        val = (n_k - _at(self.prev[0], k.clamp(min=0))) / n_k.clamp(min=1)
        return torch.where((n_u > 0) & (n_k > 0), val, torch.full_like(val, NAN))

    def fpr_known_pos(self, num: int, den: int) -> Tensor:
        """P = known ranked by ascending v: FP_{k*}/n_u, k* = the first group end with den·ce_K ≥ num·n_k
        (``ce_K`` is nondecreasing and first reaches ⌈num·n_k/den⌉ ≥ 1 at a group end: one binary search)."""
        n_u, n_k = self.n_u, self.n_k
        nk = n_k.long()
        thr = ((num * nk + den - 1) // den).to(F64)
        k = torch.searchsorted(self.ce[0], thr.reshape(1)).reshape(()).clamp(max=self.n - 1)
        val = _at(self.ce[1], k) / n_u.clamp(min=1)
        return torch.where((n_u > 0) & (n_k > 0), val, torch.full_like(val, NAN))

    def pr_terms(self, trap: Tensor, ap: Tensor) -> None:
        """Per-position terms of the PR curves (start (R=0, P=1)), row 0 AUPR-In (known = positive, ascending
        v), row 1 AUPR-Out (unknown = positive, descending v): trapezoids into ``trap``, AP terms into ``ap``."""
        ce, prev = self.ce, self.prev
        n_k, n_u = self.n_k, self.n_u
        tot = n_k + n_u
        # in-place ops on a few buffers: fresh multi-MB outputs cost a page fault per 4 KiB on CPU (and glibc
        # maps blocks over 32 MB afresh on every call, hence four buffers rather than one)
        tp_fp, prev_n, tp, prev_tp = (torch.empty(2, self.n, dtype=F64, device=ce.device) for _ in range(4))
        torch.add(ce[0], ce[1], out=tp_fp[0])  # In: TP + FP at the point
        torch.add(prev[0], prev[1], out=prev_n[0])  # In: at the previous point
        torch.sub(tot, prev_n[0], out=tp_fp[1])  # Out (descending v): the complements
        torch.sub(tot, tp_fp[0], out=prev_n[1])
        tp[0].copy_(ce[0])
        torch.sub(n_u, prev[1], out=tp[1])
        prev_tp[0].copy_(prev[0])
        torch.sub(n_u, ce[1], out=prev_tp[1])
        dr = (ce[:2] - prev[:2]).div_(self.tot[:2].clamp(min=1).reshape(2, 1))  # (tp − prev_tp)/n_p; 0 off ends
        prec = tp.div_(tp_fp.clamp_(min=1))
        start = prev_n <= 0  # the first point: its predecessor is (R=0, P=1)
        prev_prec = prev_tp.div_(prev_n.clamp_(min=1)).masked_fill_(start, 1.0)
        torch.div(prev_prec.add_(prec).mul_(dr), 2, out=trap)  # dr·(prec + prev_prec)/2
        torch.mul(dr, prec, out=ap)

    def oscr_terms(self, out: Tensor) -> None:
        """Trapezoids of CCR vs FPR over θ = the distinct s = −v in descending order (ascending v)."""
        f = torch.stack([self.n_u, self.n_k]).clamp(min=1).reshape(2, 1)
        hi, lo = self.ce[1:] / f, self.prev[1:] / f  # (FPR, CCR) at the point and the previous one
        torch.div((hi[0] - lo[0]) * (hi[1] + lo[1]), 2, out=out)

    def oscr_arpl_terms(self, out: Tensor) -> None:
        """The ARPL-lineage OSCR's trapezoids, laid out as that code sums them, into ``out`` (length ≥ n + 1).

        That code sorts by s ascending with tied knowns first (input order inside each kind), takes for
        k = 0…nv−2 the point (FP_k, CC_k) = (#unknowns at ≥ k, #correct knowns at > k), adds (0,0) and
        (1,1) and sums trapezoids over the points in descending (FPR, CCR) order. Both coordinates are
        nonincreasing in k, so that order is (1,1), the points by k, then (0,0): no second sort, and the
        trapezoid of summed position j = nv − i belongs to ascending position i = nv−1−k of a "virtual"
        layout that puts, inside each tie group, the unknowns first. A trapezoid is nonzero only after an
        unknown; there FP = i + 1 − prev_K and CC = prev_C, and the next point's CC is prev_C less, at a
        group start, whether the first (lowest input index) known of the group below is correct. The last
        trapezoid (i = 1) is closed by the (0,0) point."""
        n, dev = self.n, self.is_end.device
        cum, prev = self.cum, self.prev
        fu, fk = self.n_u.clamp(min=1), self.n_k.clamp(min=1)
        pk, pc = prev[0], prev[2]
        fp = torch.arange(1, n + 1, dtype=F64, device=dev).sub_(pk)  # FP at virtual position i if i is an unknown
        fp1 = fp - 1  # and at i − 1
        ends_u = torch.where(self.is_end, cum[1], math.inf).flip(0)
        cu_end = torch.cummin(ends_u, 0).values.flip(0)  # unknowns up to the group end
        unknown_here = fp1 < cu_end  # virtual position i is one of its group's unknowns
        cu_end_1 = cu_end[1].clone() if n >= 2 else None
        del ends_u, cu_end
        first_ok = self.flags[2] & (cum[0] - pk == 1)  # the group's first known (stable order) is correct
        last = torch.cummax(torch.cumsum(first_ok, 0, dtype=F64).mul_(self.is_end), 0).values
        t = torch.empty(n + 1, dtype=F64, device=dev)  # t[n] = 0: the summed position j = 0
        t[:2] = 0
        t[n] = 0
        if n > 2:
            # at a group start i, last[i−1] − last[i−2] = the flag of the group below; 0 inside a group
            cc_next = last[1:-1] - last[:-2]
            torch.sub(pc[2:], cc_next, out=cc_next)
            term = t[2:n]  # (FP_i/n_u − FP_{i−1}/n_u)·(CC_i/n_k + CC_next/n_k)/2, in place
            torch.div(fp[2:], fu, out=term).sub_(fp1[2:].div_(fu))
            term.mul_((pc[2:] / fk).add_(cc_next.div_(fk))).div_(2)
            term.mul_(unknown_here[2:])  # terms are finite and ≥ 0: ·0 gives +0
        if n >= 2:  # i = 1 against the appended (0,0); CC there counts virtual position 0
            e0 = torch.argmax(self.is_end.to(torch.uint8))  # end of group 0
            u0 = _at(cum[1], e0)  # unknowns in group 0
            pu1 = prev[1][1]
            fpv1 = pu1 + torch.minimum(2 - pu1 - pk[1], cu_end_1 - pu1)  # pu + min(offset + 1, group's unknowns)
            lone = (e0 >= 1) & (u0 == 0)  # group 0 holds only knowns: the highest input index is virtual 0
            cc1 = pc[1] + (lone & _at(self.flags[2], e0)).to(F64)
            t[1] = (fpv1 / fu) * (cc1 / fk) / 2
        # summed position j holds i = nv − j; t is 0 at i = 0, at i ≥ nv (ignored rows: fp1 ≥ n_u = cu_end there)
        # and at i = n, so j = 0 and j ≥ nv need no mask
        j = torch.arange(out.shape[0], device=dev)
        torch.gather(t, 0, (self.nv - j).clamp(min=0), out=out)


    def selective(self, coverages: Sequence[Fraction]) -> list[Tensor]:
        """AURC, E-AURC and accuracy at each coverage (``openworld.metrics.selective``) from this sort.

        Confidence = −v, so acceptance order = ascending v, the order of this sort. With b = valid rows before
        a position's tie group, e = rows up to its end, and c_b, c_e the correct counts there, the tie-averaged
        error count among the first k is E_k = (b − c_b) + (k − b)·g/(e − b) with g = (e − b) − (c_e − c_b) the
        group's errors (exact at group ends). The group-end counts are read by a reversed running min of the
        end-masked counts (both are nondecreasing)."""
        n, dev = self.n, self.is_end.device
        nv = self.nv.to(F64)
        k = torch.arange(1, n + 1, dtype=F64, device=dev)
        b = self.prev[0] + self.prev[1]
        c_b = self.prev[2]
        at_end = torch.where(self.is_end, torch.stack([k, self.cum[2]]), math.inf)
        e, c_e = torch.cummin(at_end.flip(1), 1).values.flip(1).unbind(0)
        size = e - b
        g = size - (c_e - c_b)
        err = (b - c_b).add_((k - b).mul_(g).div_(size))  # E_k; size ≥ 1 everywhere
        inside = k <= nv
        risk = torch.where(inside, err / k, torch.zeros((), dtype=F64, device=dev))
        r = nv - self.tot[2]  # errors in all: unknowns and wrong knowns
        oracle = torch.where(inside, (k - (nv - r)).clamp_(min=0).div_(k), torch.zeros((), dtype=F64, device=dev))
        p = 1 << n.bit_length()
        terms = torch.zeros(2, p, dtype=F64, device=dev)
        terms[0, :n], terms[1, :n] = risk, oracle
        sums = _tree_sum_rows(terms)
        has = nv > 0
        den = nv.clamp(min=1)
        nan = torch.full((), NAN, dtype=F64, device=dev)
        aurc_t = torch.where(has, sums[0] / den, nan)
        out = [aurc_t, torch.where(has, (sums[0] - sums[1]) / den, nan)]
        nvl = self.nv.long()
        for cov in coverages:  # m = ⌈c·n_valid⌉ in integers: c = 0.3 with 10 samples accepts exactly 3
            m = ((cov.numerator * nvl + cov.denominator - 1) // cov.denominator).clamp(min=1)
            idx = (m - 1).clamp(max=n - 1)
            out.append(torch.where(has, 1 - _at(err, idx) / m.to(F64), nan))
        return out


@_cpu_threads
def _curve_metrics_t(v: Tensor, unknown: Tensor, known: Tensor | None = None, correct: Tensor | None = None,
                     valid: Tensor | None = None, drop: bool = False, selective: bool = False) -> dict[str, Tensor]:
    """Every threshold-free metric of §8.3 from one :class:`_Curves` (one sort), with one tree sum over
    all per-position terms. ``unknown``, ``known`` (default: the other valid rows) and ``correct`` (known
    rows with pred_closed = y) must be False on rows with ``valid`` False. Each metric is bit-identical
    to its own evaluation and unchanged by invalid rows (they add zero terms behind the valid ones)."""
    if known is None:
        known = ~unknown if valid is None else valid & ~unknown
    c = _Curves(v, unknown, known, correct, valid)
    n = c.n
    p = 1 << n.bit_length()  # a power of two ≥ n + 1 (more zero padding leaves a tree sum unchanged)
    # two [3, p] buffers rather than one [6, p]: glibc maps blocks over 32 MB afresh on every call
    ta = torch.empty(3, p, dtype=F64, device=v.device)  # trapezoids In, Out; OSCR
    tb = torch.empty(3, p, dtype=F64, device=v.device)  # AP In, Out; ARPL OSCR
    ta[:, n:] = 0
    tb[:2, n:] = 0
    c.pr_terms(ta[0:2, :n], tb[0:2, :n])
    c.oscr_terms(ta[2, :n])
    c.oscr_arpl_terms(tb[2])  # writes all p positions
    sa, sb = _tree_sum_rows(ta), _tree_sum_rows(tb)
    sums = [sa[0], sa[1], sb[0], sb[1], sa[2], sb[2]]
    n_u, n_k = c.n_u, c.n_k
    nan = torch.full((), NAN, dtype=F64, device=v.device)
    has_k, has_u, both = n_k > 0, n_u > 0, (n_u > 0) & (n_k > 0)
    out = {
        "auroc": c.auroc(),
        "fpr95": c.fpr_unknown_pos(19, 20, drop),
        "fpr95_idpos": c.fpr_known_pos(19, 20),
        "aupr_in": torch.where(has_k, sums[0], nan),
        "aupr_out": torch.where(has_u, sums[1], nan),
        "ap_in": torch.where(has_k, sums[2], nan),
        "ap_out": torch.where(has_u, sums[3], nan),
        "oscr": torch.where(both, sums[4], nan),
        "oscr_arpl": torch.where(both, sums[5], nan),
    }
    if selective:
        out.update(zip(SELECTIVE_NAMES, c.selective(SELECTIVE_COVERAGES)))
    return out


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
    return float(_Curves(v, u, ~u).auroc()) if v.numel() else NAN


def fpr_at_tpr(scores, is_unknown, tpr: float = 0.95, curve: str = "full") -> float:
    """Fraction of known samples flagged at the highest threshold catching ≥ ``tpr`` of the unknowns
    (the spec's ``fpr95``). ``curve="sklearn_drop"`` reproduces ``roc_curve(drop_intermediate=True)``."""
    if curve not in ("full", "sklearn_drop"):
        raise ValueError(f"curve must be 'full' or 'sklearn_drop', got {curve!r}")
    v, u = _prep(scores, is_unknown)
    if not v.numel():
        return NAN
    num, den = _tpr_fraction(tpr)
    return float(_Curves(v, u, ~u).fpr_unknown_pos(num, den, drop=curve == "sklearn_drop"))


def fpr_at_tpr_idpos(scores, is_unknown, tpr: float = 0.95) -> float:
    """Classic convention (``fpr95_idpos``): known = positive ranked by s = −scores; the fraction of
    unknowns accepted at the highest threshold accepting ≥ ``tpr`` of the knowns."""
    v, u = _prep(scores, is_unknown)
    if not v.numel():
        return NAN
    num, den = _tpr_fraction(tpr)
    return float(_Curves(v, u, ~u).fpr_known_pos(num, den))


def aupr_in(scores, is_unknown) -> float:
    """AUPR with known = positive ranked by s = −scores (``auc(recall, precision)``)."""
    v, u = _prep(scores, is_unknown)
    return float(_curve_metrics_t(v, u)["aupr_in"]) if v.numel() else NAN


def aupr_out(scores, is_unknown) -> float:
    """AUPR with unknown = positive ranked by the scores."""
    v, u = _prep(scores, is_unknown)
    return float(_curve_metrics_t(v, u)["aupr_out"]) if v.numel() else NAN


def ap_in(scores, is_unknown) -> float:
    """Average precision, known = positive (``average_precision_score(~is_unknown, -scores)``)."""
    v, u = _prep(scores, is_unknown)
    return float(_curve_metrics_t(v, u)["ap_in"]) if v.numel() else NAN


def ap_out(scores, is_unknown) -> float:
    """Average precision, unknown = positive."""
    v, u = _prep(scores, is_unknown)
    return float(_curve_metrics_t(v, u)["ap_out"]) if v.numel() else NAN


def oscr(scores, is_unknown, correct) -> float:
    """Area under CCR(θ) vs FPR(θ) (Dhamija et al.); ``correct``: pred_closed == y for known samples."""
    v, u = _prep(scores, is_unknown)
    c = _bool_1d(correct, "correct", v.numel(), v.device)
    return float(_curve_metrics_t(v, u, correct=c & ~u)["oscr"]) if v.numel() else NAN


def oscr_arpl(scores, is_unknown, correct) -> float:
    """The ARPL-lineage OSCR code (compat; differs from :func:`oscr` on ties, vector F)."""
    v, u = _prep(scores, is_unknown)
    c = _bool_1d(correct, "correct", v.numel(), v.device)
    return float(_curve_metrics_t(v, u, correct=c & ~u)["oscr_arpl"]) if v.numel() else NAN


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
def _threshold_t(rule: str, s: Tensor | None, valid: Tensor, tau: float | None, n_r: int | None) -> Tensor:
    """τ on the known-ness score s (float64 device 0-d tensor; no host read). ``s`` is not read (and may
    be None) for the rules ``zero`` and ``fixed``."""
    dev = valid.device
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
    masked = valid is not None
    if not masked:
        valid = torch.ones(n, dtype=torch.bool, device=dev)
    n_valid = valid.sum()
    unknown = valid & (ym == k)
    known = valid ^ unknown
    accept = v.to(F64) <= -tau_s  # s = −v ≥ τ, exact: every float32 value is a float64 value
    pred_open = torch.where(accept, pc, k)
    trash = (k + 1) * (k + 1)
    idx = torch.where(valid, ym * (k + 1) + pred_open, trash)
    ones = torch.ones(1, dtype=torch.int64, device=dev).expand(n)  # a scatter source without an n-row buffer
    cm = torch.zeros(trash + 1, dtype=torch.int64, device=dev).scatter_add_(0, idx, ones)[:trash].view(k + 1, k + 1)
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
        # one scatter over (original unknown class, rejected) pairs; the last class slot is the trash
        ui = torch.where(unknown, 2 * yo_unk + (pred_open == k), 2 * n_unk_classes)
        pairs = torch.zeros(2 * n_unk_classes + 2, dtype=torch.int64, device=dev).scatter_add_(0, ui, ones)
        pairs = pairs.view(-1, 2)[:-1]
        hit, cnt = pairs[:, 1].to(F64), pairs.sum(1).to(F64)
        rate = torch.where(cnt > 0, hit / cnt.clamp(min=1), torch.full_like(cnt, NAN))
        unk_cm = _nanmean_t(rate)
    else:
        unk_cm = nan
    names = ["closed_acc", "os_star", "unk", "os", "hos", "unk_classmean", "hos_classmean", "h_instance",
             "overall_acc", "auroc", "fpr95", "fpr95_idpos", "aupr_in", "aupr_out", "ap_in", "ap_out", "oscr",
             "oscr_arpl", *SELECTIVE_NAMES]
    if n:
        cv = _curve_metrics_t(v, unknown, known, correct, valid if masked else None, drop=curve == "sklearn_drop",
                              selective=True)
        auc, fpr, fpr_id = cv["auroc"], cv["fpr95"], cv["fpr95_idpos"]
        pr_in, ap_i, pr_out, ap_o = cv["aupr_in"], cv["ap_in"], cv["aupr_out"], cv["ap_out"]
        osc, osc_a = cv["oscr"], cv["oscr_arpl"]
        sel = [cv[x] for x in SELECTIVE_NAMES]
    else:
        auc = fpr = fpr_id = pr_in = ap_i = pr_out = ap_o = osc = osc_a = nan
        sel = [nan] * len(SELECTIVE_NAMES)
    vals = [closed, os_star_t, unk_t, os_t, _harm_t(os_star_t, unk_t), unk_cm, _harm_t(os_star_t, unk_cm),
            _harm_t(acc_k, unk_t), overall, auc, fpr, fpr_id, pr_in, pr_out, ap_i, ap_o, osc, osc_a, *sel]
    return names, vals, cm


@_cpu_threads
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

    @_cpu_threads
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
        n_valid = valid.sum()
        rule = self._rule()
        s = None if rule in ("zero", "fixed") else torch.where(valid, -v.to(F64), torch.zeros((), dtype=F64,
                                                                                              device=v.device))
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
