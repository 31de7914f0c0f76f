"""Grid × seed sweeps on existing engines: a bounded local process pool, or a SLURM job array
through submitit. Every job is an ordinary ``openworld run`` with ``--resume``, writing an ordinary
run directory, so ``openworld compare`` works on the result and a re-issued sweep skips finished runs.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from openworld.config import ConfigError, load_recipe


@dataclass(frozen=True)
class Job:
    recipe: str
    overrides: tuple[str, ...]
    seed: int
    out: str
    tag: str

    def argv(self) -> list[str]:
        args = ["run", self.recipe, "--seeds", str(self.seed), "--out", self.out, "--resume", "--no-progress"]
        for o in self.overrides:
            args += ["--set", o]
        return args


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["a.b=1,2", "c=x"]`` -> ``{"a.b": ["1", "2"], "c": ["x"]}``; values stay YAML text."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(
                f"--grid {item!r}: expected key.path=v1,v2,… (e.g. --grid strategies.teen.shift_weight=0,0.1)"
            )
        grid[key.strip()] = [v.strip() for v in _split_values(values)]
    return grid


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets, so ``[1,2],[3]`` gives two values."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v for v in out if v.strip()]


def _tag(point: dict[str, str]) -> str:
    if not point:
        return "default"
    parts = [f"{k.split('.')[-1]}-{v}" for k, v in point.items()]
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in "__".join(parts))


def expand(
    recipe_path: str, grid: dict[str, list[str]], seeds: list[int] | None, out: str, extra: list[str] = ()
) -> list[Job]:
    """Every grid point × seed, each validated as a recipe before anything runs."""
    keys = list(grid)
    jobs = []
    for values in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        point = dict(zip(keys, values))
        overrides = tuple(extra) + tuple(f"{k}={v}" for k, v in point.items())
        try:
            recipe = load_recipe(recipe_path, overrides)
        except ConfigError as exc:
            raise ConfigError(f"grid point {point}: {exc}") from None
        tag = _tag(point)
        for seed in seeds if seeds is not None else recipe.seeds:
            jobs.append(Job(str(recipe_path), overrides, int(seed), str(Path(out) / tag), tag))
    return jobs


def run_job(job: Job) -> int:
    """One job in-process (what a SLURM array task executes)."""
    from openworld.cli import main

    return int(main(job.argv()) or 0)


def run_local(jobs: list[Job], workers: int, log_dir: Path) -> list[int]:
    """A bounded pool of ``openworld run`` processes; each job's output goes to its own log file."""
    log_dir.mkdir(parents=True, exist_ok=True)

    def launch(job: Job) -> int:
        log = log_dir / f"{job.tag}_seed{job.seed}.log"
        with open(log, "w") as f:
            proc = subprocess.run(
                [sys.executable, "-m", "openworld", *job.argv()],
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                check=False,
            )
        return proc.returncode

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(launch, jobs))


def run_slurm(
    jobs: list[Job],
    folder: Path,
    *,
    partition: str | None,
    gpus: int,
    cpus: int,
    time_min: int,
    mem_gb: int | None,
    cluster: str | None = None,
    array_parallelism: int = 64,
):
    """Submit one job array through submitit; returns the submitit jobs (``cluster="local"`` or
    ``"debug"`` runs them here, which is how the tests exercise this path)."""
    try:
        import submitit
    except ImportError:
        raise RuntimeError("--launcher slurm needs submitit: pip install 'openworld[slurm]'") from None
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = {
        "timeout_min": time_min,
        "gpus_per_node": gpus,
        "cpus_per_task": cpus,
        "name": "openworld",
        "slurm_array_parallelism": array_parallelism,
    }
    if partition:
        params["slurm_partition"] = partition
    if mem_gb:
        params["mem_gb"] = mem_gb
    executor.update_parameters(**params)
    return executor.map_array(run_job, jobs)


def write_manifest(jobs: list[Job], out: Path, grid: dict[str, list[str]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sweep.yaml"
    manifest = {
        "grid": grid,
        "jobs": [{"tag": j.tag, "seed": j.seed, "overrides": list(j.overrides), "out": j.out} for j in jobs],
    }
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path
