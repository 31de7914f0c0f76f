"""Open-set metrics: spec vectors F–J (``specs/metrics.md`` §11), scikit-learn parity, the engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve
from torch.utils._python_dispatch import TorchDispatchMode

from openworld.metrics import create_engine
from openworld.metrics import open_set as osm

TOL = 1e-6

# ---- vector F -----------------------------------------------------------------------------------
Y_ORIG = [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4]
PRED_CLOSED = [0, 0, 1, 0, 0, 1, 1, 2, 1, 2, 2, 0, 0, 1, 2, 2, 0, 1, 1, 0]
S = np.array([.95, .90, .40, .85, .30, .80, .75, .70, .35, .90, .60, .55, .30, .60, .20, .45, .10, .55, .65, .15])
Y_MERGED = [min(y, 3) for y in Y_ORIG]
IS_UNK = np.array(Y_MERGED) == 3
F_EXPECTED = {
    "closed_acc": 0.75, "os_star": 0.588889, "unk": 0.625, "os": 0.597917, "hos": 0.606407,
    "unk_classmean": 0.566667, "hos_classmean": 0.577564, "h_instance": 0.603448, "overall_acc": 0.6,
    "auroc": 0.828125, "fpr95": 0.416667, "fpr95_idpos": 0.625, "aupr_in": 0.896601, "aupr_out": 0.787717,
    "ap_in": 0.891958, "ap_out": 0.777965, "oscr": 0.645833, "oscr_arpl": 0.619792,
}
CM_OPEN = [[3, 0, 0, 2], [0, 2, 1, 1], [1, 0, 2, 0], [0, 3, 0, 5]]


def test_vector_f_one_shot():
    m = osm.open_set_metrics(-S, Y_MERGED, PRED_CLOSED, 3, tau=0.5, y_orig=Y_ORIG)
    for key, want in F_EXPECTED.items():
        assert m[key] == pytest.approx(want, abs=TOL), key


def test_vector_f_public_functions():
    v = -S
    assert osm.auroc(v, IS_UNK) == pytest.approx(0.828125, abs=TOL)
    assert osm.fpr_at_tpr(v, IS_UNK) == pytest.approx(0.416667, abs=TOL)
    assert osm.fpr_at_tpr_idpos(v, IS_UNK) == pytest.approx(0.625, abs=TOL)
    assert osm.aupr_in(v, IS_UNK) == pytest.approx(0.896601, abs=TOL)
    assert osm.aupr_out(v, IS_UNK) == pytest.approx(0.787717, abs=TOL)
    assert osm.ap_in(v, IS_UNK) == pytest.approx(0.891958, abs=TOL)
    assert osm.ap_out(v, IS_UNK) == pytest.approx(0.777965, abs=TOL)
    correct = np.array(PRED_CLOSED) == np.array(Y_MERGED)
    assert osm.oscr(v, IS_UNK, correct) == pytest.approx(0.645833, abs=TOL)
    assert osm.oscr_arpl(v, IS_UNK, correct) == pytest.approx(0.619792, abs=TOL)
    assert osm.os_star(CM_OPEN) == pytest.approx(0.588889, abs=TOL)
    assert osm.unk(CM_OPEN) == pytest.approx(0.625, abs=TOL)
    assert osm.os_score(CM_OPEN) == pytest.approx(0.597917, abs=TOL)
    assert osm.overall_acc(CM_OPEN) == pytest.approx(0.6, abs=TOL)
    assert osm.h_instance(CM_OPEN) == pytest.approx(0.603448, abs=TOL)
    assert osm.hos(osm.os_star(CM_OPEN), osm.unk(CM_OPEN)) == pytest.approx(0.606407, abs=TOL)
    pred_open = np.where(S >= 0.5, PRED_CLOSED, 3)
    assert osm.unk_classmean(np.array(Y_ORIG)[IS_UNK], pred_open[IS_UNK], 3) == pytest.approx(0.566667, abs=TOL)
    assert osm.closed_acc(PRED_CLOSED, Y_MERGED, 3) == pytest.approx(0.75, abs=TOL)
    # torch inputs and sklearn agree on the same vector
    assert osm.auroc(torch.tensor(-S), torch.tensor(IS_UNK)) == pytest.approx(roc_auc_score(IS_UNK, -S), abs=1e-12)


def test_vector_f_roc_points():
    fpr, tpr, _ = roc_curve(IS_UNK, -S, drop_intermediate=False)
    want = [(0, 0), (0, .125), (0, .25), (0, .375), (.083333, .5), (.166667, .5), (.25, .5), (.25, .625),
            (.333333, .75), (.416667, .875), (.416667, 1), (.5, 1), (.583333, 1), (.666667, 1), (.75, 1),
            (.916667, 1), (1, 1)]
    np.testing.assert_allclose(np.c_[fpr, tpr], np.array(want), atol=TOL)


def test_vector_f_engine_streamed_with_padding():
    eng = create_engine("open_set", num_classes=5, device="cpu", known_classes=[0, 1, 2], threshold="fixed",
                        tau=0.5)
    # logits whose argmax is PRED_CLOSED; one extra column (class 3/4) must be ignored by the engine
    z = torch.full((20, 5), -1.0)
    z[torch.arange(20), torch.tensor(PRED_CLOSED)] = 1.0
    z[:, 4] = 100.0
    y = torch.tensor(Y_ORIG)
    v = torch.tensor(-S, dtype=torch.float32)
    rng = np.random.default_rng(0)
    cuts = np.sort(rng.choice(np.arange(1, 20), 4, replace=False))
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, 20]):
        eng.observe(z[a:b], y[a:b], v[a:b])
        eng.observe(z[:2], torch.tensor([-1, -1]), v[:2])  # hidden labels: ignored
    m = eng.compute()
    for key, want in F_EXPECTED.items():
        assert m[key] == pytest.approx(want, abs=TOL), key
    assert eng.confusion().tolist() == CM_OPEN
    assert eng.num_samples == 20


def test_engine_auto_threshold_and_tau_recorded():
    eng = create_engine("open_set", num_classes=5, device="cpu", known_classes=[0, 1, 2], num_samples=20)
    z = torch.zeros(20, 3)
    z[torch.arange(20), torch.tensor(PRED_CLOSED)] = 1.0
    # strategy score shifted so 0 is its decision: unknown_score = τ − s (τ = 0.5)
    eng.observe(z, torch.tensor(Y_ORIG), torch.tensor(0.5 - S))
    m = eng.compute()
    assert m["hos"] == pytest.approx(0.606407, abs=TOL)
    assert eng.tau_used == 0.0
    # no unknown score: engine-derived MSP with Otsu on the target scores
    eng2 = create_engine("open_set", num_classes=5, device="cpu", known_classes=[0, 1, 2])
    eng2.observe(z * 3, torch.tensor(Y_ORIG))
    m2 = eng2.compute()
    assert math.isnan(m2["auroc"]) is False and 0 <= m2["unk"] <= 1


def test_engine_errors():
    with pytest.raises(ValueError, match="known_classes"):
        create_engine("open_set", num_classes=3, device="cpu", known_classes=[])
    with pytest.raises(ValueError, match="threshold"):
        create_engine("open_set", num_classes=3, device="cpu", known_classes=[0], threshold="nope")
    eng = create_engine("open_set", num_classes=3, device="cpu", known_classes=[0, 1])
    eng.observe(torch.zeros(2, 2), torch.tensor([0, 2]), torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="NaN"):
        eng.compute()


# ---- vector G -----------------------------------------------------------------------------------
def test_vector_g_point_dropping():
    v = np.r_[[9] * 18, 8, 8, 7, 7, [6] * 8].astype(float)
    pos = np.r_[[1] * 18, 1, 0, 1, 0, [0] * 8].astype(bool)
    assert osm.fpr_at_tpr(v, pos) == pytest.approx(0.1, abs=TOL)
    assert osm.fpr_at_tpr(v, pos, curve="sklearn_drop") == pytest.approx(0.2, abs=TOL)
    assert osm.auroc(v, pos) == pytest.approx(0.99, abs=TOL)
    fpr, tpr, _ = roc_curve(pos, v)  # drop_intermediate=True (OpenOOD)
    assert fpr[np.argmax(tpr >= 0.95)] == pytest.approx(0.2)


# ---- vector H (Mahalanobis, tied covariance via sklearn) ----------------------------------------
def test_vector_h_mahalanobis():
    from openworld.strategies.detectors import MahalanobisModel

    x = torch.tensor([[0, 0], [2, 0], [0, 2], [2, 2], [5, 5], [7, 5], [5, 7], [7, 7]], dtype=torch.float32)
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    model = MahalanobisModel.fit(x, y, [0, 1])
    np.testing.assert_allclose(model.means.numpy(), [[1, 1], [6, 6]], atol=TOL)
    np.testing.assert_allclose(model.precision.numpy(), np.eye(2), atol=TOL)
    centred = x.numpy() - model.means.numpy()[y.numpy()]
    np.testing.assert_allclose(EmpiricalCovariance(assume_centered=False).fit(centred).covariance_, np.eye(2),
                               atol=TOL)
    q = torch.tensor([[1, 1], [3, 1], [10, 0]], dtype=torch.float32)
    np.testing.assert_allclose(model.distances(q).numpy(), [[0, 50], [4, 34], [82, 52]], atol=TOL)
    np.testing.assert_allclose(model.score(q).numpy(), [0, -4, -52], atol=TOL)
    assert model.ridge == 0.0


# ---- vector I (MSP / energy) ----------------------------------------------------------------------
def test_vector_i_msp_energy():
    z = torch.tensor([[2, 1, 0], [.5, .5, .5], [4, -1, 0]])
    np.testing.assert_allclose(osm.msp_score(z).numpy(), [0.665241, 0.333333, 0.975559], atol=TOL)
    np.testing.assert_allclose(osm.energy_score(z).numpy(), [2.407606, 1.598612, 4.024745], atol=TOL)
    np.testing.assert_allclose(osm.energy_score(z, 2.0).numpy(), [3.360539, 2.697225, 4.393468], atol=TOL)


# ---- vector J (properties) and scikit-learn parity -------------------------------------------------
def test_hos_zero_when_unk_zero_and_nan_propagates():
    assert osm.hos(0.7, 0.0) == 0.0
    assert osm.hos(0.0, 0.0) == 0.0
    assert math.isnan(osm.hos(0.7, math.nan))


def _sk(v, pos):
    fpr, tpr, _ = roc_curve(pos, v, drop_intermediate=False)
    fpr_d, tpr_d, _ = roc_curve(pos, v, drop_intermediate=True)
    p_in, r_in, _ = precision_recall_curve(~pos, -v)
    p_out, r_out, _ = precision_recall_curve(pos, v)
    return {
        "auroc": roc_auc_score(pos, v),
        "fpr95": fpr[np.argmax(tpr >= 0.95)],
        "fpr95_drop": fpr_d[np.argmax(tpr_d >= 0.95)],
        "aupr_in": auc(r_in, p_in),
        "aupr_out": auc(r_out, p_out),
        "ap_in": average_precision_score(~pos, -v),
        "ap_out": average_precision_score(pos, v),
    }


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 80),
    levels=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_sklearn_parity_with_ties(n, levels, seed, dtype):
    rng = np.random.default_rng(seed)
    v = (rng.integers(0, levels, n) / levels + rng.normal(0, 1e-3, n) * (rng.random(n) < 0.2)).astype(dtype)
    pos = rng.random(n) < 0.4
    pos[0], pos[1] = True, False
    want = _sk(v, pos)
    vt = torch.from_numpy(v)
    assert osm.auroc(vt, pos) == pytest.approx(want["auroc"], abs=TOL)
    assert osm.fpr_at_tpr(vt, pos) == pytest.approx(want["fpr95"], abs=TOL)
    assert osm.fpr_at_tpr(vt, pos, curve="sklearn_drop") == pytest.approx(want["fpr95_drop"], abs=TOL)
    assert osm.aupr_in(vt, pos) == pytest.approx(want["aupr_in"], abs=TOL)
    assert osm.aupr_out(vt, pos) == pytest.approx(want["aupr_out"], abs=TOL)
    assert osm.ap_in(vt, pos) == pytest.approx(want["ap_in"], abs=TOL)
    assert osm.ap_out(vt, pos) == pytest.approx(want["ap_out"], abs=TOL)
    # AUROC is invariant under a strictly increasing transform; symmetric in the known view
    assert osm.auroc(np.exp(v.astype(np.float64)) * 3 + 1, pos) == pytest.approx(want["auroc"], abs=TOL)
    assert roc_auc_score(~pos, -v) == pytest.approx(osm.auroc(vt, pos), abs=TOL)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(4, 60))
def test_engine_streaming_equals_one_shot(seed, n):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, n)
    pc = rng.integers(0, 4, n)
    v = np.round(rng.normal(size=n), 1).astype(np.float32)
    tau = float(rng.normal())
    ym = np.where(y >= 4, 4, y)
    want = osm.open_set_metrics(torch.from_numpy(v), ym, pc, 4, tau=tau, y_orig=y)
    eng = create_engine("open_set", num_classes=6, device="cpu", known_classes=[0, 1, 2, 3], threshold="fixed",
                        tau=tau)
    z = torch.zeros(n, 6)
    z[torch.arange(n), torch.from_numpy(pc)] = 1.0
    cuts = sorted(set(rng.integers(1, n, 3).tolist()))
    for a, b in zip([0, *cuts], [*cuts, n]):
        if rng.random() < 0.5:
            eng.observe(z[:1], torch.tensor([-1]), torch.tensor([0.0]))
        eng.observe(z[a:b], torch.from_numpy(y[a:b]), torch.from_numpy(v[a:b]))
    got = eng.compute()
    for key, w in want.items():
        if math.isnan(w):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(w, abs=TOL), key


def test_threshold_rules():
    rng = np.random.default_rng(0)
    s = np.r_[rng.normal(0, 1, 300), rng.normal(5, 1, 700)]
    t_otsu = osm.threshold_otsu(s)
    t_gmm = osm.threshold_gmm(s)
    assert 1.0 < t_otsu < 4.0 and 1.0 < t_gmm < 4.0
    # Otsu reproduces its own histogram split: every score in bins ≤ k* is < τ
    h, e = np.histogram(s, 256, (s.min(), s.max()))
    assert t_otsu in e
    assert osm.threshold_otsu([2.0, 2.0]) == 2.0
    # reject_count: ties at the n_r-th smallest are rejected too
    x = np.array([0.1, 0.2, 0.2, 0.3, 0.9])
    tau = osm.threshold_reject_count(x, 2)
    assert ((x >= tau) == np.array([False, False, False, True, True])).all()
    # ros_mean: mean of normalised scores 0.44 → known iff s̃ ≥ 0.5
    x = np.array([0.0, 0.2, 0.4, 0.6, 1.0])
    assert osm.threshold_ros_mean(x) == pytest.approx(0.5)
    assert osm.threshold_source_quantile(torch.arange(101.0), 0.05) == pytest.approx(5.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_observe_never_syncs():
    rng = np.random.default_rng(3)
    n = 5000
    y = rng.integers(0, 8, n)
    pc = rng.integers(0, 5, n)
    v = np.round(rng.normal(size=n), 2).astype(np.float32)
    ym = np.where(y >= 5, 5, y)
    cpu = osm.open_set_metrics(torch.from_numpy(v), ym, pc, 5, tau=0.1, y_orig=y)
    gpu = osm.open_set_metrics(torch.from_numpy(v).cuda(), ym, pc, 5, tau=0.1, y_orig=y)
    for key in cpu:
        assert gpu[key] == pytest.approx(cpu[key], abs=TOL), key
    eng = create_engine("open_set", num_classes=8, device="cuda", known_classes=range(5), threshold="fixed", tau=0.1,
                        num_samples=n)
    z = torch.zeros(n, 8, device="cuda")
    z[torch.arange(n), torch.from_numpy(pc)] = 1.0
    yt, vt = torch.from_numpy(y).cuda(), torch.from_numpy(v).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for a in range(0, n, 512):
            eng.observe(z[a:a + 512], yt[a:a + 512], vt[a:a + 512])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = eng.compute()
    for key in cpu:
        assert got[key] == pytest.approx(cpu[key], abs=TOL), key


# ---- audit item 2: reset() forgets everything ---------------------------------------------------------
def _feed(eng, seed, n=40, score=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=g)
    y = torch.randint(-1, 5, (n,), generator=g)
    v = torch.randn(n, generator=g) if score else None
    for a in range(0, n, 16):
        eng.observe(z[a:a + 16], y[a:a + 16], None if v is None else v[a:a + 16])


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all((math.isnan(x) and math.isnan(b[k])) or x == b[k] for k, x in a.items())


@pytest.mark.parametrize("threshold", ["target_otsu", "fixed"])
def test_engine_reset_forgets_everything(threshold):
    kw = dict(num_classes=5, device="cpu", known_classes=[0, 1, 2], threshold=threshold, tau=0.2)
    eng = create_engine("open_set", **kw)
    _feed(eng, 0)
    eng.compute()
    assert eng.confusion() is not None
    eng.reset()
    assert eng.confusion() is None and eng.per_class() is None
    assert eng.tau_used is None and eng.num_samples is None
    _feed(eng, 1, n=25)
    fresh = create_engine("open_set", **kw)
    _feed(fresh, 1, n=25)
    assert eng.confusion() is None  # still None before compute
    assert _same(eng.compute(), fresh.compute())
    assert torch.equal(eng.confusion(), fresh.confusion())
    torch.testing.assert_close(eng.per_class(), fresh.per_class(), rtol=0, atol=0, equal_nan=True)
    assert eng.tau_used == fresh.tau_used and eng.num_samples == fresh.num_samples
    # the score source is forgotten too: a stream without unknown_score is accepted after reset
    eng.reset()
    _feed(eng, 2, score=False)
    eng.compute()


# ---- audit item 3: one device→host transfer per compute(), device threshold rules ------------------------
class _HostReads:
    """Counts host reads during a block: Python-level tensor methods that read values back, plus
    dispatcher ops that sync (item/bool/int/float → _local_scalar_dense, nonzero, boolean indexing)."""

    METHODS = ("cpu", "tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")
    SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive",
                "is_nonzero", "equal", "index_bool", "masked_scatter"}

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = dict.fromkeys(self.METHODS, 0)
        self.cpu_args: list = []
        self.ops: list[str] = []
        self._mp = monkeypatch

    def __enter__(self):
        for name in self.METHODS:
            orig = getattr(torch.Tensor, name)

            def wrapper(t, *a, _orig=orig, _name=name, **k):
                self.calls[_name] += 1
                if _name == "cpu":
                    self.cpu_args.append((t.dtype, tuple(t.shape)))
                return _orig(t, *a, **k)

            self._mp.setattr(torch.Tensor, name, wrapper)
        rec = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket.__name__)
                if name in ("index", "index_put") and any(
                        t is not None and t.dtype == torch.bool for t in args[1]):
                    name = "index_bool"
                rec.ops.append(name)
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._mp.undo()
        return False


RULES = ["zero", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count", "auto"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("strategy_score", [True, False])
def test_engine_compute_makes_exactly_one_host_transfer(rule, strategy_score, monkeypatch):
    eng = create_engine("open_set", num_classes=8, device="cpu", known_classes=[0, 1, 2, 3, 4], threshold=rule,
                        tau=0.1, n_r=20, curve="sklearn_drop" if rule == "fixed" else "full")
    _feed_open(eng, 300, strategy_score)
    with _HostReads(monkeypatch) as hr:
        m = eng.compute()
    assert hr.calls["cpu"] == 1 and hr.calls["tolist"] == 1, hr.calls
    assert all(hr.calls[k] == 0 for k in _HostReads.METHODS if k not in ("cpu", "tolist")), hr.calls
    assert hr.cpu_args == [(torch.float64, (len(m) + 4,))]  # metrics + tau, n, bad logits, bad scores
    assert not set(hr.ops) & _HostReads.SYNC_OPS, sorted(set(hr.ops) & _HostReads.SYNC_OPS)
    assert isinstance(eng.tau_used, float) and eng.num_samples > 0


def _feed_open(eng, n, strategy_score, seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    y = torch.randint(-1 if ignored else 0, 8, (n,), generator=g)
    v = torch.round(torch.randn(n, generator=g) * 4) / 4  # ties
    for a in range(0, n, 64):
        eng.observe(z[a:a + 64], y[a:a + 64], v[a:a + 64] if strategy_score else None)


# frozen copies of the numpy rules the device forms replace (the code before the change)
def _np_otsu(x):
    x = np.asarray(x, dtype=np.float64)
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


def _np_ros_mean(x):
    x = np.asarray(x, dtype=np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return lo
    st = (x - lo) / (hi - lo)
    t = min((math.floor(10 * float(st.mean())) + 1) / 10, 1.0)
    return lo + t * (hi - lo)


def _np_reject_count(x, n_r):
    x = np.sort(np.asarray(x, dtype=np.float64))
    return float(np.nextafter(x[int(n_r) - 1], np.inf))


def _random_scores(rng, n, kind):
    if kind == 0:
        x = rng.normal(size=n)
    elif kind == 1:
        x = np.round(rng.normal(size=n), 1)  # ties
    elif kind == 2:
        x = np.r_[rng.normal(0, 1, n // 3), rng.normal(4, 0.5, n - n // 3)]
    elif kind == 3:
        x = rng.integers(0, 11, n) / 10  # evenly spaced: mean near a multiple of 0.1
    else:  # values on the histogram's own edges (numpy's ±1 ULP bin correction)
        e = np.linspace(-1.3, 2.9, 257)
        x = e[rng.integers(0, 257, n)]
    if rng.random() < 0.5:
        x = x.astype(np.float32).astype(np.float64)
    return x


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 700), kind=st.integers(0, 4))
def test_device_threshold_rules_equal_numpy(seed, n, kind):
    """Device forms on a buffer with ignored rows = the numpy rules on the valid rows: exact for
    Otsu, ros_mean and reject_count; the GMM to 1e-9 (exp/log round differently in numpy and torch)."""
    rng = np.random.default_rng(seed)
    x = _random_scores(rng, n, kind)
    m = int(rng.integers(0, n // 2 + 1))  # ignored rows, anywhere, with garbage values
    pos = np.sort(rng.integers(0, n + 1, m)) + np.arange(m)
    mask = np.ones(n + m, dtype=bool)
    mask[pos] = False
    full = np.empty(n + m)
    full[mask] = x
    full[~mask] = rng.choice([np.nan, np.inf, 1e300, -7.0], m)
    s, vt = torch.from_numpy(full), torch.from_numpy(mask)
    assert float(osm._otsu_t(s, vt)) == _np_otsu(x)
    assert float(osm._ros_mean_t(s, vt)) == _np_ros_mean(x)
    n_r = int(rng.integers(1, n + 1))
    assert float(osm._reject_count_t(s, n_r, vt)) == _np_reject_count(x, n_r)
    g, g0 = float(osm._gmm_t(s, vt)), osm.threshold_gmm(x)
    assert g == pytest.approx(g0, abs=1e-9 * (1 + abs(g0)))
    # the device GMM itself does not depend on the ignored rows, bit for bit
    assert float(osm._gmm_t(torch.from_numpy(x))) == g
    # the public wrappers keep the numpy results
    assert osm.threshold_otsu(x) == _np_otsu(x)
    assert osm.threshold_ros_mean(x) == _np_ros_mean(x)
    assert osm.threshold_reject_count(x, n_r) == _np_reject_count(x, n_r)


def test_numpy_pairwise_sum_replica():
    rng = np.random.default_rng(5)
    for size in [1, 7, 8, 9, 127, 128, 129, 256, 1000, 8193, 20000]:
        for _ in range(3):
            a = rng.normal(size=size) * 10.0 ** rng.uniform(-4, 4, size)
            n = int(rng.integers(0, size + 1))
            buf = torch.from_numpy(np.r_[a[:n], rng.normal(size=size - n)])  # entries past n are not read
            assert float(osm._np_sum_t(buf, torch.tensor(n))) == float(np.add.reduce(a[:n])), (size, n)


def test_ros_mean_on_a_grid_uses_numpy_summation_order():
    # mean of 0, .1, …, 1.0 sits at 0.5 up to rounding: floor(10·mean) depends on the summation order
    x = np.arange(11) / 10
    assert osm.threshold_ros_mean(x) == _np_ros_mean(x)
    assert float(osm._ros_mean_t(torch.from_numpy(x))) == _np_ros_mean(x)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ignored_rows_change_nothing(rule, seed):
    """A stream with ignored-label rows (label -1, or an id that is neither known nor unknown) gives
    exactly the metrics, τ and confusion of the stream of its valid rows alone."""
    rng = np.random.default_rng(seed)
    n = 150
    y = rng.integers(0, 6, n)
    pc = rng.integers(0, 4, n)
    v = (np.round(rng.normal(size=n) * 3) / 3).astype(np.float32)
    z = np.full((n, 7), -1.0, dtype=np.float32)
    z[np.arange(n), pc] = 1.0
    kw = dict(num_classes=7, device="cpu", known_classes=[0, 1, 2, 3], unknown_classes=[4, 5], threshold=rule,
              tau=0.1, n_r=30)
    for strategy in (True, False):
        zz = z + rng.normal(0, 0.3, z.shape).astype(np.float32) if not strategy else z
        ref = create_engine("open_set", **kw)
        eng = create_engine("open_set", **kw)
        cuts = np.sort(rng.choice(np.arange(1, n), 5, replace=False))
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, n]):
            args = (torch.from_numpy(zz[a:b]), torch.from_numpy(y[a:b]))
            sv = torch.from_numpy(v[a:b]) if strategy else None
            ref.observe(*args, sv)
            m = int(rng.integers(1, 6))  # ignored rows with garbage outputs
            junk_z = torch.from_numpy(rng.normal(size=(m, 7)).astype(np.float32))
            junk_z[0, 0] = float("nan")
            junk_y = torch.from_numpy(rng.choice([-1, 6], m))
            junk_v = torch.from_numpy(rng.choice([np.nan, np.inf, 5.0, v[a]], m).astype(np.float32))
            eng.observe(junk_z, junk_y, junk_v if strategy else None)
            eng.observe(*args, sv)
        got, want = eng.compute(), ref.compute()
        assert _same(got, want), {k: (got[k], want[k]) for k in got if not _same({k: got[k]}, {k: want[k]})}
        assert eng.tau_used == ref.tau_used and eng.num_samples == ref.num_samples == n
        assert torch.equal(eng.confusion(), ref.confusion())


@pytest.mark.parametrize("rule", ["target_otsu", "ros_mean", "reject_count", "target_gmm"])
def test_engine_tau_equals_numpy_rule_on_valid_scores(rule):
    eng = create_engine("open_set", num_classes=8, device="cpu", known_classes=[0, 1, 2, 3, 4], threshold=rule,
                        n_r=40)
    _feed_open(eng, 500, True, seed=3)
    m = eng.compute()
    ym = eng._ym[:500]
    s = (-eng._score[:500][ym >= 0]).double().numpy()
    want = {"target_otsu": _np_otsu, "ros_mean": _np_ros_mean, "target_gmm": osm.threshold_gmm,
            "reject_count": lambda x: _np_reject_count(x, 40)}[rule](s)
    if rule == "target_gmm":
        assert eng.tau_used == pytest.approx(want, abs=1e-9)
    else:
        assert eng.tau_used == want
    # and every metric equals the one-shot evaluation at that τ
    ymv = ym[ym >= 0]
    one = osm.open_set_metrics(eng._score[:500][ym >= 0], ymv, eng._pc[:500][ym >= 0], 5, tau=eng.tau_used)
    for key in m:
        if key in ("unk_classmean", "hos_classmean"):  # need y_orig; covered by the streaming tests
            continue
        assert (math.isnan(m[key]) and math.isnan(one[key])) or m[key] == pytest.approx(one[key], abs=1e-12), key


def test_reject_count_too_large_is_an_error_after_the_transfer():
    eng = create_engine("open_set", num_classes=5, device="cpu", known_classes=[0, 1, 2], threshold="reject_count",
                        n_r=10)
    eng.observe(torch.eye(5)[:4], torch.tensor([0, 1, 3, -1]), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    with pytest.raises(ValueError, match="n_r must be in 1…3"):
        eng.compute()


# ---- audit item 4: detectors keep float64 -----------------------------------------------------------------
def test_msp_energy_keep_float64():
    z = torch.tensor([[20.0, 0.0, 0.0], [21.0, 0.0, 0.0]], dtype=torch.float64)
    msp = osm.msp_score(z)
    assert msp.dtype == torch.float64 and msp[0] != msp[1] and msp[1] > msp[0]  # float32 gives 1.0 twice
    assert osm.energy_score(z).dtype == torch.float64
    assert osm.msp_score(z.float()).dtype == torch.float32
    assert osm.msp_score(z.half()).dtype == torch.float32 and osm.energy_score(z.bfloat16()).dtype == torch.float32
    # the engine's own detector keeps float64 too: the two rows stay distinct (no tie)
    eng = create_engine("open_set", num_classes=4, device="cpu", known_classes=[0, 1, 2], threshold="fixed", tau=0.0)
    eng.observe(z, torch.tensor([3, 0]))  # row 0 (margin 20) is the unknown
    assert eng.compute()["auroc"] == 1.0  # the less confident row is the unknown one; float32 ties give 0.5
