"""Trust guarantees of the runner, the CLI and compare (issue 12): a changed recipe never resumes
silently, non-finite outputs fail the run with a reason, sys.exit in a strategy stops only that run,
resume keeps the training curves, the thread count and CPU are recorded and pinned, the alternative
head is chosen by the accuracy the recipe reports, detectors record τ, and every std says which."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from openworld.config import ConfigError, load_recipe, validate_recipe
from openworld.runner import ResumeMismatchError, Runner

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
FAST = ["base.epochs=4", "strategies.finetune.epochs=3", "log_every=5"]


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def runner(tmp_path, overrides=(), **kwargs) -> Runner:
    recipe = load_recipe(QUICKSTART, list(FAST) + list(overrides))
    tmp_path.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return Runner(recipe, out=tmp_path / "runs", progress=False, stream=open(tmp_path / "log.txt", "a"), **kwargs)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def metrics_only(res: dict) -> list[dict]:
    return [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in res["sessions"]]


# -- resume compares the configuration (item 11) ---------------------------------------------------
def test_resume_refuses_a_changed_recipe_and_resumes_an_unchanged_one(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        runner(tmp_path, strategies=["ncm"], stop_after_session=1).run()
    run_dir = tmp_path / "runs" / "quickstart" / "ncm" / "seed0"
    assert results(run_dir)["config_fingerprint"]
    with pytest.raises(ResumeMismatchError) as err:
        runner(tmp_path, ["base.epochs=5"], strategies=["ncm"], resume=True).run()
    msg = str(err.value)
    assert "\n" not in msg and str(run_dir) in msg and "base.epochs: 4 → 5" in msg
    assert results(run_dir)["status"] == "running" and len(results(run_dir)["sessions"]) == 2  # untouched
    # where it writes and how often it logs cannot change the numbers: those resume
    done = runner(tmp_path, ["log_every=7"], strategies=["ncm"], resume=True).run()
    assert done[0].status == "finished"
    # a finished run is not skipped silently under another recipe either (re-issued sweeps)
    with pytest.raises(ResumeMismatchError):
        runner(tmp_path, ["strategies.ncm.shots_batch_size=64"], strategies=["ncm"], resume=True).run()


def test_resume_mismatch_is_one_line_exit_2_through_the_cli(tmp_path):
    cmd = [sys.executable, "-m", "openworld", "run", str(QUICKSTART), "--strategies", "ncm", "--out", str(tmp_path),
           "--no-progress"] + [a for f in FAST for a in ("--set", f)]
    assert subprocess.run(cmd + ["--stop-after-session", "0"], capture_output=True, text=True).returncode != 0
    changed = subprocess.run(cmd + ["--set", "base.epochs=3", "--resume"], capture_output=True, text=True)
    assert changed.returncode == 2, changed.stderr
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("openworld: error: --resume:") and "Traceback" not in changed.stderr


def test_rerun_without_resume_says_it_replaces_earlier_results(tmp_path):
    r = runner(tmp_path, strategies=["ncm"])
    r.run()
    r.run()
    log = (tmp_path / "log.txt").read_text()
    assert "replacing the earlier results in" in log and "ncm" in log


# -- failure isolation (items 1, 13) ---------------------------------------------------------------
PLUGIN = textwrap.dedent(
    """
    import sys
    import torch
    from openworld.strategies.base import Prediction, Strategy

    class NaNRows(Strategy):
        '''Predicts fine, except that the logits of every third test row are NaN.'''
        supports = frozenset({"fscil"})

        def learn(self, session):
            self.k = len(session.classes.seen)

        def predict(self, x):
            logits = torch.zeros(len(x), self.k)
            logits[::3] = float("nan")
            return Prediction(logits)

        def state_dict(self):
            return {"k": self.k}

    class Quitter(Strategy):
        '''Calls sys.exit while learning (as some research code does on a bad condition).'''
        supports = frozenset({"fscil"})

        def learn(self, session):
            sys.exit("bad condition")

        def predict(self, x):
            raise AssertionError

        def state_dict(self):
            return {}
    """
)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "trust_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))


def test_non_finite_logits_fail_that_run_with_strategy_set_and_row_count(tmp_path, plugin):
    out = runner(tmp_path, ["strategies={nanrows: {strategy: 'trust_plugin:NaNRows'}, ncm: {}}"]).run()
    status = {r.strategy: r for r in out}
    assert status["ncm"].status == "finished"
    bad = status["nanrows"]
    assert bad.status == "failed"
    res = results(bad.run_dir)
    assert res["status"] == "failed" and "NonFiniteError" in res["reason"]
    reason = res["reason"]
    assert "nanrows" in reason and "'test'" in reason and "logits" in reason
    # session 0: 300 test rows in batches of 256 + 44; every third row of a batch is NaN
    assert "in 101 of 300 rows" in reason, reason


def test_sys_exit_in_a_strategy_stops_only_that_run(tmp_path, plugin):
    out = runner(tmp_path, ["strategies={quitter: {strategy: 'trust_plugin:Quitter'}, ncm: {}}"]).run()
    assert [(r.strategy, r.status) for r in out] == [("quitter", "failed"), ("ncm", "finished")]
    assert "SystemExit" in out[0].reason and "bad condition" in out[0].reason


# -- resume keeps TensorBoard's training curves (item 13) -----------------------------------------
def test_resume_keeps_the_training_curves_exactly(tmp_path):
    every = ["log_every=1"]  # finetune trains every session: curves before and after the cut
    ref = runner(tmp_path / "ref", every, strategies=["finetune"]).run()[0]
    with pytest.raises(KeyboardInterrupt):
        runner(tmp_path / "cut", every, strategies=["finetune"], stop_after_session=2).run()
    cut = torch.load(resumed_ckpt := tmp_path / "cut" / "runs" / "quickstart" / "finetune" / "seed0" / "checkpoints"
                     / "session_2.pt", weights_only=True)["global_step"]
    assert resumed_ckpt.is_file()
    resumed = runner(tmp_path / "cut", every, strategies=["finetune"], resume=True).run()[0]
    a, b = scalars(ref.run_dir), scalars(resumed.run_dir)
    steps = [s for s, _ in a["train/loss"]]
    assert min(steps) <= cut < max(steps)  # points on both sides of the checkpoint
    assert a["train/loss"] == b["train/loss"] and a["train/lr"] == b["train/lr"]
    assert a["eval/test/acc"] == b["eval/test/acc"]
    assert [s for s, _ in b["eval/test/acc"]] == list(range(6))


def test_truncate_events_drops_what_came_after_the_checkpoint(tmp_path):
    from openworld.logging import TensorBoardLogger, truncate_events

    tb = TensorBoardLogger(tmp_path)
    for step in range(1, 21):
        tb.scalar("train/loss", float(step), step)
    for session in range(4):
        tb.scalar("eval/test/acc", 10.0 * session, session)
    tb.close()
    kept = truncate_events(tmp_path, session_start=2, train_step=12)
    assert kept == 12 + 2
    got = scalars(tmp_path)
    assert [s for s, _ in got["train/loss"]] == list(range(1, 13))
    assert [s for s, _ in got["eval/test/acc"]] == [0, 1]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    # the kept events are read first, before a new writer's file from the same second whose counter
    # sorts lower ("…10" < "…9"): TensorBoard orders a directory's files by name
    (kept_file,) = tmp_path.glob("events.out.tfevents.*")
    later = TensorBoardLogger(tmp_path)
    later.scalar("eval/test/acc", 20.0, 2)
    later.close()
    names = sorted(f.name for f in tmp_path.glob("events.out.tfevents.*"))
    assert len(names) == 2 and names[0] == kept_file.name
    assert [s for s, _ in scalars(tmp_path)["eval/test/acc"]] == [0, 1, 2]


# -- threads and CPU recorded and pinned (item 14) --------------------------------------------------
def test_threads_are_pinned_recorded_and_kept_on_resume(tmp_path):
    before = torch.get_num_threads()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner(tmp_path, strategies=["ncm"], threads=1, stop_after_session=0).run()
        run_dir = tmp_path / "runs" / "quickstart" / "ncm" / "seed0"
        env = json.loads((run_dir / "environment.json").read_text())
        assert env["torch_threads"] == 1 and env["cpu_model"] and "cpu_capability" in env
        import yaml

        assert yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["threads"] == 1
        torch.set_num_threads(2)
        runner(tmp_path, strategies=["ncm"], resume=True).run()  # no --threads: takes the run's own 1
        assert json.loads((run_dir / "environment.json").read_text())["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)


# -- the alternative head is chosen by the reported accuracy (item 8) -----------------------------
def test_alternative_head_is_chosen_by_the_accuracy_the_recipe_reports(tmp_path):
    from openworld.data.views import TensorData
    from openworld.scenarios.base import EvalSet
    from openworld.strategies.base import Prediction

    # 150 samples of 2 classes → chunks of 100 and 50 (batch-mean chunk size 100).
    y = torch.zeros(150, dtype=torch.long)
    y[1::2] = 1
    default_ok = torch.zeros(150, dtype=torch.bool)
    default_ok[:100] = True  # acc 100/150 = .667, batch mean (1 + 0)/2 = .5
    learned_ok = torch.zeros(150, dtype=torch.bool)
    learned_ok[:40] = True
    learned_ok[100:] = True  # acc 90/150 = .6, batch mean (.4 + 1)/2 = .7

    def logits_for(ok):
        pred = torch.where(ok, y, 1 - y)
        return torch.nn.functional.one_hot(pred, 2).float()

    class TwoHeads:
        transductive = False

        def feature_cache_key(self):
            return None

        def predict(self, x):
            idx = x[:, 0].long()
            return Prediction(logits_for(default_ok)[idx], alternatives={"learned": logits_for(learned_ok)[idx]})

    data = TensorData(torch.arange(150, dtype=torch.float32).unsqueeze(1), y)
    eval_set = EvalSet(data, (0, 1))
    for session_acc, head in (("sample", "default"), ("batch_mean", "learned")):
        recipe = load_recipe(QUICKSTART, [f"metrics.session_acc={session_acc}", "eval_batch_size=64"])
        r = Runner(recipe, out=tmp_path, progress=False, stream=open(tmp_path / "log", "w"))
        metrics, _, _, chosen = r.evaluate(TwoHeads(), eval_set, 2, {}, "test")
        assert chosen == head, session_acc


# -- τ recorded (item 2) ------------------------------------------------------------------------------
OPEN_SET = {
    "name": "tau_record",
    "scenario": {"kind": "open_set", "data": {"source": "digits"}, "known_classes": [0, 1, 2, 3, 4, 5],
                 "unknown_classes": [6, 7, 8, 9]},
    "backbone": {"name": "mlp", "hidden": [32], "out_features": 16},
    "base": {"epochs": 3, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
             "schedule": "constant", "selection": "last"},
    "strategies": {"msp": {}, "energy": {"threshold": "target_otsu"}},
    "seeds": [0, 1],
}


def test_tau_and_its_rule_are_recorded_in_results_hparams_and_compare(tmp_path):
    from openworld.compare import compare

    out = Runner(validate_recipe(OPEN_SET), out=tmp_path, progress=False, stream=open(tmp_path / "l", "w")).run()
    assert all(r.status == "finished" for r in out), [r.reason for r in out]
    res = results(out[0].run_dir)
    info = res["sessions"][-1]["strategy_info"]
    assert isinstance(info["tau"], float) and info["tau_rule"].startswith("source_quantile(q=0.05)")
    # the engine's own decision on the strategy's τ − s is "zero"
    assert res["sessions"][-1]["thresholds"]["target"] == {"rule": "zero", "tau": 0.0}
    energy = results(out[2].run_dir)["sessions"][-1]["strategy_info"]
    assert energy["tau_rule"].startswith("target_otsu")
    tags = scalars(out[0].run_dir)
    assert any(t.startswith("hparam/") for t in tags)
    hp = (out[0].run_dir).glob("events.out.tfevents.*")
    assert any(b"info.tau" in p.read_bytes() for p in hp)
    table = compare([tmp_path]).to_markdown()
    header = next(line for line in table.splitlines() if line.startswith("| strategy"))
    assert "τ" in header and "source_quantile" in table and "target_otsu" in table
    taus = [results(r.run_dir)["sessions"][-1]["strategy_info"]["tau"] for r in out[:2]]
    assert f"{sum(taus) / 2:.4f}" in table


# -- std convention (item 3) ----------------------------------------------------------------------
def _fake_runs(root: Path, values: list[float]) -> None:
    for seed, v in enumerate(values):
        d = root / "r" / "s" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({
            "recipe": "r", "strategy": "s", "seed": seed, "status": "finished", "scenario": "long_tail",
            "params": {}, "summary": {"uniform/acc": v}, "sessions": [{"index": 0, "metrics": {}}]}))


def test_compare_std_convention_is_selectable_and_stated(tmp_path):
    from openworld.compare import compare

    _fake_runs(tmp_path, [1.0, 2.0, 3.0, 4.0])
    sample = compare([tmp_path])
    population = compare([tmp_path], std="population")
    cell_s = sample.table["s"]["uniform/acc"]
    cell_p = population.table["s"]["uniform/acc"]
    assert cell_s.std == pytest.approx(1.2909944487358056)  # sqrt(5/3)
    assert cell_p.std == pytest.approx(1.118033988749895)  # sqrt(5/4)
    assert "sample std (ddof = 1)" in sample.to_markdown().splitlines()[0]
    assert "population std (ddof = 0)" in population.to_markdown().splitlines()[0]
    assert population.to_json()["std"] == "population std (ddof = 0)"
    assert "population" in population.to_csv().splitlines()[1]
    with pytest.raises(ValueError, match="std must be one of sample, population"):
        compare([tmp_path], std="pop")


def test_cli_compare_std_flag(tmp_path):
    from openworld.cli import main

    _fake_runs(tmp_path, [1.0, 2.0, 3.0, 4.0])
    assert main(["compare", str(tmp_path), "--std", "population"]) == 0
    assert "2.50 ± 1.12" in (tmp_path / "compare.md").read_text()


def test_runner_summary_table_says_which_std(tmp_path):
    runner(tmp_path, strategies=["ncm"]).run()
    assert "sample std, ddof = 1" in (tmp_path / "log.txt").read_text()


# -- the README's plugin example is correct, resume included (item 15) ------------------------------
def test_readme_plugin_example_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    import re

    from openworld.registry import STRATEGIES

    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "class MyNCM" in b)
    monkeypatch.setattr(STRATEGIES, "_objects", dict(STRATEGIES._objects))  # registration stays in this test
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert "my_ncm" in STRATEGIES.names()
    ref = runner(tmp_path / "ref", ["strategies={my_ncm: {}}"]).run()[0]
    with pytest.raises(KeyboardInterrupt):
        runner(tmp_path / "cut", ["strategies={my_ncm: {}}"], stop_after_session=1).run()
    resumed = runner(tmp_path / "cut", ["strategies={my_ncm: {}}"], resume=True).run()[0]
    assert ref.status == resumed.status == "finished"
    assert metrics_only(results(ref.run_dir)) == metrics_only(results(resumed.run_dir))


def test_recipe_threads_key_is_validated_and_used(tmp_path):
    assert load_recipe(QUICKSTART, ["threads=1"]).threads == 1
    assert load_recipe(QUICKSTART).threads is None
    with pytest.raises(ConfigError) as err:
        load_recipe(QUICKSTART, ["threads=0"])
    assert "threads = 0: Input should be greater than 0" in str(err.value)
    before = torch.get_num_threads()
    try:
        assert runner(tmp_path, ["threads=1"], strategies=["ncm"]).threads == 1
    finally:
        torch.set_num_threads(before)
