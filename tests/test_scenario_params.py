"""Scenario parameters are checked at validate time (audit finding A).

Every bad scenario value that would crash ``openworld run`` is a one-line ``ConfigError`` from
``openworld validate`` (exit status 2) naming the key path, the value and what is allowed: single-field
ranges through the constrained annotations of the scenario constructors (FSCIL: config.py's table),
cross-field rules through ``Scenario.check_config``. Rules that need the dataset's class count are
decided at validate time when the loader declares its class count (``loader.num_classes``), and
otherwise raise the same one-line ``ConfigError`` at run start (``Runner.run`` → ``describe()``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import openworld.scenarios.long_tail  # noqa: F401  (registers synth_gauss)
from openworld.cli import main
from openworld.config import ConfigError, load_recipe
from openworld.data.sources import SourceData
from openworld.data.transforms import get_transforms
from openworld.data.views import TensorData
from openworld.registry import register_dataset

STRATEGY = {"fscil": "ncm", "cil": "ncm", "gcd": "kmeans", "ncd": "kmeans", "long_tail": "ce", "open_set": "msp"}
SOURCE = {"fscil": "digits", "cil": "digits", "gcd": "digits", "ncd": "digits", "long_tail": "synth_gauss",
          "open_set": "digits"}


@register_dataset("counted10_test")
def counted10(root=None, download=False, *, n_per_class: int = 6):
    """A 10-class vector source that declares its class count (read by validate without loading)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), n_per_class)
    x = torch.from_numpy(rng.normal(size=(len(y), 4)).astype(np.float32))
    pair = get_transforms("vector")
    return SourceData("counted10_test", TensorData(x, y, pair, "tr"), TensorData(x.clone(), y, pair, "te"),
                      classes=tuple(f"c{i}" for i in range(10)), family="vector")


counted10.num_classes = 10


def recipe(kind: str, seeds=(0,), source: str | None = None, **params) -> dict:
    return {
        "name": "t",
        "scenario": {"kind": kind, "data": {"source": source or SOURCE[kind]}, **params},
        "backbone": {"name": "mlp"},
        "strategies": {STRATEGY[kind]: {}},
        "seeds": list(seeds),
        "device": "cpu",
    }


def validate(tmp_path: Path, data: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        code = main(["validate", str(path)])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err.strip()


FSCIL = {"base_classes": 5, "ways": 1, "shots": 5}

# (kind, scenario parameters, the start of the error message after "openworld: error: ")
BAD = [
    # fscil: constraints from config.py's per-kind table (fscil.py belongs to another engineer)
    ("fscil", {**FSCIL, "ways": 0}, "scenario.ways = 0: Input should be greater than 0"),
    ("fscil", {**FSCIL, "ways": -1}, "scenario.ways = -1: Input should be greater than 0"),
    ("fscil", {**FSCIL, "ways": 2.5}, "scenario.ways = 2.5: Input should be a valid integer"),
    ("fscil", {**FSCIL, "shots": 0}, "scenario.shots = 0: Input should be greater than 0"),
    ("fscil", {**FSCIL, "base_classes": 0}, "scenario.base_classes = 0: Input should be greater than 0"),
    ("fscil", {**FSCIL, "num_sessions": 0}, "scenario.num_sessions = 0: Input should be greater than 0"),
    ("fscil", {**FSCIL, "val_frac": 1.0}, "scenario.val_frac = 1.0: Input should be less than 1"),
    ("fscil", {**FSCIL, "holdout_unknown": -1}, "scenario.holdout_unknown = -1: Input should be greater than or equal"),
    ("fscil", {**FSCIL, "class_order": "random"}, "scenario.class_order = 'random': Input should be 'natural' or"),
    ("fscil", {**FSCIL, "base_subsample": 0}, "scenario.base_subsample = 0: Input should be greater than 0"),
    # cil
    ("cil", {"num_tasks": 0}, "scenario.num_tasks = 0: Input should be greater than 0"),
    ("cil", {"num_tasks": -2}, "scenario.num_tasks = -2: Input should be greater than 0"),
    ("cil", {"num_tasks": 5.0}, "scenario.num_tasks = 5.0: Input should be a valid integer"),
    ("cil", {"first_task_classes": 0}, "scenario.first_task_classes = 0: Input should be greater than 0"),
    ("cil", {"train_per_class": 0}, "scenario.train_per_class = 0: Input should be greater than 0"),
    ("cil", {"test_per_class": -1}, "scenario.test_per_class = -1: Input should be greater than 0"),
    ("cil", {"task_aware": "yes"}, "scenario.task_aware = 'yes': Input should be a valid boolean"),
    # gcd / ncd
    ("gcd", {"p_lab": 0}, "scenario.p_lab = 0: Input should be greater than 0"),
    ("gcd", {"p_lab": 1.5}, "scenario.p_lab = 1.5: Input should be less than or equal to 1"),
    ("gcd", {"labelled_val_frac": 1}, "scenario.labelled_val_frac = 1: Input should be less than 1"),
    ("gcd", {"k_mode": "guess"}, "scenario.k_mode = 'guess': Input should be 'known' or 'estimated'"),
    ("gcd", {"variants": ["v3"]}, "scenario.variants.0 = 'v3': Input should be 'v2', 'v2b' or 'v1'"),
    ("gcd", {"inductive_mapping": "shared"}, "scenario.inductive_mapping = 'shared': Input should be"),
    ("gcd", {"train_subsample": 0}, "scenario.train_subsample = 0: Input should be greater than 0"),
    ("gcd", {"old_classes": 0}, "scenario.old_classes = 0: "),
    ("gcd", {"split_seed": -1}, "scenario.split_seed = -1: Input should be greater than or equal to 0"),
    ("gcd", {"old_classes": [0, 1], "class_split": "x.pkl"},
     "scenario.class_split = 'x.pkl': give either a split file or old_classes/new_classes"),
    ("gcd", {"old_classes": [0, 1], "new_classes": [1, 2]}, "scenario.new_classes = [1, 2]: "),
    ("gcd", {"old_classes": [0, 0, 1]}, "scenario.old_classes = [0, 0, 1]: "),
    ("gcd", {"old_classes": [0, 1], "new_classes": []}, "scenario.new_classes = []: "),
    ("gcd", {"old_classes": [], "new_classes": [1]}, "scenario.old_classes = []: "),
    ("ncd", {"p_lab": 0.3}, "scenario.p_lab = 0.3: "),
    # long_tail
    ("long_tail", {"imbalance": 0.5}, "scenario.imbalance = 0.5: Input should be greater than or equal to 1"),
    ("long_tail", {"profile": "linear"}, "scenario.profile = 'linear': Input should be 'exp' or 'step'"),
    ("long_tail", {"n_max": 0}, "scenario.n_max = 0: Input should be greater than 0"),
    ("long_tail", {"val_per_class": -1}, "scenario.val_per_class = -1: Input should be greater than or equal to 0"),
    ("long_tail", {"val_seed": -1}, "scenario.val_seed = -1: Input should be greater than or equal to 0"),
    ("long_tail", {"noise": "gauss"}, "scenario.noise = 'gauss': Input should be 'none', 'sym', 'imb' or 'pair'"),
    ("long_tail", {"noise": "sym", "noise_rate": 1.5}, "scenario.noise_rate = 1.5: Input should be less than or"),
    ("long_tail", {"noise": "sym"}, "scenario.noise_rate = 0.0: noise 'sym' needs a rate > 0"),
    ("long_tail", {"noise_sampling": "poisson"}, "scenario.noise_sampling = 'poisson': Input should be"),
    ("long_tail", {"test_distributions": []}, "scenario.test_distributions = []: at least one"),
    ("long_tail", {"test_distributions": ["forward0"]}, "scenario.test_distributions = ['forward0']: "),
    ("long_tail", {"test_distributions": ["uniform", "uniform"]}, "scenario.test_distributions = ['uniform', 'uniform"),
    ("long_tail", {"shot_thresholds": [100, 20]}, "scenario.shot_thresholds = [100, 20]: "),
    ("long_tail", {"shot_thresholds": [1, 2, 3]}, "scenario.shot_thresholds = [1, 2, 3]: "),
    ("long_tail", {"rank_fraction": 0}, "scenario.rank_fraction = 0: Input should be greater than 0"),
    ("long_tail", {"shot_groups": "quantile"}, "scenario.shot_groups = 'quantile': Input should be"),
    # open_set (osda)
    ("open_set", {"known_classes": 0}, "scenario.known_classes = 0: "),
    ("open_set", {"known_classes": [0, 0, 1]}, "scenario.known_classes = [0, 0, 1]: "),
    ("open_set", {"known_classes": [-1, 2]}, "scenario.known_classes.0 = -1: Input should be greater than or equal"),
    ("open_set", {"known_classes": "abc"}, "scenario.known_classes = 'abc': Input should be a valid integer"),
    ("gcd", {"old_classes": [0, "x"]}, "scenario.old_classes.1 = 'x': Input should be a valid integer"),
    ("open_set", {"known_classes": [0, 1], "unknown_classes": [1, 2]}, "scenario.unknown_classes = [1, 2]: "),
    ("open_set", {"target_split": "val"}, "scenario.target_split = 'val': Input should be 'all', 'train' or 'test'"),
    ("open_set", {"val_fraction": 0}, "scenario.val_fraction = 0: Input should be greater than 0"),
    ("open_set", {"val_fraction": 1}, "scenario.val_fraction = 1: Input should be less than 1"),
    ("open_set", {"target_shots": -1}, "scenario.target_shots = -1: Input should be greater than or equal to 0"),
    ("open_set", {"source_per_class": 0}, "scenario.source_per_class = 0: Input should be greater than 0"),
    ("open_set", {"transforms": "imagenet"}, "scenario.transforms = 'imagenet': Input should be 'source' or"),
    ("open_set", {"protocol": "osr"}, "scenario.protocol = 'osr': Input should be 'osda' or 'dafsos'"),
    ("open_set", {"corruptions": []}, "scenario.corruptions = []: at least one"),
    ("open_set", {"corruptions": ["fog:3"]}, "scenario.corruptions = ['fog:3']: "),
    ("open_set", {"corruptions": ["clean"], "target": {"source": "digits28"}},
     "scenario.corruptions = ['clean']: give either `target`"),
    ("open_set", {"split_seed": -3}, "scenario.split_seed = -3: Input should be greater than or equal to 0"),
    # open_set (dafsos)
    ("open_set", {"protocol": "dafsos"}, "scenario.meta_train_classes = None: protocol 'dafsos' needs"),
    ("open_set", {"protocol": "dafsos", "meta_train_classes": 5, "n_way": 0}, "scenario.n_way = 0: Input should be"),
    ("open_set", {"protocol": "dafsos", "meta_train_classes": 5, "episodes": 0}, "scenario.episodes = 0: Input should"),
    ("open_set", {"protocol": "dafsos", "meta_train_classes": 5, "n_unknown": -1}, "scenario.n_unknown = -1: Input"),
    ("open_set", {"protocol": "dafsos", "meta_train_classes": 0}, "scenario.meta_train_classes = 0: Input should be"),
    ("open_set", {"protocol": "dafsos", "meta_train_classes": 5, "target_shots": 2},
     "scenario.target_shots = 2: does not apply to protocol 'dafsos'"),
]


@pytest.mark.parametrize("kind, params, expected", BAD, ids=[f"{k}-{'-'.join(map(str, p.items()))}" for k, p, _ in BAD])
def test_validate_rejects_bad_scenario_values(tmp_path, capsys, kind, params, expected):
    code, err = validate(tmp_path, recipe(kind, **params), capsys)
    assert code == 2, err
    assert err.startswith(f"openworld: error: {expected}"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_fscil_shuffled_order_with_index_lists_needs_seed_zero(tmp_path, capsys):
    """split_files fix the natural class order: class_order 'shuffled' with a recipe seed > 0 is refused
    at validate time (it used to fail every run with seed > 0)."""
    bad = recipe("fscil", seeds=(0, 3), **FSCIL, class_order="shuffled", split_files="cec")
    code, err = validate(tmp_path, bad, capsys)
    assert code == 2
    assert err.startswith("openworld: error: scenario.class_order = 'shuffled': ") and "seed" in err
    code, _ = validate(tmp_path, recipe("fscil", seeds=(0,), **FSCIL, class_order="shuffled", split_files="cec"),
                       capsys)
    assert code == 0


# Rules that need the class count: decided at validate time for a loader that declares it.
COUNTED = [
    ("fscil", {"base_classes": 5, "ways": 2, "shots": 1},
     "scenario.ways = 2: (10 classes − base_classes 5) = 5 is not a multiple of ways"),
    ("fscil", {"base_classes": 12, "ways": 1, "shots": 1}, "scenario.base_classes = 12: "),
    ("fscil", {"base_classes": 5, "ways": 2, "shots": 1, "num_sessions": 4},
     "scenario.num_sessions = 4: base_classes 5 + (num_sessions 4 − 1) × ways 2 = 11 classes, the data has 10"),
    ("fscil", {"base_classes": 4, "ways": 2, "shots": 1, "holdout_unknown": 1},
     "scenario.ways = 2: (10 classes − holdout_unknown 1 − base_classes 4) = 5 is not a multiple of ways"),
    ("cil", {"num_tasks": 3}, "scenario.num_tasks = 3: the 10 classes do not split into 3 equal tasks"),
    ("cil", {"num_tasks": 11}, "scenario.num_tasks = 11: "),
    ("cil", {"num_tasks": 4, "first_task_classes": 5}, "scenario.first_task_classes = 5: 10 classes − 5 = 5"),
    ("cil", {"num_tasks": 2, "first_task_classes": 11}, "scenario.first_task_classes = 11: must be in 1…10"),
    ("cil", {"num_tasks": 1, "first_task_classes": 4}, "scenario.first_task_classes = 4: one task must hold"),
    ("cil", {"num_tasks": 3, "first_task_classes": 10}, "scenario.first_task_classes = 10: "),
    ("gcd", {"old_classes": [0, 12]}, "scenario.old_classes = [0, 12]: class ids must lie in 0…9"),
    ("gcd", {"old_classes": 10}, "scenario.old_classes = 10: "),
    ("ncd", {"old_classes": [0, 1], "new_classes": [2, 10]}, "scenario.new_classes = [2, 10]: class ids must lie"),
    ("open_set", {"known_classes": [0, 12]}, "scenario.known_classes = [0, 12]: ids in 0…9 required"),
    ("open_set", {"known_classes": 11}, "scenario.known_classes = 11: "),
    ("open_set", {"known_classes": [0, 1], "unknown_classes": [2, 10]}, "scenario.unknown_classes = [2, 10]: "),
    ("open_set", {"protocol": "dafsos", "meta_train_classes": 6, "n_way": 3, "n_unknown": 2},
     "scenario.n_unknown = 2: 4 meta-test classes (10 − meta_train_classes 6), n_way 3 + n_unknown 2 = 5 needed"),
    ("long_tail", {"profile": "step"}, None),  # 10 classes: fine
]


@pytest.mark.parametrize("kind, params, expected", COUNTED, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(COUNTED)])
def test_validate_uses_a_declared_class_count(tmp_path, capsys, kind, params, expected):
    code, err = validate(tmp_path, recipe(kind, source="counted10_test", **params), capsys)
    if expected is None:
        assert code == 0, err
        return
    assert code == 2, err
    assert err.startswith(f"openworld: error: {expected}"), err
    assert len(err.splitlines()) == 1


def test_synth_gauss_declares_its_class_count(tmp_path, capsys):
    """long_tail: the step profile needs an even number of classes; synth_gauss's count is its option."""
    bad = recipe("long_tail", profile="step")
    bad["scenario"]["data"]["num_classes"] = 11
    code, err = validate(tmp_path, bad, capsys)
    assert code == 2
    assert err.startswith("openworld: error: scenario.profile = 'step': needs an even number of classes"), err
    bad["scenario"]["data"]["num_classes"] = 12
    assert validate(tmp_path, bad, capsys)[0] == 0


def test_class_count_rules_raise_config_error_at_run_start(tmp_path):
    """A source without a declared class count (digits): validate cannot decide, the run stops up front
    with the same one-line ConfigError (a ValueError subclass) before any strategy runs."""
    from openworld.runner import Runner

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe("cil", num_tasks=3)))
    rec = load_recipe(path)  # validates: digits declares no class count
    runner = Runner(rec, out=tmp_path / "runs", progress=False, tensorboard=False, stream=open(tmp_path / "log", "w"))
    with pytest.raises(ConfigError) as info:
        runner.run()
    msg = str(info.value)
    assert msg.startswith("scenario.num_tasks = 3: the 10 classes do not split into 3 equal tasks") and "\n" not in msg
    assert not (tmp_path / "runs" / "t" / "ncm").exists()  # nothing ran


@pytest.mark.parametrize(
    "kind, params, expected",
    [
        ("gcd", {"old_classes": [0, 12]}, "scenario.old_classes = [0, 12]: class ids must lie in 0…9"),
        ("open_set", {"known_classes": [0, 12]}, "scenario.known_classes = [0, 12]: ids in 0…9 required"),
        ("open_set", {"protocol": "dafsos", "meta_train_classes": 7, "n_way": 3, "n_unknown": 2},
         "scenario.n_unknown = 2: 3 meta-test classes"),
        ("long_tail", {"n_max": 100000}, "scenario.n_max = 100000: "),
    ],
)
def test_scenarios_raise_the_same_config_error_when_built(kind, params, expected):
    """Scenario objects built directly (no recipe) give the same one-line ConfigError on first use."""
    from openworld.registry import SCENARIOS

    source = {"long_tail": "synth_gauss"}.get(kind, "digits")
    scenario = SCENARIOS.get(kind)(data={"source": source}, **params)
    with pytest.raises(ConfigError) as info:
        scenario.describe()
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_cli_run_class_count_error_is_exit_2(tmp_path, capsys):
    """`openworld run` prints the run-start ConfigError as one line and exits 2 (cli.cmd_run catches it)."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe("cil", num_tasks=3)))
    code = main(["run", str(path), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("openworld: error: scenario.num_tasks = 3: ") and len(err.splitlines()) == 1
