"""Non-finite logits and scores are errors, never scored silently (audit item 1).

Bad row: any NaN or +inf, or no finite entry (all -inf). Rows with some -inf entries are legitimate
(the runner pads absent classes and masks classes outside the eval set with -inf). For scores any
NaN or ±inf is bad. Engines count bad rows on the device and raise in ``compute()``.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import openworld.metrics as om
from openworld.metrics import MetricsEngine, NonFiniteError, create_engine, target_rank, topk_accuracy
from openworld.metrics import open_set as osm

NAN, INF = float("nan"), float("inf")
T = torch.tensor


def test_nonfinite_error_interface():
    assert issubclass(NonFiniteError, ValueError)
    assert om.NonFiniteError is NonFiniteError
    from openworld.metrics.engine import NonFiniteError as from_engine

    assert from_engine is NonFiniteError
    e = NonFiniteError("logits", 2, 3, "NaN or inf")
    assert (e.what, e.rows, e.total) == ("logits", 2, 3)
    assert str(e) == "non-finite logits in 2 of 3 rows (NaN or inf); the strategy produced invalid outputs"
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is NonFiniteError and (e2.what, e2.rows, e2.total) == ("logits", 2, 3)
    assert str(e2) == str(e)


# -- pure functions ------------------------------------------------------------------------------------


def test_topk_accuracy_nan_rows_are_not_hits():
    """2 of 3 rows NaN: top2 used to be 1.0 (NaN rows got rank 0) while acc = 1/3."""
    z = T([[NAN, NAN, NAN], [0.1, 0.9, 0.0], [NAN, 1.0, 2.0]])
    y = T([2, 0, 1])
    with pytest.raises(NonFiniteError, match=r"non-finite logits in 2 of 3 rows") as ei:
        topk_accuracy(z, y, 2)
    assert (ei.value.what, ei.value.rows, ei.value.total) == ("logits", 2, 3)
    with pytest.raises(ValueError, match="2 of 3"):
        target_rank(z, y)


def test_pure_functions_inf_rules():
    y = T([0, 1])
    ok = T([[1.0, -INF, 0.0], [-INF, 2.0, -INF]])  # some -inf: padded / masked classes, fine
    assert topk_accuracy(ok, y, 1) == 1.0
    assert target_rank(ok, y).tolist() == [0, 0]
    with pytest.raises(NonFiniteError, match="1 of 2"):
        topk_accuracy(T([[1.0, INF, 0.0], [0.0, 1.0, 0.0]]), y, 1)  # +inf
    with pytest.raises(NonFiniteError, match="1 of 2"):
        topk_accuracy(T([[-INF, -INF, -INF], [0.0, 1.0, 0.0]]), y, 1)  # no finite class score
    # a row whose label is ignored is not scored, so it is not checked by topk_accuracy
    assert topk_accuracy(T([[NAN, 0.0, 0.0], [0.0, 1.0, 0.0]]), T([-1, 1]), 1) == 1.0


def test_one_shot_open_set_functions_raise_nonfinite_error():
    v = np.array([0.1, NAN, 0.3, INF])
    u = np.array([True, False, True, False])
    for fn in (osm.auroc, osm.fpr_at_tpr, osm.aupr_in, osm.ap_out):
        with pytest.raises(NonFiniteError, match="2 of 4") as ei:
            fn(v, u)
        assert ei.value.what == "scores"
    with pytest.raises(NonFiniteError):
        osm.open_set_metrics(v, [0, 1, 2, 2], [0, 1, 0, 1], 2)
    for fn in (osm.threshold_otsu, osm.threshold_ros_mean):
        with pytest.raises(NonFiniteError):
            fn([0.1, NAN, 0.3])


# -- MetricsEngine -----------------------------------------------------------------------------------


def _ops_during(fn):
    class Rec(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    with Rec() as rec:
        fn()
    return set(rec.ops)


SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2", "is_nonzero", "equal"}


@pytest.mark.parametrize("topk", [(2,), ()])
def test_metrics_engine_raises_at_compute_not_in_update(topk):
    eng = MetricsEngine(3, topk=topk, chunk_size=None)
    z = T([[NAN, NAN, NAN], [0.1, 0.9, 0.0], [NAN, 1.0, 2.0]])
    ops = _ops_during(lambda: eng.update(None, T([2, 0, 1]), logits=z))  # no raise, no sync
    assert not ops & SYNC_OPS, ops
    with pytest.raises(NonFiniteError) as ei:
        eng.compute()
    e = ei.value
    assert (e.what, e.rows, e.total) == ("logits", 2, 3)
    assert str(e) == ("non-finite logits in 2 of 3 rows (NaN, +inf or all -inf); "
                      "the strategy produced invalid outputs")


def test_metrics_engine_inf_rules_and_ignored_rows():
    eng = MetricsEngine(3, topk=(2,))
    # padded/masked classes (-inf entries) are fine; a NaN row with an ignored label is not scored
    eng.update(None, T([0, 1, -1]), logits=T([[1.0, -INF, -INF], [-INF, 2.0, 0.0], [NAN, NAN, NAN]]))
    eng.update(T([0]), T([0]))  # a batch without logits is not checked
    m = eng.compute()
    assert m["acc"] == 1.0 and eng.num_samples == 3
    eng.update(None, T([0, 1]), logits=T([[INF, 0.0, 0.0], [-INF, -INF, -INF]]))
    with pytest.raises(NonFiniteError) as ei:
        eng.compute()
    assert (ei.value.rows, ei.value.total) == (2, 4)  # checked rows: those with logits and a label
    eng.reset()  # the counters go too
    eng.update(None, T([1]), logits=T([[0.0, 1.0, 0.0]]))
    assert eng.compute()["acc"] == 1.0


def test_metrics_engine_float16_nan_logits():
    eng = MetricsEngine(3, topk=(2,))
    eng.update(None, T([0, 1]), logits=T([[NAN, 0, 0], [0, 1, 0]], dtype=torch.float16))
    with pytest.raises(NonFiniteError, match="1 of 2"):
        eng.compute()


# -- OpenSetEngine -----------------------------------------------------------------------------------


def _open_set(**kw):
    return create_engine("open_set", num_classes=5, device="cpu", known_classes=[0, 1, 2], **kw)


def test_open_set_engine_nan_logits_with_strategy_score():
    """The closed prediction is argmax of the logits: NaN logits must not be scored even though the
    strategy supplies a finite unknown_score."""
    eng = _open_set(threshold="fixed", tau=0.0)
    z = T([[NAN, 0.0, 0.0, 5.0, 5.0], [0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    ops = _ops_during(lambda: eng.observe(z, T([0, 1, 3]), T([-1.0, -1.0, 1.0])))
    assert not ops & SYNC_OPS, ops
    with pytest.raises(NonFiniteError) as ei:
        eng.compute()
    assert (ei.value.what, ei.value.rows, ei.value.total) == ("logits", 1, 3)
    assert eng.confusion() is None and eng.tau_used is None  # nothing stored from a failed compute


def test_open_set_engine_bad_rows_rules():
    # NaN in an ignored (columns outside the known classes) logit column: not scored, fine
    eng = _open_set(threshold="fixed", tau=0.0)
    eng.observe(T([[1.0, 0.0, -INF, NAN, INF]]), T([0]), T([-1.0]))
    # a row with an ignored label may hold anything
    eng.observe(T([[NAN, NAN, NAN, 0.0, 0.0]]), T([-1]), T([NAN]))
    eng.observe(T([[0.0, 1.0, 0.0, 0.0, 0.0]]), T([4]), T([1.0]))
    m = eng.compute()
    assert m["closed_acc"] == 1.0 and eng.num_samples == 2
    # all known-class logits -inf: no finite class score
    eng.observe(T([[-INF, -INF, -INF, 0.0, 0.0]]), T([1]), T([0.5]))
    with pytest.raises(NonFiniteError) as ei:
        eng.compute()
    assert (ei.value.what, ei.value.rows, ei.value.total) == ("logits", 1, 3)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_open_set_engine_nonfinite_unknown_score(bad):
    eng = _open_set(threshold="zero")
    eng.observe(torch.eye(5)[[0, 1, 2, 3]], T([0, 1, 2, 3]), T([0.1, bad, -0.2, bad]))
    with pytest.raises(NonFiniteError) as ei:
        eng.compute()
    e = ei.value
    assert (e.what, e.rows, e.total) == ("unknown_score", 2, 4)
    assert str(e) == "non-finite unknown_score in 2 of 4 rows (NaN or inf); the strategy produced invalid outputs"


def test_open_set_engine_detector_nan_logits():
    eng = _open_set()  # engine-derived MSP + Otsu
    eng.observe(T([[NAN, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), T([0, 1, 4]))
    with pytest.raises(NonFiniteError) as ei:
        eng.compute()
    assert (ei.value.what, ei.value.rows, ei.value.total) == ("logits", 1, 3)
    eng.reset()  # counters cleared
    eng.observe(T([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0]]), T([0, 1, 4]))
    assert eng.compute()["closed_acc"] == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bad_row_counting_never_syncs():
    meng = MetricsEngine(3, "cuda", topk=(2,))
    oeng = create_engine("open_set", num_classes=5, device="cuda", known_classes=[0, 1, 2], threshold="target_otsu",
                         num_samples=8)
    z = torch.randn(8, 5, device="cuda")
    z[0, 0] = NAN
    y = torch.randint(0, 5, (8,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        meng.update(None, y.clamp(max=2), logits=z[:, :3])
        oeng.observe(z, y, torch.randn(8, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for eng in (meng, oeng):
        with pytest.raises(NonFiniteError, match="1 of 8"):
            eng.compute()


def test_long_tail_engine_raises_on_nan_logits_and_scores_finite_ones():
    from openworld.metrics.long_tail import LongTailEngine

    eng = LongTailEngine(3, train_counts=[100, 30, 5])
    eng.update(None, T([0, 1, 2]), logits=T([[NAN, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, INF]]))
    with pytest.raises(NonFiniteError) as ei:
        eng.compute()
    assert (ei.value.what, ei.value.rows, ei.value.total) == ("logits", 2, 3)
    eng = LongTailEngine(3, train_counts=[100, 30, 5])
    eng.update(None, T([0, 1, 2]), logits=T([[1.0, 0.0, -INF], [0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]))
    out = eng.compute()
    assert out["acc"] == pytest.approx(2 / 3) and eng.num_samples == 3


def test_clustering_engine_raises_on_nan_logits():
    from openworld.metrics.clustering import ClusteringEngine

    eng = ClusteringEngine(3, old_classes=[0])
    eng.observe(T([[NAN, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [NAN, 1.0, 0.0]]), T([0, 1, 2, -1]))
    with pytest.raises(NonFiniteError) as ei:
        eng.compute()
    assert (ei.value.what, ei.value.rows, ei.value.total) == ("logits", 1, 3)  # the unlabelled row is not counted
    eng = ClusteringEngine(3, old_classes=[0])
    eng.observe(T([[1.0, 0.0, -INF], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), T([0, 1, 2]))
    assert eng.compute()["all_v2"] == 1.0
    eng.reset()
    eng.observe(T([1, 2, 0]), T([0, 1, 2]))  # integer cluster ids: nothing to check
    assert eng.compute()["all_v2"] == 1.0
