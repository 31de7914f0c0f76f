"""Unknown detectors (msp, energy, mahalanobis, ncm_threshold): thresholds, AdaBN, wrapping, state.

A small in-domain open-set task on scikit-learn's digits (known 0–5, unknown 6–9; the digits' own
test split is the "target"), an MLP encoder, a few epochs: fast and deterministic on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import openworld.scenarios.open_set  # noqa: F401  (registers the scenario)
import openworld.strategies.detectors  # noqa: F401  (registers the detectors)
from openworld.metrics import open_set as osm
from openworld.registry import STRATEGIES
from openworld.scenarios.open_set import OpenSetScenario
from openworld.strategies.base import OptimizerConfig, RunContext, TrainConfig
from openworld.strategies.detectors import MahalanobisModel


@pytest.fixture(scope="module")
def scenario():
    return OpenSetScenario(data={"source": "digits"}, known_classes=6, unknown_classes=[6, 7, 8, 9])


@pytest.fixture(scope="module")
def memo():
    return {}


def make_ctx(scenario, memo, seed=0):
    return RunContext(
        device=torch.device("cpu"), seed=seed,
        scenario={"kind": "open_set", "num_classes": scenario.num_classes, "input_shape": scenario.input_shape,
                  "num_sessions": 1, "fingerprint": "test"},
        backbone={"name": "mlp", "hidden": [64], "out_features": 32},
        base=TrainConfig(epochs=8, batch_size=64, optimizer=OptimizerConfig("adam", 1e-2, 0.0, False, 0.0),
                         schedule="constant", selection="last"),
        progress=False, memo=memo,
    )


def fitted(name, scenario, memo, seed=0, **params):
    strat = STRATEGIES.get(name)(**params)
    strat.setup(make_ctx(scenario, memo, seed))
    session = scenario.session(0)
    strat.ctx.start_session(0)
    strat.learn(session.visible())
    return strat, session


def predict_all(strat, data):
    outs = [strat.predict(data.transforms.test(data.x[i:i + 128])) for i in range(0, len(data), 128)]
    return torch.cat([o.logits for o in outs]), torch.cat([o.unknown_score for o in outs])


@pytest.mark.parametrize("name", ["msp", "energy", "mahalanobis", "ncm_threshold"])
def test_detector_separates_unknown_digits_and_source_quantile_accepts_95pct(name, scenario, memo):
    strat, session = fitted(name, scenario, memo)
    target = session.eval_sets["target"].data
    logits, v = predict_all(strat, target)
    assert logits.shape[1] == 6 and v.dtype == torch.float64
    unknown = target.targets >= 6
    assert osm.auroc(v, unknown) > 0.75, name
    # τ = 5% quantile of the source-validation scores: ≥ 95% of source knowns accepted (v ≤ 0)
    _, v_val = predict_all(strat, session.validation)
    assert (v_val <= 0).float().mean() >= 0.95 - 1 / len(v_val)
    assert strat.tau_ is not None


def test_scores_are_tau_minus_s_and_deterministic(scenario, memo):
    a, session = fitted("energy", scenario, memo)
    b, _ = fitted("energy", scenario, {})  # retrained from scratch, same seed
    x = session.eval_sets["target"].data
    xb = x.transforms.test(x.x[:50])
    pa, pb = a.predict(xb), b.predict(xb)
    assert torch.equal(pa.unknown_score, pb.unknown_score)
    s = osm.energy_score(pa.logits)
    torch.testing.assert_close(pa.unknown_score, a.tau_ - s.double())


def test_target_threshold_rules_use_only_unlabelled_target(scenario, memo):
    strat, session = fitted("msp", scenario, memo, threshold="target_otsu")
    _, v = predict_all(strat, session.eval_sets["target"].data)
    s = strat.tau_ - v  # recovers s exactly
    assert strat.tau_ == pytest.approx(osm.threshold_otsu(s))
    strat2, _ = fitted("msp", scenario, memo, threshold="fixed", tau=0.9)
    assert strat2.tau_ == 0.9
    strat3, _ = fitted("msp", scenario, memo, threshold="reject_count", n_r=100)
    _, v3 = predict_all(strat3, session.eval_sets["target"].data)
    assert int((v3 > 0).sum()) >= 100


def test_adabn_keeps_source_statistics_for_the_detector(scenario, memo):
    plain, session = fitted("ncm_threshold", scenario, memo)
    ada, _ = fitted("ncm_threshold", scenario, memo, alignment="adabn")
    torch.testing.assert_close(plain.prototypes, ada.prototypes)  # fitted before the swap
    bn_plain = [m.running_mean for m in plain.net.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    bn_ada = [m.running_mean for m in ada.net.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bn_ada and not torch.allclose(bn_plain[0], bn_ada[0])
    assert ada.info_["adabn_layers"] == len(bn_ada)
    # the shared cached base model itself is untouched by AdaBN
    again, _ = fitted("ncm_threshold", scenario, memo)
    torch.testing.assert_close(again.prototypes, plain.prototypes)


def test_recenter_and_mahalanobis_options(scenario, memo):
    rc, session = fitted("ncm_threshold", scenario, memo, alignment="recenter")
    assert rc.center is not None
    _, v = predict_all(rc, session.eval_sets["target"].data)
    assert osm.auroc(v, session.eval_sets["target"].data.targets >= 6) > 0.7
    npred, _ = fitted("ncm_threshold", scenario, memo, alignment="recenter", ncm_pred=True)
    tgt = session.eval_sets["target"].data
    logits, v2 = predict_all(npred, tgt)
    known = tgt.targets < 6
    assert (logits.argmax(1)[known] == tgt.targets[known]).float().mean() > 0.9  # nearest re-centred prototype
    torch.testing.assert_close(v2, v)  # same detector score as without ncm_pred
    mp, _ = fitted("mahalanobis", scenario, memo, maha_pred=True)
    x = session.eval_sets["target"].data
    pred = mp.predict(x.transforms.test(x.x[:20]))
    torch.testing.assert_close(pred.unknown_score, mp.tau_ - pred.logits.double().max(1).values, atol=1e-3,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="recenter"):
        STRATEGIES.get("energy")(alignment="recenter")
    with pytest.raises(ValueError, match="tau"):
        STRATEGIES.get("msp")(threshold="fixed")
    with pytest.raises(ValueError, match="threshold"):
        STRATEGIES.get("msp")(threshold="best")
    with pytest.raises(ValueError, match="detector"):
        STRATEGIES.get("msp")(base="energy")


def test_wraps_teen_as_unknown_scorer(scenario, memo):
    strat, session = fitted("energy", scenario, memo, base="teen", base_params={"shift_weight": 0.0})
    teen = STRATEGIES.get("teen")(shift_weight=0.0)
    teen.setup(make_ctx(scenario, memo))
    teen.learn(session.visible())
    x = session.eval_sets["target"].data
    xb = x.transforms.test(x.x[:64])
    p, q = strat.predict(xb), teen.predict(xb)
    torch.testing.assert_close(p.logits, q.logits[:, :6])
    torch.testing.assert_close(p.unknown_score, strat.tau_ - osm.energy_score(q.logits[:, :6]).double())
    maha, _ = fitted("mahalanobis", scenario, memo, base="teen")  # features through teen.encode
    assert maha.predict(xb).unknown_score.shape == (64,)


@pytest.mark.parametrize("name,params", [("mahalanobis", {}), ("energy", {"base": "teen"}),
                                         ("ncm_threshold", {"alignment": "adabn"})])
def test_state_dict_round_trip(name, params, scenario, memo):
    strat, session = fitted(name, scenario, memo, **params)
    state = strat.state_dict()
    fresh = STRATEGIES.get(name)(**params)
    fresh.setup(make_ctx(scenario, memo))
    fresh.load_state_dict(state)
    x = session.eval_sets["target"].data
    xb = x.transforms.test(x.x[:32])
    a, b = strat.predict(xb), fresh.predict(xb)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.unknown_score, b.unknown_score)


def test_target_rules_need_unlabelled_data(scenario, memo):
    strat = STRATEGIES.get("msp")(alignment="adabn")
    strat.setup(make_ctx(scenario, memo))
    session = scenario.session(0)
    from dataclasses import replace

    with pytest.raises(ValueError, match="unlabelled target"):
        strat.learn(replace(session.visible(), unlabeled=None))


def test_mahalanobis_ridge_only_when_singular():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(40, 3)))
    y = torch.tensor([0] * 20 + [1] * 20)
    assert MahalanobisModel.fit(x, y, [0, 1]).ridge == 0.0
    x[:, 2] = 1.0  # a constant feature: Σ is singular
    m = MahalanobisModel.fit(x, y, [0, 1])
    assert m.ridge > 0 and torch.isfinite(m.score(x)).all()


def test_detector_forwards_its_base_strategys_protocol_flags():
    msp = STRATEGIES.get("msp")
    assert not msp().uses_oracle_data() and not msp().selects_on_test()
    assert not msp(base="joint").uses_oracle_data()
    assert msp(base="joint", base_params={"data": "full"}).uses_oracle_data()
    assert msp(base="teen", base_params={"session0_report": "max"}).selects_on_test() == STRATEGIES.get("teen")(
        session0_report="max").selects_on_test()


def test_detector_forwards_the_evaluation_set_name_to_its_base_strategy():
    # LADE picks its known test prior from the set's name; wrapped in a detector it must still see it
    class Recorder:
        names: list = []

        def begin_eval_set(self, name):
            self.names.append(name)

    det = STRATEGIES.get("msp")(base="lade")
    det.inner = None
    det.begin_eval_set("uniform")  # before learning there is no inner strategy: nothing to forward
    det.inner = Recorder()
    det.begin_eval_set("backward50")
    assert det.inner.names == ["backward50"]
