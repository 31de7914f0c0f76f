"""DA-FSOS episodes (``protocol: dafsos``, specs/open-set.md §3.2), the ``osda_cnn`` backbone and the
detectors' ``head: linear`` source model (card §7 reference networks).

In-domain scikit-learn digits (train split = "source", hashed 1/3 test split = "target"), a small MLP:
fast and deterministic on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import openworld.metrics.open_set  # noqa: F401  (registers the "open_set" engine)
import openworld.scenarios.open_set  # noqa: F401
import openworld.strategies.detectors  # noqa: F401
from openworld.config import load_recipe
from openworld.models import create_backbone
from openworld.models.heads import LinearClassifier
from openworld.registry import STRATEGIES
from openworld.runner import Runner
from openworld.scenarios.open_set import OpenSetScenario, episode_summary, meta_test_episode, meta_train_episode
from openworld.strategies.base import OptimizerConfig, RunContext, TrainConfig

EPISODE = {
    "protocol": "dafsos",
    "data": {"source": "digits"},
    "meta_train_classes": 5,
    "n_way": 3,
    "n_unknown": 2,
    "shots": 2,
    "queries": 5,
    "episodes": 4,
}


def dafsos(**kw):
    return OpenSetScenario(**{**EPISODE, **kw})


def make_ctx(scenario, memo, seed=0, backbone=None):
    return RunContext(
        device=torch.device("cpu"),
        seed=seed,
        scenario={
            "kind": "open_set",
            "num_classes": scenario.num_classes,
            "input_shape": scenario.input_shape,
            "num_sessions": scenario.num_sessions,
            "fingerprint": "test",
        },
        backbone=backbone or {"name": "mlp", "hidden": [64], "out_features": 32},
        base=TrainConfig(
            epochs=8,
            batch_size=64,
            optimizer=OptimizerConfig("adam", 1e-2, 0.0, False, 0.0),
            schedule="constant",
            selection="last",
        ),
        progress=False,
        memo=memo,
    )


# -- episodes ---------------------------------------------------------------------------------------------
def test_dafsos_episode_layout_and_hidden_labels():
    sc = dafsos()
    assert sc.num_sessions == 4 and sc.num_classes == 5  # max(N + M, n_train)
    plan = sc._build()
    assert plan["meta_train"] == [0, 1, 2, 3, 4] and plan["meta_test"] == [5, 6, 7, 8, 9]
    t_labels = plan["t_data"].targets.numpy()
    draws = set()
    for i, s in enumerate(sc.sessions()):
        ep = sc.episode(i)
        assert set(ep["known"]) | set(ep["unknown"]) <= {5, 6, 7, 8, 9}
        assert len(ep["known"]) == 3 and len(ep["unknown"]) == 2 and not set(ep["known"]) & set(ep["unknown"])
        assert not set(ep["support"]) & set(ep["query"])
        assert list(t_labels[ep["support"]]) == [c for c in ep["known"] for _ in range(2)]
        draws.add(tuple(ep["known"]))
        assert s.classes.seen == (0, 1, 2) and s.validation is None
        assert sorted(s.labeled.targets.tolist()) == [0, 0, 1, 1, 2, 2]
        assert list(s.eval_sets) == ["episodes"]  # card §8: DA-FSOS has `episodes` only (no target_known)
        q = s.eval_sets["episodes"]
        assert q.task == "open_set" and q.options["known_classes"] == [0, 1, 2]
        assert q.options["unknown_classes"] == [3, 4] and len(q.data) == 25
        assert np.bincount(q.data.targets.numpy(), minlength=5).tolist() == [5] * 5
        assert set(s.info["source"].targets.tolist()) == {0, 1, 2, 3, 4}
        assert s.info["num_source_classes"] == 5 and s.info["protocol"] == "dafsos"
        assert set(s.info["target_train"].targets.tolist()) <= {0, 1, 2, 3, 4}
        v = s.visible()
        assert (v.unlabeled.targets == -1).all() and v.eval_sets == {}
    assert len(draws) > 1  # episodes differ
    # deterministic; seed + episode is the RNG
    again = dafsos().episode(2)
    np.testing.assert_array_equal(again["query"], sc.episode(2)["query"])
    shifted = dafsos(seed=1).episode(1)
    np.testing.assert_array_equal(shifted["support"], sc.episode(2)["support"])
    d = sc.describe()
    assert d["sizes"]["episodes"] == 4 and d["meta_test_classes"] == [5, 6, 7, 8, 9]
    assert d["episodes_query_hash"] == dafsos().describe()["episodes_query_hash"]


def test_dafsos_source_support_shots_and_errors():
    s = dafsos(source_support_shots=1, data={"source": "digits"}).session(0)
    assert sorted(s.labeled.targets.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="meta_train_classes"):
        OpenSetScenario(protocol="dafsos", data={"source": "digits"}).session(0)
    with pytest.raises(ValueError, match="n_way"):
        dafsos(n_way=4).session(0)
    with pytest.raises(ValueError, match="shots \\+ queries"):
        dafsos(queries=500).session(0)
    with pytest.raises(ValueError, match="corruptions"):
        dafsos(corruptions=["clean"]).session(0)


def test_meta_test_episode_function():
    labels = np.repeat(np.arange(6), 10)
    ep = meta_test_episode(labels, [2, 3, 4, 5], n_way=2, n_unknown=2, shots=3, queries=4, seed=7, episode=0)
    assert len(ep["support"]) == 6 and len(ep["query"]) == 16
    assert np.array_equal(ep["support_y"], [0, 0, 0, 1, 1, 1])
    assert np.array_equal(ep["query_y"], np.repeat([0, 1, 2, 3], 4))
    np.testing.assert_array_equal(labels[ep["query"]], np.repeat(np.r_[ep["known"], ep["unknown"]], 4))
    rng = np.random.Generator(np.random.PCG64(7))  # PCG64(seed + episode): classes first
    np.testing.assert_array_equal(ep["known"], np.array([2, 3, 4, 5])[rng.permutation(4)[:2]])


def test_meta_train_episode_is_bug_free():
    src = np.repeat(np.arange(10), 12)
    tgt = np.repeat(np.arange(10), 8)
    ep = meta_train_episode(src, tgt, range(10), cs=3, cq=2, ss=4, sd=1, qsk=2, qdk=3, qsu=2, qdu=1, seed=0, episode=5)
    cls = [set(ep[k]) for k in ("source_classes", "target_classes", "source_unknown_classes", "target_unknown_classes")]
    assert [len(c) for c in cls] == [3, 3, 2, 2] and len(set().union(*cls)) == 10  # pairwise disjoint
    for dom in ("source", "target"):
        assert not set(ep[f"{dom}_support"]) & set(ep[f"{dom}_query"])
    assert len(ep["source_support"]) == 12 and len(ep["target_support"]) == 3
    # known target queries: Qdk per class (the released code appended Qsk), unknown: Qdu per class, label −1
    assert (ep["target_query_y"] >= 0).sum() == 9 and (ep["target_query_y"] == -1).sum() == 2
    assert (ep["source_query_y"] >= 0).sum() == 6 and (ep["source_query_y"] == -1).sum() == 4
    assert set(tgt[ep["target_query"][ep["target_query_y"] == -1]]) == set(ep["target_unknown_classes"])
    with pytest.raises(ValueError, match="2·CS"):
        meta_train_episode(src, tgt, range(6), cs=3, cq=2, ss=1, sd=1, qsk=1, qdk=1, qsu=1, qdu=1, seed=0, episode=0)


def test_episode_summary_mean_and_ci95():
    sessions = [{"metrics": {"episodes": {"auroc": v, "closed_acc": 50.0}}} for v in (60.0, 70.0, 80.0, 90.0)]
    out = episode_summary(sessions)
    assert out["auroc"] == 75.0 and out["episodes"] == 4
    assert out["auroc_ci95"] == pytest.approx(1.96 * np.std([60, 70, 80, 90]) / 2)
    assert out["closed_acc_ci95"] == 0.0 and "hos" not in out


# -- detectors in episodes ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,params",
    [
        ("ncm_threshold", {}),
        ("energy", {"alignment": "adabn"}),
        ("mahalanobis", {}),
        ("ncm_threshold", {"alignment": "recenter"}),
    ],
)
def test_detectors_in_an_episode(name, params):
    sc, memo = dafsos(), {}
    strat = STRATEGIES.get(name)(threshold="target_otsu", **params)
    strat.setup(make_ctx(sc, memo))
    session = sc.session(1)
    strat.ctx.start_session(1)
    strat.learn(session.visible())
    assert strat.ep_protos.shape == (3, 32) and strat.net_classes == 5
    q = session.eval_sets["episodes"].data
    pred = strat.predict(q.transforms.test(q.x))
    assert pred.logits.shape == (25, 3)
    known = q.targets < 3
    assert (pred.logits.argmax(1)[known] == q.targets[known]).float().mean() > 0.6  # support prototypes classify
    s = strat.tau_ - pred.unknown_score
    assert strat.tau_ == pytest.approx(openworld.metrics.open_set.threshold_otsu(s))
    # the next episode starts from the unadapted source model and its own support
    strat.learn(sc.session(2).visible())
    state = strat.state_dict()
    fresh = STRATEGIES.get(name)(threshold="target_otsu", **params)
    fresh.setup(make_ctx(sc, memo))
    fresh.load_state_dict(state)
    xb = q.transforms.test(q.x[:8])
    torch.testing.assert_close(fresh.predict(xb).unknown_score, strat.predict(xb).unknown_score)


def test_episode_needs_a_target_threshold():
    sc = dafsos()
    strat = STRATEGIES.get("msp")()
    strat.setup(make_ctx(sc, {}))
    with pytest.raises(ValueError, match="source_quantile"):
        strat.learn(sc.session(0).visible())


def test_dafsos_through_the_runner(tmp_path):
    recipe = {
        "name": "dafsos_digits_in_domain",
        "scenario": {"kind": "open_set", **EPISODE, "episodes": 6},
        "backbone": {"name": "mlp", "hidden": [64], "out_features": 32},
        "base": {
            "epochs": 8,
            "batch_size": 64,
            "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
            "schedule": "constant",
            "selection": "last",
        },
        "strategies": {
            "ncm_threshold": {"threshold": "target_otsu"},
            "energy_adabn": {"strategy": "energy", "threshold": "target_gmm", "alignment": "adabn", "head": "linear"},
        },
        "seeds": [0],
        "device": "cpu",
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = Runner(load_recipe(path), out=tmp_path, progress=False, stream=open(tmp_path / "log.txt", "w")).run()
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    for r in out:
        res = json.loads((r.run_dir / "results.json").read_text())
        assert len(res["sessions"]) == 6
        summ = episode_summary(res["sessions"])
        assert summ["closed_acc"] > 70 and summ["auroc"] > 60, (r.strategy, summ)
        assert 0 <= summ["auroc_ci95"] < 20
        # the runner's summary is the mean over episodes with the card's interval ...
        for key in ("closed_acc", "auroc", "hos"):
            assert res["summary"][f"episodes/{key}"] == pytest.approx(summ[key], abs=1e-9)
            assert res["summary"][f"episodes/{key}_ci95"] == pytest.approx(summ[f"{key}_ci95"], abs=1e-9)
        assert res["summary"]["episodes"] == 6
        # ... and only the last episode's checkpoint is kept
        assert sorted(p.name for p in (r.run_dir / "checkpoints").iterdir()) == ["session_5.pt"]
    table = (tmp_path / "log.txt").read_text()
    assert "Means over episodes" in table and "episodes/hos" in table


# -- the card's reference CNN and the linear head ------------------------------------------------------------
def test_osda_cnn_matches_the_card_networks():
    mnist = create_backbone("osda_cnn", in_channels=1, input_size=(1, 28, 28), widths=[32, 64])
    assert mnist.fc[0].in_features == 3136 and mnist.out_features == 128
    cifar = create_backbone("osda_cnn", in_channels=3, input_size=(3, 32, 32), widths=[32, 64, 128])
    assert cifar.fc[0].in_features == 2048
    x = torch.randn(4, 3, 32, 32)
    cifar.eval()
    stages = cifar.stages(x)
    assert [tuple(t.shape[1:]) for t in stages] == [(32, 16, 16), (64, 8, 8), (128, 4, 4), (128,)]
    torch.testing.assert_close(stages[-1], cifar(x))
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in cifar.modules()) == 1
    with pytest.raises(ValueError, match="too small"):
        create_backbone("osda_cnn", in_channels=1, input_size=(1, 4, 4), widths=[8, 8, 8])


def test_linear_head_source_model_is_shared_and_unbounded():
    sc = OpenSetScenario(data={"source": "digits"}, known_classes=6, unknown_classes=[6, 7, 8, 9])
    memo = {}
    session = sc.session(0)

    def fit(name, **kw):
        st = STRATEGIES.get(name)(head="linear", **kw)
        st.setup(make_ctx(sc, memo))
        st.ctx.start_session(0)
        st.learn(session.visible())
        return st

    e, m = fit("energy"), fit("msp", alignment="adabn")
    assert isinstance(e.net.head, LinearClassifier)
    assert len(memo) == 1  # one linear training, shared by both detectors
    x = session.eval_sets["target"].data
    xb = x.transforms.test(x.x[:64])
    z = e.predict(xb).logits
    with torch.no_grad():  # ordinary linear logits W·f + b (not T·cos)
        torch.testing.assert_close(z, e.net.head.fc(e.net.encoder(xb))[:, :6])
    s = openworld.metrics.open_set.energy_score(z)
    torch.testing.assert_close(e.predict(xb).unknown_score, e.tau_ - s.double())
    assert not torch.equal(m.predict(xb).logits, z)  # AdaBN changed the copy, not the shared model
    torch.testing.assert_close(fit("energy").predict(xb).logits, z)
    fresh = STRATEGIES.get("energy")(head="linear")
    fresh.setup(make_ctx(sc, memo))
    fresh.load_state_dict(e.state_dict())
    torch.testing.assert_close(fresh.predict(xb).logits, z)
    with pytest.raises(ValueError, match="head"):
        STRATEGIES.get("energy")(head="mlp")
    with pytest.raises(ValueError, match="base: null"):
        STRATEGIES.get("energy")(head="linear", base="teen")
