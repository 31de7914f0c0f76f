"""The bench scripts' ``--json``: the stored table has the published columns (tiny sizes, a few seconds)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), "the script's own printout is kept"
    return json.loads(out.read_text())


def test_bench_open_set_json(tmp_path):
    res = run_bench("bench_open_set.py", ["--n", "2000", "--repeats", "1"], tmp_path / "open_set.json")
    (table,) = res["tables"]
    assert table["columns"] == ["device", "n", "ours: AUROC + FPR@95 + AUPR-In + AUPR-Out", "scikit-learn (CPU)",
                                "ratio"]
    assert len(table["rows"]) == 1
    assert table["rows"][0][1] == "2,000" and table["rows"][0][-1].endswith("×")
    assert any("max |ours − sklearn|" in n for n in res["notes"])
    assert res["params"]["n"] == 2000


def test_bench_moco_queue_json(tmp_path):
    if importlib.util.find_spec("pytorch_metric_learning") is None:
        pytest.skip("pytorch_metric_learning is not installed")
    res = run_bench("bench_moco_queue.py", ["--queue", "64", "--batch", "32", "--dim", "8", "--steps", "1"],
                    tmp_path / "moco.json")
    (table,) = res["tables"]
    assert table["columns"] == ["queue", "batch", "dim", "path", "ms/step", "ratio"]
    assert len(table["rows"]) == 2
    assert [r[:3] for r in table["rows"]] == [["64", "32", "8"]] * 2
    assert table["rows"][0][-1] == "—" and table["rows"][1][-1].endswith("×")
