"""The ``target_known`` eval set of the open-set scenario, end to end through the runner (audit finding B).

A deterministic strategy (logits = the first |K| input features, fixed unknown score) on a small
synthetic vector source: ``target_known`` is scored by the classification engine over the known classes,
so its ``acc`` is the hand-computed closed-set accuracy on the known-class target samples (= the
``closed_acc`` of ``target``), and it is logged as ``eval/target_known/<metric>``.
"""

from __future__ import annotations

import json

import numpy as np
import torch

import openworld.metrics.open_set  # noqa: F401  (registers the "open_set" engine)
import openworld.scenarios.open_set  # noqa: F401
from openworld.config import validate_recipe
from openworld.data.sources import SourceData
from openworld.data.transforms import get_transforms
from openworld.data.views import TensorData
from openworld.registry import register_dataset, register_strategy
from openworld.runner import Runner
from openworld.strategies.base import Prediction, Strategy

N_PER_CLASS = 20


def _arrays():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(5), N_PER_CLASS)
    x = rng.normal(size=(len(y), 5)).astype(np.float32)
    x[np.arange(len(y)), y] += 0.8  # the true class's feature is larger more often than not
    return x, y


@register_dataset("tiny_vec_target_known_test")
def tiny_vec(root=None, download=False):
    x, y = _arrays()
    pair = get_transforms("vector")
    xt = torch.from_numpy(x)
    return SourceData("tiny_vec_target_known_test", TensorData(xt, y, pair, "tr"),
                      TensorData(xt.clone(), y, pair, "te"), classes=tuple("abcde"), family="vector")


@register_strategy("first_features_test")
class FirstFeatures(Strategy):
    """logits = x[:, :|K|] (no training); unknown score = −max logit."""

    name = "first_features_test"
    supports = frozenset({"open_set"})

    def learn(self, session) -> None:
        self.k = len(session.classes.seen)

    def predict(self, x):
        z = x[:, : self.k].double()
        return Prediction(logits=z, unknown_score=-z.max(1).values)

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = state["k"]


def test_target_known_metrics_equal_the_hand_computed_closed_accuracy(tmp_path):
    recipe = validate_recipe({
        "name": "target_known",
        "scenario": {"kind": "open_set", "data": {"source": "tiny_vec_target_known_test"},
                     "known_classes": [3, 0, 4], "unknown_classes": [1, 2], "target_per_class": 15},
        "backbone": {"name": "mlp"},
        "strategies": {"first_features_test": {}},
        "seeds": [0],
        "device": "cpu",
    })
    out = Runner(recipe, out=tmp_path, progress=False, stream=open(tmp_path / "log.txt", "w")).run()
    assert [r.status for r in out] == ["finished"], [r.reason for r in out]
    res = json.loads((out[0].run_dir / "results.json").read_text())
    m = res["sessions"][0]["metrics"]

    # by hand: the target set is the test split, the first 15 per class; known 3→0, 0→1, 4→2
    x, y = _arrays()
    rows = np.concatenate([np.flatnonzero(y == c)[:15] for c in (3, 0, 4)])
    local = np.array([1, -1, -1, 0, 2])[y[rows]]
    pred = x[rows][:, :3].argmax(1)  # over the known classes only
    acc = float((pred == local).mean())
    per_class = [float((pred[local == k] == k).mean()) for k in range(3)]

    tk = m["target_known"]
    assert abs(tk["acc"] - 100 * acc) < 1e-9
    assert abs(tk["acc_balanced"] - 100 * np.mean(per_class)) < 1e-9
    assert abs(tk["acc"] - m["target"]["closed_acc"]) < 1e-9  # the same quantity, from the target set
    assert 0 < acc < 1
    np.testing.assert_allclose(res["sessions"][0]["per_class_acc"]["target_known"], [100 * p for p in per_class])
    cm = np.asarray(res["sessions"][0]["confusion"]["target_known"])
    assert cm.shape == (3, 3) and cm.sum() == 45 and cm.trace() == int(round(acc * 45))
    assert res["summary"]["target_known/acc"] == tk["acc"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out[0].run_dir), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    assert "eval/target_known/acc" in tags and "eval/target/closed_acc" in tags and "eval/source_val/acc" in tags
    assert abs(ea.Scalars("eval/target_known/acc")[0].value - 100 * acc) < 1e-4
