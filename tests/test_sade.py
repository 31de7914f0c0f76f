"""SADE (card long-tail-sade-rcal §2.1–2.4; vectors T3–T7, T11) and the baselines' losses (T5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openworld.models.experts import ResNet32Experts, cnn_experts, resnet32, resnet32_experts
from openworld.strategies.long_tail_baselines import LTSchedule, balanced_softmax_loss, posthoc_adjust
from openworld.strategies.sade import (
    SADE,
    aggregation_loss,
    expert_offsets,
    inverse_prior,
    sade_losses,
    should_stop,
    strong_view,
)

D = torch.float64


# --- T3 ------------------------------------------------------------------------------------------
def test_inverse_prior_vectors():
    assert inverse_prior(torch.tensor([.5, .2, .3])).tolist() == pytest.approx([.2, .5, .3])
    assert inverse_prior(torch.tensor([.4, .3, .2, .1])).tolist() == pytest.approx([.1, .2, .3, .4])
    assert inverse_prior(torch.tensor([.4, .2, .2, .1, .1])).tolist() == pytest.approx([.1, .2, .1, .4, .2])
    assert inverse_prior(torch.tensor([.4, .2, .2, .1, .1]), "flip").tolist() == pytest.approx([.1, .1, .2, .2, .4])


def test_inverse_prior_cifar100_ties_differ_from_flip_at_24_indices():
    from openworld.scenarios.long_tail import class_counts

    n = torch.tensor(class_counts(500, 100, 100), dtype=D)
    p = n / n.sum()
    diff = (inverse_prior(p) != p.flip(0)).nonzero().flatten().tolist()
    assert diff == [74, 75] + list(range(77, 90)) + list(range(91, 100))


# --- T4 / T5 ------------------------------------------------------------------------------------------
def test_expert_losses_and_offsets():
    prior = torch.tensor([.5, .2, .3], dtype=D)
    off = expert_offsets(prior, tau=2.0)
    np.testing.assert_allclose(off[1].numpy(), [-.693147, -1.609438, -1.203973], atol=1e-6)
    np.testing.assert_allclose(off[2].numpy(), [2.525729, -.223144, 1.203973], atol=1e-6)
    v = torch.tensor([1., .5, -.5], dtype=D).expand(1, 3, 3).clone()
    losses = sade_losses(v, torch.tensor([0]), off)
    np.testing.assert_allclose(losses.numpy(), [0.604131, 0.319537, 0.093781], atol=1e-6)
    assert float(losses.sum()) == pytest.approx(1.017449, abs=1e-6)


def test_baseline_losses():
    prior = torch.tensor([.5, .2, .3], dtype=D)
    v = torch.tensor([[1., .5, -.5]], dtype=D)
    y = torch.tensor([0])
    assert float(balanced_softmax_loss(v, y, prior)) == pytest.approx(0.319537, abs=1e-6)
    assert float(balanced_softmax_loss(v, y, prior, tau=2.0)) == pytest.approx(0.163285, abs=1e-6)
    adj = posthoc_adjust(v, prior)
    np.testing.assert_allclose(adj[0].numpy(), [1.693147, 2.109438, .703973], atol=1e-6)
    assert int(v.argmax()) == 0 and int(adj.argmax()) == 1


# --- T6 / T7 ------------------------------------------------------------------------------------------
V1 = torch.tensor([[[2, 0, 0], [0, 1, 0], [0, 0, 3]], [[0, 1, 0], [1, 0, 0], [0, 2, 0]]], dtype=D)
V2 = torch.tensor([[[1, 0, 0], [0, 2, 0], [0, 0, 1]], [[0, 2, 0], [0, 0, 1], [0, 1, 0]]], dtype=D)


def test_aggregation_step():
    w = torch.full((3,), 1 / 3, dtype=D, requires_grad=True)
    loss = aggregation_loss(w, V1, V2)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-0.951737, abs=1e-6)
    np.testing.assert_allclose(w.grad.numpy(), [-0.040788, 0.028012, 0.012776], atol=1e-6)
    torch.optim.SGD([w], lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4).step()
    np.testing.assert_allclose(w.detach().numpy(), [0.341051, 0.327979, 0.330874], atol=1e-6)
    np.testing.assert_allclose(torch.softmax(w.detach(), 0).numpy(), [0.335921, 0.331559, 0.332520], atol=1e-6)
    w2 = torch.full((3,), 1 / 3, dtype=D, requires_grad=True)
    same = aggregation_loss(w2, V1, V1)
    same.backward()
    assert float(same.detach()) == pytest.approx(-1.0, abs=1e-9) and float(w2.grad.abs().max()) < 1e-9


def test_stop_rule():
    assert should_stop((0.9, 0.06, 0.04))
    assert should_stop((0.9, 0.055, 0.045))
    assert not should_stop((0.34, 0.33, 0.33))
    assert should_stop((0.91, 0.045, 0.045))


# --- schedule, architecture, views ---------------------------------------------------------------------
def test_cifar100_schedule():
    s = LTSchedule(200, 0.1, warmup_epochs=5, milestones=(160, 180))
    assert [round(s.lr_at(e), 10) for e in (0, 4, 5, 159, 160, 179, 180, 199)] == [
        0.02, 0.1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert LTSchedule(60, 0.05).resolved() == (2, (48, 54))


def test_resnet32_experts_layout():
    net = resnet32_experts(reduce_dimension=True)
    assert isinstance(net, ResNet32Experts) and net.widths == (16, 24, 48) and net.num_experts == 3
    assert len(net.layer1) == 5 and len(net.layer2s[0]) == 5 and len(net.layer3s[2]) == 5
    out = net.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 3, 48)
    single = resnet32()
    assert single(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    n_params = sum(p.numel() for p in single.parameters())
    assert 460_000 < n_params < 470_000  # ResNet-32 (option A): ~0.46 M parameters
    assert cnn_experts(in_channels=1).eval()(torch.randn(2, 1, 28, 28)).shape == (2, 3, 64)


def test_strong_view_is_batched_and_seeded():
    x = torch.rand(6, 3, 32, 32)
    a = strong_view(x, torch.Generator().manual_seed(0))
    b = strong_view(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    g = strong_view(torch.rand(4, 1, 28, 28), torch.Generator().manual_seed(1))
    assert g.shape == (4, 1, 28, 28)


def test_bad_modes_fail_loudly_and_opt_in_modes_are_accepted():
    with pytest.raises(ValueError, match="transductive, split, off"):
        SADE(tta="half")
    with pytest.raises(ValueError, match="val, last, test"):
        SADE(checkpoint="best")
    split = SADE(tta="split", checkpoint="test")
    assert split.adapt_fraction() == 0.5 and split.selects_on_test()
    plain = SADE()
    assert plain.adapt_fraction() is None and not plain.selects_on_test()


# --- T11: the aggregation path never reads labels; same seed, same α ------------------------------

def _sade_with_net(seed=0):
    from openworld.data.views import TensorData, TransformPair
    from openworld.strategies.base import RunContext, TrainConfig

    ctx = RunContext(device="cpu", seed=seed, scenario={"num_classes": 10, "input_shape": (8,)},
                     backbone={"name": "mlp_experts", "trunk": 16, "out_features": 8}, base=TrainConfig(),
                     progress=False)
    s = SADE(tta_epochs=3, tta_batch_size=16)
    s.setup(ctx)
    torch.manual_seed(seed)
    s.net = s._build().eval()
    ident = TransformPair(lambda t: t.float(), lambda t: t.float(), True, "identity")

    class Guarded(TensorData):
        @property
        def targets(self):
            raise AssertionError("SADE's aggregation read the evaluation labels")

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    return s, Guarded(x, torch.zeros(64, dtype=torch.long), ident, "eval")


def test_aggregation_reads_no_labels_and_is_deterministic():
    a, data = _sade_with_net()
    a.adapt(data)
    b, data_b = _sade_with_net()
    b.adapt(data_b)
    assert a.alpha.tolist() == b.alpha.tolist()
    assert abs(float(a.alpha.sum()) - 1) < 1e-6 and 1 <= a.tta_log[-1]["epochs"] <= 3
    diag = a.eval_diagnostics()
    assert set(diag) == {"sade_alpha_1", "sade_alpha_2", "sade_alpha_3", "sade_tta_epochs"}
    off = SADE(tta="off")
    off.setup(a.ctx)
    off.net = a.net
    off.adapt(data)
    assert off.alpha.tolist() == pytest.approx([1 / 3] * 3)
