"""RIDE (docs/methods/ride.md): the loss, margins, weights, router and LR schedule against the official code
(oracle fixtures in tests/fixtures/ride, made by its make_fixtures.py), hand-computed 3-sample vectors,
parameter validation, an end-to-end run on a long-tailed scikit-learn digits recipe, and the runner's generic
guarantees (resume, NaN isolation, label-stripped sessions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import openworld.metrics.long_tail  # noqa: F401  (registers the "long_tail" engine)
import openworld.scenarios.long_tail  # noqa: F401
import openworld.strategies.long_tail_baselines  # noqa: F401
import openworld.strategies.ride  # noqa: F401
from openworld.config import load_recipe
from openworld.registry import STRATEGIES
from openworld.runner import Runner
from openworld.strategies.long_tail_baselines import LTSchedule
from openworld.strategies.ride import (
    RIDE,
    ExpertRouter,
    balanced_order,
    diversity_temperature_weights,
    effective_number_weights,
    ldam_margins,
    ride_loss,
    routed_logits,
    router_loss,
    router_targets,
)

FIX = Path(__file__).parent / "fixtures" / "ride"
ATOL = 1e-6
D = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load(name: str) -> dict:
    return json.loads((FIX / f"{name}.json").read_text())


def t64(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=D)


def close(a, b, atol=ATOL, rtol=0.0) -> None:
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), t64(b), atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------------------
# Oracle fixtures
# ------------------------------------------------------------------------------------------------
LOSS_CASES = ["ride_loss_before_drw", "ride_loss_after_drw", "ride_loss_collaborative", "ride_loss_options"]


@pytest.mark.parametrize("name", LOSS_CASES)
def test_margins_and_class_weights_match_official(name):
    f = load(name)
    kw = f["kwargs"]
    close(ldam_margins(f["counts"], kw.get("max_m", 0.5)), f["m_list"])
    close(effective_number_weights(f["counts"]), f["drw_weights_enabled"])
    close(diversity_temperature_weights(f["counts"], kw.get("reweight_factor", 0.05)), f["diversity_weights_enabled"])


@pytest.mark.parametrize("name", LOSS_CASES)
@pytest.mark.parametrize("own_weights", [False, True])
def test_ride_loss_and_gradient_match_official(name, own_weights):
    f = load(name)
    kw = f["kwargs"]
    logits = t64(f["logits"]).requires_grad_(True)
    y = torch.tensor(f["y"])
    if own_weights:  # ours, float32 like the strategy's (the released margins are float32 too)
        margins = ldam_margins(f["counts"], kw.get("max_m", 0.5)).float()
        drw = effective_number_weights(f["counts"])
        div = diversity_temperature_weights(f["counts"], kw.get("reweight_factor", 0.05))
    else:  # the official float32 values
        margins = torch.tensor(f["m_list"], dtype=torch.float32)
        drw, div = t64(f["drw_weights_enabled"]), t64(f["diversity_weights_enabled"])
    temp = kw.get("base_diversity_temperature", 1.0)
    late = f["drw_active"]
    assert late == (f["epoch_1based"] > kw["reweight_epoch"])  # DRW from 1-based epoch reweight_epoch + 1 on
    loss, parts = ride_loss(logits, y, margins, f["s"], class_weight=drw if late else None,
                            temperature=temp * div if late else temp,
                            diversity_factor=kw["additional_diversity_factor"],
                            base_factor=kw.get("base_loss_factor", 1))
    (grad,) = torch.autograd.grad(loss, logits)
    close(loss, f["loss"])  # own weights: float64 DRW weights vs the released float32 (~1e-8)
    close(grad, f["grad"], 1e-6)
    assert set(parts) == {"base", "diversity"}


def _official_router(f) -> ExpertRouter:
    r = f["router"]
    router = ExpertRouter(len(r["expert_help_pred_hidden_fcs.0.weight"][0]), f["num_experts"], f["top_choices_num"],
                          len(r["expert_help_pred_hidden_fcs.0.weight"])).double()
    state = {"fc.weight": r["expert_help_pred_fc.weight"], "fc.bias": r["expert_help_pred_fc.bias"]}
    for k in range(f["num_experts"] - 1):
        state[f"hidden.{k}.weight"] = r[f"expert_help_pred_hidden_fcs.{k}.weight"]
        state[f"hidden.{k}.bias"] = r[f"expert_help_pred_hidden_fcs.{k}.bias"]
    router.load_state_dict({k: t64(v) for k, v in state.items()})
    return router


def test_router_loss_and_gradients_match_official_expert_assignment():
    f = load("ea_router")
    router = _official_router(f)
    y = torch.tensor(f["y"])
    logits, feats = t64(f["train_logits"]), t64(f["train_feats"])
    targets = router_targets(logits, y)
    assert targets.any() and not targets.all()  # the fixture exercises both classes of both routers
    loss = router_loss(router, feats, logits, y, f["pos_weight"])
    close(loss, f["train_loss"][0])  # the released stores router logits in float32: ~4e-8 here
    names = {"fc.weight": "expert_help_pred_fc.weight", "fc.bias": "expert_help_pred_fc.bias",
             **{f"hidden.{k}.{p}": f"expert_help_pred_hidden_fcs.{k}.{p}"
                for k in range(2) for p in ("weight", "bias")}}
    params = dict(router.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, _), g in zip(params.items(), grads):
        # the released router logits pass through a float32 buffer: gradients of size ~300 agree to 5e-8
        # relative, so they are compared to 1e-6 absolute *or* relative
        close(g, f["train_grads"][names[name]], 1e-6, 1e-6)
    close(logits.mean(1), f["train_output"])


def test_routing_matches_official_test_time_assignment():
    f = load("ea_router")
    out, used = routed_logits(_official_router(f), t64(f["eval_feats"]), t64(f["eval_logits"]))
    assert used.tolist() == f["eval_num_experts"] and set(used.tolist()) == {1, 2, 3}
    close(out, f["eval_output"])


@pytest.mark.parametrize("key", ["cifar100", "inat"])
def test_custom_lr_matches_official_lambda(key):
    f = json.loads((FIX / "custom_lr.json").read_text())[key]
    a = f["args"]
    sched = LTSchedule(f["epochs"], 1.0, a["warmup_epoch"], (a["step1"], a["step2"]), a["gamma"])
    close([sched.lr_at(e) for e in range(f["epochs"])], f["factors"], 1e-12)


# ------------------------------------------------------------------------------------------------
# Hand-computed 3-sample vectors
# ------------------------------------------------------------------------------------------------
COUNTS = [8, 4, 1]
Z = torch.tensor([[[2, 0, 1], [1, 1, 0]], [[0, 1, 0], [0, 2, 1]], [[1, 1, 3], [0, 0, 1]]], dtype=D)  # [B, E, C]
Y = torch.tensor([0, 1, 2])


def test_margins_and_weights_by_hand():
    close(ldam_margins(COUNTS), [0.297301779, 0.353553391, 0.5])  # 0.5 · n^-1/4 / 1^-1/4
    close(effective_number_weights(COUNTS, beta=0.9), [0.359220012, 0.594904264, 2.045875724])
    close(diversity_temperature_weights(COUNTS), [1.0, 0.955719557, 0.922509225])  # (3·π·.05 + .95) / max


def test_ride_loss_by_hand():
    m = ldam_margins(COUNTS)
    # s = 2, λ = −0.2, T = 1: expert 1: margin CE 0.704250849, KL 0.036633650; expert 2: 1.016249193, 0.046716903
    loss, parts = ride_loss(Z, Y, m, 2.0, diversity_factor=-0.2)
    close(loss, 1.703829931)
    close(parts["base"], 0.704250849 + 1.016249193)
    close(parts["diversity"], 0.036633650 + 0.046716903)
    # DRW (β = 0.9) and the per-class temperature T·w: 0.634753174 / 0.040412881, 1.037976066 / 0.052061906
    loss, parts = ride_loss(Z, Y, m, 2.0, class_weight=effective_number_weights(COUNTS, 0.9),
                            temperature=diversity_temperature_weights(COUNTS), diversity_factor=-0.2)
    close(loss, 1.655705246)
    close(parts["base"], 0.634753174 + 1.037976066)
    # λ = 0 (released): every expert's margin CE is taken on the mean logits
    loss, _ = ride_loss(Z, Y, m, 2.0, diversity_factor=0.0)
    single, _ = ride_loss(Z.mean(1, keepdim=True), Y, m, 2.0, diversity_factor=0.0)
    close(loss, 2 * single)


def _hand_router() -> ExpertRouter:
    r = ExpertRouter(2, 3, top_k=1, hidden=1).double()
    with torch.no_grad():
        for lin in r.hidden:
            lin.weight.zero_()
            lin.bias.zero_()
        r.fc.weight.copy_(torch.tensor([[1.0, 0.0]]))  # logit = max(mean logits) − 2
        r.fc.bias.fill_(-2.0)
    return r


ZR = torch.tensor([[[3, 0, 0], [0, 3, 0], [0, 0, 3]],   # y 0: expert 0 right
                   [[1, 0, 0], [0, 3, 0], [0, 0, 0]],   # y 1: experts 0-1 right
                   [[2, 0, 0], [0, 1, 0], [0, 0, 4]]], dtype=D)  # y 2: only all three right
YR = torch.tensor([0, 1, 2])


def test_router_targets_loss_and_routing_by_hand():
    assert router_targets(ZR, YR).tolist() == [[False, False], [True, False], [True, True]]
    feats = torch.ones(3, 3, 2, dtype=D)
    # router 0 logits (1, −1, 0), router 1 (−0.5, −0.5, −1); BCE with pos_weight 2
    close(router_loss(_hand_router(), feats, ZR, YR, pos_weight=2.0), 1.483459461)
    out, used = routed_logits(_hand_router(), feats, ZR)
    assert used.tolist() == [2, 1, 1]  # sigmoid(0) = 0.5 is not > 0.5
    close(out, [[1.5, 1.5, 0], [1, 0, 0], [2, 0, 0]])


def test_balanced_order_draws_classes_uniformly_and_cycles_each_class():
    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 3)
    order = balanced_order(labels, 3000, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels[order], minlength=3).double() / 3000
    assert (freq - 1 / 3).abs().max() < 0.03
    rows2 = order[labels[order] == 2]
    assert sorted(rows2[:3].tolist()) == [60, 61, 62] and sorted(rows2[3:6].tolist()) == [60, 61, 62]
    assert torch.equal(order, balanced_order(labels, 3000, torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"num_experts": 0}, "ride: num_experts must be a positive integer or None; got 0"),
    ({"checkpoint": "best"}, "checkpoint: allowed values are val, last, test; got 'best'"),
    ({"reweight_factor": 1.5}, "ride: reweight_factor must be in [0, 1); got 1.5"),
    ({"diversity_temperature": 0}, "ride: diversity_temperature must be > 0; got 0"),
    ({"router_top_k": 0}, "ride: router_top_k must be a positive integer; got 0"),
    ({"router_epochs": -1}, "ride: router_epochs must be a non-negative integer; got -1"),
    ({"router": "yes"}, "ride: router must be true or false; got 'yes'"),
    ({"drw_epoch": -2}, "ride: drw_epoch must be a non-negative integer or None; got -2"),
    ({"drw_beta": 1.0}, "ride: drw_beta must be in (0, 1); got 1.0"),
])
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        RIDE(**kwargs)
    assert str(err.value) == message


def test_released_defaults():
    r = RIDE()
    assert (r.diversity_factor, r.scale, r.max_margin, r.reweight_factor, r.gamma, r.milestones) == (
        -0.45, 30.0, 0.5, 0.05, 0.01, [160, 180])
    assert (r.router_top_k, r.router_pos_weight, r.router_epochs, r.router_batch_size, r.router_lr) == (
        30, 100.0, 5, 512, 0.01)
    assert r._drw_start() == 160


def _ctx(backbone: dict):
    from openworld.strategies.base import RunContext, TrainConfig

    return RunContext(device="cpu", seed=0, scenario={"num_classes": 10, "input_shape": (1, 8, 8)},
                      backbone=backbone, base=TrainConfig(), progress=False)


def test_num_experts_overrides_the_backbone_and_sizes_the_router():
    r = RIDE(num_experts=4, router_top_k=30)
    r.setup(_ctx({"name": "cnn_experts", "widths": [4, 8, 8]}))
    r.net = r._build()
    assert r.net.num_experts == 4 and len(r.net.heads) == 4
    router = r._build_router(10)
    assert len(router.hidden) == 3 and router.top_k == 10  # top-k capped at the number of classes
    logits, feats = r.net(torch.randn(2, 1, 8, 8))
    assert logits.shape == (2, 4, 10) and feats.shape == (2, 4, 8)
    plain = RIDE()
    plain.setup(_ctx({"name": "cnn8"}))
    with pytest.raises(ValueError, match="ride needs a multi-expert backbone"):
        plain._build()
    forced = RIDE(num_experts=3)
    forced.setup(_ctx({"name": "cnn8"}))
    with pytest.raises(ValueError, match="ride: num_experts needs a multi-expert backbone"):
        forced._build()


# ------------------------------------------------------------------------------------------------
# End to end on long-tailed digits (scikit-learn, embedded)
# ------------------------------------------------------------------------------------------------
FAST = {"epochs": 30, "batch_size": 64, "lr": 0.05, "milestones": [24, 27], "warmup_epochs": 1}
DIGITS = {
    "name": "lt_digits_ride",
    "scenario": {"kind": "long_tail", "data": {"source": "digits"}, "imbalance": 50, "val_per_class": 10,
                 "test_distributions": ["uniform"]},
    "backbone": {"name": "mlp_experts", "trunk": 64, "out_features": 32},
    "strategies": {"ce": {"epochs": 30, "batch_size": 64, "lr": 0.05},
                   "ride": {**FAST, "router_epochs": 30, "router_batch_size": 128}},
    "seeds": [1, 2],
    "device": "cpu",
}


def _runner(tmp_path: Path, cfg: dict, **kwargs) -> Runner:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Runner(load_recipe(path), out=tmp_path / "runs", progress=False, tensorboard=False, threads=1,
                  stream=open(tmp_path / "log.txt", "a"), **kwargs)


def _results(tmp_path: Path, cfg: dict, name: str, seed: int) -> dict:
    return json.loads((tmp_path / "runs" / cfg["name"] / name / f"seed{seed}" / "results.json").read_text())


def test_digits_lt_ride_lifts_the_tail_over_ce_and_routes(tmp_path):
    out = _runner(tmp_path, DIGITS).run()
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    for seed in (1, 2):
        ce = _results(tmp_path, DIGITS, "ce", seed)["sessions"][0]
        ride = _results(tmp_path, DIGITS, "ride", seed)["sessions"][0]
        # LDAM margins + DRW + diverse experts: the few-shot classes (n < 20) gain clearly (measured +12 to +15)
        assert ride["metrics"]["uniform"]["few"] > ce["metrics"]["uniform"]["few"] + 5
        assert ride["metrics"]["uniform"]["acc"] > ce["metrics"]["uniform"]["acc"]
        info = ride["strategy_info"]["ride"]
        used = ride["diagnostics"]["uniform"]["ride_experts_per_sample"]
        assert 1.0 <= used <= 3.0 and 1.0 <= info["val_experts_per_sample"] <= 3.0
        # routing trades a little accuracy for fewer experts, never much (validation, measured ≤ 3 points)
        assert info["val_balanced_acc_routed"] > info["val_balanced_acc_all_experts"] - 0.1
        assert info["drw_epoch"] == 24


# ------------------------------------------------------------------------------------------------
# Generic guarantees (as tests/test_rivals_generic.py, on the digits recipe)
# ------------------------------------------------------------------------------------------------
SMALL = {**DIGITS, "name": "lt_digits_ride_small", "seeds": [0],
         "strategies": {"ride": {**FAST, "epochs": 6, "milestones": [4, 5], "router_epochs": 3,
                                 "router_batch_size": 128}}}


def test_registered_and_state_round_trip(tmp_path):
    assert "ride" in STRATEGIES.names()
    (run,) = _runner(tmp_path, SMALL).run()
    assert run.status == "finished"
    ckpt = torch.load(run.run_dir / "checkpoints" / "session_0.pt", weights_only=True)["strategy"]
    assert ckpt["router"] is not None
    ctx = _ctx(SMALL["backbone"])
    a, b = RIDE(**SMALL["strategies"]["ride"]), RIDE(**SMALL["strategies"]["ride"])
    a.setup(ctx)
    b.setup(ctx)
    a.load_state_dict(ckpt)
    b.load_state_dict(a.state_dict())
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.predict(x).logits, b.predict(x).logits)


def test_drw_and_the_per_class_temperature_start_at_drw_epoch(tmp_path, monkeypatch):
    import openworld.strategies.ride as ride_mod

    calls = []
    real = ride_mod.ride_loss

    def spy(*args, **kwargs):
        calls.append((kwargs["class_weight"] is not None, isinstance(kwargs["temperature"], torch.Tensor)))
        return real(*args, **kwargs)

    monkeypatch.setattr(ride_mod, "ride_loss", spy)
    (run,) = _runner(tmp_path, SMALL).run()
    assert run.status == "finished"
    steps = len(calls) // 6  # 6 epochs, DRW from epoch 4 (the first milestone)
    assert len(calls) == 6 * steps and calls == [(False, False)] * (4 * steps) + [(True, True)] * (2 * steps)


def test_killed_run_resumes_to_the_same_numbers(tmp_path):
    _runner(tmp_path / "a", SMALL).run()
    reference = _results(tmp_path / "a", SMALL, "ride", 0)
    with pytest.raises(KeyboardInterrupt):
        _runner(tmp_path / "b", SMALL, stop_after_session=0).run()
    (done,) = _runner(tmp_path / "b", SMALL, resume=True).run()
    got = _results(tmp_path / "b", SMALL, "ride", 0)
    strip = [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in got["sessions"]]
    ref = [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in reference["sessions"]]
    assert done.status == "finished" and strip == ref and got["summary"] == reference["summary"]
