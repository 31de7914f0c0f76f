"""Loki (Roberts et al., NeurIPS 2023): Fréchet-mean decoding over a label metric, and the label metrics.

* Oracle fixtures (tests/fixtures/loki, the official code): tree squared distances, the negative Fréchet
  variances and their argmax over observed + unobserved classes, the ESD of those predictions.
* Hand-computed values for every pure function; validation messages.
* The tree property of the card: on a tree whose leaves are the classes, an unobserved leaf is never chosen.
* End to end on scikit-learn digits (FSCIL 5 base + 5 × 1-way): Loki predicts classes the frozen network never
  trained on, the argmax of the same network cannot; the ESD from stored confusions equals the ESD of the
  predictions; resume gives the same numbers; ``learn`` sees only the label-stripped session.
* Slow (``-m slow``): the recipe's setting on Omniglot, one seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import openworld.strategies.baselines  # noqa: F401  (registers ncm)
import openworld.strategies.loki  # noqa: F401  (registers loki)
from openworld.config import load_recipe
from openworld.data.views import batches
from openworld.metrics.label_metric import (
    euclidean_distances,
    expected_squared_distance,
    expected_squared_distance_from_confusion,
    hierarchy_distances,
)
from openworld.registry import STRATEGIES
from openworld.runner import Runner
from openworld.strategies.loki import Loki, class_paths, frechet_scores, run_esd

FIX = Path(__file__).parent / "fixtures" / "loki"
ROOT = Path(__file__).resolve().parents[1]


def oracle() -> dict:
    return json.loads((FIX / "loki_oracle.json").read_text())


def t64(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# oracle fixtures
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["two_level", "ragged"])
def test_tree_metric_decoding_and_esd_match_official(case):
    c = oracle()[case]
    dist = hierarchy_distances([tuple(p) for p in c["paths"]])
    torch.testing.assert_close(dist.pow(2), t64(c["sq_dist"]), rtol=0, atol=1e-12)
    n = c["num_observed"]
    scores = frechet_scores(t64(c["probs"]), dist[:n].pow(2))
    torch.testing.assert_close(scores, t64(c["scores"]), rtol=1e-6, atol=1e-12)
    pred = scores.argmax(1)
    assert pred.tolist() == c["pred"]
    esd = expected_squared_distance(pred, torch.tensor(c["target"]), dist)
    assert float(esd) == pytest.approx(c["esd_tree"], rel=1e-12)
    assert float(esd) == pytest.approx(c["esd_msd"], rel=1e-6)  # torchmetrics' float32 accumulator


def test_euclidean_metric_decoding_predicts_unobserved_classes_as_official():
    c = oracle()["euclidean"]
    dist = euclidean_distances(t64(c["embeddings"]))
    torch.testing.assert_close(dist, t64(c["dist"]), rtol=1e-6, atol=1e-12)
    n = c["num_observed"]
    scores = frechet_scores(t64(c["probs"]), dist[:n].pow(2))
    torch.testing.assert_close(scores, t64(c["scores"]), rtol=1e-6, atol=1e-12)
    pred = scores.argmax(1)
    assert pred.tolist() == c["pred"]
    assert max(c["pred"]) >= n  # the case exercises classes the classifier never saw
    esd = expected_squared_distance(pred, torch.tensor(c["target"]), dist)
    assert float(esd) == pytest.approx(c["esd_msd"], rel=1e-6)


# ------------------------------------------------------------------------------------------------
# hand-computed values
# ------------------------------------------------------------------------------------------------
def test_hierarchy_distances_hand_values():
    d = hierarchy_distances([("A", "x"), ("A", "y"), ("B", "z")])
    assert d.tolist() == [[0.0, 2.0, 4.0], [2.0, 0.0, 4.0], [4.0, 4.0, 0.0]]
    # ragged: root→a→b (depth 2) and root→c (depth 1) meet at the root: 2 + 1 = 3
    assert hierarchy_distances([("a", "b"), ("c",)]).tolist() == [[0.0, 3.0], [3.0, 0.0]]
    assert class_paths(["Greek/character03", "Latin/character01"]) == [("Greek", "character03"),
                                                                       ("Latin", "character01")]


@pytest.mark.parametrize("paths, message", [
    ([("A", "x"), ("A", "x")], "hierarchy_distances: two classes share the path ('A', 'x')"),
    ([("A",), ("A", "x")], "hierarchy_distances: class path ('A',) is an inner node of another class's path"),
    ([()], "hierarchy_distances: every class needs a non-empty path from the root"),
])
def test_hierarchy_distances_rejects_non_trees(paths, message):
    with pytest.raises(ValueError) as err:
        hierarchy_distances(paths)
    assert str(err.value) == message


def test_euclidean_and_esd_hand_values():
    assert euclidean_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]])).tolist() == [[0.0, 5.0], [5.0, 0.0]]
    d = t64([[0, 2, 4], [2, 0, 4], [4, 4, 0]])
    # predictions 0, 1, 2 for labels 0, 0, 2: (0 + 2² + 0) / 3
    esd = expected_squared_distance(torch.tensor([0, 1, 2]), torch.tensor([0, 0, 2]), d)
    assert float(esd) == pytest.approx(4 / 3, abs=1e-15)
    cm = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 1]])  # rows = true class
    assert float(expected_squared_distance_from_confusion(cm, d)) == pytest.approx(4 / 3, abs=1e-15)
    # one prediction of class 2 for a label 0 and one of class 0 for a label 1: (16 + 4) / 2
    cm2 = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 0, 0]])
    assert float(expected_squared_distance_from_confusion(cm2, d)) == 10.0


def test_esd_validation_messages():
    d = t64([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=r"class ids outside 0\.\.1"):
        expected_squared_distance(torch.tensor([2]), torch.tensor([0]), d)
    with pytest.raises(ValueError, match="the confusion matrix is empty"):
        expected_squared_distance_from_confusion(torch.zeros(2, 2), d)
    with pytest.raises(ValueError, match=r"confusion \(3, 3\) and metric \(2, 2\) differ"):
        expected_squared_distance_from_confusion(torch.ones(3, 3), d)


def test_frechet_mean_picks_the_unseen_class_between_two_seen_ones():
    # classes on a line at 0 (seen), 2 (seen), 1 (never trained on); p = (½, ½) over the seen two
    pos = t64([[0.0], [2.0], [1.0]])
    sq = euclidean_distances(pos)[:2].pow(2)  # [[0, 4, 1], [4, 0, 1]]
    s = frechet_scores(t64([[0.5, 0.5], [0.9, 0.1]]), sq)
    # row 0: −(½·[0,4,1] + ½·[4,0,1]) = [−2, −2, −1] → class 2; row 1: −[0.4, 3.6, 1] → class 0
    torch.testing.assert_close(s, t64([[-2.0, -2.0, -1.0], [-0.4, -3.6, -1.0]]), rtol=0, atol=1e-15)
    assert s.argmax(1).tolist() == [2, 0]


def test_tree_metric_never_predicts_an_unobserved_leaf():
    # two alphabets of 4 characters; the classifier saw characters 0, 1 of each (ids 0, 1, 4, 5)
    paths = [(a, f"c{i}") for a in ("A", "B") for i in range(4)]
    d = hierarchy_distances(paths)
    observed = [0, 1, 4, 5]
    p = torch.softmax(4 * torch.randn(500, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64), 1)
    pred = frechet_scores(p, d[observed].pow(2)).argmax(1)
    assert set(pred.tolist()) <= set(observed)


@pytest.mark.parametrize("kwargs, message", [
    ({"metric": "wordnet"}, "loki: metric must be one of prototypes, hierarchy; got 'wordnet'"),
    ({"decode": "mode"}, "loki: decode must be one of frechet, argmax; got 'mode'"),
    ({"temperature": 0}, "loki: temperature must be positive, got 0"),
    ({"base": "loki"}, "loki: base must name the classifier strategy to decode, not loki itself"),
])
def test_parameters_are_validated(kwargs, message):
    with pytest.raises(ValueError) as err:
        Loki(**kwargs)
    assert str(err.value) == message


def test_hierarchy_needs_levelled_names():
    with pytest.raises(ValueError, match="metric 'hierarchy': needs class names with the separator '/'"):
        class_paths(["0", "1", "2"])


# ------------------------------------------------------------------------------------------------
# runs on digits
# ------------------------------------------------------------------------------------------------
def recipe(strategies: dict, seeds=(1,)) -> dict:
    return {
        "name": "loki_digits",
        "scenario": {"kind": "fscil", "data": {"source": "digits"}, "base_classes": 5, "ways": 1, "shots": 5},
        "backbone": {"name": "cnn8", "width": 16},
        "base": {"epochs": 15, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
        "strategies": strategies,
        "seeds": list(seeds),
        "device": "cpu",
    }


def make_runner(tmp_path: Path, cfg: dict, **kwargs) -> Runner:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Runner(load_recipe(path), out=tmp_path / "runs", progress=False, tensorboard=False, threads=1,
                  stream=open(tmp_path / "log.txt", "a"), cache_dir=tmp_path / "cache", **kwargs)


def run(tmp_path: Path, cfg: dict, **kwargs) -> dict:
    return {r.strategy: r for r in make_runner(tmp_path, cfg, **kwargs).run()}


def res(r) -> dict:
    return json.loads((r.run_dir / "results.json").read_text())


def test_digits_loki_predicts_classes_the_network_never_trained_on(tmp_path):
    runs = run(tmp_path, recipe({"loki": {}, "loki_argmax": {"strategy": "loki", "decode": "argmax"}}))
    assert all(r.status == "finished" for r in runs.values()), {k: r.reason for k, r in runs.items()}
    loki, argmax = res(runs["loki"]), res(runs["loki_argmax"])
    last_l, last_a = loki["sessions"][-1], argmax["sessions"][-1]
    # the frozen network scores only the 5 base classes: its argmax never names a new class
    assert last_a["metrics"]["test"]["acc_novel"] == 0.0
    assert last_l["metrics"]["test"]["acc_novel"] > 5.0, last_l["metrics"]["test"]
    assert last_l["metrics"]["test"]["acc"] > last_a["metrics"]["test"]["acc"]
    assert last_l["strategy_info"] == {"num_observed": 5, "num_candidates": 10, "metric": "prototypes"}
    # ESD from the stored confusions = ESD of the predictions themselves (the prototype metric of the loki run)
    esd_l = run_esd(runs["loki"].run_dir, runs["loki"].run_dir, metric="prototypes")
    esd_a = run_esd(runs["loki_argmax"].run_dir, runs["loki"].run_dir, metric="prototypes")
    assert len(esd_l) == len(loki["sessions"]) == 6
    state = torch.load(runs["loki"].run_dir / "checkpoints" / "session_5.pt", weights_only=True)["strategy"]
    runner = make_runner(tmp_path, recipe({"loki": {}}))
    session = list(runner.scenario(1).sessions())[-1]
    test = session.eval_sets["test"].data
    from openworld.strategies.base import RunContext, TrainConfig

    ctx = RunContext(device="cpu", seed=1, scenario={"kind": "fscil", "num_classes": 10, "input_shape": (1, 8, 8),
                                                     "num_sessions": 6},
                     backbone={"name": "cnn8", "width": 16}, base=TrainConfig.from_dict({}), progress=False)
    s = Loki()
    s.setup(ctx)
    s.load_state_dict(state)
    preds, ys = [], []
    for xb, yb in batches(test, 256, device="cpu"):
        preds.append(s.predict(xb).logits.argmax(1))
        ys.append(yb)
    pred, y = torch.cat(preds), torch.cat(ys)
    direct = expected_squared_distance(pred, y, euclidean_distances(state["prototypes"]))
    assert esd_l[-1] == pytest.approx(float(direct), rel=1e-12)
    assert float((pred == y).double().mean() * 100) == pytest.approx(last_l["metrics"]["test"]["acc"], abs=1e-9)
    assert esd_l[-1] < esd_a[-1]


def test_resume_gives_the_same_numbers(tmp_path):
    cfg = recipe({"loki": {}, "loki_teen": {"strategy": "loki", "base": "teen"}})
    cfg["base"]["epochs"] = 3
    ref = run(tmp_path / "a", cfg)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", cfg, stop_after_session=2)
    got = run(tmp_path / "b", cfg, resume=True)
    for name in ("loki", "loki_teen"):
        assert got[name].status == "finished", got[name].reason
        strip = [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in res(ref[name])["sessions"]]
        again = [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in res(got[name])["sessions"]]
        assert again == strip
        assert res(got[name])["summary"] == res(ref[name])["summary"]


def test_learn_sees_only_the_label_stripped_session(tmp_path, monkeypatch):
    cls = STRATEGIES.get("loki")
    original = cls.learn
    seen = []

    def checked(self, session):
        assert session.eval_sets == {}, "eval sets reached the strategy"
        if session.unlabeled is not None and len(session.unlabeled):
            assert bool((session.unlabeled.targets == -1).all()), "unlabelled targets reached the strategy"
        seen.append(session.index)
        return original(self, session)

    monkeypatch.setattr(cls, "learn", checked)
    cfg = recipe({"loki": {}})
    cfg["base"]["epochs"] = 1
    assert run(tmp_path, cfg)["loki"].status == "finished"
    assert seen == [0, 1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------------------------
# slow: the recipe's setting on Omniglot (one seed)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_omniglot_recipe_loki_beats_argmax_on_new_classes(tmp_path, shared_data):
    cfg = yaml.safe_load((ROOT / "scenarios" / "loki_omniglot_small.yaml").read_text())
    cfg["scenario"]["data"]["root"] = str(shared_data)
    cfg["seeds"] = [1]
    runs = run(tmp_path, cfg)
    assert all(r.status == "finished" for r in runs.values()), {k: r.reason for k, r in runs.items()}
    last = {k: res(r)["sessions"][-1]["metrics"]["test"] for k, r in runs.items()}
    assert last["loki_argmax"]["acc_novel"] == 0.0 and last["loki_hierarchy"]["acc_novel"] == 0.0
    assert last["loki"]["acc_novel"] > 5.0 and last["loki"]["acc"] > last["loki_argmax"]["acc"]
    tree = {k: run_esd(r.run_dir, runs["loki"].run_dir, metric="hierarchy")[-1] for k, r in runs.items()}
    assert tree["loki"] < tree["loki_argmax"]
