"""The one-sort curve metrics of ``openworld.metrics.open_set`` (issue 15): bit-for-bit the values of the
multi-sort device code they replace (frozen below), exact values, one sort per compute(), threads."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from openworld.metrics import create_engine
from openworld.metrics import open_set as osm

F64 = torch.float64
CURVES = ["auroc", "fpr95", "fpr95_idpos", "aupr_in", "aupr_out", "ap_in", "ap_out", "oscr", "oscr_arpl"]


# ---- frozen copy of the device code before the change (one sort per metric family, 5 sorts for ARPL) ----
class _OldSorted:
    def __init__(self, v, valid=None):
        n, dev = v.numel(), v.device
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

    def cum(self, mask):
        return torch.cumsum(mask[self.order].long(), 0)

    def before(self, c, idx):
        return torch.where(idx > 0, c[(idx - 1).clamp(min=0)], torch.zeros_like(c))


def _old_points(srt, pos, neg, descending):
    cp, cn = srt.cum(pos), srt.cum(neg)
    n_p, n_n = cp[-1], cn[-1]
    if descending:
        tp, fp = n_p - srt.before(cp, srt.start), n_n - srt.before(cn, srt.start)
        prev_tp, prev_fp = n_p - cp[srt.end], n_n - cn[srt.end]
    else:
        tp, fp = cp[srt.end], cn[srt.end]
        prev_tp, prev_fp = srt.before(cp, srt.start), srt.before(cn, srt.start)
    return tp, fp, prev_tp, prev_fp, n_p, n_n


def _old_fpr(srt, pos, neg, descending=True, drop=False):
    tp, fp, prev_tp, prev_fp, n_p, n_n = _old_points(srt, pos, neg, descending)
    keep = srt.is_end & srt.vmask
    if drop:
        lower = (srt.start - 1).clamp(min=0)
        next_tp, next_fp = tp[lower], fp[lower]
        first, last = srt.end == srt.nv - 1, srt.start == 0
        d2_tp, d2_fp = (next_tp - tp) - (tp - prev_tp), (next_fp - fp) - (fp - prev_fp)
        keep = keep & (first | last | (d2_tp != 0) | (d2_fp != 0))
    cond = keep & (20 * tp >= 19 * n_p)
    k = torch.where(cond, srt.pos, -1).max().clamp(min=0) if descending else torch.argmax(cond.to(torch.int8))
    val = fp[k].to(F64) / n_n.clamp(min=1).to(F64)
    return torch.where((n_p > 0) & (n_n > 0), val, torch.full_like(val, math.nan))


def _old_aupr(srt, pos, neg, descending):
    tp, fp, prev_tp, prev_fp, n_p, _ = _old_points(srt, pos, neg, descending)
    npf = n_p.clamp(min=1).to(F64)
    prec = tp.to(F64) / (tp + fp).clamp(min=1).to(F64)
    prev_n = prev_tp + prev_fp
    prev_prec = torch.where(prev_n > 0, prev_tp.to(F64) / prev_n.clamp(min=1).to(F64), torch.ones_like(prec))
    dr = torch.where(srt.is_end & srt.vmask, (tp - prev_tp).to(F64) / npf, torch.zeros_like(prec))
    nan = torch.full((), math.nan, dtype=F64)
    return (torch.where(n_p > 0, osm._tree_sum_t(dr * (prec + prev_prec) / 2), nan),
            torch.where(n_p > 0, osm._tree_sum_t(dr * prec), nan))


def _old_oscr(srt, unknown, known, correct):
    cu, cc = srt.cum(unknown), srt.cum(correct & known)
    n_u, n_k = cu[-1], known.sum()
    fu, fk = n_u.clamp(min=1).to(F64), n_k.clamp(min=1).to(F64)
    fpr, ccr = cu[srt.end].to(F64) / fu, cc[srt.end].to(F64) / fk
    pfpr, pccr = srt.before(cu, srt.start).to(F64) / fu, srt.before(cc, srt.start).to(F64) / fk
    area = osm._tree_sum_t(torch.where(srt.is_end & srt.vmask, (fpr - pfpr) * (ccr + pccr) / 2,
                                       torch.zeros_like(fpr)))
    return torch.where((n_u > 0) & (n_k > 0), area, torch.full_like(area, math.nan))


def _old_oscr_arpl(v, unknown, known, correct, valid):
    n = v.numel()
    o = torch.sort(unknown.to(torch.uint8), stable=True).indices
    o = o[torch.sort(-v[o], stable=True).indices]
    o = o[torch.sort((~valid[o]).to(torch.uint8), stable=True).indices]
    su, sc = unknown[o].long(), (correct & known)[o].long()
    suf_u = torch.flip(torch.cumsum(torch.flip(su, (0,)), 0), (0,))
    suf_c = torch.flip(torch.cumsum(torch.flip(sc, (0,)), 0), (0,))
    n_u, n_k = unknown.sum(), known.sum()
    k = torch.arange(max(n - 1, 0))
    inside = k <= valid.sum() - 2
    zero = torch.zeros(k.numel(), dtype=F64)
    fpr = torch.where(inside, suf_u[k].to(F64) / n_u.clamp(min=1).to(F64), zero)
    ccr = torch.where(inside, suf_c[k + 1].to(F64) / n_k.clamp(min=1).to(F64), zero)
    fpr = torch.cat([fpr, torch.zeros(2, dtype=F64), torch.ones(1, dtype=F64)])
    ccr = torch.cat([ccr, torch.zeros(2, dtype=F64), torch.ones(1, dtype=F64)])
    o2 = torch.sort(ccr, descending=True, stable=True).indices
    o2 = o2[torch.sort(fpr[o2], descending=True, stable=True).indices]
    f, c = fpr[o2], ccr[o2]
    area = osm._tree_sum_t((f[:-1] - f[1:]) * (c[:-1] + c[1:]) / 2)
    return torch.where((n_u > 0) & (n_k > 0), area, torch.full_like(area, math.nan))


def _old_curves(v, unknown, correct, valid, drop):
    known = valid & ~unknown
    unknown = unknown & valid
    correct = correct & known
    srt = _OldSorted(v, valid)
    pr_in, ap_in = _old_aupr(srt, known, unknown, False)
    pr_out, ap_out = _old_aupr(srt, unknown, known, True)
    auc_p = unknown[srt.order].long()
    n_p, n_n = auc_p.sum(), known.sum()
    num = ((auc_p * (srt.start + srt.end + 2)).sum() - n_p * (n_p + 1)).to(F64)
    den = (2 * n_p * n_n).to(F64)
    return {"auroc": torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, math.nan)),
            "fpr95": _old_fpr(srt, unknown, known, drop=drop),
            "fpr95_idpos": _old_fpr(srt, known, unknown, descending=False),
            "aupr_in": pr_in, "aupr_out": pr_out, "ap_in": ap_in, "ap_out": ap_out,
            "oscr": _old_oscr(srt, unknown, known, correct),
            "oscr_arpl": _old_oscr_arpl(v, unknown, known, correct, valid)}


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _arpl_python(s_known, s_unknown, correct_known) -> float:
    """The ARPL-lineage OSCR as that code computes it (spec §8.3), in plain Python with a stable sort."""
    x = list(s_known) + list(s_unknown)
    is_k = [1] * len(s_known) + [0] * len(s_unknown)
    is_u = [1 - t for t in is_k]
    cor = [int(c) for c in correct_known] + [0] * len(s_unknown)
    n = len(x)
    idx = sorted(range(n), key=lambda i: x[i])  # Python's sort is stable
    su, sc = [is_u[i] for i in idx], [cor[i] * is_k[i] for i in idx]
    ccr, fpr = [0.0] * (n + 2), [0.0] * (n + 2)
    for k in range(n - 1):
        ccr[k] = sum(sc[k + 1:]) / len(s_known)
        fpr[k] = sum(su[k:]) / len(s_unknown)
    ccr[n + 1] = fpr[n + 1] = 1.0
    roc = sorted(zip(fpr, ccr), reverse=True)
    return sum((roc[j][0] - roc[j + 1][0]) * (roc[j][1] + roc[j + 1][1]) / 2 for j in range(n + 1))


# ---- bit-for-bit against the previous implementation -------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), levels=st.integers(1, 40), ignored=st.integers(0, 40),
       dtype=st.sampled_from([torch.float32, torch.float64]), drop=st.booleans())
def test_one_sort_curves_equal_previous_code_bit_for_bit(seed, n, levels, ignored, dtype, drop):
    """Ties, ignored rows anywhere (with garbage scores), all-unknown / all-known sets, n up to 300."""
    rng = np.random.default_rng(seed)
    m = n + ignored
    v = torch.from_numpy(rng.integers(0, levels, m) / levels).to(dtype)
    p_unk = rng.choice([0.0, 0.3, 0.7, 1.0])
    unknown = torch.from_numpy(rng.random(m) < p_unk)
    correct = torch.from_numpy(rng.random(m) < 0.6)
    valid = torch.zeros(m, dtype=torch.bool)
    valid[torch.from_numpy(rng.permutation(m)[:n])] = True
    v = torch.where(valid, v, torch.tensor(rng.choice([math.nan, math.inf, 0.5]), dtype=dtype))
    want = _old_curves(v, unknown, correct, valid, drop)
    got = osm._curve_metrics_t(v, unknown & valid, valid & ~unknown, correct & valid & ~unknown, valid, drop=drop)
    for key in CURVES:
        assert _same(float(got[key]), float(want[key])), (key, float(got[key]), float(want[key]))
    # the same rows without the ignored ones, and without a validity mask
    vv, uu, cc = v[valid], unknown[valid], correct[valid]
    alone = osm._curve_metrics_t(vv, uu, ~uu, cc & ~uu, drop=drop)
    for key in CURVES:
        assert _same(float(alone[key]), float(want[key])), key


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 60), levels=st.integers(1, 6))
def test_arpl_oscr_equals_the_python_transcription(seed, n, levels):
    """Heavy ties (including a lowest group of knowns only, or of one row): equal to the float."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, levels, n) / levels
    unk = rng.random(n) < rng.choice([0.2, 0.5, 0.8])
    cor = rng.random(n) < 0.5
    if unk.all() or not unk.any():
        return
    want = _arpl_python(s[~unk], s[unk], cor[~unk])
    # original order: knowns first then unknowns, as the ARPL code concatenates them
    v = torch.from_numpy(np.r_[-s[~unk], -s[unk]])
    u = torch.from_numpy(np.r_[np.zeros((~unk).sum(), bool), np.ones(unk.sum(), bool)])
    c = torch.from_numpy(np.r_[cor[~unk], np.zeros(unk.sum(), bool)])
    assert osm.oscr_arpl(v, u, c) == pytest.approx(want, abs=1e-15)


def test_arpl_oscr_edge_layouts_exact():
    """The last trapezoid (closed by (0,0)) when the lowest group holds only knowns, one row, or unknowns."""
    cases = [  # (s_known, s_unknown, correct_known)
        ([0.1, 0.1, 0.5], [0.3], [True, False, True]),  # lowest group: two knowns, the later one wrong
        ([0.1, 0.1, 0.5], [0.3], [False, True, True]),  # ... the later one right
        ([0.1, 0.4], [0.3, 0.3], [True, True]),  # lowest group: one row
        ([0.2, 0.4], [0.1, 0.1], [True, False]),  # lowest group: unknowns only
        ([0.2, 0.2], [0.2, 0.2], [True, False]),  # one group
    ]
    for sk, su, ck in cases:
        want = _arpl_python(sk, su, ck)
        v = torch.tensor([-x for x in sk + su], dtype=F64)
        u = torch.tensor([False] * len(sk) + [True] * len(su))
        c = torch.tensor(list(ck) + [False] * len(su))
        assert osm.oscr_arpl(v, u, c) == want, (sk, su, ck)
        assert float(_old_oscr_arpl(v, u, ~u, c, torch.ones_like(u))) == want


def test_exact_values_vector_f_and_g():
    s = np.array([.95, .90, .40, .85, .30, .80, .75, .70, .35, .90, .60, .55, .30, .60, .20, .45, .10, .55, .65, .15])
    unk = np.array([0] * 12 + [1] * 8, dtype=bool)
    v = -s
    assert osm.auroc(v, unk) == 159 / 192  # 2U = 159, 2·n_u·n_k = 192
    assert osm.fpr_at_tpr(v, unk) == 5 / 12
    assert osm.fpr_at_tpr_idpos(v, unk) == 5 / 8
    # vector G: the full curve picks FP = 1 of 10; sklearn's dropped point moves it to 2 of 10
    vg = np.r_[[9] * 18, 8, 8, 7, 7, [6] * 8].astype(float)
    pg = np.r_[[1] * 18, 1, 0, 1, 0, [0] * 8].astype(bool)
    assert osm.fpr_at_tpr(vg, pg) == 0.1 and osm.fpr_at_tpr(vg, pg, curve="sklearn_drop") == 0.2
    assert osm.auroc(vg, pg) == 0.99
    # tpr other than 0.95: the first point with TP ≥ ⌈tpr·n_p⌉ (integer test)
    assert osm.fpr_at_tpr(vg, pg, tpr=0.9) == 0.0 and osm.fpr_at_tpr(vg, pg, tpr=1.0) == 0.2


def test_exact_rational_areas():
    """AUPR/AP/OSCR against exact fractions on a tiny vector (float rounding only in the last bits)."""
    v = torch.tensor([0.0, 1.0, 1.0, 2.0, 3.0, 3.0], dtype=F64)
    u = torch.tensor([False, True, False, False, True, True])
    c = torch.tensor([True, False, False, True, False, False])
    m = osm._curve_metrics_t(v, u, correct=c)
    # unknown-positive curve (descending v): groups {3,3}=UU, {2}=K, {1,1}=UK, {0}=K
    # points (TP, FP): (2,0), (2,1), (3,2), (3,3); AP-Out = Σ ΔR·P = (2/3)·1 + (1/3)·(3/5)
    assert float(m["ap_out"]) == pytest.approx(float(Fraction(2, 3) + Fraction(1, 3) * Fraction(3, 5)), abs=1e-15)
    # AUROC: pairs (unknown > known) = 3+3 for the two 3s over 3 knowns, the 1 beats the 0, ties ½ with the 1
    assert float(m["auroc"]) == (6 + 1 + 0.5) / 9
    # OSCR (ascending v = descending s): FPR/CCR steps at groups {0}: (0, 1/3) ... CCR counts knowns 0 and 2
    # points (FPR, CCR): (0,1/3), (1/3,1/3), (1/3,2/3), (1,2/3)
    want = Fraction(1, 3) * (Fraction(1, 3) + Fraction(1, 3)) / 2 + Fraction(2, 3) * Fraction(2, 3)
    assert float(m["oscr"]) == pytest.approx(float(want), abs=1e-15)


# ---- one sort per compute(), and the CPU thread setting ---------------------------------------------------
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def _engine(rule="zero", n=400, seed=0):
    eng = create_engine("open_set", num_classes=8, device="cpu", known_classes=[0, 1, 2, 3, 4], threshold=rule,
                        tau=0.1)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    y = torch.randint(-1, 8, (n,), generator=g)
    v = torch.round(torch.randn(n, generator=g) * 4) / 4
    for a in range(0, n, 64):
        eng.observe(z[a:a + 64], y[a:a + 64], v[a:a + 64])
    return eng


@pytest.mark.parametrize(("rule", "rule_sorts"), [("zero", 0), ("fixed", 0), ("target_otsu", 0), ("ros_mean", 1)])
@pytest.mark.parametrize("curve", ["full", "sklearn_drop"])
def test_compute_sorts_once(rule, rule_sorts, curve):
    """Every curve metric, ARPL OSCR included, comes from one sort; ros_mean adds the one stable sort that
    moves the valid rows first (numpy's pairwise-sum order needs them contiguous)."""
    eng = _engine(rule)
    eng.curve = curve
    with _Ops() as ops:
        eng.compute()
    assert ops.names.count("sort") == 1 + rule_sorts, ops.names.count("sort")


def test_cpu_threads_scoped_and_restored(monkeypatch):
    if (torch.get_num_threads() < 2):
        torch_threads = torch.get_num_threads()
        monkeypatch.setattr(osm, "CPU_THREADS", None)
        _engine().compute()
        assert torch.get_num_threads() == torch_threads
        pytest.skip("one intra-op thread only: nothing to limit")
    seen = []
    inner = osm._Curves.__init__

    def spy(self, *a, **k):
        seen.append(torch.get_num_threads())
        inner(self, *a, **k)

    monkeypatch.setattr(osm._Curves, "__init__", spy)
    before = torch.get_num_threads()
    want = _engine().compute()
    assert seen == [1] and torch.get_num_threads() == before
    monkeypatch.setattr(osm, "CPU_THREADS", None)
    got = _engine().compute()
    assert seen == [1, before] and torch.get_num_threads() == before
    assert all(_same(got[k], want[k]) for k in want)  # the thread count changes no value
