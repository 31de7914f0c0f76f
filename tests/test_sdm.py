"""SDM activation, calibration and selective region (openworld/strategies/sdm.py): values by hand, the official
code's values on a seeded problem (tests/fixtures/sdm/), and an end-to-end open-set run on real digits."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import openworld.metrics.open_set  # noqa: F401  (registers the "open_set" engine)
import openworld.scenarios.open_set  # noqa: F401
import openworld.strategies.sdm as S
from openworld.registry import STRATEGIES

FIX = Path(__file__).parent / "fixtures" / "sdm"
ATOL = 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# by hand
# ------------------------------------------------------------------------------------------------
def test_activation_by_hand():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 1.0]])
    # base 2+q = 4: [4^0, 4^-1]/1.25 = [0.8, 0.2]; with d = 1/2: [1, 1/2]/1.5; q = 0 (base 2), d = 1/2 on the
    # shifted logits [0, −2]: [2^0, 2^-1]/1.5
    p = S.sdm_activation(z, torch.tensor([2.0, 2.0, 0.0]), torch.tensor([1.0, 0.5, 0.5]))
    assert p.flatten().tolist() == pytest.approx([0.8, 0.2, 2 / 3, 1 / 3, 2 / 3, 1 / 3], abs=1e-7)
    # q = e − 2, no distance factor: the softmax
    zz = torch.tensor([[0.3, -1.2, 2.0]])
    soft = S.sdm_activation(zz, torch.tensor([math.e - 2]))
    assert torch.allclose(soft, torch.softmax(zz, 1), atol=1e-6)
    # log form: log base 4 of [0.8, 0.2]
    lg = S.sdm_activation(z[:1], torch.tensor([2.0]), log=True)
    assert lg.tolist()[0] == pytest.approx([math.log(0.8, 4), math.log(0.2, 4)], abs=1e-6)


def test_similarity_counts_the_leading_correct_run():
    d2 = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    labels = torch.tensor([0, 0, 1, 0, 0])
    preds = torch.tensor([0, 0, 1, 1, 0])  # support 3 is wrongly predicted, support 2 predicts another class
    # for ŷ = 0: supports 0, 1 match, support 2 (pred 1) stops the run → q = 2
    assert S.sdm_similarity(d2, torch.tensor([0]), labels, preds, k=10).tolist() == [2]
    assert S.sdm_similarity(d2, torch.tensor([0]), labels, preds, k=1).tolist() == [1]  # capped at k
    # for ŷ = 1: the nearest (pred 0) already differs → q = 0
    assert S.sdm_similarity(d2, torch.tensor([1]), labels, preds, k=10).tolist() == [0]


def test_distance_and_output_quantiles_by_hand():
    # calibration d0 per class: class 0 {1, 3}, class 1 {2}; a q = 0 point (d0 = 0.5) is left out
    d0 = torch.tensor([3.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    table, counts = S.class_tables(d0, y, 2, keep=torch.tensor([True, True, True, False]))
    assert counts.tolist() == [2, 1]
    # d0 = 2: class 0 → 1 − 1/2, class 1 → 1 − 0/1 → min = 1/2; d0 = 5 → 0; d0 = 0 → 1
    d = S.distance_quantile(torch.tensor([2.0, 5.0, 0.0], dtype=torch.float64), table, counts)
    assert d.tolist() == [0.5, 0.0, 1.0]
    # output CDF: class 0 outputs {0.2, 0.6}; class 1 empty → u = 0; at/above the largest → 1
    t2, c2 = S.class_tables(torch.tensor([0.6, 0.2]), torch.tensor([0, 0]), 2)
    u = S.output_quantiles(torch.tensor([[0.5, 0.5], [0.6, 0.4], [0.1, 0.9]]), t2, c2)
    assert u.flatten().tolist() == [0.5, 0.0, 1.0, 0.0, 0.0, 0.0]
    # soft q bin: log((2+q')^u) = u·log(2+q')
    assert S.soft_qbin(torch.tensor([0.5]), torch.tensor([7])).item() == pytest.approx(0.5 * math.log(9), abs=1e-6)


def test_region_thresholds_by_hand():
    # class 0: (p, b) = (0.99, 1), (0.9, 2), (0.97, 3); class 1: (0.96, 2), (0.98, 3); α = 0.95 → n < 20, so the
    # quantile is the minimum. b* = 1: min class 0 = 0.9 < α; b* = 2: class 0 {0.9, 0.97} → 0.9 fails;
    # b* = 3: class 0 {0.97}, class 1 {0.98} → found
    p = torch.tensor([0.99, 0.9, 0.97, 0.96, 0.98])
    b = torch.tensor([1.0, 2.0, 3.0, 2.0, 3.0])
    y = torch.tensor([0, 0, 0, 1, 1])
    b_star, thr, found = S.region_thresholds(p, b, y, torch.ones(5, dtype=torch.bool), 2, 0.95)
    assert found and b_star == 3.0
    assert thr.tolist() == pytest.approx([0.97, 0.98], abs=1e-7)
    # a class without points can never reach α: nothing found
    assert S.region_thresholds(p, b, y, torch.ones(5, dtype=torch.bool), 3, 0.95)[2] is False


# ------------------------------------------------------------------------------------------------
# the official code's values (tests/fixtures/sdm/make_fixtures.py)
# ------------------------------------------------------------------------------------------------
def _generator():
    spec = importlib.util.spec_from_file_location("sdm_make_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def oracle():
    gen = _generator()
    a = gen.tiny_problem(gen.SEED)
    ref = json.loads((FIX / "sdm.json").read_text())
    assert gen.problem_sha256(a) == ref["problem_sha256"]
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    w, b = f32(a["w"]), f32(a["b"])
    logits = {s: torch.nn.functional.linear(f32(a[f"f_{s}"]), w, b) for s in ("train", "cal", "test")}
    stats = S.sdm_fit(
        f32(a["f_train"]), torch.tensor(a["y_train"]).long(), logits["train"], f32(a["f_cal"]), logits["cal"],
        torch.tensor(a["y_cal"]).long(), gen.K, ref["k"], ref["alpha"], rescaler=f32(a["rescaler"]),
    )
    out = S.sdm_predict(stats, f32(a["f_test"]), logits["test"])
    return stats, out, ref


def _close(ours, ref, atol=ATOL, rtol=0.0):
    ours = torch.as_tensor(ours, dtype=torch.float64)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=atol, rtol=rtol), float((ours - ref).abs().max())


def test_calibration_matches_official(oracle):
    stats, _, ref = oracle
    cal, rc = stats["calibration"], ref["calibration"]
    assert cal["q"].tolist() == rc["q"]
    _close(cal["d0"], rc["d0"], rtol=1e-6)  # faiss: float32 squared L2
    for key in ("d", "sdm", "u", "qbin"):
        _close(cal[key], rc[key])
    assert cal["ood"].long().tolist() == rc["ood"]
    assert stats["found"] is ref["found"] is True
    assert stats["b_star"] == pytest.approx(ref["b_star"], abs=ATOL)
    _close(stats["thresholds"], ref["thresholds"])


def test_test_points_match_official(oracle):
    _, out, ref = oracle
    rt = ref["test"]
    assert out["q"].tolist() == rt["q"] and out["pred"].tolist() == rt["pred"]
    assert max(rt["q"]) == ref["k"]  # the cap is exercised
    _close(out["d0"], rt["d0"], rtol=1e-6)
    for key in ("d", "sdm", "qbin", "rescaled"):
        _close(out[key], rt[key])
    assert out["accepted"].tolist() == rt["accepted"]
    assert 0 < sum(rt["accepted"]) < len(rt["accepted"])  # both decisions occur
    # the region score ranks every accepted point above every rejected one, and τ = 2 is the decision
    s = S.known_score(out, "region")
    assert ((s >= S.SDM_REGION_TAU) == out["accepted"]).all()


# ------------------------------------------------------------------------------------------------
# the strategy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params,message",
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"alpha": 1.0}, "alpha must be in"),
        ({"score": "x"}, "score must be one of"),
        ({"rescaler": "platt"}, "rescaler must be"),
        ({"score": "sdm"}, "threshold 'sdm_region' is the SDM decision"),
        ({"alignment": "recenter"}, "recenter"),
    ],
)
def test_parameter_validation(params, message):
    with pytest.raises(ValueError, match=message):
        STRATEGIES.get("sdm")(**params)


def test_params_round_trip():
    det = STRATEGIES.get("sdm")(k=50)
    p = det.get_params()
    assert p["threshold"] == "sdm_region" and p["tau"] is None and p["k"] == 50
    assert STRATEGIES.get("sdm")(**p).get_params() == p
    assert "sdm_region" in det.tau_rule()


DIGITS = {
    "name": "sdm_digits",
    "scenario": {
        "kind": "open_set",
        "data": {"source": "digits"},
        "known_classes": [0, 1, 2, 3, 4, 5],
        "unknown_classes": [6, 7, 8, 9],
    },
    "backbone": {"name": "mlp", "hidden": [64], "out_features": 32},
    "base": {
        "epochs": 8,
        "batch_size": 64,
        "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
        "schedule": "constant",
        "selection": "last",
    },
    "strategies": {
        "sdm": {"strategy": "openworld.strategies.sdm:SDM"},
        "sdm_calibrated": {
            "strategy": "openworld.strategies.sdm:SDM", "score": "calibrated", "threshold": "source_quantile",
        },
    },
    "seeds": [0],
    "device": "cpu",
}


def test_digits_end_to_end_label_stripped(tmp_path, monkeypatch):
    from test_ood_scores import run_recipe

    seen = []
    original = S.SDM.learn

    def spying_learn(self, session):
        assert session.eval_sets == {}, "eval sets reached the strategy"
        assert session.unlabeled is None or bool((session.unlabeled.targets == -1).all())
        seen.append(self.name)
        return original(self, session)

    monkeypatch.setattr(S.SDM, "learn", spying_learn)
    out = run_recipe(DIGITS, tmp_path)
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    assert len(seen) == 2
    res = {r.strategy: json.loads((r.run_dir / "results.json").read_text()) for r in out}
    m = {k: r["sessions"][0]["metrics"]["target"] for k, r in res.items()}
    info = res["sdm"]["sessions"][0]["strategy_info"]
    assert info["sdm_region_found"] is True and info["sdm_min_qbin"] > 0
    assert info["tau"] == 2.0 and "sdm_region" in info["tau_rule"]
    # in-domain unknown digits: the calibrated SDM score separates them well above chance (percent)
    assert m["sdm_calibrated"]["auroc"] > 75, m
    # the SDM region is selective: it rejects most unknowns and keeps a part of the knowns
    assert m["sdm"]["unk"] > 50 and m["sdm"]["os_star"] > 30, m["sdm"]


@pytest.mark.parametrize("params", [{}, {"score": "calibrated", "threshold": "source_quantile"}])
def test_state_dict_round_trip_through_torch_save_weights_only(params, tmp_path):
    """The checkpoint path (runner: ``torch.save`` of ``state_dict()``, ``torch.load(weights_only=True)``) gives a
    fresh strategy, without refitting, bit-identical logits and unknown scores on new inputs."""
    from openworld.scenarios.open_set import OpenSetScenario
    from openworld.strategies.base import OptimizerConfig, RunContext, TrainConfig

    scenario = OpenSetScenario(data={"source": "digits"}, known_classes=6, unknown_classes=[6, 7, 8, 9])

    def ctx():  # a fresh memo each time: the reloaded strategy cannot reuse the cached source model
        return RunContext(
            device=torch.device("cpu"), seed=0,
            scenario={"kind": "open_set", "num_classes": scenario.num_classes, "input_shape": scenario.input_shape,
                      "num_sessions": 1, "fingerprint": "test"},
            backbone={"name": "mlp", "hidden": [64], "out_features": 32},
            base=TrainConfig(epochs=4, batch_size=64, optimizer=OptimizerConfig("adam", 1e-2, 0.0, False, 0.0),
                             schedule="constant", selection="last"),
            progress=False, memo={},
        )

    det = S.SDM(k=50, **params)
    det.setup(ctx())
    session = scenario.session(0)
    det.ctx.start_session(0)
    det.learn(session.visible())
    path = tmp_path / "sdm.pt"
    torch.save({"strategy": det.state_dict()}, path)
    state = torch.load(path, map_location="cpu", weights_only=True)["strategy"]
    fresh = S.SDM(k=50, **params)
    fresh.setup(ctx())
    fresh.load_state_dict(state)
    target = session.eval_sets["target"].data  # inputs the detector was not fitted on
    xb = target.transforms.test(target.x)
    a, b = det.predict(xb), fresh.predict(xb)
    assert torch.equal(a.logits, b.logits)
    assert a.unknown_score.dtype == torch.float64 and torch.equal(a.unknown_score, b.unknown_score)
    assert fresh.tau_ == det.tau_ and fresh.stats["b_star"] == det.stats["b_star"]
    # the SDM intermediates too; the scores spread and the region decides both ways (the comparison is not vacuous)
    fa = S.sdm_predict(det.stats, det._features(xb), det._logits(xb))
    fb = S.sdm_predict(fresh.stats, fresh._features(xb), fresh._logits(xb))
    for key in fa:
        assert torch.equal(fa[key], fb[key]), key
    assert len(torch.unique(a.unknown_score)) > 10
    assert 0 < int(fa["accepted"].sum()) < len(xb)
