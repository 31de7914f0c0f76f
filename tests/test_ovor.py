"""OVOR / OnePrompt (card cil-ovor §2, §7, §9): VOR loss (V1), LR factors (V2), outlier generator (V5,
V6), prompt geometry (V7), the training invariants (V8) and the §9 pilot threshold calibration."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from openworld.data.views import TensorData
from openworld.models.prompts import OnePrompt, PromptedViT, prefix_attention, vit_backbone
from openworld.scenarios.base import ClassInfo, Session
from openworld.strategies.base import RunContext, TrainConfig
from openworld.strategies.ovor import (
    OVOR,
    OnePromptStrategy,
    OVORConfigError,
    energy,
    generate_outliers,
    hinge_activity,
    kth_sq_distance,
    lr_factor,
    ood_batch_size,
    pilot_thresholds,
    vor_loss,
)

T = torch.tensor


# --------------------------------------------------------------------------------------------------
# V1 — VOR loss
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "id_logits, ood_logits, e_id, e_ood, expected",
    [
        ([[10, 10]], [[0, 0]], [-10.693147], [-0.693147], 0.380685),
        ([[10, 10]], [[5, 1]], [-10.693147], [-5.018150], 0.532500),
        (
            [[10, 10], [16, 0]],
            [[0, 0], [5, 1], [3.5, 3.5]],
            [-10.693147, -16.0],
            [-0.693147, -5.018150, -4.193147],
            0.264053,
        ),
    ],
)
def test_v1_vor_loss(id_logits, ood_logits, e_id, e_ood, expected):
    zi, zo = T(id_logits, dtype=torch.float64), T(ood_logits, dtype=torch.float64)
    assert energy(zi).tolist() == pytest.approx(e_id, abs=1e-6)
    assert energy(zo).tolist() == pytest.approx(e_ood, abs=1e-6)
    assert float(vor_loss(zi, zo, -15.0, -3.0, 0.1)) == pytest.approx(expected, abs=1e-6)


def test_vor_loss_mse_and_inactive_hinges():
    zi, zo = T([[10.0, 10.0]], dtype=torch.float64), T([[5.0, 1.0]], dtype=torch.float64)
    r_id, r_ood = -10.693147 + 15, -3 + 5.018150
    assert float(vor_loss(zi, zo, -15, -3, 0.1, "mse")) == pytest.approx(0.1 * (r_id**2 + r_ood**2), abs=1e-5)
    # both hinges inactive: zero loss and zero gradient
    zi = T([[20.0, 0.0]], requires_grad=True)
    zo = T([[0.0, 0.0]], requires_grad=True)
    loss = vor_loss(zi, zo)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(zi.grad.abs().sum()) == 0.0 and float(zo.grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="huber' or 'mse"):
        vor_loss(zi, zo, loss="l1")


# --------------------------------------------------------------------------------------------------
# V2 — LR factors
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "K, e, released, nominal",
    [
        (20, 0, 1, 1),
        (20, 1, 1, 0.996652),
        (20, 2, 0.996652, 0.986632),
        (20, 16, 0.336403, 0.258287),
        (20, 17, 0.258287, 0.178441),
        (20, 19, 0.097400, 0.015707),
        (50, 2, 0.999496, 0.997986),
        (50, 40, 0.326949, 0.296797),
        (50, 49, 0.047427, 0.015707),
    ],
)
def test_v2_lr_factor(K, e, released, nominal):
    assert lr_factor(e, K, "released") == pytest.approx(released, abs=1e-6)
    assert lr_factor(e, K, "nominal") == pytest.approx(nominal, abs=1e-6)


# Released scheduler (CODA-Prompt's utils/schedulers.py, kept by the OVOR release) and the released
# per-task loop (learners/default.py ``train``): regular and warm-up epochs step it only at epoch
# counter e > 0, VOR epochs at every epoch. An independent reference for the per-epoch LR factors.
def _released_lr_factors(E: tuple[int, int, int], task: int) -> list[float]:
    E_w, E_r, E_v = E
    K = E_w + E_r + E_v

    class _Cosine:  # _LRScheduler.__init__ calls step(0) (lr = g(0)), then sets last_epoch = -1
        def __init__(self):
            self.lr, self.last_epoch = math.cos(0.0), -1

        def step(self):
            self.last_epoch += 1
            self.lr = math.cos((99 * math.pi * self.last_epoch) / (200 * (K - 1)))

    sched, lrs, start = _Cosine(), [], 0
    if task > 0:
        for e in range(E_w):
            if e > 0:
                sched.step()
            lrs.append(sched.lr)
        start = E_w
    for e in range(start, start + E_r):
        if e > 0:
            sched.step()
        lrs.append(sched.lr)
    for _ in range(E_v):
        sched.step()
        lrs.append(sched.lr)
    return lrs


def test_v2_released_lr_no_lag_without_regular_epochs():
    """E = (E_w, E_r, E_v) = (0, 0, 3): K = 3 epochs, all VOR. The released VOR epoch steps the scheduler
    at epoch 0 too, so there is no lag: factors g(0), g(1), g(2) = 1, cos(99π/400), cos(99π/200)."""
    expected = [1.0, 0.712639, 0.015707]
    exact = [1.0, math.cos(99 * math.pi / 400), math.cos(99 * math.pi / 200)]
    assert exact == pytest.approx(expected, abs=1e-6)
    assert _released_lr_factors((0, 0, 3), 0) == pytest.approx(exact, abs=1e-12)
    got = [lr_factor(e, 3, "released", first_epoch_vor=True) for e in range(3)]
    assert got == pytest.approx(exact, abs=1e-12)
    # the nominal schedule has no lag anyway; with a regular epoch first the lag stays
    assert [lr_factor(e, 3, "nominal", first_epoch_vor=True) for e in range(3)] == pytest.approx(exact, abs=1e-12)
    assert [lr_factor(e, 3, "released") for e in range(3)] == pytest.approx([1.0, 1.0, exact[1]], abs=1e-12)


@pytest.mark.parametrize(
    "E, task",
    [((0, 0, 3), 0), ((0, 0, 3), 1), ((0, 2, 1), 0), ((0, 16, 4), 1), ((2, 0, 3), 0), ((2, 0, 3), 1),
     ((2, 1, 2), 0), ((2, 1, 2), 1), ((0, 3, 0), 0), ((0, 1, 1), 0)],  # K = 1: the released g divides by 0
)
def test_v2_strategy_lr_matches_the_released_loop(monkeypatch, E, task):
    """The LR each epoch of ``OVOR.learn`` runs at == the released scheduler in the released loop."""
    seen = []
    monkeypatch.setattr(OVOR, "_vor_epoch", lambda self, data, s, e, opt, gen, epoch, lr: seen.append(lr))
    monkeypatch.setattr(OVOR, "_ce_epoch", lambda self, data, s, e, opt, gen, epoch, lr, *a, **k: seen.append(lr))
    strat, ctx = _strategy(epochs_warmup=E[0], epochs_regular=E[1], epochs_vor=E[2], lr=1.0)
    ctx.start_session(task)
    strat.learn(_session(task))
    assert seen == pytest.approx(_released_lr_factors(E, task), abs=1e-12)


def test_lr_factor_errors():
    assert lr_factor(0, 1) == 1.0
    with pytest.raises(ValueError, match="outside"):
        lr_factor(20, 20)
    with pytest.raises(ValueError, match="lr_offset"):
        lr_factor(0, 20, "lagged")


# --------------------------------------------------------------------------------------------------
# V5 / V6 — outlier generator
# --------------------------------------------------------------------------------------------------
V5_X = T([[3, 0], [2, 1], [3, 1.5], [0, 2], [1, 3], [-1, 2.5]])
V5_Z = T([[1.0, 0], [0, 2], [-1, -1]])


def _multiset(rows):
    return sorted(tuple(round(v, 6) for v in r) for r in rows.tolist())


def test_v5_boundary_radii():
    U = F.normalize(V5_X, dim=1)
    r = kth_sq_distance(U, U, 2)
    assert r.tolist() == pytest.approx([0.211146, 0, 0, 0.102633, 0.102633, 0.143047], abs=1e-6)
    assert torch.topk(r, 2).indices.tolist() == [0, 5]


@pytest.mark.parametrize(
    "mode, space, kept",
    [
        ("official", "normalized", [[-0.5, -0.5], [-0.5, -0.5]]),
        ("npos", "normalized", [[2.5, -0.5], [-1.5, 2.0]]),
        ("npos", "raw", [[-1.0, 3.5], [3.5, 0.0]]),
    ],
)
def test_v5_generator(mode, space, kept):
    out = generate_outliers(
        V5_X, 2, mode=mode, k=2, select=2, sigma=0.5, num_per_class=1, score_space=space, noise=V5_Z
    )
    assert _multiset(out) == _multiset(T(kept))


def test_v5_scores():
    U = F.normalize(V5_X, dim=1)
    official = 0.5 * V5_Z
    assert kth_sq_distance(official, U, 2).tolist() == pytest.approx([0.355573, 0.102633, 2.5], abs=1e-6)
    cand = (V5_X[[0, 5]][:, None] + 0.5 * V5_Z[None]).reshape(-1, 2)
    assert kth_sq_distance(F.normalize(cand, dim=1), U, 2).tolist() == pytest.approx(
        [0.211146, 0.020101, 0.421296, 0.038839, 0.076952, 0.4], abs=1e-6
    )
    assert kth_sq_distance(cand, U, 2).tolist() == pytest.approx(
        [6.989010, 4.739010, 3.475078, 2.5, 7.25, 3.25], abs=1e-6
    )


@pytest.mark.parametrize("m, rows, distinct", [(10, 400, 8), (20, 800, 16)])
def test_v6_official_counts(m, rows, distinct):
    # D = 768 as in the card; n only has to exceed s = 50 for these counts (the card's n = 5,000 sets b_ood)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(300, 768, generator=gen)
    out = generate_outliers(X, m, mode="official", generator=gen)
    assert out.shape == (rows, 768)
    assert len(torch.unique(out, dim=0)) == distinct


def test_v6_npos_distinct_and_batch_sizes():
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(300, 64, generator=gen) + 3.0
    out = generate_outliers(X, 10, mode="npos", generator=gen)
    assert out.shape == (400, 64) and len(torch.unique(out, dim=0)) == 400
    assert ood_batch_size(5000, 400) == 10
    assert ood_batch_size(2166, 800) == 47
    with pytest.raises(OVORConfigError, match=r"n = 5000 .*M = 30 .*b_id = 128"):
        ood_batch_size(5000, 30)
    with pytest.raises(OVORConfigError, match="exceeds"):
        generate_outliers(X[:20], 2, k=50, generator=gen)


# --------------------------------------------------------------------------------------------------
# V7 — prompt geometry
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D, count", [(768, 107_520), (192, 26_880), (128, 17_920)])
def test_v7_parameter_count(D, count):
    assert OnePrompt(D).num_parameters == count


def _tiny_vit(depth=5):
    torch.manual_seed(0)
    return vit_backbone(img_size=8, patch_size=4, embed_dim=16, depth=depth, num_heads=2, in_channels=1)


def test_v7_prefix_geometry_and_math():
    m = PromptedViT(_tiny_vit())
    assert [m.prompt.lengths[i] // 2 for i in range(5)] == [5, 5, 20, 20, 20]
    p = m.prompt.get(0)
    assert p.min() >= 0 and p.max() < 1  # U[0, 1)
    blk = m.vit.blocks[2]
    x = torch.randn(3, 5, 16)
    out = prefix_attention(blk.attn, x, m.prompt.get(2))
    assert out.shape == x.shape
    # reference: per head, K' = [P^k_h; k_h], V' = [P^v_h; v_h], softmax(q K'^T / sqrt(d_h)) V'
    attn, P = blk.attn, m.prompt.get(2)
    qkv = attn.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    heads = []
    for h in range(2):
        kk = torch.cat([P[:20, h * 8 : (h + 1) * 8].expand(3, -1, -1), k[:, h]], 1)
        vv = torch.cat([P[20:, h * 8 : (h + 1) * 8].expand(3, -1, -1), v[:, h]], 1)
        heads.append(torch.softmax(q[:, h] @ kk.transpose(1, 2) / math.sqrt(8), -1) @ vv)
    ref = attn.proj(torch.cat(heads, -1))
    assert torch.allclose(out, ref, atol=1e-5)
    # zero prompts still change the output (zero keys take softmax mass)
    img = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for prm in m.prompt.parameters():
            prm.zero_()
        assert not torch.allclose(m(img), m(img, use_prompts=False))
        assert torch.equal(m(img, use_prompts=False), m.vit(img))  # prompt-free pass = the timm ViT
    with pytest.raises(ValueError, match="depth >= 5"):
        PromptedViT(_tiny_vit(depth=4))


# --------------------------------------------------------------------------------------------------
# V8 — invariants, through the strategy on a tiny two-task stream
# --------------------------------------------------------------------------------------------------
BACKBONE = {"name": "vit", "img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 5, "num_heads": 2}


def _ctx(seed=0, log_scalar=None):
    return RunContext(
        device=torch.device("cpu"),
        seed=seed,
        scenario={"kind": "cil", "num_classes": 4, "input_shape": (1, 8, 8), "num_sessions": 2},
        backbone=BACKBONE,
        base=TrainConfig(),
        progress=False,
        log_scalar=log_scalar,
    )


def _session(t, n_per_class=30):
    gen = torch.Generator().manual_seed(100 + t)
    classes = [2 * t, 2 * t + 1]
    x = torch.rand(2 * n_per_class, 1, 8, 8, generator=gen)
    y = torch.tensor(classes).repeat_interleave(n_per_class)
    x = x + y[:, None, None, None].float() * 0.3
    info = ClassInfo(num_classes=4, seen=tuple(range(2 * t + 2)), new=tuple(classes))
    return Session(index=t, name=f"task_{t}", classes=info, labeled=TensorData(x, y))


def _snap(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _strategy(log_scalar=None, **kw):
    params = {
        "epochs_regular": 2,
        "epochs_vor": 1,
        "knn_k": 10,
        "select": 10,
        "sample_from": 50,
        "num_per_class": 20,
        "batch_size": 16,
    }
    params.update(kw)
    s = OVOR(**params)
    ctx = _ctx(log_scalar=log_scalar)
    s.setup(ctx)
    return s, ctx


@pytest.mark.parametrize("mode", ["official", "npos"])
def test_v8_invariants(mode):
    s, ctx = _strategy(outlier_mode=mode)
    vit0 = _snap(s.encoder.vit)
    head0 = _snap(s.head)
    prompt0 = _snap(s.encoder.prompt)
    ctx.start_session(0)
    s.learn(_session(0))
    assert all(torch.equal(v, vit0[k]) for k, v in s.encoder.vit.state_dict().items())  # backbone frozen
    head1 = _snap(s.head)
    assert torch.equal(head1["weight"][2:], head0["weight"][2:]) and torch.equal(head1["bias"][2:], head0["bias"][2:])
    assert not torch.equal(head1["weight"][:2], head0["weight"][:2])
    assert not all(torch.equal(v, prompt0[k]) for k, v in s.encoder.prompt.state_dict().items())
    assert len(s.diagnostics) == 1 and s.diagnostics[0]["num_outliers"] == 40  # min(s·S, p·m) = min(500, 40)
    ctx.start_session(1)
    s.learn(_session(1))
    head2 = _snap(s.head)
    assert torch.equal(head2["weight"][:2], head1["weight"][:2]) and torch.equal(head2["bias"][:2], head1["bias"][:2])
    assert all(torch.equal(v, vit0[k]) for k, v in s.encoder.vit.state_dict().items())
    pred = s.predict(torch.rand(3, 1, 8, 8))
    assert pred.logits.shape == (3, 4)


def test_v8_vor_epochs_leave_prompts_unchanged():
    s, ctx = _strategy(epochs_regular=0, epochs_vor=2)
    prompt0, head0 = _snap(s.encoder.prompt), _snap(s.head)
    ctx.start_session(0)
    s.learn(_session(0))
    assert all(torch.equal(v, prompt0[k]) for k, v in s.encoder.prompt.state_dict().items())
    assert all(p.grad is None for p in s.encoder.prompt.parameters())
    assert not torch.equal(s.head.weight[:2], head0["weight"][:2])


def test_determinism_and_state_roundtrip():
    a, ctx_a = _strategy()
    b, ctx_b = _strategy()
    for s, ctx in ((a, ctx_a), (b, ctx_b)):
        ctx.start_session(0)
        s.learn(_session(0))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa["prompt"][k], sb["prompt"][k]) for k in sa["prompt"])
    assert all(torch.equal(sa["head"][k], sb["head"][k]) for k in sa["head"])
    c, _ = _strategy()
    c.load_state_dict(sa)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(c.predict(x).logits, a.predict(x).logits)


def test_oneprompt_has_no_vor_phase():
    s = OnePromptStrategy(epochs_regular=1, batch_size=16)
    assert s.epochs_vor == 0 and "epochs_vor" not in s.get_params()
    ctx = _ctx()
    s.setup(ctx)
    ctx.start_session(0)
    s.learn(_session(0))
    assert s.diagnostics == [] and s.num_seen == 2


# --------------------------------------------------------------------------------------------------
# §9 — pilot-calibrated thresholds
# --------------------------------------------------------------------------------------------------
LN2 = math.log(2.0)


def test_pilot_thresholds_are_the_medians():
    # E([x, x]) = −x − ln 2; ID energies −10, −12, −14 (− ln 2): median −12 − ln 2 (odd count);
    # OOD energies 0, −1, −2, −3 (− ln 2): median −1.5 − ln 2 (even count: mean of the middle two)
    z_id = T([[14.0, 14.0], [10.0, 10.0], [12.0, 12.0]])
    z_ood = T([[3.0, 3.0], [0.0, 0.0], [2.0, 2.0], [1.0, 1.0]])
    tau_id, tau_ood = pilot_thresholds(z_id, z_ood)
    assert tau_id == pytest.approx(-12.0 - LN2, abs=1e-9)
    assert tau_ood == pytest.approx(-1.5 - LN2, abs=1e-9)
    # at the medians, half the hinges of each kind are active (strictly above / below)
    a_id, a_ood = hinge_activity(z_id, z_ood, tau_id, tau_ood)
    assert float(a_id) == pytest.approx(1 / 3) and float(a_ood) == pytest.approx(0.5)


def test_pilot_thresholds_enforce_the_gap():
    # medians −2 and −1.5 (0.5 apart): τ_id stays at its median, τ_ood is raised to τ_id + 1 = −1
    z_id = T([[1.0 - LN2, 1.0 - LN2], [2.0 - LN2, 2.0 - LN2], [3.0 - LN2, 3.0 - LN2]])
    z_ood = T([[1.5 - LN2, 1.5 - LN2]])
    assert pilot_thresholds(z_id, z_ood) == pytest.approx((-2.0, -1.0), abs=1e-6)
    # OOD median below the ID median: still τ_id + 1
    assert pilot_thresholds(z_id, T([[5.0 - LN2, 5.0 - LN2]])) == pytest.approx((-2.0, -1.0), abs=1e-6)
    # a gap already ≥ 1 is kept as measured
    assert pilot_thresholds(z_id, T([[-4.0 - LN2, -4.0 - LN2]])) == pytest.approx((-2.0, 4.0), abs=1e-6)
    with pytest.raises(ValueError, match="needs ID and OOD logits"):
        pilot_thresholds(z_id, z_id[:0])


@pytest.mark.parametrize("mode", ["official", "npos"])
def test_pilot_calibrates_on_task0_after_the_regular_epochs(mode):
    logged = []
    a, ctx_a = _strategy(thresholds="pilot", outlier_mode=mode, log_scalar=lambda *r: logged.append(r))
    assert a.tau is None
    ctx_a.start_session(0)
    a.learn(_session(0))
    # reference: the same model after the same 2 regular epochs (VOR off; released lag: both at lr0),
    # then E over the task-0 train-transform features and over the outliers drawn from the pilot's generator
    b, ctx_b = _strategy(outlier_mode=mode, epochs_vor=0)
    ctx_b.start_session(0)
    b.learn(_session(0))
    assert all(torch.equal(v, b.encoder.prompt.state_dict()[k]) for k, v in a.encoder.prompt.state_dict().items())
    gen = torch.Generator().manual_seed(ctx_b.derive_seed("ovor", "pilot"))
    feats, _ = b._task_features(_session(0).labeled, gen)
    outliers = b._outliers(feats, 2, gen)
    with torch.no_grad():
        e_id = energy(b._logits(feats, 0, 2)).double().numpy()
        e_ood = energy(b._logits(outliers, 0, 2)).double().numpy()
    import numpy as np

    tau_id = float(np.median(e_id))
    tau_ood = max(float(np.median(e_ood)), tau_id + 1.0)
    assert a.tau == pytest.approx((tau_id, tau_ood), abs=1e-5)
    assert a.pilot["num_id"] == 60 and a.pilot["num_ood"] == 40 and a.pilot["outlier_mode"] == mode
    assert a.pilot["rho"] == pytest.approx(0.1 * 4 / float(feats.norm(dim=1).median()), rel=1e-5)
    assert a.diagnostics[0]["tau_id"] == a.tau[0] and a.diagnostics[0]["tau_ood"] == a.tau[1]
    # frozen: task 1 keeps the task-0 thresholds
    tau0 = a.tau
    ctx_a.start_session(1)
    a.learn(_session(1))
    assert a.tau == tau0 and [d["tau_id"] for d in a.diagnostics] == [tau0[0], tau0[0]]
    # logged: τ once, and the hinge fractions / ρ / loss once per VOR epoch
    tags = [tag for tag, _, _ in logged]
    assert tags.count("train/vor/tau_id") == 1 and tags.count("train/vor/tau_ood") == 1
    assert tags.count("train/vor/active_id") == 2 and tags.count("train/vor/rho") == 2
    assert dict((t, v) for t, v, _ in logged)["train/vor/tau_id"] == pytest.approx(tau0[0])


def test_pilot_thresholds_activate_the_ood_hinge_that_official_ones_leave_off():
    official, ctx_o = _strategy()
    pilot, ctx_p = _strategy(thresholds="pilot")
    for s, ctx in ((official, ctx_o), (pilot, ctx_p)):
        ctx.start_session(0)
        s.learn(_session(0))
    d_off, d_pil = official.diagnostics[0], pilot.diagnostics[0]
    assert official.tau == (-15.0, -3.0) and d_off["tau_id"] == -15.0
    # official τ_ood = −3: outlier logsumexp is far below 3 at this scale, so the OOD hinge never fires
    assert d_off["active_ood"] == 0.0
    # pilot: τ at the medians, so both hinges fire and the VOR loss is non-zero
    assert 0.0 < d_pil["active_id"] < 1.0 and 0.0 < d_pil["active_ood"] <= 1.0
    assert d_pil["vor_loss"] > 0.0
    assert not torch.equal(official.head.weight, pilot.head.weight)


def test_pilot_thresholds_survive_the_state_dict():
    a, ctx_a = _strategy(thresholds="pilot")
    ctx_a.start_session(0)
    a.learn(_session(0))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)  # the runner's checkpoint path (loaded with weights_only=True)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    c, ctx_c = _strategy(thresholds="pilot")
    c.load_state_dict(state)
    assert c.tau == a.tau and c.pilot == a.pilot and c.diagnostics == a.diagnostics
    # resuming at task 1 reproduces the uninterrupted run (no re-calibration on task 1)
    for s, ctx in ((a, ctx_a), (c, ctx_c)):
        ctx.start_session(1)
        s.learn(_session(1))
    assert c.tau == a.tau
    assert torch.equal(c.head.weight, a.head.weight) and torch.equal(c.head.bias, a.head.bias)
    assert c.diagnostics == a.diagnostics
    # without the state, a fresh pilot strategy would calibrate on whatever task it sees first
    d, ctx_d = _strategy(thresholds="pilot")
    ctx_d.start_session(1)
    d.learn(_session(1))
    assert d.tau != a.tau


def test_separate_pilot_without_regular_epochs():
    s, ctx = _strategy(thresholds="pilot", epochs_regular=0, epochs_vor=1, pilot_epochs=2)
    prompt0 = _snap(s.encoder.prompt)
    ctx.start_session(0)
    s.learn(_session(0))
    assert s.pilot["separate_epochs"] == 2 and s.tau is not None
    # the pilot trained a throw-away copy: the prompts are back to their initial values (VOR leaves them alone)
    assert all(torch.equal(v, prompt0[k]) for k, v in s.encoder.prompt.state_dict().items())
    assert all(p.grad is None for p in s.encoder.prompt.parameters())
    # and the thresholds come from the pilot-trained model, not the untrained one
    u, ctx_u = _strategy(thresholds="pilot", epochs_regular=0, epochs_vor=1, pilot_epochs=1)
    ctx_u.start_session(0)
    u.learn(_session(0))
    assert u.tau != s.tau


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"thresholds": "calibrated"}, r"thresholds: must be 'fixed' or 'pilot', got 'calibrated'"),
        ({"thres_id": "pilot"}, r"thres_id: must be a finite number with thresholds: fixed, got 'pilot'"),
        ({"thres_ood": float("nan")}, r"thres_ood: must be a finite number"),
        ({"thresholds": "pilot", "pilot_epochs": 0}, r"pilot_epochs: must be an integer >= 1, got 0"),
    ],
)
def test_threshold_settings_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        _strategy(**kw)
    if set(kw) <= {"thres_id", "thres_ood"}:
        _strategy(thresholds="pilot", **kw)  # ignored with pilot thresholds
