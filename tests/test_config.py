"""Recipes: includes, presets, overrides, and one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from openworld.cli import main
from openworld.config import ConfigError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def minimal(**extra) -> dict:
    recipe = {
        "name": "t",
        "scenario": {"kind": "fscil", "data": {"source": "digits"}, "base_classes": 5, "ways": 1, "shots": 5},
        "backbone": {"name": "cnn8"},
        "strategies": {"ncm": {}},
    }
    recipe.update(extra)
    return recipe


def test_quickstart_validates_and_pulls_presets():
    recipe = load_recipe(QUICKSTART)
    assert recipe.strategy_params("teen") == {"softmax_t": 16, "shift_weight": 0.1}  # strategies/teen.yaml
    assert recipe.strategy_params("finetune")["epochs"] == 20  # the recipe wins over strategies/finetune.yaml
    assert recipe.strategy_params("finetune")["momentum"] == 0.9  # …and the preset fills the rest


def test_overrides_and_includes(tmp_path):
    parent = write(tmp_path / "parent.yaml", minimal(seeds=[3]))
    child = write(tmp_path / "child.yaml", {"defaults": ["parent.yaml"], "name": "child", "base": {"epochs": 2}})
    recipe = load_recipe(child, ["base.optimizer.lr=0.5", "strategies.teen={shift_weight: 0.2}", "seeds=[1,2]"])
    assert recipe.name == "child" and recipe.base.epochs == 2 and recipe.base.optimizer.lr == 0.5
    assert recipe.seeds == [1, 2] and recipe.strategies["teen"] == {"shift_weight": 0.2}
    assert parent.exists()


def test_paper_protocol_sets_released_values(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", minimal(protocol="paper", strategies={"teen": {}})))
    assert recipe.base.selection == "test"
    assert recipe.metrics.session_acc == "batch_mean" and recipe.metrics.hm_rounding


@pytest.mark.parametrize(
    "override, expected",
    [
        ("scenario.ways=five", "scenario.ways = 'five'"),
        ("device=tpu", "device = 'tpu': Input should be 'auto', 'cpu' or 'cuda'"),
        ("base.epochz=3", "base.epochz: unknown key; allowed: epochs, batch_size"),
        ("base.optimizer.name=rmsprop", "base.optimizer.name = 'rmsprop'"),
        (
            "strategies.teen={softmax_tt: 3}",
            "strategies.teen.softmax_tt: unknown parameter; allowed: softmax_t, shift_weight",
        ),
        ("strategies.teen={shift_weight: lots}", "strategies.teen.shift_weight = 'lots'"),
        ("strategies.teeen={}", "strategies.teeen = 'teeen': unknown strategy 'teeen' (did you mean 'teen'?)"),
        ("scenario.kind=fscl", "scenario.kind = 'fscl': unknown scenario 'fscl' (did you mean 'fscil'?)"),
        ("scenario.data.source=cifar", "scenario.data.source = 'cifar'"),
        ("backbone.name=resnet21", "backbone.name = 'resnet21'"),
        ("backbone.widht=3", "backbone.widht: unknown parameter; allowed: width"),
        ("scenario.shotz=3", "scenario.shotz: unknown parameter"),
        ("seeds=[]", "seeds = []"),
        ("base.epochs=0", "base.epochs = 0: Input should be greater than 0"),
        ("scenario.data.augment=ovorr", "scenario.data.augment = 'ovorr': unknown augmentation; allowed: "),
        ("metrics.label_metric=tree", "metrics.label_metric = 'tree': Input should be 'hierarchy'"),
        ("metrics.chunk_size=0", "metrics.chunk_size = 0"),
    ],
)
def test_invalid_recipes_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_recipe(QUICKSTART, [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"strategies.teen.defaults = 'nope': no preset nope.yaml in"):
        load_recipe(write(tmp_path / "r.yaml", minimal(strategies={"teen": {"defaults": "nope"}})))
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML at line 3, column 1"):
        load_recipe(write(tmp_path / "bad.yaml", "name: x\nscenario: [unclosed\n"))
    with pytest.raises(ConfigError, match="recipe not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_cli_config_error_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["validate", str(QUICKSTART), "--set", "scenario.ways=five"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openworld: error: scenario.ways = 'five'")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_validate_and_list(capsys):
    assert main(["validate", str(QUICKSTART)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["list", "strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("teen", "ncm", "finetune", "joint"):
        assert name in out


def test_help_starts_fast():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "openworld", "--help"], capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0 and "run" in proc.stdout
    # Heavy modules stay unimported: measure the import itself rather than wall time on a loaded CI box.
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, openworld.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "False"
    assert elapsed < 5.0


def test_cli_missing_data_is_one_clear_error(tmp_path, capsys):
    recipe = ROOT / "scenarios" / "fscil_omniglot_small.yaml"
    code = main(["run", str(recipe), "--out", str(tmp_path), "--set", f"scenario.data.root={tmp_path / 'nowhere'}"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openworld: error: omniglot: dataset not found")
    assert "images_background_small1.zip" in err and str(tmp_path / "nowhere") in err and "OPENWORLD_DATA" in err
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_constructs(path):
    """Each shipped recipe passes validation, and its scenario and strategies construct from their
    parameters (no data is read: paper recipes need data users provide)."""
    from openworld.registry import SCENARIOS

    recipe = load_recipe(path)
    scenario = SCENARIOS.get(recipe.scenario.kind)(**recipe.scenario_params())
    assert scenario.get_params()["data"]["source"] == recipe.scenario.data.source
    for entry in recipe.strategies:
        strategy = recipe.strategy_class(entry)(**recipe.strategy_params(entry))
        assert set(recipe.strategy_params(entry)) <= set(strategy.get_params()), entry


def test_chunk_size_null_drops_batch_mean_and_conflicts_with_batch_mean_accuracy():
    recipe = load_recipe(QUICKSTART, ["metrics.chunk_size=null"])
    assert recipe.metrics.chunk_size is None
    with pytest.raises(ConfigError, match=r"^metrics.chunk_size: null leaves no acc_batch_mean for "
                                          r"metrics.session_acc = 'batch_mean'"):
        load_recipe(QUICKSTART, ["metrics.chunk_size=null", "metrics.session_acc=batch_mean"])
