"""Long-tail recipes end to end (card long-tail-sade-rcal §9): outcomes that mean something.

* Synthetic Gaussian features (R1, always run): the prior-corrected losses recover the tail classes
  that plain CE sacrifices; SADE is recorded as transductive and its α log is kept; the noisy-label
  run never lets a noisy label into the evaluation.
* Fashion-MNIST-LT (R2, real data): Balanced Softmax beats CE on the few-shot classes and on the
  backward-50 distribution.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import openworld.metrics.long_tail  # noqa: F401  (registers the "long_tail" engine)
import openworld.scenarios.long_tail  # noqa: F401
import openworld.strategies.long_tail_baselines  # noqa: F401
import openworld.strategies.rcal  # noqa: F401
import openworld.strategies.sade  # noqa: F401
from openworld.config import load_recipe
from openworld.runner import Runner

ROOT = Path(__file__).resolve().parents[1]

SYNTH = {
    "name": "lt_synth",
    "scenario": {
        "kind": "long_tail",
        "data": {"source": "synth_gauss", "train_per_class": 500, "test_per_class": 100, "mean_std": 0.3},
        "imbalance": 100,
        "val_per_class": 20,
        "test_distributions": ["forward50", "uniform", "backward50"],
    },
    "backbone": {"name": "mlp_experts"},
    "strategies": {
        "ce": {"epochs": 20},
        "balanced_softmax": {"epochs": 20},
        "logit_adjustment": {"epochs": 20},
        "sade": {"epochs": 20, "warmup_epochs": 1, "milestones": [16, 18]},
    },
    "seeds": [1],
    "device": "cpu",
}


def run(recipe_path: Path, tmp_path: Path, overrides=(), strategies=None) -> dict:
    recipe = load_recipe(recipe_path, list(overrides))
    out = Runner(recipe, out=tmp_path / "runs", progress=False, strategies=strategies, tensorboard=False,
                 stream=open(tmp_path / "log.txt", "w")).run()
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    return {r.strategy: (json.loads((r.run_dir / "results.json").read_text()), r.run_dir) for r in out}


def metric(res, dist, key):
    return res[0]["sessions"][0]["metrics"][dist][key]


def test_synthetic_prior_correction_and_sade(tmp_path):
    path = tmp_path / "lt_synth.yaml"
    path.write_text(yaml.safe_dump(SYNTH))
    runs = run(path, tmp_path)
    ce, bs, la, sade = runs["ce"], runs["balanced_softmax"], runs["logit_adjustment"], runs["sade"]
    for res in (bs, la):
        assert metric(res, "uniform", "few") > metric(ce, "uniform", "few") + 10
        assert metric(res, "backward50", "acc") > metric(ce, "backward50", "acc") + 10
    # SADE's balanced/backward experts lift the tail too (20 epochs: a smaller margin than BS/LA)
    assert metric(sade, "uniform", "few") > metric(ce, "uniform", "few") + 5
    assert metric(sade, "backward50", "acc") > metric(ce, "backward50", "acc") + 5
    assert metric(ce, "forward50", "acc") > metric(ce, "backward50", "acc") + 30  # CE favours the head
    assert sade[0]["transductive"] is True and ce[0]["transductive"] is False
    state = torch.load(sade[1] / "checkpoints" / "session_0.pt", weights_only=True)["strategy"]
    log = state["tta_log"]
    assert len(log) == 3 and all(abs(sum(t["alpha"]) - 1) < 1e-5 and 1 <= t["epochs"] <= 5 for t in log)
    splits = json.loads((sade[1] / "splits.json").read_text())
    assert splits["train_counts_clean"] == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]


def test_synthetic_noisy_labels_rcal(tmp_path):
    cfg = json.loads(json.dumps(SYNTH))
    cfg["scenario"].update(noise="imb", noise_rate=0.4, test_distributions=["uniform"])
    cfg["strategies"] = {"rcal": {"moco_epochs": 2, "moco_batch_size": 128, "moco_queue": 512, "epochs": 6},
                         "ce": {"epochs": 10}}
    path = tmp_path / "lt_noisy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runs = run(path, tmp_path)
    for res, run_dir in runs.values():
        splits = json.loads((run_dir / "splits.json").read_text())
        assert splits["num_flipped"] == int(0.4 * 1236) and len(splits["noisy_labels"]) == 1236
        cm = res["sessions"][0]["confusion"]["uniform"]
        assert [sum(row) for row in cm] == [100] * 10  # the clean, balanced test set
    assert 0 < metric(runs["rcal"], "uniform", "acc") <= 100


def test_sade_split_adaptation_diagnostics_and_opt_in_test_selection(tmp_path):
    cfg = json.loads(json.dumps(SYNTH))
    cfg["scenario"]["test_distributions"] = ["uniform", "backward50"]
    cfg["strategies"] = {
        "sade_split": {"strategy": "sade", "epochs": 6, "warmup_epochs": 1, "milestones": [4, 5], "tta": "split"},
        "ce_last": {"strategy": "ce", "epochs": 6, "checkpoint": "last"},
        "ce_test": {"strategy": "ce", "epochs": 6, "checkpoint": "test"},
    }
    path = tmp_path / "lt_opts.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runs = run(path, tmp_path)
    sade, sade_dir = runs["sade_split"]
    # tta: split — adapted on a seeded half of each set, scored on the other half only
    cm = sade["sessions"][0]["confusion"]["uniform"]
    assert sum(map(sum, cm)) == 500
    n_b50 = sum(map(sum, runs["ce_last"][0]["sessions"][0]["confusion"]["backward50"]))
    assert sum(map(sum, sade["sessions"][0]["confusion"]["backward50"])) == n_b50 - round(n_b50 / 2)
    log = torch.load(sade_dir / "checkpoints" / "session_0.pt", weights_only=True)["strategy"]["tta_log"]
    assert [t["n"] for t in log] == [500, round(n_b50 / 2)]
    # SADE's α and stop epoch are logged next to each set's metrics (card §5 tags)
    uni = sade["sessions"][0]["diagnostics"]["uniform"]
    assert uni["sade_alpha_1"] + uni["sade_alpha_2"] + uni["sade_alpha_3"] == pytest.approx(1, abs=1e-5)
    assert [uni[f"sade_alpha_{k}"] for k in (1, 2, 3)] == pytest.approx(log[0]["alpha"])
    assert uni["sade_tta_epochs"] == log[0]["epochs"]
    assert "diagnostics" not in runs["ce_last"][0]["sessions"][0]
    # checkpoint: test — opt-in selection on the (balanced) uniform test set, flagged in the results
    test_sel, test_dir = runs["ce_test"]
    assert "TEST set" in test_sel["warning"] and test_sel["flags"]["selection"] == "test"
    assert "warning" not in runs["ce_last"][0]
    chosen = torch.load(test_dir / "checkpoints" / "session_0.pt", weights_only=True)["strategy"]["selection"]
    assert metric(runs["ce_test"], "uniform", "acc") == pytest.approx(100 * chosen["best_val"], abs=1e-6)
    assert metric(runs["ce_test"], "uniform", "acc") >= metric(runs["ce_last"], "uniform", "acc") - 1e-9


@pytest.mark.slow
def test_fashion_lt_balanced_softmax_beats_ce_on_few(shared_data, tmp_path):
    overrides = [
        f"scenario.data.root={shared_data}",
        "scenario.test_distributions=[uniform,backward50]",
        "backbone.widths=[8,16,32]",
        "strategies.ce.epochs=4", "strategies.balanced_softmax.epochs=4",
        "seeds=[1]",
    ]
    runs = run(ROOT / "scenarios" / "lt_fashion_small.yaml", tmp_path, overrides, ["ce", "balanced_softmax"])
    ce, bs = runs["ce"], runs["balanced_softmax"]
    assert metric(bs, "uniform", "few") > metric(ce, "uniform", "few") + 10
    assert metric(bs, "backward50", "acc") > metric(ce, "backward50", "acc") + 5
    assert metric(ce, "uniform", "acc") > 50  # the CE network did learn (10 classes: chance is 10 %)
