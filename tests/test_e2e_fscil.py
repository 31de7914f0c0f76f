"""TEEN and its baselines end to end: outcomes that mean something, on real and card-synthetic data.

TEEN's claim (paper Fig. 1, card §2): novel-class samples of a prototype classifier are mostly
misclassified *into base classes*; calibrating novel prototypes toward base prototypes reduces that
bias. Fine-tuning on the few shots forgets the base classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from openworld.config import load_recipe
from openworld.runner import Runner

ROOT = Path(__file__).resolve().parents[1]


def run_recipe(name: str, tmp_path, overrides=(), strategies=None, seeds=None) -> dict[str, list[dict]]:
    recipe = load_recipe(ROOT / "scenarios" / name, list(overrides))
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = Runner(
        recipe, out=tmp_path, progress=False, strategies=strategies, seeds=seeds, stream=open(tmp_path / "log.txt", "w")
    ).run()
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    return {f"{r.strategy}/{r.seed}": json.loads((r.run_dir / "results.json").read_text())["sessions"] for r in out}


def series(sessions, key):
    return [s["metrics"]["test"][key] for s in sessions]


def novel_to_base_rate(sessions, base: int) -> list[float]:
    """Per session ≥ 1: % of novel-class test samples predicted as a base class."""
    rates = []
    for s in sessions[1:]:
        cm = s["confusion"]["test"]
        novel = range(base, len(cm))
        rates.append(100 * sum(sum(cm[c][:base]) for c in novel) / sum(sum(cm[c]) for c in novel))
    return rates


def test_quickstart_digits_teen_reduces_base_bias_and_finetune_forgets(tmp_path):
    runs = run_recipe("quickstart.yaml", tmp_path)
    teen, ncm, ft = runs["teen/0"], runs["ncm/0"], runs["finetune/0"]
    # One shared base model: identical session 0 for the two prototype classifiers.
    assert teen[0]["metrics"]["test"] == ncm[0]["metrics"]["test"]
    assert teen[0]["metrics"]["test"]["acc"] > 90
    t_rate, n_rate = novel_to_base_rate(teen, 5), novel_to_base_rate(ncm, 5)
    assert all(t <= n for t, n in zip(t_rate, n_rate)), (t_rate, n_rate)
    assert sum(t_rate) < sum(n_rate)
    # Prototype classifiers keep the base classes; naive fine-tuning on 5 shots forgets them.
    assert min(series(teen, "acc_base")) > 90 and min(series(ncm, "acc_base")) > 90
    assert series(ft, "acc_base")[-1] < 40
    assert series(teen, "acc")[-1] > series(ft, "acc")[-1] + 20


def test_synth_smoke_matches_the_cards_expected_pattern(tmp_path):
    """Card fscil-teen §9 acceptance on `fscil_synth_smoke`: TEEN (β>0) has higher novel accuracy and
    HM than β=0 at most sessions, base accuracy lower by at most a few points; finetune collapses."""
    runs = run_recipe("fscil_synth_smoke.yaml", tmp_path)
    ncm, teen, teen5, ft = runs["ncm/0"], runs["teen/0"], runs["teen_b05/0"], runs["finetune/0"]
    assert 80 < ncm[0]["metrics"]["test"]["acc"] < 97  # card: acc0 ≈ 89
    sessions = range(1, len(ncm))
    for better in (teen, teen5):
        nov_wins = sum(
            better[i]["metrics"]["test"]["acc_novel"] > ncm[i]["metrics"]["test"]["acc_novel"] for i in sessions
        )
        hm_wins = sum(better[i]["metrics"]["test"]["hm"] > ncm[i]["metrics"]["test"]["hm"] for i in sessions)
        assert nov_wins >= 6 and hm_wins >= 6, (nov_wins, hm_wins)
    base_drop = [ncm[i]["metrics"]["test"]["acc_base"] - teen[i]["metrics"]["test"]["acc_base"] for i in sessions]
    assert max(base_drop) < 3.0
    assert sum(novel_to_base_rate(teen5, 60)) < sum(novel_to_base_rate(teen, 60)) < sum(novel_to_base_rate(ncm, 60))
    assert ft[-1]["metrics"]["test"]["acc"] < 0.5 * ncm[-1]["metrics"]["test"]["acc"]


@pytest.mark.slow
def test_omniglot_small_real_data(tmp_path, shared_data):
    """The shared Omniglot subset, the full small recipe, one seed (about 2 minutes on 2 cores)."""
    runs = run_recipe(
        "fscil_omniglot_small.yaml",
        tmp_path,
        [f"scenario.data.root={shared_data}"],
        strategies=["teen", "ncm", "finetune"],
        seeds=[1],
    )
    teen, ncm, ft = runs["teen/1"], runs["ncm/1"], runs["finetune/1"]
    t_rate, n_rate = novel_to_base_rate(teen, 142), novel_to_base_rate(ncm, 142)
    assert all(t <= n for t, n in zip(t_rate, n_rate)) and sum(t_rate) < sum(n_rate)
    assert sum(series(teen, "acc_novel")[1:]) > sum(series(ncm, "acc_novel")[1:])
    assert series(teen, "acc")[-1] > 2 * series(ft, "acc")[-1]


def test_joint_upper_bound_keeps_base_classes_and_resumes(tmp_path):
    overrides = ["base.epochs=6", "strategies={joint: {}, finetune: {epochs: 5, lr: 0.01}}"]
    runs = run_recipe("quickstart.yaml", tmp_path / "a", overrides)
    joint, ft = runs["joint/0"], runs["finetune/0"]
    # Session 0 of both is the shared base model with its learned cosine rows.
    assert joint[0]["metrics"]["test"] == ft[0]["metrics"]["test"]
    # Retraining on base data ∪ shots keeps the base classes; fine-tuning on shots alone does not.
    assert series(joint, "acc_base")[-1] > series(ft, "acc_base")[-1] + 30
    # Resume mid-stream: joint rebuilds its data of earlier sessions and gives the same numbers.
    recipe = load_recipe(ROOT / "scenarios" / "quickstart.yaml", overrides)
    log = open(tmp_path / "log.txt", "w")  # noqa: SIM115
    with pytest.raises(KeyboardInterrupt):
        Runner(recipe, out=tmp_path / "b", progress=False, strategies=["joint"], stream=log, stop_after_session=2).run()
    resumed = Runner(recipe, out=tmp_path / "b", progress=False, strategies=["joint"], stream=log, resume=True).run()
    got = json.loads((resumed[0].run_dir / "results.json").read_text())["sessions"]
    strip = lambda ss: [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in ss]  # noqa: E731
    assert strip(got) == strip(joint)
