"""``joint`` with ``data: full`` (card fscil-teen §2.1): the oracle that trains on all training images of
the seen classes. The full data of novel classes reaches only a strategy that asks for it
(``Strategy.uses_oracle_data``), through ``Session.oracle`` and ``Session.visible(oracle=True)``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openworld.config import load_recipe
from openworld.scenarios.fscil import FSCILScenario
from openworld.strategies.base import RunContext, Strategy, TrainConfig
from openworld.strategies.baselines import Finetune, Joint

ROOT = Path(__file__).resolve().parents[1]


def test_only_joint_full_asks_for_oracle_data():
    assert Strategy().uses_oracle_data() is False
    assert Finetune().uses_oracle_data() is False
    assert Joint().uses_oracle_data() is False and Joint().data == "shots"
    assert Joint(data="full").uses_oracle_data() is True
    assert Joint(data="full").get_params() == {"data": "full"}


def _setup(num_sessions: int = 3, epochs: int = 8):
    """The quickstart recipe (digits, 5 base classes, 1-way 5-shot, cnn8), shortened."""
    recipe = load_recipe(ROOT / "scenarios" / "quickstart.yaml", [f"base.epochs={epochs}"])
    params = recipe.scenario_params()
    params["num_sessions"] = num_sessions
    scenario = FSCILScenario(**params)
    memo: dict = {}  # shared, as in the runner: one base-model training for both variants

    def ctx():
        return RunContext(
            device=torch.device("cpu"),
            seed=0,
            scenario={"kind": "fscil", "num_classes": scenario.num_classes, "input_shape": scenario.input_shape,
                      "num_sessions": scenario.num_sessions, "fingerprint": "test_joint_oracle"},
            backbone=recipe.backbone.model_dump(),
            base=TrainConfig.from_dict(recipe.base.model_dump()),
            progress=False,
            memo=memo,
        )

    return scenario, ctx


def _novel_acc(strategy, session) -> float:
    ev = session.eval_sets["test"]
    x, y = ev.data.x, ev.data.targets
    if ev.data.transforms is not None:
        x = ev.data.transforms.test(x)
    with torch.no_grad():
        pred = strategy.predict(x).logits[:, list(ev.classes)].argmax(1)
    novel = y >= len(session.classes.base)
    return float((pred[novel] == y[novel]).float().mean())


def test_joint_full_trains_on_the_oracle_and_beats_shots(monkeypatch):
    scenario, make_ctx = _setup(num_sessions=3, epochs=4)
    tags: list[str] = []
    base_model = RunContext.base_model

    def spy(self, session=None, **kw):
        tags.append(kw.get("tag", "base"))
        if kw.get("data") is not None:
            tags.append(len(kw["data"]))
        return base_model(self, session, **kw)

    monkeypatch.setattr(RunContext, "base_model", spy)
    acc = {}
    for variant in ("shots", "full"):
        strategy = Joint(data=variant)
        ctx = make_ctx()
        strategy.setup(ctx)
        for session in scenario.sessions():
            ctx.start_session(session.index)
            strategy.learn(session.visible(oracle=strategy.uses_oracle_data()))  # as the runner does
        acc[variant] = _novel_acc(strategy, session)
    s0 = scenario.session(0)
    n_base = len(s0.labeled)
    n_full = [len(scenario.session(i).oracle) for i in (1, 2)]
    assert tags == [
        "base", "joint_1", n_base + 5, "joint_2", n_base + 10,  # shots: base ∪ 5 shots per session
        "base", "joint_full_1", n_base + n_full[0], "joint_full_2", n_base + sum(n_full),  # oracle: all images
    ]
    assert min(n_full) > 100  # digits: ~145 training images per class
    # novel accuracy at the last session (digits, 4 epochs: about 1.0 against 0.1)
    assert acc["full"] > 0.8 and acc["full"] > acc["shots"] + 0.3, acc


def test_joint_full_resume_rebuilds_the_oracle_union(monkeypatch):
    """--resume: restore_session gets the same visible(oracle=True) sessions, so the union matches."""
    scenario, make_ctx = _setup(num_sessions=3, epochs=1)
    sizes: list[int] = []
    base_model = RunContext.base_model

    def spy(self, session=None, **kw):
        if kw.get("data") is not None:
            sizes.append(len(kw["data"]))
        return base_model(self, session, **kw)

    monkeypatch.setattr(RunContext, "base_model", spy)
    sessions = [s.visible(oracle=True) for s in scenario.sessions()]
    strategy = Joint(data="full")
    ctx = make_ctx()
    strategy.setup(ctx)
    for s in sessions[:2]:
        strategy.restore_session(s)
    ctx.start_session(2)
    strategy.learn(sessions[2])
    assert sizes == [len(sessions[0].labeled) + len(sessions[1].oracle) + len(sessions[2].oracle)]


def test_joint_full_without_oracle_data_fails_clearly():
    scenario, make_ctx = _setup(num_sessions=2, epochs=1)
    strategy = Joint(data="full")
    ctx = make_ctx()
    strategy.setup(ctx)
    strategy.learn(scenario.session(0).visible())  # the base session needs no oracle data
    with pytest.raises(ValueError, match=r"visible\(oracle=True\)"):
        strategy.learn(scenario.session(1).visible())


def test_joint_data_is_validated():
    with pytest.raises(ValueError, match="'shots' or 'full'"):
        Joint(data="all").setup(None)
