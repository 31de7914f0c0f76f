"""``openworld run --profile``: the phase timer's accounting (fake clock), the files a profiled run
writes, the printed summary line, identical results with and without it, and --resume with it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from openworld.cli import main
from openworld.config import load_recipe
from openworld.profiling import NULL_TIMER, PHASES, PhaseTimer, combine, make_report, summary_line, to_table
from openworld.runner import Runner, config_fingerprint

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
FAST = ["base.epochs=4", "strategies.finetune.epochs=3", "log_every=5"]


class FakeClock:
    """A clock the test moves by hand; counts the syncs the timer makes."""

    def __init__(self):
        self.t = 0.0
        self.syncs = 0

    def __call__(self) -> float:
        return self.t

    def sync(self) -> None:
        self.syncs += 1


# -- the timer ------------------------------------------------------------------------------------
def test_nested_phases_are_exclusive_and_add_up_to_the_total():
    clock = FakeClock()
    timer = PhaseTimer(clock=clock).start()  # t = 0
    clock.t = 1.0
    timer.enter("eval")
    clock.t = 3.0
    with timer.phase("metrics"):
        clock.t = 4.0
    clock.t = 6.0
    with timer.phase("metrics"):
        clock.t = 6.5
    clock.t = 8.0
    timer.exit()  # eval
    clock.t = 10.0
    assert timer.stop() == 10.0
    rep = timer.report(strategy="x")
    ph = rep["phases"]
    assert list(ph) == [*PHASES, "other"]
    assert ph["eval"] == {"seconds": 5.5, "inclusive_seconds": 7.0, "calls": 1, "share": 0.55}
    assert ph["metrics"] == {"seconds": 1.5, "inclusive_seconds": 1.5, "calls": 2, "share": 0.15}
    assert ph["other"] == {"seconds": 3.0, "inclusive_seconds": 3.0, "calls": None, "share": 0.3}
    assert ph["train"] == {"seconds": 0.0, "inclusive_seconds": 0.0, "calls": 0, "share": 0.0}
    assert sum(p["seconds"] for p in ph.values()) == rep["total_seconds"] == 10.0
    assert rep["strategy"] == "x" and rep["synchronized"] is False


def test_a_phase_inside_itself_counts_once_and_syncs_happen_at_every_boundary():
    clock = FakeClock()
    timer = PhaseTimer(clock=clock, sync=clock.sync).start()
    with timer.phase("train"):
        clock.t = 1.0
        with timer.phase("train"):
            clock.t = 2.0
        clock.t = 3.0
    timer.stop()
    train = timer.report()["phases"]["train"]
    assert (train["seconds"], train["inclusive_seconds"], train["calls"]) == (3.0, 3.0, 2)
    assert clock.syncs == 6  # start, 2 enters, 2 exits, stop
    assert timer.report()["synchronized"] is True


def test_wrap_iterate_unwind_and_backdate():
    clock = FakeClock()
    timer = PhaseTimer(clock=clock)
    clock.t = 5.0
    timer.start()
    timer.backdate(2.0, "startup")  # 3 s before the timer existed

    def items():
        for i in range(2):
            clock.t += 1.0  # producing an item takes 1 s
            yield i

    def log(v):
        clock.t += 0.25
        return v * 10

    logged = timer.wrap("logging", log)
    got = []
    for i in timer.iterate("data", items()):
        clock.t += 2.0  # using it: not data
        got.append(logged(i))
    assert got == [0, 10]
    timer.enter("train")  # an exception would skip the exit: unwind closes it
    clock.t += 4.0
    timer.unwind()
    clock.t += 1.0
    assert timer.stop() == 16.5 - 2.0
    ph = timer.report()["phases"]
    assert ph["startup"]["seconds"] == 3.0
    assert (ph["data"]["seconds"], ph["data"]["calls"]) == (2.0, 3)  # two items and the final StopIteration
    assert (ph["logging"]["seconds"], ph["logging"]["calls"]) == (0.5, 2)
    assert ph["train"]["seconds"] == 4.0
    assert ph["other"]["seconds"] == 5.0  # the 2 × 2 s of use + the last 1 s
    assert list(ph)[-2:] == ["startup", "other"]


def test_null_timer_is_a_no_op():
    def fn():
        return 1

    items = [1, 2]
    assert NULL_TIMER.enabled is False
    assert NULL_TIMER.wrap("logging", fn) is fn
    assert NULL_TIMER.iterate("data", items) is items
    assert NULL_TIMER.phase("train") is NULL_TIMER.phase("eval")  # one shared object, nothing allocated
    with NULL_TIMER.phase("train"):
        NULL_TIMER.enter("x")
        NULL_TIMER.exit()
    NULL_TIMER.unwind()
    assert NULL_TIMER.start() is NULL_TIMER and NULL_TIMER.stop() == 0.0


def test_combine_table_and_summary_line_exact():
    a = make_report(4.0, {"train": 3.0}, {"train": 3.0}, {"train": 1})
    b = make_report(4.0, {"eval": 1.0, "metrics": 0.5}, {"eval": 1.5, "metrics": 0.5}, {"eval": 2, "metrics": 4})
    both = combine([a, b], total=10.0)
    ph = both["phases"]
    assert (ph["train"]["seconds"], ph["eval"]["calls"], ph["other"]["seconds"]) == (3.0, 2, 5.5)
    assert combine([a, b])["total_seconds"] == 8.0
    assert summary_line(both, "runs/x/profile.md") == (
        "profile (10.0 s): train 30 % · eval 10 % · metrics 5 % · other 55 % → runs/x/profile.md"
    )
    table = to_table(a, "T")
    assert table.splitlines()[4:] == [
        "| phase      | seconds (excl.) |   share | calls | inclusive s |",
        "|------------|----------------:|--------:|------:|------------:|",
        "| data       |           0.000 |   0.0 % |     0 |       0.000 |",
        "| train      |           3.000 |  75.0 % |     1 |       3.000 |",
        "| eval       |           0.000 |   0.0 % |     0 |       0.000 |",
        "| metrics    |           0.000 |   0.0 % |     0 |       0.000 |",
        "| checkpoint |           0.000 |   0.0 % |     0 |       0.000 |",
        "| logging    |           0.000 |   0.0 % |     0 |       0.000 |",
        "| other      |           1.000 |  25.0 % |       |       1.000 |",
        "| total      |           4.000 | 100.0 % |       |             |",
    ]
    assert "exclusive" in table.splitlines()[2]  # the header says which


# -- through the runner and the CLI --------------------------------------------------------------
def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def metrics_only(res: dict) -> list[dict]:
    return [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in res["sessions"]]


def runner(tmp_path: Path, name: str, **kwargs) -> Runner:
    recipe = load_recipe(QUICKSTART, FAST)
    kwargs.setdefault("cache_dir", tmp_path / f"cache_{name}")
    return Runner(recipe, out=tmp_path / name, progress=False, stream=open(tmp_path / f"{name}.log", "a"),
                  strategies=["ncm", "finetune"], **kwargs)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same recipe without and with --profile (each trains its own base model)."""
    tmp = tmp_path_factory.mktemp("profile")
    plain = runner(tmp, "plain").run()
    profiled = runner(tmp, "profiled", profile=True).run()
    return tmp, plain, profiled


def test_results_are_identical_with_and_without_profile(pair):
    tmp, plain, profiled = pair
    assert [r.status for r in profiled] == ["finished", "finished"]
    for a, b in zip(plain, profiled):
        ra, rb = results(a.run_dir), results(b.run_dir)
        assert metrics_only(ra) == metrics_only(rb) and ra["summary"] == rb["summary"]
        assert ra["config_fingerprint"] == rb["config_fingerprint"]
        assert (a.run_dir / "config.resolved.yaml").read_text() == (b.run_dir / "config.resolved.yaml").read_text()
        assert not (a.run_dir / "profile.json").exists()  # off: nothing written
    assert not (tmp / "plain" / "quickstart" / "profile.json").exists()


def test_profiled_runs_write_tables_that_add_up(pair):
    tmp, _, profiled = pair
    for r in profiled:
        rep = json.loads((r.run_dir / "profile.json").read_text())
        ph = rep["phases"]
        assert list(ph) == [*PHASES, "other"] and rep["status"] == "finished" and rep["strategy"] == r.strategy
        assert sum(p["seconds"] for p in ph.values()) == pytest.approx(rep["total_seconds"], abs=1e-9)
        assert sum(p["share"] for p in ph.values()) == pytest.approx(1.0, abs=1e-9)
        assert all(p["seconds"] >= 0 for p in ph.values())
        # every session trained, evaluated, scored, checkpointed and logged: 6 sessions of the quickstart
        assert ph["train"]["calls"] == 6 + 1  # + strategy.setup
        assert ph["eval"]["calls"] == 6 and ph["checkpoint"]["calls"] >= 6 and ph["metrics"]["calls"] > 6
        assert ph["train"]["inclusive_seconds"] >= ph["train"]["seconds"]
        md = (r.run_dir / "profile.md").read_text()
        assert md.startswith(f"# Profile — quickstart · {r.strategy} · seed 0 (finished)") and "| total" in md
    top = json.loads((tmp / "profiled" / "quickstart" / "profile.json").read_text())
    assert [x["run_dir"] for x in top["runs"]] == ["ncm/seed0", "finetune/seed0"]
    assert top["total_seconds"] >= sum(x["total_seconds"] for x in top["runs"])
    line = (tmp / "profiled.log").read_text().strip().splitlines()[-1]
    assert re.fullmatch(r"profile \(\d+\.\d s\): train \d+ % · .* · other \d+ % → .*/quickstart/profile\.md "
                        r"\(per run: <strategy>/seed<k>/profile\.md\)", line), line


def test_profile_with_resume_is_accepted_and_changes_nothing(pair, tmp_path):
    _, plain, _ = pair
    with pytest.raises(KeyboardInterrupt):
        runner(tmp_path, "r", stop_after_session=2).run()  # killed without --profile
    resumed = runner(tmp_path, "r", resume=True, profile=True).run()  # the fingerprint does not see it
    assert [r.status for r in resumed] == ["finished", "finished"]
    for a, b in zip(plain, resumed):
        assert metrics_only(results(a.run_dir)) == metrics_only(results(b.run_dir))
    ncm = json.loads((resumed[0].run_dir / "profile.json").read_text())
    assert ncm["resumed_from_session"] == 3 and ncm["phases"]["eval"]["calls"] == 3
    assert json.loads((resumed[1].run_dir / "profile.json").read_text())["resumed_from_session"] == 0


def test_profile_is_not_part_of_the_fingerprint(tmp_path):
    recipe = load_recipe(QUICKSTART, FAST)
    a = Runner(recipe, out=tmp_path, progress=False).resolved_config("ncm", 0)
    b = Runner(recipe, out=tmp_path, progress=False, profile=True).resolved_config("ncm", 0)
    assert a == b and config_fingerprint(a) == config_fingerprint(b)


def test_cli_profile_flag_writes_the_files_and_prints_the_line(tmp_path, capsys):
    args = ["run", str(QUICKSTART), "--strategies", "ncm", "--out", str(tmp_path), "--no-progress", "--profile"]
    args += [a for f in FAST for a in ("--set", f)]
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--stop-after-session", "1"])
    run_dir = tmp_path / "quickstart" / "ncm" / "seed0"
    assert json.loads((run_dir / "profile.json").read_text())["status"] == "interrupted"  # written on a kill too
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("profile (") and out[-1].endswith(
        f"→ {tmp_path / 'quickstart' / 'profile.md'} (per run: <strategy>/seed<k>/profile.md)")
    top = json.loads((tmp_path / "quickstart" / "profile.json").read_text())
    assert top["phases"]["startup"]["calls"] == 1  # imports and recipe loading of the command
    assert (run_dir / "profile.md").is_file() and (tmp_path / "quickstart" / "profile.md").is_file()
    assert "--profile" in _run_help()


def _run_help() -> str:
    from openworld.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices["run"].format_help()
