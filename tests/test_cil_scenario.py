"""Scenario `cil` (card cil-ovor §1): class orders (V4), task layout, sessions and eval sets,
the accuracy-matrix metrics (V3), the heat map, and an end-to-end run on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import openworld.scenarios.class_incremental  # noqa: F401  (registers `cil`)
from openworld.config import validate_recipe
from openworld.metrics import average_accuracy, forgetting
from openworld.plots import acc_matrix_image, acc_matrix_table
from openworld.registry import SCENARIOS
from openworld.runner import Runner
from openworld.scenarios.class_incremental import ClassIncrementalScenario, cil_class_order, task_layout

# --------------------------------------------------------------------------------------------------
# V4 — class orders
# --------------------------------------------------------------------------------------------------
CIFAR_TASK0 = {
    1: [53, 37, 65, 51, 4, 20, 38, 9, 10, 81],
    2: [0, 76, 61, 63, 1, 71, 2, 6, 16, 19],
    3: [35, 41, 45, 4, 76, 12, 0, 64, 42, 11],
    4: [73, 86, 82, 23, 1, 42, 57, 40, 76, 69],
}
IMAGENET_R_TASK0 = {
    1: [33, 146, 79, 19, 23, 131, 12, 187, 174, 32, 86, 123, 109, 171, 42, 170, 179, 31, 36, 10],
    2: [51, 94, 55, 35, 170, 177, 20, 85, 50, 36, 30, 76, 5, 136, 182, 82, 25, 169, 166, 178],
    3: [158, 62, 14, 69, 47, 137, 110, 6, 116, 88, 130, 100, 118, 67, 79, 56, 142, 199, 36, 12],
    4: [136, 126, 189, 51, 145, 98, 0, 68, 40, 4, 83, 82, 112, 196, 53, 16, 8, 148, 180, 139],
}


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_class_order_first_task_matches_card(seed):
    assert cil_class_order(100, seed)[:10] == CIFAR_TASK0[seed]
    assert cil_class_order(200, seed)[:20] == IMAGENET_R_TASK0[seed]


def test_class_order_seed0_natural_and_seed1_task1():
    assert cil_class_order(100, 0) == list(range(100))
    assert cil_class_order(200, 0)[:20] == list(range(20))
    assert cil_class_order(100, 1)[10:20] == [44, 36, 84, 50, 96, 90, 66, 16, 80, 33]
    assert cil_class_order(100, 3, "natural") == list(range(100))
    state = __import__("random").getstate()
    cil_class_order(100, 2)
    assert __import__("random").getstate() == state  # the global stream is left alone
    with pytest.raises(ValueError, match="class_order"):
        cil_class_order(10, 1, "numpy")


def test_task_layout():
    assert task_layout(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert task_layout(10, 3, first_task_classes=4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="do not split into num_tasks 3"):
        task_layout(10, 3)
    with pytest.raises(ValueError, match="first_task_classes 5 = 5 do not split into 2"):
        task_layout(10, 3, first_task_classes=5)


# --------------------------------------------------------------------------------------------------
# Sessions (scikit-learn's digits: real, embedded)
# --------------------------------------------------------------------------------------------------
def test_registered():
    assert SCENARIOS.get("cil") is ClassIncrementalScenario


@pytest.mark.parametrize("seed", [0, 3])
def test_sessions_on_digits(seed):
    sc = ClassIncrementalScenario(data={"source": "digits"}, num_tasks=5, seed=seed, task_aware=True)
    order = sc.class_order_list
    assert order == cil_class_order(10, seed)
    src = sc.source
    sessions = list(sc.sessions())
    assert len(sessions) == sc.num_sessions == 5
    for t, s in enumerate(sessions):
        new = list(range(2 * t, 2 * t + 2))
        assert list(s.classes.new) == new and list(s.classes.seen) == list(range(2 * t + 2))
        assert sorted(torch.unique(s.labeled.targets).tolist()) == new  # only the task's classes
        # the relabelled targets are the original ones through the order
        orig = [order[c] for c in new]
        assert len(s.labeled) == int(np.isin(src.train.targets.numpy(), orig).sum())
        test = s.eval_sets["test"]
        assert test.options["tasks"] == [list(range(2 * j, 2 * j + 2)) for j in range(t + 1)]
        assert test.classes == tuple(range(2 * t + 2))
        assert sorted(torch.unique(test.data.targets).tolist()) == list(range(2 * t + 2))
        assert len(test.data) == int(np.isin(src.test.targets.numpy(), [order[c] for c in range(2 * t + 2)]).sum())
        til = [k for k in s.eval_sets if k.startswith("til_")]
        assert til == [f"til_{j:02d}" for j in range(t + 1)]
        assert s.eval_sets[f"til_{t:02d}"].classes == tuple(new)
        vis = s.visible()
        assert vis.eval_sets == {}
    d = sc.describe()
    json.dumps(d)
    assert d["class_order"] == order and d["num_sessions"] == 5 and len(d["task_test_sizes"]) == 5


def test_subsampling_and_first_task():
    sc = ClassIncrementalScenario(data={"source": "digits"}, num_tasks=4, first_task_classes=4,
                                  train_per_class=20, test_per_class=10)
    s0, s1 = sc.session(0), sc.session(1)
    assert list(s0.classes.new) == [0, 1, 2, 3] and list(s1.classes.new) == [4, 5]
    assert len(s0.labeled) == 80 and len(s1.eval_sets["test"].data) == 60
    again = ClassIncrementalScenario(data={"source": "digits"}, num_tasks=4, first_task_classes=4,
                                     train_per_class=20, test_per_class=10)
    assert torch.equal(again.session(2).labeled.x, sc.session(2).labeled.x)
    with pytest.raises(ValueError, match="scenario.num_tasks"):
        ClassIncrementalScenario(data={"source": "digits"}, num_tasks=0).session(0)



@pytest.mark.parametrize("seed", [0, 2])
def test_validation_split_is_held_out_training_data(seed):
    """eval_split=validation: per class test_per_class training images that no task trains on."""
    kw = dict(data={"source": "digits"}, num_tasks=5, train_per_class=30, test_per_class=12, seed=seed)
    val = ClassIncrementalScenario(eval_split="validation", **kw)
    test = ClassIncrementalScenario(**kw)
    src = val.source
    train_x = torch.cat([val.session(t).labeled.x for t in range(5)]).flatten(1)
    last_val = val.session(4).eval_sets["test"].data
    assert len(last_val) == 10 * 12
    assert torch.bincount(last_val.targets, minlength=10).tolist() == [12] * 10
    # every validation image is a training-split image, none of them trained on, none a test image
    train_pool = {tuple(r) for r in src.train.x.flatten(1).tolist()}
    trained = {tuple(r) for r in train_x.tolist()}
    val_rows = [tuple(r) for r in last_val.x.flatten(1).tolist()]
    assert all(r in train_pool for r in val_rows)
    assert not trained & set(val_rows)
    # the labels follow the class order like the test split's, and training data is unchanged
    assert sorted(torch.unique(val.session(1).eval_sets["test"].data.targets).tolist()) == [0, 1, 2, 3]
    assert torch.equal(val.session(3).labeled.x, test.session(3).labeled.x)
    assert val.describe()["eval_split"] == "validation" and test.describe()["eval_split"] == "test"
    # deterministic
    again = ClassIncrementalScenario(eval_split="validation", **kw)
    assert torch.equal(again.session(4).eval_sets["test"].data.x, last_val.x)


def test_validation_split_needs_training_subsample_and_room():
    from openworld.params import ConfigError

    with pytest.raises(ConfigError, match="eval_split.*train_per_class"):
        ClassIncrementalScenario.check_config({"num_tasks": 5, "eval_split": "validation"})
    too_many = ClassIncrementalScenario(data={"source": "digits"}, num_tasks=5, train_per_class=100,
                                        test_per_class=40, eval_split="validation")
    with pytest.raises(ConfigError, match="test_per_class.*left for validation"):
        too_many.session(0)
    with pytest.raises(ValueError, match="scenario.eval_split: allowed values are test, validation"):
        ClassIncrementalScenario(data={"source": "digits"}, num_tasks=5, eval_split="val").session(0)

# --------------------------------------------------------------------------------------------------
# V3 — A/F from the matrix; heat map
# --------------------------------------------------------------------------------------------------
def _lower(rows):
    T = len(rows)
    r = np.full((T, T), np.nan)
    for t, row in enumerate(rows):
        r[t, : len(row)] = row
    return r


@pytest.mark.parametrize(
    "rows, A, F",
    [
        ([[90], [80, 85], [70, 75, 88]], [90, 82.5, 77.666666667], [10, 15]),
        ([[60], [70, 80], [65, 70, 90]], [60, 75, 75], [-10, 7.5]),
        ([[50], [60, 70]], [50, 65], [-10]),
    ],
)
def test_card_v3_average_accuracy_and_forgetting(rows, A, F):
    r = _lower(rows)
    for t in range(len(rows)):
        assert average_accuracy(r[: t + 1, : t + 1]) == pytest.approx(A[t], abs=1e-6)
        if t:
            assert forgetting(r[: t + 1, : t + 1]) == pytest.approx(F[t - 1], abs=1e-6)


def test_forgetting_variants_first_last():
    r = _lower([[90], [80, 85], [70, 75, 88]])
    # Avalanche-style: a_{j,j} − a_{t,j}: ((90−70) + (85−75)) / 2
    assert forgetting(r, "first_last") == pytest.approx(15.0, abs=1e-6)


def test_heat_map_and_table():
    r = _lower([[90], [80, 85], [70, 75, 88]])
    img = acc_matrix_image(r)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 50
    assert img.std() > 0
    table = acc_matrix_table(r)
    assert table.splitlines()[3] == "| 1 | 80.00 | 85.00 |  |"
    with pytest.raises(ValueError, match="square"):
        acc_matrix_image(np.zeros((2, 3)))


# --------------------------------------------------------------------------------------------------
# End to end on real data: prototypes on a frozen encoder forget less than naive fine-tuning
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_e2e_digits_ncm_forgets_less_than_finetune(tmp_path):
    recipe = validate_recipe({
        "name": "cil_digits",
        "scenario": {"kind": "cil", "data": {"source": "digits"}, "num_tasks": 5},
        "backbone": {"name": "cnn8"},
        "base": {"epochs": 15, "batch_size": 64, "selection": "last",
                 "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4}},
        "strategies": {"ncm": {}, "finetune": {"epochs": 10, "lr": 0.05, "batch_size": 64}},
        "seeds": [0],
    })
    runs = Runner(recipe, out=tmp_path, progress=False, stream=open(tmp_path / "log.txt", "w")).run()
    assert [r.status for r in runs] == ["finished", "finished"]
    by = {r.strategy: r for r in runs}
    res = json.loads((by["ncm"].run_dir / "results.json").read_text())
    last = res["sessions"][-1]["metrics"]["test"]
    assert [f"task_{j:02d}/acc" in last for j in range(5)] == [True] * 5
    for key in ("avg_acc_tasks", "forgetting", "aia", "bwt"):
        assert key in res["summary"]
    ncm, ft = by["ncm"].summary, by["finetune"].summary
    # naive fine-tuning on 2 new classes overwrites the old ones (the last task dominates)
    assert ft["forgetting"] > 50.0
    assert ncm["forgetting"] < ft["forgetting"] - 20.0
    assert ncm["avg_acc_tasks"] > ft["avg_acc_tasks"] + 20.0


def test_e2e_ovor_pilot_thresholds_reach_results_json(tmp_path):
    recipe = validate_recipe({
        "name": "cil_digits_ovor",
        "scenario": {"kind": "cil", "data": {"source": "digits"}, "num_tasks": 2},
        "backbone": {"name": "vit", "img_size": 8, "patch_size": 4, "embed_dim": 16, "depth": 5, "num_heads": 2},
        "strategies": {"ovor": {"thresholds": "pilot", "epochs_regular": 1, "epochs_vor": 1, "batch_size": 64,
                                "knn_k": 5, "sample_from": 20, "select": 5, "num_per_class": 4}},
        "seeds": [0],
    })
    runs = Runner(recipe, out=tmp_path, progress=False, stream=open(tmp_path / "log.txt", "w")).run()
    assert [r.status for r in runs] == ["finished"], runs[0].reason
    res = json.loads((runs[0].run_dir / "results.json").read_text())
    info = [s["strategy_info"] for s in res["sessions"]]
    assert info[0]["thresholds"] == "pilot" and info[0]["tau_ood"] >= info[0]["tau_id"] + 1 - 1e-6
    assert info[0]["pilot"]["tau_id"] == info[0]["tau_id"]  # calibrated on task 0 ...
    assert (info[1]["tau_id"], info[1]["tau_ood"]) == (info[0]["tau_id"], info[0]["tau_ood"])  # ... then frozen
    assert 0.0 <= info[1]["last_vor_epoch"]["active_ood"] <= 1.0
