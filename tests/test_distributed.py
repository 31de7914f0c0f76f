"""One run across two processes (torchrun, gloo on CPU) against the same run in one process.

Tolerance: each rank trains on its half of every global batch with DDP-averaged gradients, which
is the single-process update except for BatchNorm, whose batch statistics are per rank on CPU
(SyncBatchNorm needs a GPU). Per-session accuracy of the prototype classifier therefore agrees
within 3 points, not bit for bit; evaluation itself is identical (rank 0, same engine).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["run", str(ROOT / "scenarios" / "quickstart.yaml"), "--strategies", "ncm", "--no-progress",
        "--set", "base.epochs=5"]
TOLERANCE = 3.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_matches_single_process(tmp_path):
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "openworld"]
    two = subprocess.run(env_cmd + ARGS + ["--out", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=600, check=False)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "openworld", *ARGS, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, check=False)
    assert one.returncode == 0, one.stderr[-2000:]
    runs = sorted((tmp_path / "two").rglob("results.json"))
    assert len(runs) == 1  # one run directory, written by rank 0
    res_two = json.loads(runs[0].read_text())
    res_one = json.loads(next((tmp_path / "one").rglob("results.json")).read_text())
    assert res_two["status"] == res_one["status"] == "finished"
    assert len(res_two["sessions"]) == len(res_one["sessions"]) == 6
    for a, b in zip(res_two["sessions"], res_one["sessions"]):
        assert abs(a["metrics"]["test"]["acc"] - b["metrics"]["test"]["acc"]) <= TOLERANCE
    assert "world_size: 2" in (runs[0].parent / "config.resolved.yaml").read_text()
    assert len(list(runs[0].parent.glob("events.out.tfevents.*"))) == 1
    assert two.stdout.count("Session accuracy") == 1  # the table is printed once, by rank 0
