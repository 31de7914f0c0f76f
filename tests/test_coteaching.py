"""Co-teaching (docs/methods/coteaching.md): the exchange loss and the released schedules against the official
code (oracle fixtures in tests/fixtures/coteaching, made by its make_fixtures.py), a hand-computed 3-sample
vector, parameter validation, end-to-end runs on long-tailed scikit-learn digits with 40 % symmetric and
class-dependent (imb) noise, and the runner's generic guarantees (resume, NaN isolation, label-stripped
sessions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import openworld.metrics.long_tail  # noqa: F401  (registers the "long_tail" engine)
import openworld.scenarios.long_tail  # noqa: F401
import openworld.strategies.coteaching  # noqa: F401
import openworld.strategies.long_tail_baselines  # noqa: F401
from openworld.config import load_recipe
from openworld.registry import STRATEGIES
from openworld.runner import Runner
from openworld.strategies.coteaching import (
    CoTeaching,
    coteaching_loss,
    forget_rate_at,
    released_adam_plan,
    released_rate_schedule,
)

FIX = Path(__file__).parent / "fixtures" / "coteaching"
ATOL = 1e-6
D = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load(name: str):
    return json.loads((FIX / f"{name}.json").read_text())


def t64(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=D)


def close(a, b, atol=ATOL) -> None:
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), t64(b), atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------
# Oracle fixtures
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["loss_forget025", "loss_forget04", "loss_forget0"])
def test_exchange_loss_matches_official(name):
    f = load(name)
    y1, y2 = t64(f["y1"]).requires_grad_(True), t64(f["y2"]).requires_grad_(True)
    t = torch.tensor(f["t"])
    l1, l2, sel = coteaching_loss(y1, y2, t, f["forget_rate"], scaling="released")
    close(l1, f["loss_1"])
    close(l2, f["loss_2"])
    g1, g2 = torch.autograd.grad(l1 + l2, (y1, y2))
    close(g1, f["grad_1"])
    close(g2, f["grad_2"])
    # network 1 is updated on network 2's small-loss samples, and vice versa
    assert sorted(sel["keep2"].tolist()) == torch.nonzero(t64(f["grad_1"]).abs().sum(1)).flatten().tolist()
    assert sorted(sel["keep1"].tolist()) == torch.nonzero(t64(f["grad_2"]).abs().sum(1)).flatten().tolist()
    k = len(sel["keep1"])
    assert k == int((1 - f["forget_rate"]) * len(t))
    m1, m2, _ = coteaching_loss(y1, y2, t, f["forget_rate"], scaling="mean")  # the paper's mean = released · k
    close(m1, k * f["loss_1"])
    close(m2, k * f["loss_2"])
    # the released pure ratio (label precision of the selection; needs clean labels, so not computed here)
    clean = np.asarray(f["clean_in_batch"])
    assert f["pure_ratio_1"] == pytest.approx(clean[sel["keep1"].numpy()].mean(), abs=1e-9)


@pytest.mark.parametrize("row", range(4))
def test_released_schedules_match_official(row):
    f = load("schedules")[row]
    n, tk, c, tau = f["n_epoch"], f["num_gradual"], f["exponent"], f["forget_rate"]
    close(released_rate_schedule(n, tau, tk, c), f["rate_schedule"], 1e-12)
    alpha, beta1 = released_adam_plan(f["lr"], n, f["epoch_decay_start"])
    close(alpha, f["alpha_plan"], 1e-12)
    close(beta1, f["beta1_plan"], 1e-12)
    # our epoch e (0-based) runs the released epoch index e + 1 (the released loop trains 1 … n_epoch − 1)
    got = [forget_rate_at(e, tau, tk, "released", c) for e in range(n - 1)]
    close(got, f["rate_schedule"][1:], 1e-12)


def test_adam_plan_is_applied_like_the_released_loop(monkeypatch):
    """Strategy epochs = n_epoch − 1 reproduce the released per-epoch lr / beta1 (read from the optimiser)."""
    f = load("schedules")[2]  # n_epoch 13, decay from 5, lr 0.002
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        g = self.param_groups[0]
        seen.append((g["lr"], g["betas"][0]))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    s = _fitted({"epochs": f["n_epoch"] - 1, "decay_start": f["epoch_decay_start"], "lr": f["lr"],
                 "forget_schedule": "released", "num_gradual": f["num_gradual"], "forget_rate": f["forget_rate"],
                 "batch_size": 64, "checkpoint": "last"}, n=64)
    per_epoch = seen[::2]  # two optimisers, one batch per epoch
    close([a for a, _ in per_epoch], f["alpha_plan"][1:], 1e-12)
    close([b for _, b in per_epoch], f["beta1_plan"][1:], 1e-12)
    assert s.info["final_forget_rate"] == pytest.approx(f["rate_schedule"][-1])


# ------------------------------------------------------------------------------------------------
# Hand-computed 3-sample vector and the paper schedule
# ------------------------------------------------------------------------------------------------
def test_exchange_loss_by_hand():
    l1 = torch.tensor([[2.0, 0, 0], [0, 1, 0], [0, 0, -1]], dtype=D)
    l2 = torch.tensor([[0.0, 0, 2], [0, 3, 0], [1, 0, 0]], dtype=D)
    y = torch.tensor([0, 1, 2])
    # per-sample CE: net 1 (0.239545, 0.551445, 1.861995) keeps {0, 1}; net 2 (2.239545, 0.094923, 1.551445)
    # keeps {1, 2}; k = int(0.7 · 3) = 2
    a, b, sel = coteaching_loss(l1, l2, y, 0.3)
    assert sorted(sel["keep1"].tolist()) == [0, 1] and sorted(sel["keep2"].tolist()) == [1, 2]
    close(a, 1.206719759)  # net 1 on {1, 2}: (0.551445 + 1.861995) / 2
    close(b, 1.167233861)  # net 2 on {0, 1}: (2.239545 + 0.094923) / 2
    ra, rb, _ = coteaching_loss(l1, l2, y, 0.3, scaling="released")
    close(ra, 1.206719759 / 2)
    close(rb, 1.167233861 / 2)
    full, _, sel = coteaching_loss(l1, l2, y, 0.0)
    assert len(sel["keep1"]) == 3
    close(full, (0.239544766 + 0.551444714 + 1.861994804) / 3)


def test_paper_forget_schedule():
    got = [forget_rate_at(e, 0.4, 10) for e in range(13)]
    close(got, [0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.24, 0.28, 0.32, 0.36, 0.4, 0.4, 0.4], 1e-12)
    # released: linspace(0, τ, T_k) at index e + 1, so it reaches τ at epoch T_k − 2 already
    close([forget_rate_at(e, 0.4, 10, "released") for e in range(10)],
          [0.4 * (e + 1) / 9 for e in range(8)] + [0.4, 0.4], 1e-12)


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"forget_rate": 1.0}, "coteaching: forget_rate must be a number in [0, 1); got 1.0"),
    ({"forget_rate": "auto"}, "coteaching: forget_rate must be a number in [0, 1); got 'auto'"),
    ({"forget_schedule": "linear"}, "coteaching: forget_schedule must be one of paper, released; got 'linear'"),
    ({"optimizer": "rmsprop"}, "coteaching: optimizer must be one of adam, sgd; got 'rmsprop'"),
    ({"predict_with": "net2"}, "coteaching: predict_with must be one of net1, ensemble; got 'net2'"),
    ({"loss_scaling": "sum"}, "coteaching: loss_scaling must be one of mean, released; got 'sum'"),
    ({"checkpoint": "best"}, "checkpoint: allowed values are val, last, test; got 'best'"),
    ({"num_gradual": -1}, "coteaching: num_gradual must be a non-negative integer; got -1"),
    ({"exponent": 2.0}, "coteaching: exponent applies to forget_schedule='released' only; got exponent=2.0 with "
                        "forget_schedule='paper'"),
    ({"milestones": [5]}, "coteaching: warmup_epochs / milestones apply to optimizer='sgd' only (Adam follows the "
                          "released linear decay from decay_start)"),
    ({"optimizer": "sgd", "decay_start": 3}, "coteaching: decay_start applies to optimizer='adam' only (SGD uses "
                                             "milestones)"),
    ({"batch_size": 1}, "coteaching: batch_size must be an integer >= 2; got 1"),
])
def test_bad_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        CoTeaching(**kwargs)
    assert str(err.value) == message


def test_defaults():
    s = CoTeaching()
    assert (s.forget_rate, s.num_gradual, s.optimizer, s._lr(), s._wd(), s._decay_start(), s.batch_size) == (
        0.2, 10, "adam", 0.001, 0.0, 80, 128)
    sgd = CoTeaching(optimizer="sgd")
    assert (sgd._lr(), sgd._wd()) == (0.1, 5e-4)


def _fitted(params: dict, n: int = 96):
    """A Co-teaching strategy trained on a tiny in-memory set (no runner)."""
    from openworld.data.views import TensorData
    from openworld.scenarios.base import ClassInfo, Session
    from openworld.strategies.base import RunContext, TrainConfig

    ctx = RunContext(device="cpu", seed=0, scenario={"num_classes": 3, "input_shape": (4,)},
                     backbone={"name": "mlp_experts", "trunk": 8, "out_features": 8}, base=TrainConfig(),
                     progress=False)
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, generator=g) + 2 * torch.nn.functional.one_hot(y, 4).float()
    classes = ClassInfo(num_classes=3, seen=(0, 1, 2), new=(0, 1, 2), base=(0, 1, 2), known=(0, 1, 2),
                        train_counts=(n // 3,) * 3)
    session = Session(index=0, name="lt", classes=classes, labeled=TensorData(x, y))
    s = CoTeaching(**params)
    s.setup(ctx)
    s.learn(session)
    return s


def test_ensemble_prediction_is_the_mean_of_both_softmaxes():
    s = _fitted({"epochs": 2, "batch_size": 32, "checkpoint": "last", "predict_with": "ensemble"})
    x = torch.randn(5, 4)
    with torch.no_grad():
        p = 0.5 * (torch.softmax(s.nets[0](x), 1) + torch.softmax(s.nets[1](x), 1))
    close(s.predict(x).logits.exp(), p)
    s.predict_with = "net1"
    with torch.no_grad():
        assert torch.equal(s.predict(x).logits, s.nets[0](x))
    assert not torch.equal(s.nets[0][1].weight, s.nets[1][1].weight)  # two different initialisations


# ------------------------------------------------------------------------------------------------
# End to end: long-tailed digits (IF 10) with 40 % label noise
# ------------------------------------------------------------------------------------------------
def _recipe(noise: str, name: str) -> dict:
    return {
        "name": name,
        "scenario": {"kind": "long_tail", "data": {"source": "digits"}, "imbalance": 10, "val_per_class": 10,
                     "noise": noise, "noise_rate": 0.4, "test_distributions": ["uniform"]},
        "backbone": {"name": "mlp_experts", "trunk": 64, "out_features": 32},
        # checkpoint last for both: no early stopping, so CE memorises the noisy labels (the paper's setting)
        "strategies": {"ce": {"epochs": 40, "batch_size": 64, "lr": 0.05, "checkpoint": "last"},
                       "coteaching": {"epochs": 40, "batch_size": 64, "forget_rate": 0.4, "lr": 0.003,
                                      "checkpoint": "last"}},
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


@pytest.mark.parametrize("noise", ["sym", "imb"])
def test_digits_lt_coteaching_beats_ce_under_40_percent_noise(noise, tmp_path):
    cfg = _recipe(noise, f"lt_digits_noisy_{noise}")
    out = _runner(tmp_path, cfg).run()
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    for seed in (1, 2):
        ce = _results(tmp_path, cfg, "ce", seed)["sessions"][0]["metrics"]["uniform"]["acc"]
        co = _results(tmp_path, cfg, "coteaching", seed)["sessions"][0]["metrics"]["uniform"]["acc"]
        assert co > ce + 5, (noise, seed, co, ce)  # measured: sym +14 to +17, imb +9 to +10 points


# ------------------------------------------------------------------------------------------------
# Generic guarantees (as tests/test_rivals_generic.py)
# ------------------------------------------------------------------------------------------------
SMALL = {**_recipe("sym", "lt_digits_coteaching_small"), "seeds": [0],
         "strategies": {"coteaching": {"epochs": 4, "batch_size": 64, "forget_rate": 0.4, "num_gradual": 2}}}


def test_registered_and_killed_run_resumes_to_the_same_numbers(tmp_path):
    assert "coteaching" in STRATEGIES.names()
    _runner(tmp_path / "a", SMALL).run()
    reference = _results(tmp_path / "a", SMALL, "coteaching", 0)
    with pytest.raises(KeyboardInterrupt):
        _runner(tmp_path / "b", SMALL, stop_after_session=0).run()
    (done,) = _runner(tmp_path / "b", SMALL, resume=True).run()
    got = _results(tmp_path / "b", SMALL, "coteaching", 0)
    strip = [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in got["sessions"]]
    ref = [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in reference["sessions"]]
    assert done.status == "finished" and strip == ref and got["summary"] == reference["summary"]
    state = torch.load(tmp_path / "b" / "runs" / SMALL["name"] / "coteaching" / "seed0" / "checkpoints" /
                       "session_0.pt", weights_only=True)["strategy"]
    assert set(state) == {"net1", "net2", "selection"}
