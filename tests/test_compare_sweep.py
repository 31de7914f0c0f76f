"""`openworld compare` and `openworld sweep`: aggregation, significance, plots, launchers, skipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy.stats import ttest_rel

from openworld.cli import main
from openworld.compare import compare, paired_p_value, plot
from openworld.config import load_recipe
from openworld.runner import Runner
from openworld.sweep import Job, expand, parse_grid, run_slurm

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    recipe = load_recipe(QUICKSTART, ["base.epochs=3", "strategies={ncm: {}, finetune: {epochs: 3, lr: 0.01}}"])
    with open(out / "log.txt", "w") as log:
        Runner(recipe, out=out, seeds=[0, 1, 2], progress=False, stream=log).run()
    failed = out / "quickstart" / "broken" / "seed0"
    failed.mkdir(parents=True)
    (failed / "results.json").write_text(json.dumps(
        {"recipe": "quickstart", "strategy": "broken", "seed": 0, "status": "failed", "scenario": "fscil",
         "reason": "NonFiniteLossError: boom", "sessions": []}))
    return out / "quickstart"


def test_paired_p_value():
    a, b = {0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.9, 2: 2.0}
    assert paired_p_value(a, b) == pytest.approx(ttest_rel([1, 2, 4], [0.5, 1.9, 2.0]).pvalue)
    assert paired_p_value(a, a) == 1.0
    assert paired_p_value({0: 1.0}, {0: 2.0}) is None  # one common seed: no test
    assert paired_p_value({0: 1.0, 1: 2.0}, {2: 1.0, 3: 2.0}) is None


def test_compare_table_marks_best_and_lists_failures(runs):
    result = compare([runs])
    labels = [g.label for g in result.groups]
    assert set(labels) == {"ncm", "finetune", "broken"}
    assert result.metrics[:3] == ["avg", "pd", "last"]
    ncm, ft = result.table["ncm"], result.table["finetune"]
    assert ncm["avg"].best and not ft["avg"].best  # prototypes beat naive fine-tuning
    assert ncm["pd"].best  # lower is better for the performance drop
    assert ncm["avg"].n == 3 and ncm["avg"].std is not None
    assert ft["avg"].p_vs_best is not None and 0 <= ft["avg"].p_vs_best <= 1
    md = result.to_markdown()
    assert "| ncm | 3/3 |" in md and "paired t-test" in md
    assert "Failed runs" in md and "NonFiniteLossError: boom" in md
    data = result.to_json()
    assert {g["strategy"] for g in data["groups"]} == {"ncm", "finetune", "broken"}
    assert data["failed"][0]["reason"] == "NonFiniteLossError: boom"
    assert "ncm,quickstart,avg," in result.to_csv()


def test_compare_plots(runs, tmp_path):
    paths = plot(compare([runs]), tmp_path)
    names = {p.name for p in paths}
    assert names >= {"acc_per_session.png", "fscil_base_novel_hm.png"}
    for p in paths:
        assert p.stat().st_size > 10_000  # a real figure, not an empty canvas
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_cli_writes_files(runs, tmp_path, capsys):
    assert main(["compare", str(runs), "--out", str(tmp_path), "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "| ncm |" in out and "plot:" in out
    for name in ("compare.md", "compare.csv", "compare.json"):
        assert (tmp_path / name).is_file()
    assert main(["compare", str(tmp_path / "nothing-here")]) == 2


def test_sweep_grid_parsing_and_validation(tmp_path):
    assert parse_grid(["a.b=1,2", "c=[1,2],[3]"]) == {"a.b": ["1", "2"], "c": ["[1,2]", "[3]"]}
    jobs = expand(str(QUICKSTART), parse_grid(["base.epochs=2,3"]), [0, 1], str(tmp_path))
    assert len(jobs) == 4 and {j.tag for j in jobs} == {"epochs-2", "epochs-3"}
    from openworld.config import ConfigError

    with pytest.raises(ConfigError, match=r"grid point \{'base.epochs': '0'\}: base.epochs = 0"):
        expand(str(QUICKSTART), parse_grid(["base.epochs=0"]), [0], str(tmp_path))


def test_sweep_local_runs_skips_finished_and_compares(tmp_path, capsys):
    args = ["sweep", str(QUICKSTART), "--grid", "base.epochs=2,3", "--seeds", "0", "--set",
            "strategies={ncm: {}}", "--out", str(tmp_path), "--workers", "2"]
    assert main(args) == 0
    results = sorted(tmp_path.rglob("results.json"))
    assert len(results) == 2 and all(json.loads(r.read_text())["status"] == "finished" for r in results)
    before = [r.stat().st_mtime_ns for r in results]
    assert main(args) == 0  # re-issued: every run is already finished
    assert [r.stat().st_mtime_ns for r in results] == before
    assert "already finished" in (tmp_path / "logs" / "epochs-2_seed0.log").read_text()
    result = compare([tmp_path])
    assert sorted(g.label for g in result.groups) == ["ncm[base.epochs=2]", "ncm[base.epochs=3]"]


def test_sweep_slurm_path_through_submitit_local_executor(tmp_path):
    pytest.importorskip("submitit")
    jobs = [Job(str(QUICKSTART), ("base.epochs=2", "strategies={ncm: {}}"), 0, str(tmp_path / "runs"), "t")]
    submitted = run_slurm(jobs, tmp_path / ".submitit", partition=None, gpus=0, cpus=1, time_min=10, mem_gb=None,
                          cluster="local")
    assert [job.result() for job in submitted] == [0]
    res = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert res["status"] == "finished"


def test_compare_across_two_scenario_kinds(runs, tmp_path):
    """FSCIL runs and open-set runs in one comparison: one table, and each kind's plots."""
    import yaml

    recipe = {
        "name": "open_digits",
        "scenario": {"kind": "open_set", "data": {"source": "digits"}, "known_classes": [0, 1, 2, 3, 4, 5],
                     "unknown_classes": [6, 7, 8, 9]},
        "backbone": {"name": "mlp", "hidden": [64], "out_features": 32},
        "base": {"epochs": 4, "batch_size": 64, "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
                 "schedule": "constant", "selection": "last"},
        "strategies": {"msp": {}, "energy": {}},
        "seeds": [0, 1],
        "device": "cpu",
    }
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with open(tmp_path / "log.txt", "w") as log:
        Runner(load_recipe(path), out=tmp_path / "runs", progress=False, stream=log).run()
    result = compare([runs, tmp_path / "runs"])
    labels = {g.label for g in result.groups}
    assert {"quickstart/ncm", "open_digits/msp", "open_digits/energy"} <= labels
    assert {"avg", "last", "target/auroc", "target/hos"} <= set(result.metrics)
    assert result.table["open_digits/msp"]["target/auroc"].mean > 60
    assert result.table["quickstart/ncm"]["target/auroc"].mean is None  # not an open-set run
    names = {p.name for p in plot(result, tmp_path / "plots")}
    assert {"acc_per_session.png", "fscil_base_novel_hm.png", "open_set_roc.png"} <= names


def test_runs_differing_only_in_description_or_output_form_one_group(runs, tmp_path):
    """A recipe whose description was edited between seeds is still one strategy (the runner's resume
    fingerprint ignores the description too); a real setting that differs still splits the group."""
    import shutil

    src = runs / "ncm"
    dst = tmp_path / "quickstart" / "ncm"
    for k, (field, value) in enumerate([(None, None), ("description", "edited"), ("output", "elsewhere")]):
        shutil.copytree(src / f"seed{k}", dst / f"seed{k}")
        if field:
            f = dst / f"seed{k}" / "results.json"
            res = json.loads(f.read_text())
            res["config"][field] = value
            f.write_text(json.dumps(res))
    (group,) = compare([tmp_path / "quickstart"], ["avg"]).groups
    assert group.label == "ncm" and len(group.finished) == 3
    f = dst / "seed2" / "results.json"
    res = json.loads(f.read_text())
    res["config"]["eval_batch_size"] = 7
    f.write_text(json.dumps(res))
    assert sorted(g.label for g in compare([tmp_path / "quickstart"], ["avg"]).groups) == [
        "ncm[eval_batch_size=256]", "ncm[eval_batch_size=7]"]
