"""TEEN calibration: the card's exact vectors (T1, T3) and properties (T2)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from openworld.metrics import confusion_counts, fscil_session_metrics
from openworld.strategies.base import class_means
from openworld.strategies.teen import calibrate

BASE = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]], dtype=torch.float64)
NEW = torch.tensor([[1.0, 0.2], [0.3, -1.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    "tau, beta, expected",
    [
        (16, 0.5, [[0.990290, 0.098060], [0.643674, -0.478913]]),
        (16, 0.1, [[0.982523, 0.176505], [0.358613, -0.862044]]),
        (1, 0.5, [[0.931878, 0.332579], [0.561247, -0.203899]]),
        (16, 0.0, [[0.980581, 0.196116], [0.287348, -0.957826]]),
    ],
)
def test_t1_calibration_vectors(tau, beta, expected):
    out = calibrate(BASE, NEW, softmax_t=tau, shift_weight=beta)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)
    out32 = calibrate(BASE.float(), NEW.float(), softmax_t=tau, shift_weight=beta)
    torch.testing.assert_close(out32, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "tau, expected",
    [
        (16, [[0.999996, 0.000004, 0.0], [0.999898, 0.0, 0.000102]]),
        (1, [[0.626151, 0.285753, 0.088096], [0.540317, 0.155552, 0.304131]]),
    ],
)
def test_t1_softmax_weights(tau, expected):
    # The weights the card tabulates: softmax over base classes of tau * cosine.
    a = torch.softmax(tau * F.normalize(NEW, dim=-1) @ F.normalize(BASE, dim=-1).T, dim=-1)
    torch.testing.assert_close(a, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


vectors = st.lists(st.floats(-5, 5, allow_nan=False), min_size=3, max_size=3).filter(
    lambda v: sum(x * x for x in v) > 0.05
)


@settings(max_examples=60, deadline=None)
@given(
    base=st.lists(vectors, min_size=2, max_size=5),
    new=st.lists(vectors, min_size=1, max_size=3),
    scales=st.lists(st.floats(0.1, 10), min_size=8, max_size=8),
    tau=st.floats(0.5, 32),
)
def test_t2_beta_zero_and_scale_invariance(base, new, scales, tau):
    b = torch.tensor(base, dtype=torch.float64)
    p = torch.tensor(new, dtype=torch.float64)
    torch.testing.assert_close(calibrate(b, p, tau, 0.0), F.normalize(p, dim=-1), atol=1e-12, rtol=0)
    sb = torch.tensor(scales[: len(b)], dtype=torch.float64)[:, None]
    sp = torch.tensor(scales[-len(p) :], dtype=torch.float64)[:, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = calibrate(b, p, tau, 0.3)
        scaled = calibrate(b * sb, p * sp, tau, 0.3)
    if torch.isfinite(ref).all() and (ref.norm(dim=-1) > 1e-3).all():
        torch.testing.assert_close(scaled, ref, atol=1e-9, rtol=0)


def test_t2_large_tau_goes_to_nearest_base_direction():
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2]], dtype=torch.float64)
    p = torch.tensor([[0.9, 0.5], [-0.7, 0.1]], dtype=torch.float64)
    out = calibrate(b, p, softmax_t=1e4, shift_weight=1.0)
    nearest = F.normalize(b, dim=-1)[(F.normalize(p, dim=-1) @ F.normalize(b, dim=-1).T).argmax(1)]
    torch.testing.assert_close(out, nearest, atol=1e-9, rtol=0)


def test_t2_degenerate_mix_warns_instead_of_nan():
    b = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    p = torch.tensor([[0.0, -1.0]])
    with pytest.warns(RuntimeWarning, match="undefined"):
        out = calibrate(b, p, softmax_t=16, shift_weight=0.5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "beta, row, preds, recalls, acc, base, nov, hm",
    [
        (0.0, [0.447214, 0.894427], [0, 0, 1, 2, 1, 2], [1, 0.5, 0.5], 66.6667, 75, 50, 60.0),
        (0.5, [0.223997, 0.947213], [0, 0, 1, 2, 2, 2], [1, 0.5, 1], 83.3333, 75, 100, 85.7143),
    ],
)
def test_t3_end_to_end_toy_session(beta, row, preds, recalls, acc, base, nov, hm):
    # Identity encoder, d=2, B=2, W=1, K=2 shots; shots arrive one per batch (pitfall 2).
    base_feats = torch.tensor([[1.0, 0], [3, 0], [0, 2], [0, 4]], dtype=torch.float64)
    base_labels = torch.tensor([0, 0, 1, 1])
    protos = class_means(base_feats, base_labels, [0, 1])
    torch.testing.assert_close(protos, torch.tensor([[2.0, 0], [0, 3]], dtype=torch.float64))
    shot_batches = [torch.tensor([[1.0, 1]], dtype=torch.float64), torch.tensor([[1.0, 3]], dtype=torch.float64)]
    shots = torch.cat(shot_batches)
    p2 = class_means(shots, torch.tensor([2, 2]), [2])
    torch.testing.assert_close(p2, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    new_row = calibrate(protos, p2, softmax_t=16, shift_weight=beta)
    torch.testing.assert_close(new_row[0], torch.tensor(row, dtype=torch.float64), atol=1e-6, rtol=0)
    weights = torch.cat([protos, new_row])
    x = torch.tensor([[1, 0.1], [1, 0.5], [0.1, 1], [0.3, 1], [0.2, 1], [0.6, 1]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = 16 * F.normalize(x, dim=-1) @ F.normalize(weights, dim=-1).T
    pred = logits.argmax(1)
    assert pred.tolist() == preds
    m = fscil_session_metrics(confusion_counts(y, pred, 3), base_classes=[0, 1], novel_classes=[2])
    assert m["acc"] * 100 == pytest.approx(acc, abs=1e-4)
    assert m["acc_base"] * 100 == pytest.approx(base, abs=1e-4)
    assert m["acc_novel"] * 100 == pytest.approx(nov, abs=1e-4)
    assert m["hm"] * 100 == pytest.approx(hm, abs=1e-4)
    del recalls  # implied by base/nov above


def test_only_current_session_rows_change():
    """After session i only rows [B+(i-1)W, B+iW) change; base rows stay bit-identical (T2)."""
    from types import SimpleNamespace

    from openworld.strategies.teen import TEEN

    torch.manual_seed(0)
    strategy = TEEN(softmax_t=16, shift_weight=0.5)
    strategy.ctx = SimpleNamespace(extract_features=lambda enc, data, batch_size=None: (data[0], data[1]))
    strategy.base_classes = [0, 1, 2]
    strategy.encoder = torch.nn.Identity()
    strategy.weights = torch.zeros(7, 4)
    strategy.weights[:3] = torch.randn(3, 4)
    before = strategy.weights.clone()
    feats = torch.randn(4, 4)
    session = SimpleNamespace(
        classes=SimpleNamespace(seen=tuple(range(5)), new=(3, 4)), labeled=(feats, torch.tensor([3, 3, 4, 4]))
    )
    strategy.learn(session)
    assert torch.equal(strategy.weights[:3], before[:3])
    assert torch.equal(strategy.weights[5:], before[5:])
    assert not torch.equal(strategy.weights[3:5], before[3:5])
