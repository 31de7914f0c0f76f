"""Active GCD (issue 16 item 1): the budgeted label-query handle of the ``active_gcd`` scenario, the label firewall
(``query()`` is the only path for a hidden label), the selection rules and the stable label mapping (hand-computed
vectors and the official code's outputs in ``tests/fixtures/active_gcd``), and an end-to-end run on digits."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

import openworld.scenarios.active_gcd  # noqa: F401 (registers the scenario until the entry point exists)
import openworld.strategies.active_gcd  # noqa: F401
from openworld.config import load_recipe
from openworld.runner import Runner
from openworld.scenarios.active_gcd import ActiveGCDScenario, LabelQuery, QueryError
from openworld.strategies.active_gcd import (
    ActiveGCD,
    adaptive_novel_margin_select,
    entropy_select,
    random_select,
    round_lr_schedule,
    stable_label_mapping,
)

FIXTURE = Path(__file__).parent / "fixtures" / "active_gcd" / "oracle.json"
FAST = {"epochs": 2, "batch_size": 64, "proj_hidden": 64, "proj_dim": 32, "finetune": "all", "round_epochs": 1}
RECIPE = {
    "name": "agcd_tiny",
    "scenario": {"kind": "active_gcd", "data": {"source": "digits"}, "rounds": 2, "budget": 20},
    "backbone": {"name": "cnn8"},
    "strategies": {"active_gcd": FAST, "active_gcd_random": FAST, "active_gcd_entropy": FAST},
    "seeds": [0],
    "device": "cpu",
}


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_recipe(tmp_path: Path, strategies: list[str], recipe: dict = RECIPE):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runner = Runner(load_recipe(path), out=tmp_path / "runs", progress=False, stream=open(tmp_path / "log.txt", "a"),
                    strategies=strategies, threads=1, cache_dir=tmp_path / "cache")
    return runner.run()


def results(run) -> dict:
    return json.loads((run.run_dir / "results.json").read_text())


def hidden_labels() -> torch.Tensor:
    """The true D_U labels, read on the test side from the plain gcd scenario (same split)."""
    from openworld.scenarios.discovery import GCDScenario

    return GCDScenario(data={"source": "digits"}).session(0).unlabeled.targets


# ------------------------------------------------------------------------------------------------
# The query handle
# ------------------------------------------------------------------------------------------------
def test_label_query_is_budgeted_logged_and_answers_only_the_rows_asked():
    labels = torch.tensor([4, 1, 3, 0, 2, 2])
    excluded = {5}
    q = LabelQuery(labels, budget=3, round_index=1, excluded=excluded)
    assert q([2, 0]).tolist() == [3, 4]
    assert (q.used, q.remaining) == (2, 1)
    with pytest.raises(QueryError, match="over budget"):
        q([1, 3])
    with pytest.raises(QueryError, match="already queried"):
        q([0])
    with pytest.raises(QueryError, match="already queried"):
        q([5])  # revealed in an earlier round
    with pytest.raises(QueryError, match="twice"):
        q([1, 1])
    with pytest.raises(QueryError, match="rows must lie"):
        q([6])
    assert q([3]).tolist() == [0]
    assert q.record() == {"round": 1, "budget": 3, "indices": [2, 0, 3], "num_queried": 3, "num_queried_total": 4}
    q.close()
    assert excluded == {5, 2, 0, 3}
    with pytest.raises(QueryError, match="closed"):
        q([])
    assert "4" not in repr(q) and "labels" not in repr(q)
    with pytest.raises(TypeError):
        pickle.dumps(q)


def test_scenario_rounds_budget_zero_then_b_and_handles_close():
    sc = ActiveGCDScenario(data={"source": "digits"}, rounds=2, budget=5)
    seen = []
    for s in sc.sessions():
        q = s.info["label_query"]
        seen.append((s.index, s.name, q.budget, s.info["num_queried_before"]))
        if s.index == 0:
            with pytest.raises(QueryError, match="over budget"):
                q([0])
        else:
            q(list(range(5 * (s.index - 1), 5 * s.index)))
        prev = q
    assert seen == [(0, "round_0", 0, 0), (1, "round_1", 5, 0), (2, "round_2", 5, 5)]
    with pytest.raises(QueryError, match="closed"):
        prev([20])
    assert sc.num_sessions == 3 and sc.describe()["rounds"] == 2


# ------------------------------------------------------------------------------------------------
# Selection rules and mapping: hand-computed vectors
# ------------------------------------------------------------------------------------------------
PROBS = torch.tensor([
    [0.10, 0.80, 0.10],  # id 10: pred 1, margin 0.70
    [0.20, 0.50, 0.30],  # id 11: pred 1, margin 0.20
    [0.10, 0.30, 0.60],  # id 12: pred 2, margin 0.30
    [0.70, 0.20, 0.10],  # id 13: pred 0 (old), margin 0.50
    [0.05, 0.05, 0.90],  # id 14: pred 2, margin 0.85
    [0.40, 0.45, 0.15],  # id 15: pred 1, margin 0.05
], dtype=torch.float64)
POOL = torch.arange(10, 16)


@pytest.mark.parametrize("n, rd, expected, fill", [
    (2, 1, [10, 14], 0),  # round < adaptive_round: confident first; one per novel cluster, cluster 1 first
    (2, 2, [15, 12], 0),  # from adaptive_round on: smallest margin first
    (5, 2, [15, 11, 12, 14, 10], 0),  # quota ⌊5/2⌋ = 2 per cluster, then the next predicted-novel row
    (6, 2, [15, 11, 10, 12, 14, 13], 1),  # quota 3: every predicted-novel row (5), then one predicted-old row
])
def test_adaptive_novel_margin_by_hand(n, rd, expected, fill):
    chosen, n_fill = adaptive_novel_margin_select(PROBS, POOL, n, 1, 2, rd, 2)
    assert chosen.tolist() == expected and n_fill == fill


def test_entropy_random_and_mapping_by_hand():
    # entropies: 11 → 1.0297, 15 → 1.0104, 12 → 0.8979, …
    assert entropy_select(PROBS, POOL, 2).tolist() == [11, 15]
    assert random_select(POOL, 3, 7).tolist() == np.random.RandomState(7).choice(np.arange(10, 16), 3, False).tolist()
    preds, targets = torch.tensor([0, 0, 1, 2, 2, 1, 0]), torch.tensor([1, 1, 2, 0, 0, 2, 2])
    assert stable_label_mapping(preds, targets, 3).tolist() == [2, 0, 1]  # class 1 → column 0, 2 → 1, 0 → 2


def test_selection_and_mapping_match_the_official_code():
    oracle = json.loads(FIXTURE.read_text())
    for case in oracle["selection"]:
        probs, pool, n = torch.tensor(case["probs"], dtype=torch.float64), torch.tensor(case["pool"]), case["n"]
        for rd in (1, 2, 3):
            chosen, fill = adaptive_novel_margin_select(probs, pool, n, case["num_old"], case["num_new"], rd, 2)
            assert chosen.tolist() == case[f"adaptive_round{rd}"] and fill == 0
        assert entropy_select(probs, pool, n).tolist() == case["entropy"]
        assert random_select(pool, n, 7).tolist() == case["random_seed7"]
    for m in oracle["mapping"]:
        got = stable_label_mapping(torch.tensor(m["preds"]), torch.tensor(m["targets"]), m["K"])
        assert got.tolist() == m["mapping"]


# ------------------------------------------------------------------------------------------------
# Firewall and end-to-end
# ------------------------------------------------------------------------------------------------
def test_query_is_the_only_label_path(tmp_path, monkeypatch, one_thread):
    truth = hidden_labels()
    got: dict[int, tuple[list[int], list[int]]] = {}
    original_learn = ActiveGCD.learn

    def spying_learn(self, session):
        assert session.eval_sets == {} and session.oracle is None
        assert bool((session.unlabeled.targets == -1).all()), "unlabelled targets reached the strategy"
        assert session.unlabeled.origin[1] is None and session.labeled.origin[1] is None  # no link to the source
        for key, value in session.info.items():  # nothing label-bearing besides the handle
            if key != "label_query":
                assert not isinstance(value, (torch.Tensor, np.ndarray)), key
        handle = session.info["label_query"]
        assert set(dir(handle)) & {"labels", "targets"} == set()
        real = handle.__call__
        asked = []

        class Spy:  # records what the strategy receives through the handle
            budget, round = handle.budget, handle.round

            def __call__(self, rows):
                labels = real(rows)
                asked.append((torch.as_tensor(rows).tolist(), labels.tolist()))
                return labels

        session.info["label_query"] = Spy()
        try:
            return original_learn(self, session)
        finally:
            session.info["label_query"] = handle
            got[session.index] = asked

    monkeypatch.setattr(ActiveGCD, "learn", spying_learn)
    (run,) = run_recipe(tmp_path, ["active_gcd"])
    assert run.status == "finished"
    res = results(run)
    assert [s["queries"]["num_queried_total"] for s in res["sessions"]] == [0, 20, 40]
    all_rows = []
    for s in res["sessions"]:
        rows = s["queries"]["indices"]
        if s["index"] == 0:
            assert rows == [] and got[0] == []
            continue
        ((asked, labels),) = got[s["index"]]  # one call per round, logged as asked
        assert asked == rows and labels == truth[rows].tolist()
        all_rows += rows
    assert len(set(all_rows)) == 40


def test_over_budget_query_fails_the_run(tmp_path, monkeypatch, one_thread):
    def greedy_select(self, session, n, r):
        return torch.arange(n + 1)

    monkeypatch.setattr(ActiveGCD, "_select", greedy_select)
    (run,) = run_recipe(tmp_path, ["active_gcd"])
    assert run.status == "failed"
    assert "over budget" in results(run)["reason"]


def test_queried_labels_improve_discovery_on_digits(tmp_path, one_thread):
    # round_lr 0.01 and 40 labels a round: at the official lr 0.1 with 20 a round, the first 1-epoch round
    # knocked this tiny model below round 0 on one CPU (All 64.9 -> 33.4 -> 50.9) while another CPU's kernels
    # passed; docs/results/issue16_active_gcd.md measures the same lr effect. Here: 64.9 -> 74.6 / 70.6.
    slow = {**FAST, "round_lr": 0.01}
    recipe = {**RECIPE, "scenario": {**RECIPE["scenario"], "budget": 40},
              "strategies": {"active_gcd": slow, "active_gcd_random": slow}}
    runs = {r.strategy: results(r) for r in run_recipe(tmp_path, ["active_gcd", "active_gcd_random"], recipe)}
    for res in runs.values():
        assert [s["name"] for s in res["sessions"]] == ["round_0", "round_1", "round_2"]
        acc = [s["metrics"]["test"]["all_v2"] for s in res["sessions"]]
        assert acc[-1] > acc[0] + 4, acc  # 80 queried labels (8 % of D_U) lift All accuracy after round 2
    # round 0 is the same SimGCD for both (same seed): only the selection differs afterwards
    assert runs["active_gcd"]["sessions"][0]["metrics"] == runs["active_gcd_random"]["sessions"][0]["metrics"]
    assert runs["active_gcd"]["sessions"][1]["queries"] != runs["active_gcd_random"]["sessions"][1]["queries"]


# ------------------------------------------------------------------------------------------------
# Per-round learning rate (round_lr)
# ------------------------------------------------------------------------------------------------
def test_round_lr_schedule_by_hand():
    # cosine over the epochs of a round, from the round's lr towards 1e-3 of it (stepped per epoch)
    assert round_lr_schedule(0.1, 1e-3, 1) == [0.1]
    two = round_lr_schedule(0.01, 1e-3, 2)
    assert two[0] == 0.01 and two[1] == pytest.approx(1e-5 + (0.01 - 1e-5) / 2, rel=1e-12)  # 0.005005
    four = round_lr_schedule(0.1, 1e-3, 4)
    assert four == pytest.approx([0.1, 1e-4 + 0.0999 * (1 + 2**-0.5) / 2, 0.05005, 1e-4 + 0.0999 * (1 - 2**-0.5) / 2],
                                 rel=1e-12)


@pytest.mark.parametrize("bad", [0, -0.01, float("nan"), float("inf"), "0.01", True])
def test_round_lr_is_validated(bad, tmp_path):
    with pytest.raises(ValueError, match="round_lr must be a finite float > 0"):
        ActiveGCD(round_lr=bad)
    recipe = {**RECIPE, "strategies": {"active_gcd": {**FAST, "round_lr": bad}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"strategies\.active_gcd\.round_lr"):
        load_recipe(path)


def test_round_lr_defaults_to_lr_and_reaches_the_optimiser(tmp_path, monkeypatch, one_thread):
    assert ActiveGCD().round_lr is None and ActiveGCD(round_lr=0.01).round_lr == 0.01
    seen: list[tuple[int, list[float]]] = []
    in_round = []
    original = ActiveGCD._train_round

    def spying_round(self, session, r):
        in_round.append(r)
        try:
            return original(self, session, r)
        finally:
            in_round.pop()

    def pre_step(opt, args, kwargs):  # the lr each SGD step of a query round really uses
        if in_round:
            seen.append((in_round[-1], sorted({g["lr"] for g in opt.param_groups})))

    monkeypatch.setattr(ActiveGCD, "_train_round", spying_round)
    handle = register_optimizer_step_pre_hook(pre_step)
    try:
        params = {**FAST, "round_epochs": 2, "round_lr": 0.01}
        (run,) = run_recipe(tmp_path, ["active_gcd"], {**RECIPE, "strategies": {"active_gcd": params}})
    finally:
        handle.remove()
    assert run.status == "finished"
    for r in (1, 2):
        lrs = [lr for rr, lr in seen if rr == r]
        assert all(len(lr) == 1 for lr in lrs)  # both parameter groups share the lr
        assert sorted({lr[0] for lr in lrs}) == sorted(round_lr_schedule(0.01, 1e-3, 2))  # not the round-0 lr 0.1
        assert lrs[0] == [0.01] and lrs[-1] == [round_lr_schedule(0.01, 1e-3, 2)[1]]
