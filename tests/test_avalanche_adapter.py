"""The Avalanche adapter: names, lazy import, a run on a tiny real stream, checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("avalanche", reason="avalanche-lib is not installed (pip install 'openworld[avalanche]')")

import openworld.scenarios.class_incremental  # noqa: E402,F401
import openworld.strategies.avalanche as av  # noqa: E402
from openworld.config import validate_recipe  # noqa: E402
from openworld.registry import STRATEGIES  # noqa: E402
from openworld.runner import Runner  # noqa: E402

NAMES = ["avalanche.naive", "avalanche.lwf", "avalanche.ewc", "avalanche.si", "avalanche.agem",
         "avalanche.replay", "avalanche.icarl"]


def test_registered_with_dotted_names():
    for name in NAMES:
        cls = STRATEGIES.get(name)
        assert cls.name == name and cls.supports == frozenset({"cil"})
        assert set(cls().get_params()) >= {"epochs", "batch_size", "lr"}


def test_avalanche_is_imported_lazily():
    code = ("import sys, openworld.strategies.avalanche as a; a.AvalancheLwF(alpha=0.5); "
            "print('avalanche' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _recipe(strategies):
    return validate_recipe({
        "name": "av_tiny",
        "scenario": {"kind": "cil", "data": {"source": "digits"}, "num_tasks": 5, "train_per_class": 30,
                     "test_per_class": 10},
        "backbone": {"name": "cnn8", "width": 16},
        "strategies": strategies,
        "seeds": [0],
    })


def test_naive_runs_on_a_tiny_stream_and_resumes(tmp_path):
    recipe = _recipe({"naive": {"strategy": "avalanche.naive", "epochs": 5, "lr": 0.02, "batch_size": 16}})
    runner = Runner(recipe, out=tmp_path, progress=False, stream=open(tmp_path / "log.txt", "w"),
                    stop_after_session=2)
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    out = Runner(recipe, out=tmp_path, progress=False, resume=True, stream=open(tmp_path / "log.txt", "a")).run()
    assert out[0].status == "finished"
    res = json.loads((out[0].run_dir / "results.json").read_text())
    last = res["sessions"][-1]["metrics"]["test"]
    assert all(f"task_{j:02d}/acc" in last for j in range(5))
    # naive fine-tuning: strong forgetting, while some recent task is well recognised
    assert res["summary"]["forgetting"] > 30.0
    assert max(last[f"task_{j:02d}/acc"] for j in range(5)) > 50.0


def test_plugin_strategies_refuse_to_resume_without_their_memory():
    from openworld.strategies.base import RunContext, TrainConfig

    ctx = RunContext(device=torch.device("cpu"), seed=0,
                     scenario={"kind": "cil", "num_classes": 10, "input_shape": (1, 8, 8), "num_sessions": 5},
                     backbone={"name": "cnn8", "width": 8}, base=TrainConfig(), progress=False)
    s = av.AvalancheLwF()
    s.setup(ctx)
    state = s.state_dict()
    state["task_sizes"] = [2]
    with pytest.raises(NotImplementedError, match="avalanche.lwf: resuming mid-stream is not supported"):
        s.load_state_dict(state)
