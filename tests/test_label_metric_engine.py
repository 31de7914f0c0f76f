"""Expected squared label distance in the classification engine (issue 16, Loki's measure): ``esd`` and
``esd_<group>`` from the counts with exact values, the checks on a label metric, its unit (not ×100), and the
runner's ``metrics.label_metric: hierarchy`` end to end (equal to ESD of the predictions themselves)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from openworld.compare import lower_is_better
from openworld.config import load_recipe
from openworld.data.sources import load_source
from openworld.metrics import MetricsEngine
from openworld.metrics.label_metric import (
    check_label_metric,
    class_paths,
    expected_squared_distance,
    hierarchy_distances,
    reported_value,
)
from openworld.registry import DATASETS, register_dataset
from openworld.runner import Runner, config_fingerprint

D = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])


def test_hand_values_and_groups():
    eng = MetricsEngine(3, groups={"base": [0, 1], "novel": [2]}, label_metric=D)
    # (y, ŷ): (0,0) 0, (0,2) 4, (1,0) 1, (2,2) 0, (2,1) 1, (2,0) 4
    eng.update(torch.tensor([0, 2, 0, 2, 1, 0]), torch.tensor([0, 0, 1, 2, 2, 2]))
    m = eng.compute()
    assert m["esd"] == pytest.approx(10 / 6, abs=1e-15)
    assert m["esd_base"] == pytest.approx(5 / 3, abs=1e-15)
    assert m["esd_novel"] == pytest.approx(5 / 3, abs=1e-15)
    assert list(m)[-3:] == ["esd", "esd_base", "esd_novel"]


def test_equals_the_functional_on_random_predictions():
    g = torch.Generator().manual_seed(0)
    paths = [(f"a{c % 3}", f"g{c % 2}", f"c{c}") for c in range(12)]
    d = hierarchy_distances(paths)
    y = torch.randint(0, 12, (1000,), generator=g)
    p = torch.where(torch.rand(1000, generator=g) < 0.5, y, torch.randint(0, 12, (1000,), generator=g))
    eng = MetricsEngine(12, label_metric=d)
    for a in range(0, 1000, 128):
        eng.update(p[a:a + 128], y[a:a + 128])
    assert eng.compute()["esd"] == pytest.approx(float(expected_squared_distance(p, y, d)), rel=1e-13)


def test_ignored_labels_do_not_count_and_outside_predictions_give_nan():
    eng = MetricsEngine(3, label_metric=D)
    eng.update(torch.tensor([2, 1]), torch.tensor([0, -1]))  # the ignored row does not count
    assert eng.compute()["esd"] == 4.0
    eng = MetricsEngine(3, label_metric=D)
    eng.update(torch.tensor([0, 7]), torch.tensor([0, 1]))  # no distance for a prediction outside 0…K-1
    assert math.isnan(eng.compute()["esd"])
    eng = MetricsEngine(3, label_metric=D)
    assert math.isnan(eng.compute()["esd"])  # no sample


def test_without_a_metric_nothing_changes():
    eng = MetricsEngine(3)
    eng.update(torch.tensor([0, 1]), torch.tensor([0, 2]))
    assert not any(k.startswith("esd") for k in eng.compute())


@pytest.mark.parametrize(("bad", "message"), [
    (torch.zeros(2, 2), r"must be a \[3, 3\] matrix"),
    (torch.tensor([[0.0, 1, 1], [2, 0, 1], [1, 1, 0]]), "symmetric"),
    (torch.tensor([[1.0, 1, 1], [1, 0, 1], [1, 1, 0]]), "zero diagonal"),
    (torch.tensor([[0.0, -1, 1], [-1, 0, 1], [1, 1, 0]]), "finite and ≥ 0"),
    (torch.tensor([[0.0, math.nan, 1], [math.nan, 0, 1], [1, 1, 0]]), "finite and ≥ 0"),
])
def test_metric_checks(bad, message):
    with pytest.raises(ValueError, match=message):
        check_label_metric(bad, 3)
    with pytest.raises(ValueError, match=message):
        MetricsEngine(3, label_metric=bad)


def test_units_and_direction():
    assert reported_value("esd", 4.5) == 4.5 and reported_value("esd_novel", 2.0) == 2.0
    assert reported_value("acc", 0.5) == 50.0 and reported_value("aurc", 0.25) == 25.0
    assert lower_is_better("test/esd") and lower_is_better("esd_novel") and lower_is_better("aurc")
    assert not lower_is_better("acc")


# ------------------------------------------------------------------------------------------------
# the runner: metrics.label_metric
# ------------------------------------------------------------------------------------------------
@register_dataset("digits_parity_tree")
def _digits_parity_tree(root=None, download=False, **options):
    """sklearn digits with class names "<even|odd>/<digit>": a two-level tree (d ∈ {0, 2, 4})."""
    src = load_source("digits", **options)
    names = tuple(f"{'odd' if int(c) % 2 else 'even'}/{c}" for c in src.classes)
    return dataclasses.replace(src, name="digits_parity_tree", classes=names)


def _recipe(tmp_path: Path, source: str, label_metric=None) -> Runner:
    cfg = {
        "name": "esd_digits",
        "scenario": {"kind": "fscil", "data": {"source": source}, "base_classes": 6, "ways": 2, "shots": 5},
        "backbone": {"name": "cnn8", "width": 8},
        "base": {"epochs": 2, "batch_size": 64},
        "strategies": {"ncm": {}},
        "seeds": [0],
        "device": "cpu",
    }
    if label_metric:
        cfg["metrics"] = {"label_metric": label_metric}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return Runner(load_recipe(path), out=tmp_path / "runs", progress=False, tensorboard=False, threads=1,
                  stream=open(tmp_path / "log.txt", "a"), cache_dir=tmp_path / "cache")


def test_runner_reports_esd_over_the_class_name_tree(tmp_path):
    assert "digits_parity_tree" in DATASETS
    (r,) = _recipe(tmp_path, "digits_parity_tree", "hierarchy").run()
    assert r.status == "finished", r.reason
    res = json.loads((r.run_dir / "results.json").read_text())
    assert res["splits"]["class_order"] == list(range(10))  # the fallback order: class id = digit
    names = [f"{'odd' if c % 2 else 'even'}/{c}" for c in range(10)]
    d = hierarchy_distances(class_paths(names))
    for s in res["sessions"]:
        test = s["metrics"]["test"]
        # the stored confusion covers the seen classes, ids 0…n−1 here: ESD rebuilt from it
        cm = torch.tensor(s["confusion"]["test"], dtype=torch.float64)
        n = len(cm)
        direct = float((cm * d[:n, :n].pow(2)).sum() / cm.sum())
        assert test["esd"] == pytest.approx(direct, rel=1e-12), s["index"]
        assert 0.0 <= test["esd"] <= 16.0  # not ×100
    assert res["config"]["metrics.label_metric"] == "hierarchy"


def test_runner_rejects_names_without_levels(tmp_path):
    (r,) = _recipe(tmp_path, "digits", "hierarchy").run()
    assert r.status == "failed"
    assert "metrics.label_metric 'hierarchy': needs class names with the separator '/'" in r.reason


def test_fingerprint_unchanged_when_the_new_keys_hold_their_defaults():
    old = {"name": "x", "metrics": {"topk": [5]}, "strategy_params": {"lr": 0.1}}
    new = {"name": "x", "metrics": {"topk": [5], "label_metric": None, "hierarchy_sep": "/"},
           "strategy_params": {"lr": 0.1, "round_lr": None}}
    assert config_fingerprint(old) == config_fingerprint(new)
    new["metrics"]["label_metric"] = "hierarchy"
    assert config_fingerprint(old) != config_fingerprint(new)
