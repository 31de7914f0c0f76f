"""RCAL stage 2a (card long-tail-sade-rcal §2.5; vectors T8–T10) and the MoCo loss wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openworld.scenarios.long_tail import class_counts
from openworld.strategies.rcal import (
    RCAL,
    calibrate_tail,
    class_gaussians,
    head_tail_split,
    lof_keep,
    sample_gaussians,
)


# --- T8 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_max,imb,c,heads", [(5000, 10, 10, 3), (5000, 100, 10, 2), (500, 10, 100, 26),
                                               (500, 100, 100, 15)])
def test_head_split(n_max, imb, c, heads):
    head, tail = head_tail_split(class_counts(n_max, imb, c))
    assert head == list(range(heads)) and tail == list(range(heads, c))


def test_head_split_uses_count_order_not_ids():
    head, tail = head_tail_split([10, 60, 30])
    assert head == [1] and tail == [0, 2]


# --- T9 -------------------------------------------------------------------------------------------
MU = np.array([[0, 0], [2, 0], [10, 0], [1, 1.0]])
COV = np.stack([np.eye(2), 2 * np.eye(2), 3 * np.eye(2), 0.5 * np.eye(2)])
N = [100, 50, 80, 10]


def test_calibration_toy_q2():
    mu, cov, chosen = calibrate_tail(MU, COV, N, [0, 1, 2], [3], q=2, gamma=0.5, alpha=0.1)
    sel, w = chosen[3]
    assert sel == [0, 1]
    np.testing.assert_allclose(w, [2 / 3, 1 / 3], atol=1e-6)
    np.testing.assert_allclose(mu[3], [0.833333, 0.5], atol=1e-6)
    np.testing.assert_allclose(cov[3], [[1.016667, 0.1], [0.1, 1.016667]], atol=1e-6)
    np.testing.assert_array_equal(mu[:3], MU[:3])  # heads keep their statistics
    np.testing.assert_array_equal(cov[:3], COV[:3])


def test_calibration_toy_q3_as_paper_weights_far_heads_more():
    mu, _, chosen = calibrate_tail(MU, COV, N, [0, 1, 2], [3], q=3, gamma=0.5, alpha=0.1)
    np.testing.assert_allclose(chosen[3][1], [0.029155, 0.014577, 0.956268], atol=1e-6)
    np.testing.assert_allclose(mu[3], [5.295918, 0.5], atol=1e-6)
    _, cov_i, ch_eq = calibrate_tail(MU, COV, N, [0, 1, 2], [3], q=2, gamma=0.5, alpha=0.1, omega="equal",
                                     jitter="identity")
    np.testing.assert_allclose(ch_eq[3][1], [0.5, 0.5])
    np.testing.assert_allclose(cov_i[3], [[0.5 * 1.5 + 0.25 + 0.1, 0], [0, 0.5 * 1.5 + 0.25 + 0.1]], atol=1e-12)


# --- T10 ------------------------------------------------------------------------------------------
def test_lof_removes_the_far_point():
    grid = np.array([[i, j] for i in range(5) for j in range(5)] + [[10, 10]], dtype=float)
    keep, scores = lof_keep(grid, 20)
    assert np.flatnonzero(~keep).tolist() == [25]
    assert scores[-1] == pytest.approx(2.9614, abs=1e-4)
    mu, cov, kept, removed = class_gaussians(grid, np.zeros(26, dtype=int), 1)
    np.testing.assert_allclose(mu[0], [2, 2], atol=1e-12)
    np.testing.assert_allclose(cov[0], 2.083333 * np.eye(2), atol=1e-6)
    assert kept.tolist() == [25] and removed == pytest.approx(1 / 26)


def test_small_classes_and_singular_sampling():
    z = np.array([[0.0, 1.0], [2.0, 3.0], [5.0, 5.0]])
    mu, cov, kept, _ = class_gaussians(z, np.array([0, 0, 1]), 3)
    assert kept.tolist() == [2, 1, 0] and np.allclose(cov[1], 0) and np.allclose(mu[2], 0)
    singular = np.array([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]])  # rank 1 and rank 0
    zs, ys = sample_gaussians(np.array([[0.0, 0.0], [3.0, 3.0]]), singular, [500, 4], np.random.default_rng(0))
    assert zs.shape == (504, 2) and ys.tolist() == [0] * 500 + [1] * 4
    np.testing.assert_allclose(zs[:500, 0], zs[:500, 1], atol=1e-6)  # rank-1: on the diagonal
    np.testing.assert_allclose(zs[500:], 3.0)


def test_pml_memory_loss_is_moco_infonce():
    from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss

    g = torch.Generator().manual_seed(0)
    d, b = 8, 4
    fn = CrossBatchMemory(NTXentLoss(temperature=0.2), embedding_size=d, memory_size=16)
    old = F.normalize(torch.randn(3, d, generator=g), dim=1)
    fn(torch.cat([torch.randn(3, d, generator=g), old]), torch.tensor([90, 91, 92, 80, 81, 82]),
       enqueue_mask=torch.tensor([False] * 3 + [True] * 3))
    q = F.normalize(torch.randn(b, d, generator=g), dim=1)
    k = F.normalize(torch.randn(b, d, generator=g), dim=1)
    lab = torch.arange(b)
    loss = fn(torch.cat([q, k]), torch.cat([lab, lab]), enqueue_mask=torch.tensor([False] * b + [True] * b))
    # MoCo: logits [q·k+, q·queue] / tau, target 0; the queue = older keys + the other current keys
    queue = torch.cat([old, k])
    pos = (q * k).sum(1, keepdim=True)
    neg = q @ queue.T
    neg = neg.masked_fill(torch.cat([torch.zeros(b, 3, dtype=torch.bool), torch.eye(b, dtype=torch.bool)], 1),
                          float("-inf"))
    ref = F.cross_entropy(torch.cat([pos, neg], 1) / 0.2, torch.zeros(b, dtype=torch.long))
    assert float(loss) == pytest.approx(float(ref), abs=1e-5)


def test_bad_switches_are_named():
    with pytest.raises(ValueError, match="omega"):
        RCAL(omega="near")
    with pytest.raises(ValueError, match="val, last, test"):
        RCAL(checkpoint="best")
    assert RCAL(checkpoint="test").selects_on_test() and not RCAL().selects_on_test()


def test_dense_moco_queue_loss_equals_pml_cross_batch_memory_over_steps():
    """MoCoQueueLoss = CrossBatchMemory(NTXentLoss) with fresh labels per image, while the queue fills,
    when it is full and when it wraps around (queue 10, batches of 4)."""
    from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss

    from openworld.strategies.rcal import MoCoQueueLoss

    g = torch.Generator().manual_seed(1)
    d, b, size, tau = 6, 4, 10, 0.2
    pml = CrossBatchMemory(NTXentLoss(temperature=tau), embedding_size=d, memory_size=size)
    ours = MoCoQueueLoss(d, size, tau)
    for step in range(5):
        q = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
        k = F.normalize(torch.randn(b, d, generator=g), dim=1)
        lab = torch.arange(step * b, (step + 1) * b)
        ref = pml(torch.cat([q, k]), torch.cat([lab, lab]), enqueue_mask=torch.tensor([False] * b + [True] * b))
        got = ours(q, k)
        assert float(got) == pytest.approx(float(ref), abs=1e-6), step
        assert torch.autograd.grad(got, q)[0].abs().sum() > 0  # the queries get the gradient
    with pytest.raises(ValueError, match="smaller than the batch"):
        MoCoQueueLoss(d, 2, tau)(q, k)
