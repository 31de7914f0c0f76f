"""LADE (Hong et al., CVPR 2021): loss, schedule and test-prior post-adjustment.

* Oracle fixtures (tests/fixtures/lade, the official code): PriorCE and the LADE regulariser (values and
  gradients, a class absent from the batch included), the released ``WarmupMultiStepLR`` as the trainer
  steps it, and ``calculate_prior``'s test-set counts (our known test prior).
* A hand-computed 3-sample example; parameter validation messages.
* The known test prior: on synthetic features the post-adjustment helps on forward-50 and backward-50 and
  changes nothing on the uniform set; the evaluation-order guard fails loudly rather than mismatch a prior.
* End to end on scikit-learn digits (IF 20): LADE beats CE on the few-shot classes.
* Resume gives the same numbers; non-finite outputs fail only that run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import openworld.metrics.long_tail  # noqa: F401
import openworld.scenarios.long_tail  # noqa: F401
import openworld.strategies.lade  # noqa: F401
import openworld.strategies.long_tail_baselines  # noqa: F401
from openworld.config import load_recipe
from openworld.runner import Runner
from openworld.scenarios.long_tail import class_counts
from openworld.strategies.base import RunContext, TrainConfig
from openworld.strategies.lade import (
    LADE,
    WarmupMultiStep,
    known_test_prior,
    lade_loss,
    lade_regularizer,
    lt_test_counts,
    prior_ce_loss,
)

FIX = Path(__file__).parent / "fixtures" / "lade"


def load(name):
    return json.loads((FIX / name).read_text())


# ------------------------------------------------------------------------------------------------
# oracle fixtures
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["c5_imb0.1", "c6_absent_class", "c10_imb0.01"])
def test_losses_and_gradients_match_official(case):
    f = load(f"loss_{case}.json")
    counts = torch.tensor(f["counts"], dtype=torch.float64)
    prior = counts / counts.sum()
    x = torch.tensor(f["logits"], dtype=torch.float64, requires_grad=True)
    y = torch.tensor(f["target"])
    total, parts = lade_loss(x, y, prior, f["alpha"], f["remine_lambda"])
    total.backward()
    assert float(parts["prior_ce"]) == pytest.approx(f["prior_ce"][0], abs=1e-6)
    assert float(parts["lade"]) == pytest.approx(f["lade"][0], abs=1e-6)
    assert float(total.detach()) == pytest.approx(f["total"][0], abs=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor(f["grad"], dtype=torch.float64), atol=1e-6, rtol=0)


def test_released_schedule_matches_official():
    for key, lrs in load("lr_schedules.json").items():
        epochs, ms, warm = key.split("|")
        sched = WarmupMultiStep(int(epochs), 0.2, int(warm), 1 / 3, tuple(int(m) for m in ms.split(",")), 0.01)
        assert [sched.lr_at(e) for e in range(int(epochs))] == pytest.approx(lrs, abs=1e-9)
    # our defaults scale the released 200-epoch schedule: W = ceil(E/40), milestones 0.6E / 0.8E
    assert LADE().schedule() == WarmupMultiStep(200, 0.2, 5, 1 / 3, (120, 160), 0.01)
    assert LADE(epochs=20).schedule() == WarmupMultiStep(20, 0.2, 1, 1 / 3, (12, 16), 0.01)


def test_test_counts_match_official_and_the_scenario():
    for key, counts in load("test_counts.json").items():
        c, m, rho, direction = key.split("|")
        c, m, rho, rev = int(c), int(m), float(rho), direction == "backward"
        assert lt_test_counts(m, rho, c, rev) == counts
        assert class_counts(m, rho, c, "exp", reverse=rev) == counts  # the scenario builds the same sets
        prior, rule = known_test_prior(f"{direction}{rho:g}", sum(counts), c)
        torch.testing.assert_close(prior, torch.tensor(counts, dtype=torch.float64) / sum(counts))
        assert rule == f"{direction} rho={rho:g}, m={m}"


def test_known_prior_names_and_unknowns():
    p, rule = known_test_prior("uniform", 123, 4)
    assert rule == "uniform" and p.tolist() == [0.25] * 4
    assert known_test_prior("forward50", 2794, 10) == (None, "unknown")  # no m gives this size
    assert known_test_prior("val", 100, 10) == (None, "unknown")
    assert known_test_prior("forwardX", 100, 10) == (None, "unknown")


# ------------------------------------------------------------------------------------------------
# hand-computed vectors and validation
# ------------------------------------------------------------------------------------------------
def test_three_sample_example():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 1, 0])
    pi = torch.tensor([0.75, 0.25], dtype=torch.float64)
    lam, alpha = 0.1, 0.1
    # PriorCE: CE of v + log π, i.e. −log(π_y e^{v_y} / Σ_c π_c e^{v_c}), averaged over the 3 samples
    ce = (-math.log(0.75 * math.e / (0.75 * math.e + 0.25))
          - math.log(0.25 * math.e / (0.75 + 0.25 * math.e))
          - math.log(0.75 * math.e ** 2 / (0.75 * math.e ** 2 + 0.25 * math.e))) / 3
    # LADE: T1 = mean target logit of the class's samples; T2 = log Σ_i e^{v_c(x_i)}·(1/2)/π_c − log 3
    t1 = [3 / (2 + 1e-8), 1 / (1 + 1e-8)]
    t2 = [math.log((math.e + 1 + math.e ** 2) * 0.5 / 0.75) - math.log(3),
          math.log((1 + math.e + math.e) * 0.5 / 0.25) - math.log(3)]
    reg = -sum(p * (a - b - lam * b * b) for p, a, b in zip((0.75, 0.25), t1, t2))
    assert float(prior_ce_loss(v, y, pi)) == pytest.approx(ce, abs=1e-8)
    assert float(lade_regularizer(v, y, pi, lam)) == pytest.approx(reg, abs=1e-8)
    total, _ = lade_loss(v, y, pi, alpha, lam)
    assert float(total) == pytest.approx(ce + alpha * reg, abs=1e-8)
    assert float(total) == pytest.approx(0.3031077794470769, abs=1e-9)


@pytest.mark.parametrize("kwargs, message", [
    ({"test_prior": "oracle"}, "lade: test_prior must be one of known, uniform; got 'oracle'"),
    ({"alpha": -0.1}, "lade: alpha must be a number >= 0; got -0.1"),
    ({"remine_lambda": "x"}, "lade: remine_lambda must be a number >= 0; got 'x'"),
    ({"epochs": 0}, "lade: epochs must be a positive integer; got 0"),
    ({"lr": 0}, "lade: lr must be a number > 0; got 0"),
    ({"warmup_factor": 1.5}, "lade: warmup_factor must be a number >= 0 and <= 1; got 1.5"),
    ({"nesterov": "yes"}, "lade: nesterov must be true or false; got 'yes'"),
    ({"checkpoint": "best"}, "checkpoint: allowed values are val, last, test; got 'best'"),
])
def test_parameters_are_validated(kwargs, message):
    with pytest.raises(ValueError) as err:
        LADE(**kwargs)
    assert str(err.value) == message


# ------------------------------------------------------------------------------------------------
# the test-prior post-adjustment
# ------------------------------------------------------------------------------------------------
def ctx(num_classes=3):
    return RunContext(device="cpu", seed=0, scenario={"kind": "long_tail", "num_classes": num_classes,
                                                      "input_shape": (4,), "num_sessions": 1},
                      backbone={"name": "mlp", "hidden": [8], "out_features": 4}, base=TrainConfig.from_dict({}),
                      progress=False)


def test_prior_follows_the_evaluation_order_and_the_guard_fails_loudly():
    s = LADE(test_prior="known")
    s.setup(ctx(3))
    s.net = torch.nn.Sequential(torch.nn.Identity()).eval()
    s._set_test_priors({"uniform": 3, "forward2": 6}, 3)  # forward2 with m = 3: counts 3, 2, 1
    x = torch.zeros(3, 3)
    torch.testing.assert_close(s.predict(x).logits, torch.full((3, 3), -math.log(3)))
    s.eval_diagnostics()
    out = s.predict(torch.zeros(6, 3)).logits
    counts = lt_test_counts(3, 2, 3)
    assert counts == [3, 2, 1]
    torch.testing.assert_close(out[0], torch.log(torch.tensor(counts, dtype=torch.float32) / 6))
    s.eval_diagnostics()  # sizes matched: the pointer wraps round
    s.predict(torch.zeros(2, 3))  # the runner scored 2 samples of a 3-sample set: a different order
    with pytest.raises(RuntimeError, match="expected to have scored the evaluation set 'uniform'"):
        s.eval_diagnostics()
    s.begin_eval_set("forward2")  # a runner that names the set overrides the order
    torch.testing.assert_close(s.predict(torch.zeros(1, 3)).logits[0], out[0])
    assert s.eval_diagnostics() == {}


def synth(strategies: dict) -> dict:
    return {
        "name": "lt_synth",
        "scenario": {"kind": "long_tail",
                     "data": {"source": "synth_gauss", "train_per_class": 500, "test_per_class": 100, "mean_std": 0.3},
                     "imbalance": 100, "val_per_class": 20,
                     "test_distributions": ["forward50", "uniform", "backward50"]},
        "backbone": {"name": "mlp_experts"},
        "strategies": strategies,
        "seeds": [1],
        "device": "cpu",
    }


def digits(strategies: dict) -> dict:
    return {
        "name": "lt_digits",
        "scenario": {"kind": "long_tail", "data": {"source": "digits"}, "n_max": 100, "imbalance": 20,
                     "val_per_class": 10, "test_distributions": ["uniform"], "shot_groups": "rank"},
        "backbone": {"name": "cnn8", "width": 16},
        "strategies": strategies,
        "seeds": [1],
        "device": "cpu",
    }


def run(tmp_path: Path, cfg: dict, **kwargs) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = Runner(load_recipe(path), out=tmp_path / "runs", progress=False, tensorboard=False, threads=1,
                 stream=open(tmp_path / "log.txt", "a"), cache_dir=tmp_path / "cache", **kwargs).run()
    return {r.strategy: r for r in out}


def res(r) -> dict:
    return json.loads((r.run_dir / "results.json").read_text())


def metric(r, dist, key):
    return res(r)["sessions"][0]["metrics"][dist][key]


SYN = {"epochs": 10, "batch_size": 128, "lr": 0.1}


def test_known_test_prior_helps_on_shifted_sets_and_is_recorded(tmp_path):
    runs = run(tmp_path, synth({"lade": SYN, "lade_uniform": {"strategy": "lade", **SYN, "test_prior": "uniform"}}))
    known, uni = runs["lade"], runs["lade_uniform"]
    assert known.status == uni.status == "finished"
    # the same network (same seeds); only the offset differs, and it is constant on the uniform set
    assert res(known)["sessions"][0]["metrics"]["uniform"] == res(uni)["sessions"][0]["metrics"]["uniform"]
    assert metric(known, "forward50", "acc") > metric(uni, "forward50", "acc") + 1
    assert metric(known, "backward50", "acc") > metric(uni, "backward50", "acc") + 10
    info = res(known)["sessions"][0]["strategy_info"]
    assert info["test_prior"] == "known"
    assert info["test_prior_per_set"] == {"forward50": "forward rho=50, m=100", "uniform": "uniform",
                                          "backward50": "backward rho=50, m=100"}
    assert set(res(uni)["sessions"][0]["strategy_info"]["test_prior_per_set"].values()) == {
        "uniform (test_prior: uniform)"}


def test_digits_lade_beats_ce_on_few(tmp_path):
    short = {"epochs": 30, "batch_size": 64, "lr": 0.05}
    runs = run(tmp_path, digits({"ce": short, "lade": {**short, "milestones": [24, 27], "gamma": 0.1}}))
    ce, lade = runs["ce"], runs["lade"]
    assert ce.status == lade.status == "finished"
    assert metric(lade, "uniform", "few") > metric(ce, "uniform", "few") + 10
    assert metric(lade, "uniform", "acc") > metric(ce, "uniform", "acc") + 3
    assert metric(ce, "uniform", "acc") > 70


def test_resume_gives_the_same_numbers(tmp_path):
    cfg = synth({"lade": {"epochs": 3, "batch_size": 128}})
    ref = run(tmp_path / "a", cfg)["lade"]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", cfg, stop_after_session=0)
    got = run(tmp_path / "b", cfg, resume=True)["lade"]
    strip = lambda r: [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in res(r)["sessions"]]  # noqa: E731
    assert got.status == "finished" and strip(got) == strip(ref) and res(got)["summary"] == res(ref)["summary"]
    # the restored strategy knows the test priors again
    state = torch.load(ref.run_dir / "checkpoints" / "session_0.pt", weights_only=True)["strategy"]
    s = LADE(epochs=3, batch_size=128)
    s.setup(RunContext(device="cpu", seed=1, scenario={"kind": "long_tail", "num_classes": 10, "input_shape": (64,),
                                                       "num_sessions": 1},
                       backbone={"name": "mlp_experts"}, base=TrainConfig.from_dict({}), progress=False))
    s.load_state_dict(state)
    assert s.eval_order == ["forward50", "uniform", "backward50"] and s.test_prior_rule["uniform"] == "uniform"
