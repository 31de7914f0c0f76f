"""End to end through the runner: outputs on disk, TensorBoard tags, resume, failure isolation,
plugins, base-model sharing and the structural label guarantee."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from openworld.config import load_recipe
from openworld.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
FAST = ["base.epochs=4", "strategies.finetune.epochs=3", "log_every=5"]


def run(tmp_path, overrides=(), **kwargs):
    recipe = load_recipe(QUICKSTART, list(FAST) + list(overrides))
    runner = Runner(recipe, out=tmp_path / "runs", progress=False, stream=open(tmp_path / "log.txt", "a"), **kwargs)
    return runner.run(), runner


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def metrics_only(res: dict) -> list[dict]:
    """Per-session records without wall-clock timings."""
    return [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in res["sessions"]]


def scalar_tags(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quick")
    out, runner = run(tmp)
    return tmp, out, runner


def test_quickstart_outputs(quick):
    tmp, out, runner = quick
    assert [r.status for r in out] == ["finished"] * 3
    run_dir = out[0].run_dir
    for name in ("config.resolved.yaml", "environment.json", "splits.json", "results.json", "metrics.csv"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"session_{i}.pt" for i in range(6)]
    res = results(run_dir)
    assert res["status"] == "finished" and len(res["sessions"]) == 6
    assert set(res["summary"]) >= {"avg", "pd", "last"}
    s = res["sessions"]
    accs = [x["metrics"]["test"]["acc"] for x in s]
    assert res["summary"]["avg"] == pytest.approx(sum(accs) / 6)
    assert res["summary"]["pd"] == pytest.approx(accs[0] - accs[-1])
    assert res["summary"]["last"] == pytest.approx(accs[-1])
    assert s[0]["metrics"]["test"]["acc_novel"] is None and s[0]["metrics"]["test"]["hm"] is None
    assert 0 <= s[3]["metrics"]["test"]["hm"] <= 100
    # Session i's test set holds every test sample of the classes seen so far.
    assert [len(x["confusion"]["test"]) for x in s] == [5, 6, 7, 8, 9, 10]
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["packages"]["torch"] and env["device"] == "cpu"
    splits = json.loads((run_dir / "splits.json").read_text())
    assert splits["class_order"] == list(range(10))
    layout = list((run_dir.parent.parent / "_layout").glob("events.out.tfevents.*"))
    assert len(layout) == 1 and b"custom_scalars" in layout[0].read_bytes()  # all strategies on one chart
    table = (tmp / "log.txt").read_text()
    assert "teen" in table and "avg" in table and " hm" in table


def test_tensorboard_tags_follow_the_spec(quick):
    _, out, _ = quick
    tags = scalar_tags(out[0].run_dir)
    for t in (
        "eval/test/acc",
        "eval/test/acc_base",
        "eval/test/acc_novel",
        "eval/test/hm",
        "eval/test/pd",
        "eval/test/avg",
        "train/loss",
        "train/lr",
        "hparam/test/avg",
    ):
        assert t in tags, t
    assert [step for step, _ in tags["eval/test/acc"]] == list(range(6))
    assert [step for step, _ in tags["eval/test/hm"]] == list(range(1, 6))  # NaN at session 0 is not written
    res = results(out[0].run_dir)
    assert tags["eval/test/acc"][-1][1] == pytest.approx(res["sessions"][-1]["metrics"]["test"]["acc"], rel=1e-6)


def test_strategies_share_one_base_model(quick):
    _, out, _ = quick
    s0 = {r.strategy: results(r.run_dir)["sessions"][0]["metrics"]["test"]["acc"] for r in out}
    assert s0["teen"] == s0["ncm"]  # same encoder, same prototypes at session 0
    cache_entries = list((quick[2].cache.root).rglob("*.pt"))
    assert len(cache_entries) == 1


def test_same_seed_same_numbers(quick, tmp_path):
    _, first, _ = quick
    again, _ = run(tmp_path, cache_dir=tmp_path / "fresh_cache")  # retrains the base model from scratch
    for a, b in zip(first, again):
        assert metrics_only(results(a.run_dir)) == metrics_only(results(b.run_dir))


def test_resume_after_kill_gives_identical_results(quick, tmp_path):
    _, reference, _ = quick
    recipe = load_recipe(QUICKSTART, FAST)
    log = open(tmp_path / "log.txt", "a")
    runner = Runner(
        recipe,
        out=tmp_path / "runs",
        progress=False,
        stream=log,
        strategies=["teen"],
        stop_after_session=2,
        cache_dir=tmp_path / "c",
    )
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    run_dir = tmp_path / "runs" / "quickstart" / "teen" / "seed0"
    assert results(run_dir)["status"] == "running" and len(results(run_dir)["sessions"]) == 3
    resumed = Runner(
        recipe,
        out=tmp_path / "runs",
        progress=False,
        stream=log,
        strategies=["teen"],
        resume=True,
        cache_dir=tmp_path / "c",
    ).run()
    assert resumed[0].status == "finished"
    ref = results(reference[0].run_dir)
    got = results(run_dir)
    assert metrics_only(got) == metrics_only(ref) and got["summary"] == ref["summary"]
    assert [step for step, _ in scalar_tags(run_dir)["eval/test/acc"]] == list(range(6))


def test_cli_kill_and_resume(tmp_path):
    """The same through the command line: a killed process, then --resume."""
    cmd = [
        sys.executable,
        "-m",
        "openworld",
        "run",
        str(QUICKSTART),
        "--strategies",
        "ncm",
        "--out",
        str(tmp_path),
        "--no-progress",
    ] + [a for f in FAST for a in ("--set", f)]
    killed = subprocess.run(cmd + ["--stop-after-session", "1"], capture_output=True, text=True, timeout=300)
    assert killed.returncode != 0
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fresh = subprocess.run(cmd + ["--out", str(tmp_path / "fresh")], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    a = results(tmp_path / "quickstart" / "ncm" / "seed0")
    b = results(tmp_path / "fresh" / "quickstart" / "ncm" / "seed0")
    assert metrics_only(a) == metrics_only(b) and a["status"] == "finished"


PLUGIN = textwrap.dedent(
    """
    import torch
    from openworld.strategies.base import Prediction, Strategy

    class Exploding(Strategy):
        '''Trains a linear layer with a huge learning rate: the loss becomes NaN.'''
        supports = frozenset({"fscil"})

        def __init__(self, lr: float = 1e30):
            self.lr = lr

        def learn(self, session):
            from openworld.strategies.base import TrainConfig, OptimizerConfig, train_classifier
            self.net = self.ctx.create_classifier_net()
            cfg = TrainConfig(epochs=2, batch_size=32, optimizer=OptimizerConfig(lr=self.lr), schedule="constant",
                              selection="last")
            train_classifier(self.net, session.labeled, cfg=cfg, ctx=self.ctx, num_active=5)

        def predict(self, x):
            return Prediction(self.net(x))

        def state_dict(self):
            return {}

    class Majority(Strategy):
        '''Always predicts the most frequent labelled class: a tiny out-of-tree strategy.'''
        supports = frozenset({"fscil"})

        def learn(self, session):
            self.top = int(torch.bincount(session.labeled.targets).argmax())
            self.k = len(session.classes.seen)

        def predict(self, x):
            logits = torch.zeros(len(x), self.k)
            logits[:, self.top] = 1
            return Prediction(logits)

        def state_dict(self):
            return {"top": self.top, "k": self.k}

        def load_state_dict(self, state):
            self.top, self.k = state["top"], state["k"]
    """
)


def test_nan_loss_fails_that_run_only_and_plugins_load(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    out, _ = run(
        tmp_path,
        ["strategies={boom: {strategy: 'my_plugin:Exploding'}, majority: {strategy: 'my_plugin:Majority'}, ncm: {}}"],
    )
    status = {r.strategy: r.status for r in out}
    assert status == {"boom": "failed", "majority": "finished", "ncm": "finished"}
    failed = results(out[0].run_dir)
    assert failed["status"] == "failed" and "NonFiniteLossError" in failed["reason"]
    assert (out[0].run_dir / "error.log").is_file()
    majority = results(out[1].run_dir)
    cm = majority["sessions"][0]["confusion"]["test"]
    top = max(range(5), key=lambda c: sum(cm[r][c] for r in range(5)))
    assert majority["sessions"][0]["metrics"]["test"]["acc"] == pytest.approx(100 * cm[top][top] / sum(map(sum, cm)))
    assert 15 < majority["sessions"][0]["metrics"]["test"]["acc"] < 25  # 5 balanced classes


def test_example_plugin_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, _ = run(tmp_path, ["strategies={simpleshot: {strategy: 'strategies.example_plugin:SimpleShot'}, ncm: {}}"])
    assert [r.status for r in out] == ["finished", "finished"]
    a, b = (results(r.run_dir)["summary"]["avg"] for r in out)
    assert a > 50 and b > 50


def test_entry_point_plugin(tmp_path, monkeypatch):
    """A plugin published through the entry-point group is found like the built-ins."""
    from importlib import metadata

    from openworld.registry import STRATEGIES

    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = metadata.EntryPoint(name="majority", value="my_plugin:Majority", group="openworld.strategies")
    monkeypatch.setattr(STRATEGIES, "_entry_points", {**STRATEGIES._eps(), "majority": ep})
    monkeypatch.setattr(STRATEGIES, "_objects", dict(STRATEGIES._objects))
    assert "majority" in STRATEGIES.names()
    out, _ = run(tmp_path, ["strategies={majority: {}}"])
    assert out[0].status == "finished"


def test_strategy_never_sees_eval_labels(tmp_path, monkeypatch):
    """Walk everything a strategy receives: no eval set, and no reachable target tensor that is not
    the session's own labelled targets (or all -1)."""
    from openworld.data.views import TensorData
    from openworld.strategies.baselines import NCM

    seen_sessions = []
    original = NCM.learn

    def spy(self, session):
        seen_sessions.append(session)
        return original(self, session)

    monkeypatch.setattr(NCM, "learn", spy)
    run(tmp_path, ["strategies={ncm: {}}"])
    assert len(seen_sessions) == 6
    for session in seen_sessions:
        assert session.eval_sets == {}
        for ds in _reachable_datasets(session):
            assert ds.origin[0] is ds  # no link back to the full source
            if ds is session.labeled or ds is session.validation or ds is session.info.get("prototype_data"):
                continue
            assert bool((ds.targets == -1).all()), ds
        assert isinstance(session.labeled, TensorData)


def _reachable_datasets(obj, seen=None):
    from openworld.data.views import FileData, TensorData

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    found = []
    if isinstance(obj, (TensorData, FileData)):
        found.append(obj)
    children = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, type)):
        children = list(vars(obj).values())
    elif hasattr(obj, "__dataclass_fields__"):
        children = [getattr(obj, f) for f in obj.__dataclass_fields__]
    for child in children:
        found += _reachable_datasets(child, seen)
    return found


def test_hidden_labels_are_structural():
    """A GCD-like view: labelled and unlabelled parts cut from one source; the unlabelled view
    keeps no path to the true labels."""
    from openworld.data.views import TensorData
    from openworld.scenarios.base import ClassInfo, EvalSet, Session

    source = TensorData(torch.randn(20, 3), torch.arange(20) % 4)
    labeled = source.subset(torch.arange(0, 10))
    unlabeled = source.subset(torch.arange(10, 20))
    session = Session(
        0,
        "s",
        ClassInfo(4, (0, 1, 2, 3), (0, 1, 2, 3)),
        labeled=labeled,
        unlabeled=unlabeled,
        eval_sets={"unlabelled": EvalSet(unlabeled, (0, 1, 2, 3))},
    )
    visible = session.visible()
    assert visible.eval_sets == {}
    assert bool((visible.unlabeled.targets == -1).all())
    reachable = _reachable_datasets(visible)
    assert all(not torch.equal(d.targets, source.targets[10:]) for d in reachable)
    assert all(d.origin[0] is d for d in reachable)


def test_paper_protocol_is_applied_and_flagged(tmp_path):
    out, _ = run(tmp_path, ["protocol=paper", "strategies={teen: {}, ncm: {}}"])
    assert [r.status for r in out] == ["finished", "finished"]
    res = results(out[0].run_dir)
    assert res["flags"] == {"selection": "test", "protocol": "paper", "session_acc": "batch_mean", "hm_rounding": True}
    assert "TEST set" in res["warning"]
    assert res["params"]["shots_batching"] == "last_batch" and res["params"]["session0_report"] == "max"
    s0 = res["sessions"][0]
    # session0_report: max reports the better of the prototype and the learned head.
    assert s0.get("reported_head", {}).get("test", "default") in {"default", "learned"}
    batch_means = [s["metrics"]["test"]["acc_batch_mean"] for s in res["sessions"]]
    assert res["summary"]["avg"] == pytest.approx(sum(batch_means) / len(batch_means))
    hm = res["sessions"][-1]["metrics"]["test"]["hm"]
    assert round(hm, 3) == pytest.approx(hm, abs=1e-9)  # hm_rounding: 3 decimals in %
