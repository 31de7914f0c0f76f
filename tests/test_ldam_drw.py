"""LDAM-DRW (Cao et al., NeurIPS 2019): margins, normalised classifier, deferred re-weighting.

* Oracle fixtures (tests/fixtures/ldam_drw, the official code): ``LDAMLoss`` values, gradients and margins
  (with and without class weights), the ``train_rule`` branch's per-class weights at epochs 0/159/160/199,
  ``adjust_learning_rate`` over 200 epochs, ``NormedLinear``'s output.
* A hand-computed 3-sample example; parameter validation messages; the weights switch at ``drw_epoch``.
* End to end on scikit-learn digits (IF 20): LDAM-DRW beats CE on the few-shot classes.
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
import openworld.strategies.ldam_drw as ldam_mod
import openworld.strategies.long_tail_baselines  # noqa: F401
from openworld.config import load_recipe
from openworld.models.experts import NormedLinear
from openworld.runner import Runner
from openworld.strategies.ldam_drw import LDAMDRW, class_balanced_weights, drw_weights_at, ldam_loss, ldam_margins
from openworld.strategies.long_tail_baselines import LTSchedule

FIX = Path(__file__).parent / "fixtures" / "ldam_drw"


def load(name):
    return json.loads((FIX / name).read_text())


# ------------------------------------------------------------------------------------------------
# oracle fixtures
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["ldam_c10", "ldam_c5_drw"])
def test_ldam_loss_matches_official(case):
    f = load(f"{case}.json")
    margins = ldam_margins(f["counts"], f["max_m"])
    torch.testing.assert_close(margins, torch.tensor(f["m_list"], dtype=torch.float64), atol=1e-9, rtol=0)
    x = torch.tensor(f["cosine"], dtype=torch.float64, requires_grad=True)
    w = None if f["weight"] is None else torch.tensor(f["weight"], dtype=torch.float64)
    if w is not None:
        torch.testing.assert_close(class_balanced_weights(f["counts"], 0.9999), w, atol=1e-6, rtol=1e-6)  # float32
    loss = ldam_loss(x, torch.tensor(f["target"]), margins, f["s"], w)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(f["loss"][0], abs=1e-6)
    torch.testing.assert_close(x.grad, torch.tensor(f["grad"], dtype=torch.float64), atol=1e-6, rtol=0)


def test_train_rule_weights_match_official():
    rules = {"DRW": "drw", "Reweight": "reweight", "None": "none"}
    for key, official in load("train_rule_weights.json").items():
        rule, epoch, counts = key.split("|")
        counts = [int(v) for v in counts.split(",")]
        ours = drw_weights_at(int(epoch), counts, rules[rule], 160, 0.9999)
        if official is None:  # released: no weight tensor at all, i.e. every class weighs 1
            assert ours.tolist() == [1.0] * len(counts)
        else:  # the released weights are float32
            torch.testing.assert_close(ours, torch.tensor(official, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_learning_rate_schedule_matches_official():
    f = load("lr_schedule.json")
    ours = LDAMDRW()._schedule()
    assert ours == LTSchedule(200, 0.1, None, None, 0.01) and ours.resolved() == (5, (160, 180))
    assert [ours.lr_at(e) for e in range(200)] == pytest.approx(f["lrs"], abs=1e-12)
    assert LDAMDRW().resolved_drw_epoch == 160 and LDAMDRW(epochs=30).resolved_drw_epoch == 24


def test_normed_linear_matches_official():
    f = load("normed_linear.json")
    layer = NormedLinear(6, 4, scale=1.0).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(f["weight"], dtype=torch.float64))
    out = layer(torch.tensor(f["x"], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor(f["out"], dtype=torch.float64), atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------------------
# hand-computed vectors and validation
# ------------------------------------------------------------------------------------------------
def test_three_sample_example():
    cos = torch.tensor([[0.5, 0.1], [0.2, 0.4], [-0.3, 0.6]], dtype=torch.float64)
    y = torch.tensor([0, 1, 1])
    m = ldam_margins([16, 1])  # n^{-1/4} = 0.5, 1 → rescaled so that the largest is 0.5
    assert m.tolist() == [0.25, 0.5]
    # s·(cos − m_y at the target): [7.5, 3], [6, −3], [−9, 3]
    losses = [math.log(1 + math.exp(3 - 7.5)), math.log(1 + math.exp(6 + 3)), math.log(1 + math.exp(-9 - 3))]
    assert float(ldam_loss(cos, y, m, 30.0)) == pytest.approx(sum(losses) / 3, abs=1e-10)
    # class-balanced weights, β = 0.9999: (1−β)/(1−β^n), normalised to sum to C = 2
    raw = [(1 - 0.9999) / (1 - 0.9999 ** 16), (1 - 0.9999) / (1 - 0.9999 ** 1)]
    w = [2 * r / sum(raw) for r in raw]
    torch.testing.assert_close(class_balanced_weights([16, 1], 0.9999), torch.tensor(w, dtype=torch.float64))
    weighted = (w[0] * losses[0] + w[1] * losses[1] + w[1] * losses[2]) / (w[0] + 2 * w[1])
    assert float(ldam_loss(cos, y, m, 30.0, class_balanced_weights([16, 1], 0.9999))) == pytest.approx(
        weighted, abs=1e-10)
    # an absent class: margin 0 and weight 0; the others as without it
    assert ldam_margins([16, 0, 1]).tolist() == [0.25, 0.0, 0.5]
    assert class_balanced_weights([16, 0, 1], 0.0).tolist() == [1.5, 0.0, 1.5]


@pytest.mark.parametrize("kwargs, message", [
    ({"train_rule": "resample"}, "ldam_drw: train_rule must be one of drw, reweight, none; got 'resample'"),
    ({"beta": 1.0}, "ldam_drw: beta must be in [0, 1); got 1.0"),
    ({"max_m": -1}, "ldam_drw: max_m must be a number >= 0; got -1"),
    ({"s": 0}, "ldam_drw: s must be a number > 0; got 0"),
    ({"epochs": 10, "drw_epoch": 11},
     "ldam_drw: drw_epoch must be an integer in [0, epochs=10] or null (int(0.8·epochs)); got 11"),
    ({"epochs": 0}, "ldam_drw: epochs must be a positive integer; got 0"),
    ({"nesterov": 1}, "ldam_drw: nesterov must be true or false; got 1"),
    ({"checkpoint": "best"}, "checkpoint: allowed values are val, last, test; got 'best'"),
])
def test_parameters_are_validated(kwargs, message):
    with pytest.raises(ValueError) as err:
        LDAMDRW(**kwargs)
    assert str(err.value) == message


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------
def synth(strategies: dict) -> dict:
    return {
        "name": "lt_synth",
        "scenario": {"kind": "long_tail",
                     "data": {"source": "synth_gauss", "train_per_class": 500, "test_per_class": 100, "mean_std": 0.3},
                     "imbalance": 100, "val_per_class": 20, "test_distributions": ["uniform"]},
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


def test_weights_switch_at_drw_epoch(tmp_path, monkeypatch):
    seen = []
    original = ldam_mod.ldam_loss

    def spy(cosine, target, margins, s=30.0, weight=None):
        seen.append(weight.clone())
        return original(cosine, target, margins, s, weight)

    monkeypatch.setattr(ldam_mod, "ldam_loss", spy)
    runs = run(tmp_path, synth({"ldam_drw": {"epochs": 4, "drw_epoch": 2, "checkpoint": "last"}}))
    assert runs["ldam_drw"].status == "finished"
    steps = math.ceil(1236 / 128)  # 1,236 training samples, batches of 128 (the last one short)
    assert len(seen) == 4 * steps
    ones = torch.ones(10)
    assert all(torch.equal(w, ones) for w in seen[: 2 * steps])
    cb = class_balanced_weights([500, 299, 179, 107, 64, 38, 23, 13, 8, 5], 0.9999).float()
    assert all(torch.equal(w, cb) for w in seen[2 * steps:])
    assert res(runs["ldam_drw"])["sessions"][0]["strategy_info"]["drw_epoch"] == 2


def test_digits_ldam_drw_beats_ce_on_few(tmp_path):
    short = {"epochs": 30, "batch_size": 64, "lr": 0.05}
    runs = run(tmp_path, digits({"ce": short, "ldam_drw": short}))
    ce, ldam = runs["ce"], runs["ldam_drw"]
    assert ce.status == ldam.status == "finished"
    assert metric(ldam, "uniform", "few") > metric(ce, "uniform", "few") + 10
    assert metric(ldam, "uniform", "acc") > metric(ce, "uniform", "acc") + 3
    assert metric(ce, "uniform", "acc") > 70


def test_resume_gives_the_same_numbers_and_state_round_trips(tmp_path):
    cfg = synth({"ldam_drw": {"epochs": 3, "batch_size": 128}})
    ref = run(tmp_path / "a", cfg)["ldam_drw"]
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", cfg, stop_after_session=0)
    got = run(tmp_path / "b", cfg, resume=True)["ldam_drw"]
    strip = lambda r: [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in res(r)["sessions"]]  # noqa: E731
    assert got.status == "finished" and strip(got) == strip(ref) and res(got)["summary"] == res(ref)["summary"]
    from openworld.strategies.base import RunContext, TrainConfig

    ctx = RunContext(device="cpu", seed=1, scenario={"kind": "long_tail", "num_classes": 10, "input_shape": (64,),
                                                     "num_sessions": 1},
                     backbone={"name": "mlp_experts"}, base=TrainConfig.from_dict({}), progress=False)
    state = torch.load(ref.run_dir / "checkpoints" / "session_0.pt", weights_only=True)["strategy"]
    a, b = LDAMDRW(), LDAMDRW()
    a.setup(ctx)
    a.load_state_dict(state)
    b.setup(ctx)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.predict(x).logits, b.predict(x).logits, atol=0, rtol=0)
    assert float(a.predict(x).logits.abs().max()) <= 30.0 + 1e-5  # s·cos
