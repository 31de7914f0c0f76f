"""Naive-Bayes and logistic-regression probes on frozen features (Zheng et al., ICML 2023).

* Oracle fixtures (tests/fixtures/naive_bayes_probe, the official ``GaussianNB`` and the official protocol's
  scikit-learn LR + MinMaxScaler): log joint, predictions, means and shared variance; the official two-call merge;
  LR class probabilities at the exact minimiser.
* Hand-computed values: a two-class 1-d NB with and without min-max scaling; the shot picker.
* End to end on scikit-learn digits (FSCIL quickstart): both probes fit on the very same samples, NB with one
  shot is the nearest class mean, more shots help, the state round trip gives the same logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

import openworld.strategies.naive_bayes_probe  # noqa: F401  (registers the strategies)
from openworld.config import load_recipe
from openworld.runner import Runner
from openworld.strategies.naive_bayes_probe import (
    LogRegProbe,
    NaiveBayesProbe,
    class_stats,
    fit_logreg,
    merge_stats,
    minmax_scale,
    nb_log_joint,
    nb_parameters,
    pick_shots,
)

ROOT = Path(__file__).resolve().parents[1]
FIX = json.loads((Path(__file__).parent / "fixtures" / "naive_bayes_probe" / "oracle.json").read_text())
T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def nb_fit_predict(x, y, xt, eps, minmax=True, stats=None):
    k = int(max(y)) + 1
    x, xt = T(x), T(xt)
    s = class_stats(x, torch.tensor(y), k) if stats is None else stats
    lo = x.min(0).values if minmax else torch.zeros(x.shape[1], dtype=torch.float64)
    scale = minmax_scale(lo, x.max(0).values) if minmax else torch.ones(x.shape[1], dtype=torch.float64)
    log_prior, mu, var = nb_parameters(*s, lo, scale, eps)
    return nb_log_joint((xt - lo) * scale, log_prior, mu, var), log_prior, mu, var


# ------------------------------------------------------------------------------------------------
# oracle fixtures
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["nb_unequal", "nb_one_shot", "nb_eps"])
def test_nb_matches_official_gaussnb(case):
    f = FIX[case]
    joint, log_prior, mu, var = nb_fit_predict(f["x"], f["y"], f["x_test"], f["epsilon"])
    # one-shot: var = ε = 1e-9, so the log joint is ~1e9 and the fixture's 12 digits bound it relatively
    torch.testing.assert_close(joint, T(f["log_joint"]), rtol=1e-9, atol=1e-6)
    assert joint.argmax(1).tolist() == f["pred"]
    torch.testing.assert_close(log_prior.exp(), T(f["prior"]), rtol=0, atol=1e-12)
    torch.testing.assert_close(mu, T(f["mus"]), rtol=0, atol=1e-9)
    torch.testing.assert_close(var, T(f["shared_var"]), rtol=1e-9, atol=1e-12)


def test_nb_merge_matches_official_two_call_fit():
    f = FIX["nb_incremental"]
    k = 3
    s1 = class_stats(T(f["x1"]), torch.tensor(f["y1"]), k)
    s2 = class_stats(T(f["x2"]), torch.tensor(f["y2"]), k)
    merged = merge_stats(s1, s2)
    joint, _, mu, _ = nb_fit_predict(f["x1"] + f["x2"], f["y1"] + f["y2"], f["x_test"], 1e-9, minmax=False,
                                     stats=merged)
    torch.testing.assert_close(joint, T(f["log_joint"]), rtol=1e-9, atol=1e-6)
    assert joint.argmax(1).tolist() == f["pred"]
    torch.testing.assert_close(mu, T(f["mus"]), rtol=0, atol=1e-9)
    torch.testing.assert_close(merged[2] / merged[0][:, None] + 1e-9, T(f["vars_groupby"]), rtol=0, atol=1e-9)
    # and the merge equals one pass over the union
    whole = class_stats(T(f["x1"] + f["x2"]), torch.tensor(f["y1"] + f["y2"]), k)
    for a, b in zip(merged, whole):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", ["lr_c1", "lr_c01", "lr_one_shot"])
def test_logreg_matches_sklearn_lbfgs_at_the_minimiser(case):
    f = FIX[case]
    x, xt, y = T(f["x"]), T(f["x_test"]), torch.tensor(f["y"])
    lo, scale = x.min(0).values, minmax_scale(x.min(0).values, x.max(0).values)
    w, b, info = fit_logreg((x - lo) * scale, y, int(y.max()) + 1, C=f["C"], max_iter=5000, tol=1e-8)
    assert info["converged"], info
    proba = torch.softmax(((xt - lo) * scale) @ w.T + b, 1)
    torch.testing.assert_close(proba, T(f["proba"]), rtol=0, atol=1e-6)
    torch.testing.assert_close(w, T(f["coef"]), rtol=0, atol=1e-5)
    assert proba.argmax(1).tolist() == f["pred"]


# ------------------------------------------------------------------------------------------------
# hand-computed values
# ------------------------------------------------------------------------------------------------
def test_nb_two_classes_by_hand():
    # class 0: {0, 2} (mean 1, var 1); class 1: {4, 10} (mean 7, var 9); shared var 0.5·1 + 0.5·9 = 5.
    x, y = [[0.0], [2.0], [4.0], [10.0]], [0, 0, 1, 1]
    joint, log_prior, mu, var = nb_fit_predict(x, y, [[3.0], [0.0]], 1e-9, minmax=False)
    torch.testing.assert_close(var, T([5.0 + 1e-9]), rtol=0, atol=1e-15)
    # log .5 − ½((3−1)²/5 + log 10π) etc.
    expected = [[-2.816804669981668, -4.016804669981668], [-2.516804669981668, -7.316804669981669]]
    torch.testing.assert_close(joint, T(expected), rtol=0, atol=1e-6)
    # min-max scaling (÷10): the quadratic terms are unchanged, log σ² drops by log 100: + ½·log 100 per feature
    scaled, *_ = nb_fit_predict(x, y, [[3.0], [0.0]], 1e-9)
    torch.testing.assert_close(scaled, T(expected) + 0.5 * math.log(100.0), rtol=0, atol=1e-6)
    # uniform prior: identical here (equal counts); unequal counts shift by log(π_c) only
    lp, _, _ = nb_parameters(T([3.0, 1.0]), T([[0.0], [1.0]]), T([[1.0], [0.0]]), T([0.0]), T([1.0]), 1e-9)
    torch.testing.assert_close(lp, T([math.log(0.75), math.log(0.25)]), rtol=0, atol=1e-12)
    lp, _, _ = nb_parameters(T([3.0, 1.0]), T([[0.0], [1.0]]), T([[1.0], [0.0]]), T([0.0]), T([1.0]), 1e-9,
                             "uniform")
    torch.testing.assert_close(lp, T([math.log(0.5)] * 2), rtol=0, atol=1e-12)


def test_minmax_scale_constant_feature_is_one():
    torch.testing.assert_close(minmax_scale(T([0.0, 2.0, -1.0]), T([4.0, 2.0, 1.0])), T([0.25, 1.0, 0.5]))


def test_pick_shots_counts_nesting_and_errors():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])  # counts 5, 5, 4
    picks = {k: pick_shots(labels, k, torch.Generator().manual_seed(7)) for k in (1, 2, 4)}
    for k, idx in picks.items():
        assert torch.bincount(labels[idx]).tolist() == [k, k, k]
        assert idx.tolist() == sorted(idx.tolist())
    assert set(picks[1].tolist()) <= set(picks[2].tolist()) <= set(picks[4].tolist())
    again = pick_shots(labels, 2, torch.Generator().manual_seed(7))
    assert again.tolist() == picks[2].tolist()
    with pytest.raises(ValueError, match="class 2 has only 4 labelled samples"):
        pick_shots(labels, 5, torch.Generator().manual_seed(7))


@pytest.mark.parametrize("cls, kwargs, message", [
    (NaiveBayesProbe, {"shots": 0}, "shots must be a positive integer or null"),
    (NaiveBayesProbe, {"epsilon": 0}, "epsilon must be a positive number"),
    (NaiveBayesProbe, {"prior": "flat"}, "prior must be one of empirical, uniform"),
    (NaiveBayesProbe, {"minmax": "yes"}, "minmax must be true or false"),
    (LogRegProbe, {"C": -1}, "C must be a positive number"),
    (LogRegProbe, {"max_iter": 0}, "max_iter must be a positive integer"),
    (LogRegProbe, {"tol": 0}, "tol must be a positive number"),
])
def test_parameter_errors(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


# ------------------------------------------------------------------------------------------------
# end to end on scikit-learn digits
# ------------------------------------------------------------------------------------------------
NB = "openworld.strategies.naive_bayes_probe:NaiveBayesProbe"
LR = "openworld.strategies.naive_bayes_probe:LogRegProbe"


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    recipe = yaml.safe_load((ROOT / "scenarios" / "quickstart.yaml").read_text())
    recipe["base"]["epochs"] = 10
    recipe["strategies"] = {"nb_1": {"strategy": NB, "shots": 1}, "nb_5": {"strategy": NB, "shots": 5},
                            "lr_5": {"strategy": LR, "shots": 5}}
    path = tmp / "probe_digits.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = Runner(load_recipe(path), out=tmp / "runs", progress=False, stream=open(tmp / "log.txt", "w")).run()
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    return {r.strategy: json.loads((r.run_dir / "results.json").read_text())["sessions"] for r in out}


def test_digits_probes_share_samples_and_more_shots_help(digits_runs):
    nb1, nb5, lr5 = digits_runs["nb_1"], digits_runs["nb_5"], digits_runs["lr_5"]
    assert len(nb5) == 6
    for a, b in zip(nb5, lr5):
        assert a["strategy_info"]["num_fit_samples"] == b["strategy_info"]["num_fit_samples"]
    assert [s["strategy_info"]["num_fit_samples"] for s in nb5] == [25, 5, 5, 5, 5, 5]
    assert [s["strategy_info"]["num_fit_samples"] for s in nb1] == [5, 1, 1, 1, 1, 1]
    acc = lambda runs: [s["metrics"]["test"]["acc"] for s in runs]  # noqa: E731
    assert min(acc(nb5)) > 70 and min(acc(lr5)) > 70, (acc(nb5), acc(lr5))
    assert sum(acc(nb5)) > sum(acc(nb1)), (acc(nb5), acc(nb1))
    assert all(s["strategy_info"]["converged"] for s in lr5)


def test_one_shot_nb_is_the_nearest_class_mean():
    # With one sample per class every class variance is 0, σ² = ε, so NB ranks classes by Euclidean distance
    # to the (scaled) samples, the log prior being negligible against 1/ε.
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 4, generator=g, dtype=torch.float64)
    xt = torch.rand(50, 4, generator=g, dtype=torch.float64)
    joint, _, mu, _ = nb_fit_predict(x.tolist(), list(range(6)), xt.tolist(), 1e-9)
    lo, scale = x.min(0).values, minmax_scale(x.min(0).values, x.max(0).values)
    nearest = torch.cdist((xt - lo) * scale, mu).argmin(1)
    assert joint.argmax(1).tolist() == nearest.tolist()


def test_state_round_trip_gives_the_same_logits():
    from openworld.strategies.base import RunContext, TrainConfig

    ctx = RunContext(device=torch.device("cpu"), seed=0, scenario={"input_shape": (1, 8, 8), "num_classes": 10},
                     backbone={"name": "cnn8"}, base=TrainConfig(), progress=False)
    torch.manual_seed(0)
    encoder = ctx.create_backbone().eval()
    z = torch.randn(40, encoder.out_features, dtype=torch.float64)
    y = torch.arange(40) % 4
    for cls in (NaiveBayesProbe, LogRegProbe):
        a = cls(shots=None)
        a.setup(ctx)
        a.encoder, a.num_active = encoder, 4
        a.lo, a.hi = z.min(0).values, z.max(0).values
        if cls is NaiveBayesProbe:
            a.stats = class_stats(z, y, 10)
            a._refresh()
        else:
            a.feats, a.labels = z, y
            a._fit()
        b = cls(shots=None)
        b.setup(ctx)
        b.load_state_dict(a.state_dict())
        zt = torch.randn(7, encoder.out_features)
        torch.testing.assert_close(b.predict_features(zt).logits, a.predict_features(zt).logits, rtol=0, atol=0)
