"""``openworld report``: generated blocks in the docs, rebuilt from run directories (issue 13 item 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from openworld.report import ReportError, parse_blocks, report

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
SETS = "set=base.epochs=2 set=strategies.finetune.epochs=1"


def doc_with(tmp_path: Path, attrs: str, body: str = "stale\n") -> Path:
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Results\n\nbefore\n\n<!-- report:begin {attrs} -->\n{body}<!-- report:end -->\n\nafter\n")
    return doc


def test_block_attributes_are_parsed_and_bad_ones_named(tmp_path):
    doc = doc_with(tmp_path, f"id=q recipe={QUICKSTART} strategies=ncm,teen seeds=0,1 {SETS} std=population")
    (b,) = parse_blocks(doc)
    assert (b.id, b.strategies, b.seeds, b.sets, b.std, b.threads) == (
        "q", ["ncm", "teen"], [0, 1], ["base.epochs=2", "strategies.finetune.epochs=1"], "population", 1)
    assert b.command(Path("runs/report")) == (
        f"openworld run {QUICKSTART} --strategies ncm,teen --seeds 0,1 --set base.epochs=2 "
        "--set strategies.finetune.epochs=1 --threads 1 --out runs/report/q --resume")
    (shared,) = parse_blocks(doc_with(tmp_path, f"id=q2 runs=q recipe={QUICKSTART}"))
    assert shared.run_dir(Path("r")) == Path("r/q") and "--out r/q " in shared.command(Path("r"))
    for attrs, msg in [
        (f"id=q recipe={QUICKSTART} colour=red", "report block attribute 'colour': unknown; allowed:"),
        (f"recipe={QUICKSTART}", "a report block has no id="),
        (f"id=q recipe={QUICKSTART} claim=c method=teen", "a claim needs baseline, metric, direction"),
        (f"id=q recipe={QUICKSTART} claim=c method=teen baseline=ncm metric=hm direction=up",
         "direction = 'up'; allowed: higher, lower"),
    ]:
        with pytest.raises(ReportError, match=msg):
            parse_blocks(doc_with(tmp_path, attrs))
    (tmp_path / "bad.md").write_text("<!-- report:begin id=x recipe=r -->\nno end\n")
    with pytest.raises(ReportError, match="unbalanced report markers"):
        parse_blocks(tmp_path / "bad.md")


def test_missing_runs_are_named_with_the_command_that_makes_them(tmp_path):
    doc = doc_with(tmp_path, f"id=q recipe={QUICKSTART} strategies=ncm seeds=0 {SETS}")
    with pytest.raises(ReportError, match=r"block 'q': runs missing under .*: ncm/seed0 \(make them with "
                                          r"`openworld report --run --only q`\)"):
        report([doc], tmp_path / "runs")
    with pytest.raises(ReportError, match="strategies nope are not in"):
        report([doc_with(tmp_path, f"id=q recipe={QUICKSTART} strategies=nope")], tmp_path / "runs")


def test_run_writes_the_block_check_passes_then_detects_an_edit_and_evidence_is_recorded(tmp_path):
    attrs = (f"id=q recipe={QUICKSTART} strategies=teen,ncm seeds=0,1 {SETS} metrics=last,acc_novel sessions=acc "
             "per_seed=last claim=teen_vs_ncm method=teen baseline=ncm metric=last direction=higher")
    doc = doc_with(tmp_path, attrs)
    runs, evidence = tmp_path / "runs", tmp_path / "evidence.json"
    out = report([doc], runs, run=True, evidence_path=evidence)
    text = doc.read_text()
    assert out.changed == [f"{doc}: block 'q'"] and doc in out.written
    assert text.startswith("# Results\n\nbefore\n") and text.endswith("<!-- report:end -->\n\nafter\n")
    assert "--out runs/report/q --resume" in text and "| teen | 2/2 |" in text and "| ncm | 2/2 |" in text
    assert "**Claim `teen_vs_ncm`**" in text and "stale" not in text
    assert "| teen | acc | " in text and "| s5 |" in text  # the per-session table
    assert "| seed | ncm | teen |" in text and "\n| 1 | " in text  # the per-seed table
    data = json.loads(evidence.read_text())
    (claim,) = data["claims"]
    assert claim["seeds"] == [0, 1] and len(claim["method_values"]) == 2 and claim["metric"] == "last"
    assert claim["holds"] == (claim["difference"] > 0 and claim["p_value"] < 0.05)
    assert data["summary"] == {"claims": 1, "hold": int(claim["holds"])}
    # the committed text matches its runs; no run is repeated (finished runs are kept)
    mtime = (runs / "q" / "quickstart" / "teen" / "seed0" / "results.json").stat().st_mtime_ns
    assert report([doc], runs, run=True, check=True).changed == []
    assert (runs / "q" / "quickstart" / "teen" / "seed0" / "results.json").stat().st_mtime_ns == mtime
    # a hand-edited number is caught, with a diff, and the CLI exits 1 without writing
    doc.write_text(text.replace("| teen | 2/2 |", "| teen | 2/2 | 99.9 |", 1))
    res = subprocess.run([sys.executable, "-m", "openworld", "report", str(doc), "--runs", str(runs), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "1 block(s) differ" in res.stderr and "99.9" in res.stdout
    assert "99.9" in doc.read_text()
    res = subprocess.run([sys.executable, "-m", "openworld", "report", str(doc), "--runs", str(runs),
                          "--evidence", str(evidence)], capture_output=True, text=True)
    assert res.returncode == 0 and doc.read_text() == text and "claims: " in res.stderr


def test_duplicate_ids_and_unknown_only_are_errors(tmp_path):
    a = doc_with(tmp_path, f"id=q recipe={QUICKSTART}")
    b = tmp_path / "other.md"
    b.write_text(a.read_text())
    with pytest.raises(ReportError, match="id also used in"):
        report([a, b], tmp_path / "runs")
    with pytest.raises(ReportError, match="--only z: no such block"):
        report([a], tmp_path / "runs", only=["z"])
    res = subprocess.run([sys.executable, "-m", "openworld", "report", str(tmp_path / "nope.md")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no such document" in res.stderr


@pytest.mark.slow
def test_committed_evidence_block_regenerates_exactly(tmp_path):
    """``--check`` on the committed docs: the TEEN claim's runs (10 × ~10 s) rebuilt from scratch give the
    published text bit for bit (same CPU kind and thread count as the committed runs)."""
    res = subprocess.run(
        [sys.executable, "-m", "openworld", "report", "docs/evidence.md", "--run", "--check",
         "--only", "evidence_teen_novel,evidence_teen_hm", "--runs", str(tmp_path / "runs")],
        capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


FAKE_BENCH = """
import argparse, sys
sys.path.insert(0, {root!r})
from openworld.report import write_bench_result
ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=10)
ap.add_argument("--json")
a = ap.parse_args()
print("measuring", a.n)
if a.n < 0:
    sys.exit("negative n")
write_bench_result(a.json, [{{"title": "speed", "columns": ["n", "ours", "ratio"],
                             "rows": [[str(a.n), "1.00 ms", "3.0×"]]}}], notes=["max |diff| = 0"],
                   params=vars(a))
"""


def test_bench_block_runs_the_script_once_renders_its_tables_and_checks_the_text(tmp_path):
    script = tmp_path / "bench_fake.py"
    script.write_text(FAKE_BENCH.format(root=str(ROOT)))
    doc = doc_with(tmp_path, f'id=speed bench={script} args="--n 7"')
    (b,) = parse_blocks(doc)
    runs = tmp_path / "runs"
    assert b.command(Path("runs/report")) == f"python {script} --n 7 --json runs/report/speed/bench.json"
    with pytest.raises(ReportError, match=r"runs missing under .*: bench.json"):
        report([doc], runs)
    report([doc], runs, run=True)
    text = doc.read_text()
    assert "**speed**\n\n| n | ours | ratio |\n|---|---|---|\n| 7 | 1.00 ms | 3.0× |" in text
    assert "- max |diff| = 0" in text and "Measured " in text and "CPUs" in text
    stored = json.loads((runs / "speed" / "bench.json").read_text())
    assert stored["params"]["n"] == 7 and stored["machine"]["cpu_count"] >= 1
    mtime = (runs / "speed" / "bench.json").stat().st_mtime_ns
    assert report([doc], runs, run=True, check=True).changed == []  # not measured again
    assert (runs / "speed" / "bench.json").stat().st_mtime_ns == mtime
    doc.write_text(text.replace("3.0×", "30×"))
    assert report([doc], runs, check=True).changed == [f"{doc}: block 'speed'"]
    failing = doc_with(tmp_path, f'id=neg bench={script} args="--n -1"')
    with pytest.raises(ReportError, match="failed \\(exit 1\\).*negative n"):
        report([failing], runs, run=True)
    for attrs, msg in [(f"id=s bench={script} metrics=acc", "a bench= block takes only id, bench and args"),
                       ("id=s bench=bench/nope.py", "bench script bench/nope.py not found")]:
        with pytest.raises(ReportError, match=msg):
            report([doc_with(tmp_path, attrs)], runs, run=True)


def test_times_block_shows_recorded_seconds_per_strategy_against_the_limit(tmp_path):
    runs = tmp_path / "runs"
    recorded = {("teen", 0): [(100.0, 20.0), (50.0, 1.5)], ("teen", 1): [(140.0, 10.0), (60.0, 2.0)],
                ("ncm", 0): [(1.0, 2.0)], ("ncm", 1): [(1.5, 2.5)]}
    for (strategy, seed), sessions in recorded.items():
        d = runs / "t" / "quickstart" / strategy / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"status": "finished", "sessions": [
            {"train_seconds": a, "eval_seconds": b} for a, b in sessions]}))
    doc = doc_with(tmp_path, f"id=t recipe={QUICKSTART} strategies=teen,ncm seeds=0,1 times=200")
    report([doc], runs)
    text = doc.read_text()
    # teen: 171.5 and 212 s → mean 191.75, max 212 > 200; ncm: 3 and 4 s
    assert "| teen | 2 | 192 | 212 | **no** |" in text and "| ncm | 2 | 4 | 4 | yes |" in text
    assert "within 200 s" in text and "| strategy | seeds |" not in text  # no metrics table
    doc = doc_with(tmp_path, f"id=t recipe={QUICKSTART} strategies=ncm seeds=0 times=soon")
    with pytest.raises(ReportError, match="times='soon' must be a number"):
        report([doc], runs)
