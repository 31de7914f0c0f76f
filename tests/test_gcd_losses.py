"""SimGCD / LegoGCD loss terms against the card's exact vectors (specs/gcd-ncd.md §7 T2–T8, T10)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from openworld.strategies.legogcd import LegoGCD, dkl, ler_loss, ler_selection, qhat_update, scaled_qhat_momentum
from openworld.strategies.simgcd import (
    SimGCD,
    distill_loss,
    info_nce_loss,
    mean_entropy_from_probs,
    mean_entropy_regulariser,
    supcon_loss,
    teacher_temperatures,
)

T = torch.float64


def test_t2_mean_entropy():
    assert float(mean_entropy_from_probs(torch.tensor([0.5, 0.25, 0.25], dtype=T))) == pytest.approx(0.058892, abs=1e-6)
    assert float(mean_entropy_from_probs(torch.full((7,), 1 / 7, dtype=T))) == pytest.approx(0.0, abs=1e-12)
    assert float(mean_entropy_from_probs(torch.tensor([0, 1.0, 0, 0], dtype=T))) == pytest.approx(math.log(4))


def test_t3_teacher_schedule():
    tau = teacher_temperatures(200, 30)
    assert len(tau) == 200
    assert tau[0] == pytest.approx(0.07) and tau[1] == pytest.approx(0.068966, abs=1e-6)
    assert tau[15] == pytest.approx(0.054483, abs=1e-6) and np.allclose(tau[29:], 0.04)
    ref = [0.07, 0.065714, 0.061429, 0.057143, 0.052857, 0.048571, 0.044286, 0.04, 0.04, 0.04]
    assert np.allclose(teacher_temperatures(50, 8)[:10], ref, atol=1e-6)
    cos = teacher_temperatures(50, 8, kind="cosine")
    assert cos[0] == pytest.approx(0.07) and cos[7] == pytest.approx(0.04) and np.all(np.diff(cos) <= 1e-12)
    with pytest.raises(ValueError, match="linear"):
        teacher_temperatures(10, 2, kind="step")


Z4 = torch.tensor([[.9, .1, -.2], [.2, .8, 0], [.7, .3, -.1], [.1, .6, .2]], dtype=T)


def test_t4_distillation_and_regulariser():
    assert float(distill_loss(Z4, 0.07, 0.1)) == pytest.approx(0.026212, abs=1e-6)
    assert float(distill_loss(Z4, 0.04, 0.1)) == pytest.approx(0.011784, abs=1e-6)
    assert float(mean_entropy_regulariser(Z4, 0.1)) == pytest.approx(0.379135, abs=1e-6)


def info_nce_reference(proj: torch.Tensor, tau: float) -> torch.Tensor:
    """The card's definition: row i, positive i±B first, then the 2B-2 negatives in index order."""
    f = F.normalize(proj, dim=1)
    s = f @ f.T
    n = len(f)
    b = n // 2
    rows = []
    for i in range(n):
        pos = (i + b) % n
        negs = [j for j in range(n) if j not in (i, pos)]
        rows.append(torch.cat([s[i, pos:pos + 1], s[i, negs]]))
    logits = torch.stack(rows) / tau
    return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long)), logits


def supcon_reference(proj: torch.Tensor, labels: torch.Tensor, tau: float, tau_b: float) -> torch.Tensor:
    f = F.normalize(proj, dim=1)
    s = f @ f.T / tau
    n = len(f)
    eye = torch.eye(n, dtype=torch.bool)
    log_prob = s - torch.logsumexp(s.masked_fill(eye, -float("inf")), dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None]) & ~eye
    per_anchor = -(tau / tau_b) * (log_prob * pos).sum(1) / pos.sum(1)
    return per_anchor.mean()


def test_t5_info_nce():
    proj = torch.tensor([[1, 0], [0, 1], [1, .1], [.1, 1]], dtype=T)
    ref, logits = info_nce_reference(proj, 1.0)
    assert logits[0].tolist() == pytest.approx([.995037, 0, .099504], abs=1e-6)
    assert logits[1].tolist() == pytest.approx([.995037, 0, .099504], abs=1e-6)
    assert logits[2].tolist() == pytest.approx([.995037, .099504, .198020], abs=1e-6)
    assert float(ref) == pytest.approx(0.597808, abs=1e-6)
    assert float(info_nce_loss(proj, 1.0)) == pytest.approx(0.597808, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    from pytorch_metric_learning.losses import NTXentLoss

    assert float(NTXentLoss(temperature=1.0)(proj, torch.arange(2).repeat(2))) == pytest.approx(0.597808, abs=1e-6)
    for tau in (1.0, 0.5):  # ours == pytorch-metric-learning's NTXentLoss == the card's definition
        p = torch.randn(12, 5, generator=g, dtype=T)
        ref = float(info_nce_reference(p, tau)[0])
        assert float(info_nce_loss(p, tau)) == pytest.approx(ref, abs=1e-9)
        assert float(NTXentLoss(temperature=tau)(p, torch.arange(6).repeat(2))) == pytest.approx(ref, abs=1e-9)


def test_t6_supcon():
    raw = torch.tensor([[[1, 0], [.9, .1]], [[0, 1], [.1, .9]], [[.8, .2], [1, 0]]], dtype=T)
    feats = F.normalize(raw, dim=-1)
    labels = torch.tensor([0, 1, 0])
    proj = torch.cat([feats[:, 0], feats[:, 1]])  # view-major rows, as in the strategy
    lab2 = labels.repeat(2)
    assert float(supcon_reference(proj, lab2, 0.07, 0.07)) == pytest.approx(0.739583, abs=1e-6)
    assert float(supcon_loss(proj, lab2, 0.07, 0.07)) == pytest.approx(0.739583, abs=1e-6)
    g = torch.Generator().manual_seed(1)
    p = torch.randn(16, 6, generator=g, dtype=T)
    y = torch.randint(0, 3, (8,), generator=g).repeat(2)
    assert float(supcon_loss(p, y)) == pytest.approx(float(supcon_reference(p, y, 0.07, 0.07)), abs=1e-9)


def supcon_numpy_loop(proj: np.ndarray, labels, tau: float, tau_b: float) -> float:
    """The official SupCon (Khosla et al.; HobbitLong/SupContrast ``SupConLoss``, contrast_mode 'all'),
    by plain loops in float64: anchor a over every row, denominator over every j ≠ a (positives
    included), mean over the positives p ≠ a; an anchor without a positive contributes 0 and still
    counts in the mean over anchors (the official code's edge-case fix: it divides by max(|P(a)|, 1))."""
    f = np.asarray(proj, dtype=np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    labels = [int(v) for v in labels]
    n = len(f)
    total = 0.0
    for a in range(n):
        denom = sum(math.exp(float(f[a] @ f[j]) / tau) for j in range(n) if j != a)
        pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
        if not pos:
            continue  # 0 for this anchor
        mean_log_prob = sum(float(f[a] @ f[p]) / tau - math.log(denom) for p in pos) / len(pos)
        total += -(tau / tau_b) * mean_log_prob
    return total / n


def official_supcon(features: torch.Tensor, labels: torch.Tensor, temperature=0.07, base_temperature=0.07):
    """HobbitLong/SupContrast ``losses.py`` ``SupConLoss.forward`` (master), contrast_mode 'all', on
    normalised ``features`` [bsz, n_views, d] — the function SimGCD's ``model.py`` copies."""
    batch_size = features.shape[0]
    mask = torch.eq(labels.view(-1, 1), labels.view(-1, 1).T).to(features.dtype)
    contrast_count = features.shape[1]
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature, anchor_count = contrast_feature, contrast_count
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_pos_pairs = mask.sum(1)
    mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


# label layouts per image; ``views`` = 2 stacks both views view-major, as the strategy passes them
SUPCON_LAYOUTS = {
    "mixed_two_views": ([0, 2, 1, 0, 2, 2, 1, 0], 2),
    "all_one_class_two_views": ([3] * 8, 2),
    "all_one_class_one_view": ([1] * 10, 1),
    "singleton_classes_two_views": ([0, 1, 1, 2, 3, 3, 4], 2),
    "singletons_without_positives": ([0, 1, 1, 2, 3, 4, 4, 5], 1),
    "no_positive_at_all": ([0, 1, 2, 3, 4], 1),
}


@pytest.mark.parametrize("layout", sorted(SUPCON_LAYOUTS))
@pytest.mark.parametrize("tau, tau_b", [(0.07, 0.07), (0.1, 0.07)])
def test_supcon_equals_the_official_definition(layout, tau, tau_b):
    per_image, views = SUPCON_LAYOUTS[layout]
    g = torch.Generator().manual_seed(len(per_image) * 10 + views)
    n_img = len(per_image)
    raw = torch.randn(n_img, views, 6, generator=g, dtype=T)
    proj = torch.cat(torch.unbind(raw, dim=1))  # view-major rows
    labels = torch.tensor(per_image).repeat(views)
    expected = supcon_numpy_loop(proj.numpy(), labels.tolist(), tau, tau_b)
    official = float(official_supcon(F.normalize(raw, dim=-1), torch.tensor(per_image), tau, tau_b))
    assert official == pytest.approx(expected, abs=1e-9)  # the loop reference is the official code
    assert float(supcon_loss(proj, labels, tau, tau_b)) == pytest.approx(expected, abs=1e-6)
    assert float(supcon_loss(proj.float(), labels, tau, tau_b)) == pytest.approx(expected, abs=1e-4)
    if layout.startswith("all_one_class"):
        # no negative pair: the library's SupConLoss returns 0, the official one does not
        assert expected > 1.0


def test_supcon_gradient_equals_the_official_one():
    g = torch.Generator().manual_seed(7)
    for per_image in ([0, 2, 1, 0, 2, 2, 1, 0], [5] * 6):
        raw = torch.randn(len(per_image), 2, 5, generator=g, dtype=T)
        a = raw.clone().requires_grad_(True)
        supcon_loss(torch.cat(torch.unbind(a, dim=1)), torch.tensor(per_image).repeat(2)).backward()
        b = raw.clone().requires_grad_(True)
        official_supcon(F.normalize(b, dim=-1), torch.tensor(per_image)).backward()
        assert torch.allclose(a.grad, b.grad, atol=1e-9)


def test_supcon_degenerate_batches_are_zero_and_finite():
    # one row: no j ≠ a at all (the official code gives NaN there); ours 0 with a zero, finite gradient
    for n in (0, 1):
        p = torch.randn(n, 4, dtype=T, requires_grad=True)
        loss = supcon_loss(p, torch.zeros(n, dtype=torch.long))
        loss.backward()
        assert float(loss.detach()) == 0.0 and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) == 0.0


Z7 = torch.tensor([[.60, .40, .35, .30], [.30, .20, .60, .25], [.50, .45, .40, .35], [.20, .30, .25, .65]],
                  dtype=T)


def test_t7_ler():
    labelled = torch.tensor([False, True]).repeat(2)
    p = torch.softmax(Z7 / 0.1, dim=1)
    assert p.max(1).values.tolist() == pytest.approx([.7891, .9105, .4551, .9437], abs=1e-4)
    o = ler_selection(Z7, ~labelled, num_old=2, delta=0.7)
    assert o.tolist() == [True, False, False, False]
    P0 = torch.softmax(Z7[0] / 0.05, dim=0)
    assert P0.tolist() == pytest.approx([.973205, .017825, .006557, .002412], abs=1e-6)
    uniform = torch.full((4,), 0.25, dtype=T)
    assert float(ler_loss(Z7, o, uniform)) == pytest.approx(0.036430, abs=1e-6)
    assert float(ler_loss(Z7, o, None)) == pytest.approx(0.036430, abs=1e-6)
    assert float(ler_loss(Z7, o, torch.tensor([.4, .3, .2, .1], dtype=T))) == pytest.approx(0.036591, abs=1e-6)
    q = qhat_update(uniform, Z7, 0.999, 1.0)
    assert q.tolist() == pytest.approx([0.2500045, 0.2499876, 0.2500050, 0.2500029], abs=1e-7)
    both = ler_selection(Z7, ~labelled, num_old=2, delta=0.7, mask="both_views")
    assert both.tolist() == [False, False, False, False]  # view 2 of image 0 is not confident


def test_qhat_scaled_momentum():
    assert scaled_qhat_momentum(78000) == pytest.approx(0.999)
    assert scaled_qhat_momentum(780) == pytest.approx(0.9)
    assert scaled_qhat_momentum(7800) == pytest.approx(0.99)


def test_t8_dkl():
    z1, z2 = torch.tensor([[.5, .2, -.1]], dtype=T), torch.tensor([[.3, .4, 0]], dtype=T)
    p1, p2 = torch.softmax(z1 / 0.1, 1), torch.softmax(z2 / 0.1, 1)
    assert p1[0].tolist() == pytest.approx([.950330, .047314, .002356], abs=1e-6)
    assert p2[0].tolist() == pytest.approx([.265388, .721399, .013213], abs=1e-6)
    released = float(dkl(z1, z2, "as_released"))
    closed = float((p1 * (p1 - p2)).sum() - torch.logsumexp(p1, 1) + torch.logsumexp(p2, 1))
    assert released == pytest.approx(0.560657, abs=1e-6) and released == pytest.approx(closed, abs=1e-12)
    assert float(dkl(z1, z2, "as_paper")) == pytest.approx(1.079293, abs=1e-6)
    n1, n2 = torch.tensor([[0, 0, .1]], dtype=T), torch.tensor([[0, 0, .2]], dtype=T)
    assert float(dkl(n1, n2, "as_released")) == pytest.approx(-0.037523, abs=1e-6)
    assert float(dkl(n1, n2, "as_paper")) == pytest.approx(0.111983, abs=1e-6)
    assert float(dkl(n1, n2, "off")) == 0.0
    # as_paper detaches view 2; as_released does not
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    dkl(a, b, "as_paper").backward()
    assert b.grad is None and a.grad is not None
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    dkl(a, b, "as_released").backward()
    assert b.grad is not None


class _Ctx:
    device = torch.device("cpu")


@pytest.mark.parametrize("cls", [SimGCD, LegoGCD])
def test_t10_label_firewall(cls):
    """The loss with unlabelled targets -1 equals the loss with their true labels present but masked."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(8, 6, generator=g, dtype=T).tanh()
    u = torch.randn(8, 5, generator=g, dtype=T)
    labelled = torch.tensor([True, False, True, False])
    y_true = torch.tensor([1, 4, 1, 5])
    y_hidden = torch.where(labelled, y_true, torch.full_like(y_true, -1))
    s = cls()
    s.ctx = _Ctx()
    if isinstance(s, LegoGCD):
        s._start_training(6, 3, 1000)
        s.qhat = s.qhat.double()
    a, _ = s.batch_loss(z, u, y_true, labelled, 0.07)
    b, logs = s.batch_loss(z, u, y_hidden, labelled, 0.07)
    assert torch.isfinite(a) and float(a) == pytest.approx(float(b), abs=1e-12)
    # no labelled row at all: SupCon/CE are skipped (card pitfall 4), the loss stays finite
    c, logs = s.batch_loss(z, u, torch.full_like(y_true, -1), torch.zeros(4, dtype=torch.bool), 0.07)
    assert torch.isfinite(c) and float(logs["loss_supcon"]) == 0.0 and float(logs["loss_sup_ce"]) == 0.0


def test_legogcd_switch_validation():
    with pytest.raises(ValueError, match="dkl_mode"):
        LegoGCD(dkl_mode="kl")
    with pytest.raises(ValueError, match="ler_mask"):
        LegoGCD(ler_mask="any")
    with pytest.raises(ValueError, match="qhat_momentum"):
        LegoGCD(qhat_momentum="fast")


@pytest.mark.slow
def test_finetune_last_block_on_dino_vit():
    """Card §2.1: only transformer block 11 trains; embeddings, CLS token and final norm stay frozen.
    (Slow only because building a random ViT-B/16 takes seconds on a loaded CPU; no download.)"""
    from openworld.models import create_backbone
    from openworld.strategies.simgcd import set_trainable

    vit = create_backbone("timm", model_name="vit_base_patch16_224.dino", pretrained=False, in_channels=3,
                          input_size=(3, 224, 224))
    set_trainable(vit, "last_block")
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.blocks.11.") for n in trainable)
    assert vit.out_features == 768


def test_finetune_last_block_on_small_cnn_and_model_shapes():
    from openworld.models import create_backbone
    from openworld.strategies.simgcd import GCDModel, set_trainable

    cnn = create_backbone("cnn28", in_channels=1, input_size=(1, 28, 28))
    set_trainable(cnn, "last_block")
    assert {n.split(".")[0] for n, p in cnn.named_parameters() if p.requires_grad} == {"block3"}
    model = GCDModel(cnn, 10, 32, 16, 3)
    h, u, z = model(torch.randn(4, 1, 28, 28))
    assert u.shape == (4, 16) and z.shape == (4, 10) and float(z.detach().abs().max()) <= 1 + 1e-6  # cosine logits
    assert all(float(m.bias.abs().sum()) == 0 for m in model.projector.mlp if isinstance(m, torch.nn.Linear))
