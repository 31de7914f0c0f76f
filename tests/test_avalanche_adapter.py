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

NAMES = [
    "avalanche.naive",
    "avalanche.lwf",
    "avalanche.ewc",
    "avalanche.si",
    "avalanche.agem",
    "avalanche.replay",
    "avalanche.icarl",
]


def test_registered_with_dotted_names():
    for name in NAMES:
        cls = STRATEGIES.get(name)
        assert cls.name == name and cls.supports == frozenset({"cil"})
        assert set(cls().get_params()) >= {"epochs", "batch_size", "lr"}


def test_avalanche_is_imported_lazily():
    code = (
        "import sys, openworld.strategies.avalanche as a; a.AvalancheLwF(alpha=0.5); print('avalanche' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _recipe(strategies):
    return validate_recipe(
        {
            "name": "av_tiny",
            "scenario": {
                "kind": "cil",
                "data": {"source": "digits"},
                "num_tasks": 5,
                "train_per_class": 30,
                "test_per_class": 10,
            },
            "backbone": {"name": "cnn8", "width": 16},
            "strategies": strategies,
            "seeds": [0],
        }
    )


def test_naive_runs_on_a_tiny_stream_and_resumes(tmp_path):
    recipe = _recipe({"naive": {"strategy": "avalanche.naive", "epochs": 5, "lr": 0.02, "batch_size": 16}})
    runner = Runner(recipe, out=tmp_path, progress=False, stream=open(tmp_path / "log.txt", "w"), stop_after_session=2)
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


# Small memories so that every buffer is sub-sampled (and, for Replay/iCaRL, shrunk as tasks arrive).
TINY_PARAMS = {
    "avalanche.naive": {},
    "avalanche.lwf": {"alpha": 1.0},
    "avalanche.ewc": {"ewc_lambda": 10.0},
    "avalanche.si": {"si_lambda": 1.0},
    "avalanche.agem": {"patterns_per_exp": 20, "sample_size": 16},
    "avalanche.replay": {"mem_size": 30},
    "avalanche.icarl": {"memory_size": 30},
}


def _tiny_recipe():
    """Digits in 3 tasks (4, 3, 3 classes), one epoch, batches of 16: every Avalanche strategy."""
    strategies = {
        name.split(".")[1]: {"strategy": name, "epochs": 1, "batch_size": 16, "lr": 0.02, **TINY_PARAMS[name]}
        for name in NAMES
    }
    return validate_recipe(
        {
            "name": "av_resume",
            "scenario": {
                "kind": "cil",
                "data": {"source": "digits"},
                "num_tasks": 3,
                "first_task_classes": 4,
                "train_per_class": 20,
                "test_per_class": 10,
            },
            "backbone": {"name": "cnn8", "width": 8},
            "strategies": strategies,
            "seeds": [0],
            "device": "cpu",
        }
    )


def _metrics_only(res: dict) -> list[dict]:
    """Per-session records without wall-clock timings."""
    return [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in res["sessions"]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run of every strategy: {entry: results.json}."""
    out = tmp_path_factory.mktemp("av_ref")
    runs = Runner(_tiny_recipe(), out=out, progress=False, tensorboard=False, stream=open(out / "log.txt", "w")).run()
    return {r.strategy: r.run_dir for r in runs}


def _final_state(run_dir) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "session_2.pt", map_location="cpu", weights_only=True)
    return ckpt["strategy"]


def _assert_same(a, b, where="state"):
    """Bit-for-bit equality of two nests of tensors, numbers, lists and dicts."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", NAMES)
def test_resume_after_stop_gives_identical_results(name, uninterrupted, tmp_path):
    """Stopped after the first session and resumed from openworld's checkpoint (torch.load with
    weights_only=True), each strategy's remaining sessions give exactly the uninterrupted run's results:
    the restored plugin memory is used by the next session and then updated and used once more; the
    final checkpoint (weights, optimizer state, clock, plugin memory) matches bit for bit."""
    entry = name.split(".")[1]
    recipe = _tiny_recipe()
    log = open(tmp_path / "log.txt", "a")
    with pytest.raises(KeyboardInterrupt):
        Runner(
            recipe,
            out=tmp_path,
            progress=False,
            tensorboard=False,
            stream=log,
            strategies=[entry],
            stop_after_session=0,
        ).run()
    resumed = Runner(
        recipe, out=tmp_path, progress=False, tensorboard=False, stream=log, strategies=[entry], resume=True
    ).run()
    assert resumed[0].status == "finished"
    got = json.loads((resumed[0].run_dir / "results.json").read_text())
    ref = json.loads((uninterrupted[entry] / "results.json").read_text())
    assert [s["index"] for s in got["sessions"]] == [0, 1, 2]
    assert _metrics_only(got) == _metrics_only(ref)
    assert got["summary"] == ref["summary"]
    # accuracies on a tiny test set can hide small differences: the final weights, optimizer state and
    # plugin memory must be identical too
    _assert_same(_final_state(resumed[0].run_dir), _final_state(uninterrupted[entry]))


def test_si_learns_importances_on_cpu_and_resumes_with_them(tmp_path):
    """On CPU, Avalanche 0.6's SI stores parameter *views* (``param.detach().cpu().flatten()`` copies
    nothing there), so its importances would stay zero; the adapter makes the snapshot a copy, as on GPU.
    ω must then be non-zero and still resume exactly."""
    recipe = _tiny_recipe()
    log = open(tmp_path / "log.txt", "a")
    ref = Runner(recipe, out=tmp_path / "ref", progress=False, tensorboard=False, stream=log, strategies=["si"]).run()
    with pytest.raises(KeyboardInterrupt):
        Runner(
            recipe,
            out=tmp_path / "cut",
            progress=False,
            tensorboard=False,
            stream=log,
            strategies=["si"],
            stop_after_session=0,
        ).run()
    got = Runner(
        recipe, out=tmp_path / "cut", progress=False, tensorboard=False, stream=log, strategies=["si"], resume=True
    ).run()
    omega = _final_state(ref[0].run_dir)["memory"]["ewc_data"][1]
    assert sum(float(w.abs().sum()) for w in omega.values()) > 0
    a = json.loads((got[0].run_dir / "results.json").read_text())
    b = json.loads((ref[0].run_dir / "results.json").read_text())
    assert _metrics_only(a) == _metrics_only(b)
    _assert_same(_final_state(got[0].run_dir), _final_state(ref[0].run_dir))


def test_checkpoint_holds_the_plugin_memory_as_plain_tensors(tmp_path):
    """What each strategy's checkpoint holds after two sessions, and that it loads with weights_only=True."""
    recipe = _tiny_recipe()
    log = open(tmp_path / "log.txt", "a")
    expect = {
        "lwf": {"expcount", "prev_model", "prev_model_modes", "prev_classes_by_task"},
        "ewc": {"saved_params", "importances"},
        "si": {"ewc_data", "syn_data"},
        "agem": {"buffers"},
        "replay": {"num_exps", "groups"},
        "icarl": {
            "x_memory",
            "y_memory",
            "order",
            "observed_classes",
            "class_means",
            "embedding_size",
            "output_size",
            "input_size",
            "old_classes",
            "old_model",
            "old_model_modes",
        },
    }
    for entry in ["naive", *expect]:
        with pytest.raises(KeyboardInterrupt):
            Runner(
                recipe,
                out=tmp_path,
                progress=False,
                tensorboard=False,
                stream=log,
                strategies=[entry],
                stop_after_session=1,
            ).run()
        ckpt = torch.load(
            tmp_path / "av_resume" / entry / "seed0" / "checkpoints" / "session_1.pt",
            map_location="cpu",
            weights_only=True,
        )
        state = ckpt["strategy"]
        assert state["task_sizes"] == [4, 3] and state["clock"]["train_exp_counter"] == 2
        assert state["optimizer"]["state"], "SGD momentum carries over between experiences"
        if entry == "naive":
            assert "memory" not in state
            continue
        mem = state["memory"]
        assert set(mem) == expect[entry]
        if entry == "ewc":
            assert sorted(mem["importances"]) == [0, 1]  # 'separate' mode keeps one penalty per experience
        if entry == "agem":
            assert [len(b["y"]) for b in mem["buffers"]] == [20, 20]
        if entry == "replay":
            assert mem["num_exps"] == 2 and sum(len(g["y"]) for g in mem["groups"]) == 30
            assert all(len(g["y"]) == len(g["weights"]) for g in mem["groups"])
        if entry == "icarl":
            assert [ys[0] for ys in mem["y_memory"]] == list(range(7)) and mem["observed_classes"] == list(range(7))
            assert sum(len(ys) for ys in mem["y_memory"]) <= 7 * 5  # ceil(30 / 7) exemplars per class


def test_a_checkpoint_without_plugin_memory_is_refused():
    """Checkpoints written before plugin memories were saved cannot resume those strategies silently."""
    from openworld.strategies.base import RunContext, TrainConfig

    ctx = RunContext(
        device=torch.device("cpu"),
        seed=0,
        scenario={"kind": "cil", "num_classes": 10, "input_shape": (1, 8, 8), "num_sessions": 5},
        backbone={"name": "cnn8", "width": 8},
        base=TrainConfig(),
        progress=False,
    )
    s = av.AvalancheLwF()
    s.setup(ctx)
    state = s.state_dict()
    state["task_sizes"] = [2]
    with pytest.raises(NotImplementedError, match="avalanche.lwf: this checkpoint holds no Avalanche plugin memory"):
        s.load_state_dict(state)
    assert all(STRATEGIES.get(n).resumable for n in NAMES)
