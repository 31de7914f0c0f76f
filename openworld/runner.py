"""The experiment loop: strategies × seeds × sessions, evaluation, logging, checkpoints, resume.

Nothing here is setting-specific. A (strategy, seed) run that raises — a NaN loss, a bug, missing
data — is recorded as failed in its own ``results.json`` and the other runs go on.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openworld import distributed
from openworld.cache import Cache, atomic_torch_save, atomic_write_bytes
from openworld.config import ConfigError, Recipe
from openworld.data.views import batches
from openworld.logging import (
    TensorBoardLogger,
    flatten,
    format_table,
    truncate_events,
    write_json,
    write_metrics_csv,
)
from openworld.metrics import History, NonFiniteError, create_engine, harmonic_mean, mean_ci95
from openworld.metrics.label_metric import class_paths, hierarchy_distances, reported_value
from openworld.profiling import NULL_TIMER, PhaseTimer, combine, runs_table, summary_line, to_table
from openworld.registry import SCENARIOS
from openworld.scenarios.base import EvalSet, Scenario
from openworld.strategies.base import RunContext, TrainConfig, stable_hash

# Scenario kinds whose test metrics feed the cross-session History (pd/avg/last, A_t, forgetting, …).
CROSS_SESSION_KINDS = ("fscil", "cil")

# Headline metrics of the summary table per scenario kind (metrics.md §10); summary keys.
HEADLINES = {
    "fscil": ["avg", "pd", "last", "hm"],
    "cil": ["avg_acc_tasks", "forgetting", "acc", "aia"],
    "gcd": ["unlabelled/all_v2", "unlabelled/old_v2", "unlabelled/new_v2"],
    "ncd": ["acc", "nmi", "ari"],
    "long_tail": ["uniform/acc", "uniform/many", "uniform/medium", "uniform/few", "forward50/acc", "backward50/acc"],
    "open_set": ["target/hos", "target/os_star", "target/unk", "target/auroc", "target/fpr95", "target/closed_acc"],
}

# --profile: the command-level phase that holds the (separately profiled) runs.
RUNS_PHASE = "runs"

# Episodic scenarios (Scenario.episodic): summary keys of the means over episodes.
EPISODIC_HEADLINES = {
    "open_set": ["episodes/hos", "episodes/os_star", "episodes/unk", "episodes/auroc", "episodes/closed_acc"],
}


@dataclass
class RunResult:
    strategy: str
    seed: int
    status: str
    run_dir: Path
    summary: dict = field(default_factory=dict)
    sessions: list = field(default_factory=list)
    reason: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine (use --device cpu)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def environment_info(device: torch.device) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {
            p: version(p)
            for p in (
                "openworld",
                "torch",
                "torchvision",
                "timm",
                "numpy",
                "scikit-learn",
                "scipy",
                "torchmetrics",
                "pytorch-metric-learning",
            )
        },
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        **cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "git_commit": commit,
        "argv": sys.argv,
    }


# Recipe fields that cannot change a run's numbers (where it writes, how often it logs): left out of
# the configuration fingerprint that ``--resume`` compares.
# ``threads`` is left out too: a resumed run takes the thread count it started with (see Runner._run).
FINGERPRINT_IGNORES = ("output", "log_every", "description", "threads")

# environment.json fields on which CPU results depend bit for bit (thread count, instruction set).
DETERMINISM_FIELDS = ("torch_threads", "cpu_capability", "cpu_model", "device", "torch")


class ResumeMismatchError(ConfigError):
    """``--resume`` found a run directory made with another configuration (one line for the CLI)."""


# Keys added after runs were published, with the value that reproduces those runs: left out of the
# fingerprint while they hold it, so a finished run made before the key existed still resumes (and a run
# that sets it to anything else is a different configuration).
FINGERPRINT_LATE_DEFAULTS = {
    ("metrics", "label_metric"): None,
    ("metrics", "hierarchy_sep"): "/",
    ("strategy_params", "round_lr"): None,
}


def config_fingerprint(resolved: dict) -> str:
    """The hash of everything in a run's resolved configuration that can change its numbers."""
    kept = {k: v for k, v in resolved.items() if k not in FINGERPRINT_IGNORES}
    for (section, key), default in FINGERPRINT_LATE_DEFAULTS.items():
        sub = kept.get(section)
        if isinstance(sub, dict) and key in sub and sub[key] == default:
            kept[section] = {k: v for k, v in sub.items() if k != key}
    return stable_hash(kept)


def _config_diff(old: dict, new: dict, limit: int = 3) -> str:
    a = {k: v for k, v in flatten(old).items() if k.split(".")[0] not in FINGERPRINT_IGNORES}
    b = {k: v for k, v in flatten(new).items() if k.split(".")[0] not in FINGERPRINT_IGNORES}
    keys = sorted(k for k in set(a) | set(b) if json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str))
    shown = [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in keys[:limit]]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "; ".join(shown) + more if shown else "the configuration fingerprint differs"


def cpu_info() -> dict:
    """CPU model and the instruction set torch dispatches its CPU kernels to (results on the CPU are
    bit for bit the same only for the same thread count and instruction set)."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {"cpu_model": model or platform.processor() or platform.machine(), "cpu_capability": capability}


def _finite_or_none(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v


class Runner:
    """Runs every (strategy, seed) of a recipe; see :meth:`run`."""

    def __init__(
        self,
        recipe: Recipe,
        *,
        out: str | Path | None = None,
        resume: bool = False,
        device: str | None = None,
        strategies: list[str] | None = None,
        seeds: list[int] | None = None,
        progress: bool = True,
        tensorboard: bool = True,
        cache_dir: str | Path | None = None,
        stream=None,
        stop_after_session: int | None = None,
        threads: int | None = None,
        profile: bool = False,
        profile_since: float | None = None,
    ):
        self.recipe = recipe
        self.out = Path(out or recipe.output) / recipe.name
        self.resume = resume
        self.device = resolve_device(device or recipe.device)
        # Under torchrun: one process group, one device per process; rank 0 evaluates and writes.
        self.rank, self.world = distributed.init_from_env(self.device.type)
        if self.world > 1:
            self.device = distributed.local_device(self.device.type)
        self.main = self.rank == 0
        unknown = [s for s in (strategies or []) if s not in recipe.strategies]
        if unknown:
            raise ValueError(
                f"--strategies: {', '.join(unknown)} not in the recipe; allowed: {', '.join(recipe.strategies)}"
            )
        self.strategies = strategies or list(recipe.strategies)
        self.seeds = seeds if seeds is not None else list(recipe.seeds)
        self.progress = progress
        self.tensorboard = tensorboard
        self.cache = Cache(cache_dir or Path(out or recipe.output) / ".cache")
        self.stream = stream or sys.stdout
        self.stop_after_session = stop_after_session  # testing hook: simulates a kill after session i
        # CPU threads, set again at the start of every run (a library may change them): results are the
        # same bit for bit only for the same thread count (and instruction set; both in environment.json).
        self._threads_explicit = bool(threads or recipe.threads)
        self.threads = int(threads or recipe.threads or torch.get_num_threads())
        if self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads}")
        self._scenarios: dict[tuple, Scenario] = {}
        self._memo: dict = {}  # base models shared by strategies within this process
        self._roc = None  # ROC points of the last open-set evaluation (for plots)
        self._threshold = None  # {"rule", "tau"} of the last open-set evaluation
        self._entry = None  # the strategy entry being run (for error messages)
        self._label_metrics: dict[tuple, torch.Tensor] = {}  # metrics.label_metric, by class names
        self._label_metric = None  # the one the current session's classification engines get
        # --profile: per-phase wall time, written per run directory (never part of the configuration,
        # so never of the fingerprint --resume compares); off, the timer is a no-op that never syncs.
        self.profile = profile
        self.profile_since = profile_since  # time.perf_counter() when the command started (its imports: "startup")
        self._timer = NULL_TIMER
        self._profiles: list[tuple[Path, dict]] = []
        self._resume_start = 0  # the session the run being profiled resumed at

    # ------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.main:
            print(text, file=self.stream, flush=True)

    def scenario(self, seed: int) -> Scenario:
        cls = SCENARIOS.get(self.recipe.scenario.kind)
        params = self.recipe.scenario_params()
        if "seed" in inspect.signature(cls.__init__).parameters:
            params["seed"] = seed
        key = (json.dumps(params, sort_keys=True, default=str),)
        if key not in self._scenarios:
            self._scenarios[key] = cls(**params)
        return self._scenarios[key]

    def run(self) -> list[RunResult]:
        top = self._new_timer()  # the whole command; each run also gets its own (run_one)
        if top.enabled and self.profile_since is not None:
            top.backdate(self.profile_since, "startup")
        self._profiles = []
        n = len(self.strategies)
        self.say(
            f"openworld: recipe {self.recipe.name!r} · {n} strateg{'y' if n == 1 else 'ies'}"
            f" × {len(self.seeds)} seed(s) on {self.device} → {self.out}"
        )
        # Load the data once up front: a missing or corrupt dataset is one clear error, not a failure
        # repeated for every (strategy, seed).
        with top.phase("data"):
            self.scenario(self.seeds[0]).describe()
        if self.resume:  # before anything runs: a changed recipe never resumes or skips silently
            for entry in self.strategies:
                for seed in self.seeds:
                    self.check_resumable(entry, seed)
        with top.phase(RUNS_PHASE):
            results = [self.run_one(entry, seed) for entry in self.strategies for seed in self.seeds]
        if self.main and self.tensorboard:
            with top.phase("logging"):
                write_custom_scalars_layout(self.out, results)
        self.say("")
        self.say(summary_table(results, self.recipe.scenario.kind, episodic=self.scenario(self.seeds[0]).episodic))
        failed = [r for r in results if r.status == "failed"]
        for r in failed:
            self.say(f"FAILED {r.strategy} seed {r.seed}: {r.reason} (details: {r.run_dir / 'error.log'})")
        self.say(f"\nTensorBoard: tensorboard --logdir {self.out}")
        if top.enabled:
            self._write_recipe_profile(top)
        return results

    # -- --profile -------------------------------------------------------------------------------
    def _new_timer(self):
        """A started :class:`PhaseTimer` under ``--profile`` (rank 0 only), else the no-op timer. On CUDA
        it synchronises the device at phase boundaries, so the times are the device's too."""
        if not (self.profile and self.main):
            return NULL_TIMER
        sync = None
        if self.device.type == "cuda":
            device = self.device

            def sync():
                torch.cuda.synchronize(device)

        return PhaseTimer(sync=sync).start()

    def _write_profile(self, timer: PhaseTimer, run_dir: Path, entry: str, seed: int, status: str) -> None:
        """``profile.json`` and ``profile.md`` of one (strategy, seed) run: the time of this process
        (a resumed run: from the session it resumed at)."""
        timer.stop()
        report = timer.report(strategy=entry, seed=seed, status=status, device=str(self.device),
                              resumed_from_session=self._resume_start)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "profile.json", report)
        title = f"Profile — {self.recipe.name} · {entry} · seed {seed} ({status})"
        if self._resume_start:
            title += f", resumed at session {self._resume_start}"
        atomic_write_bytes(run_dir / "profile.md", to_table(report, title).encode())
        self._profiles.append((run_dir, report))

    def _write_recipe_profile(self, top: PhaseTimer) -> None:
        """``<out>/profile.{json,md}``: every run of this command summed, plus the work before and
        after the runs, as shares of the command's wall time; and the one-line summary."""
        total = top.stop()
        own = top.report()
        own["phases"].pop(RUNS_PHASE, None)  # replaced by the runs' own profiles (the gap stays "other")
        runs = [rep for _, rep in self._profiles]
        report = combine([own, *runs], total=total, recipe=self.recipe.name, device=str(self.device),
                         runs=[{"run_dir": str(d.relative_to(self.out)), "status": rep["status"],
                                "total_seconds": rep["total_seconds"],
                                "shares": {k: p["share"] for k, p in rep["phases"].items()}}
                               for d, rep in self._profiles])
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "profile.json", report)
        text = to_table(report, f"Profile — {self.recipe.name}: {len(runs)} run(s) of this command")
        if self._profiles:
            text += "\n" + runs_table([(str(d.relative_to(self.out)), rep) for d, rep in self._profiles])
        atomic_write_bytes(self.out / "profile.md", text.encode())
        self.say(summary_line(report, self.out / "profile.md") + " (per run: <strategy>/seed<k>/profile.md)")

    # ------------------------------------------------------------------------------------------
    def run_dir(self, entry: str, seed: int) -> Path:
        return self.out / entry / f"seed{seed}"

    def resolved_config(self, entry: str, seed: int) -> dict:
        """The run's resolved configuration (``config.resolved.yaml``): the recipe with this one
        strategy entry, the seed, the device, the thread count and the strategy's full parameters."""
        recipe = self.recipe
        strategy = recipe.strategy_class(entry)(**recipe.strategy_params(entry))
        resolved = recipe.to_dict()
        resolved["strategies"] = {entry: recipe.strategies[entry]}
        resolved["seed"] = seed
        resolved["device"] = str(self.device)
        resolved["threads"] = self.threads if self.device.type == "cpu" else None
        resolved["strategy_params"] = strategy.get_params()
        resolved["world_size"] = self.world
        return json.loads(json.dumps(resolved, default=str))  # the form it has once written and read back

    def check_resumable(self, entry: str, seed: int) -> None:
        """Raise :class:`ResumeMismatchError` when the run directory holds a run of another
        configuration (compared by :func:`config_fingerprint`; runs written before fingerprints were
        recorded are compared through their ``config.resolved.yaml``)."""
        run_dir = self.run_dir(entry, seed)
        results_path, config_path = run_dir / "results.json", run_dir / "config.resolved.yaml"
        if not results_path.is_file() and not config_path.is_file():
            return
        current = self.resolved_config(entry, seed)
        stored_fp, stored = None, None
        if results_path.is_file():
            try:
                stored_fp = json.loads(results_path.read_text()).get("config_fingerprint")
            except json.JSONDecodeError:
                stored_fp = None
        if config_path.is_file():
            import yaml

            try:
                stored = yaml.safe_load(config_path.read_text())
            except yaml.YAMLError:
                stored = None
        if stored_fp is None and stored is not None:
            stored_fp = config_fingerprint(stored)
        if stored_fp is None:
            raise ResumeMismatchError(
                f"--resume: {run_dir} has no readable configuration to compare with; "
                "rerun without --resume to replace it, or choose another --out"
            )
        if stored_fp != config_fingerprint(current):
            diff = _config_diff(stored, current) if isinstance(stored, dict) else "its fingerprint differs"
            raise ResumeMismatchError(
                f"--resume: {run_dir} was run with another configuration ({diff}); "
                "rerun without --resume to replace it, or choose another --out"
            )

    def run_one(self, entry: str, seed: int) -> RunResult:
        run_dir = self.run_dir(entry, seed)
        results_path = run_dir / "results.json"
        timer = self._new_timer()
        if self.resume and results_path.is_file():
            self.check_resumable(entry, seed)
            prev = json.loads(results_path.read_text())
            if prev.get("status") == "finished":
                self.say(f"{entry} seed {seed}: already finished, skipped (--resume)")
                return RunResult(entry, seed, "finished", run_dir, prev.get("summary", {}), prev.get("sessions", []))
        if self.main and not self.resume and run_dir.exists():
            self.say(f"{entry} seed {seed}: replacing the earlier results in {run_dir} (--resume would continue them)")
            shutil.rmtree(run_dir)
        distributed.barrier()
        run_dir.mkdir(parents=True, exist_ok=True)
        record: dict[str, Any] = {"strategy": entry, "seed": seed, "status": "running", "sessions": []}
        self._tb = None
        self._timer, self._resume_start = timer, 0
        status = "interrupted"
        try:
            result = self._run(entry, seed, run_dir, record)
            status = result.status
            return result
        except KeyboardInterrupt:
            raise
        except (Exception, SystemExit) as exc:  # failure isolation: this run is marked failed, the others go on
            status = "failed"
            timer.unwind()  # phases the exception left open (entered without a with-block) end here
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, SystemExit):
                reason = f"SystemExit({exc.code!r}): the strategy called sys.exit; only this run stops"
            if self.main:
                with timer.phase("logging"):
                    atomic_write_bytes(run_dir / "error.log", traceback.format_exc().encode())
                    record.update(status="failed", reason=reason)
                    write_json(results_path, record)
            self.say(f"{entry} seed {seed}: FAILED — {reason}")
            return RunResult(entry, seed, "failed", run_dir, {}, record.get("sessions", []), reason)
        finally:
            timer.unwind()
            if self._tb is not None:
                with timer.phase("logging"):
                    self._tb.close()
                self._tb = None
            self._timer = NULL_TIMER
            if timer.enabled:
                self._write_profile(timer, run_dir, entry, seed, status)

    def _run(self, entry: str, seed: int, run_dir: Path, record: dict) -> RunResult:
        recipe = self.recipe
        self._entry = entry
        timer = self._timer
        ph = timer.phase
        threads = self.threads
        stored_config = run_dir / "config.resolved.yaml"
        if self.resume and not self._threads_explicit and stored_config.is_file():
            import yaml

            threads = int((yaml.safe_load(stored_config.read_text()) or {}).get("threads") or threads)
        torch.set_num_threads(threads)
        seed_everything(seed)
        with ph("data"):
            scenario = self.scenario(seed)
            description = scenario.describe()
        fingerprint = stable_hash(description)
        cls = recipe.strategy_class(entry)
        params = recipe.strategy_params(entry)
        strategy = cls(**params)
        kind = scenario.kind
        if kind not in cls.supports:
            raise ValueError(f"strategy {entry!r} does not support scenario kind {kind!r}")

        resolved = self.resolved_config(entry, seed)
        if resolved["threads"] is not None:
            resolved["threads"] = threads
        config_fp = config_fingerprint(resolved)
        import yaml

        if self.main:
            timer.enter("logging")
            env = environment_info(self.device)
            env_path = run_dir / "environment.json"
            if self.resume and env_path.is_file():  # keep what the run started on; say when it differs
                first = json.loads(env_path.read_text())
                first = first.get("first_run", first)
                changed = [k for k in DETERMINISM_FIELDS if first.get(k) != env.get(k) and k != "torch"]
                if first.get("packages", {}).get("torch") != env["packages"]["torch"]:
                    changed.append("torch version")
                if changed:
                    self.say(f"{entry} seed {seed}: resuming with another {', '.join(changed)} than the run "
                             "started with; CPU numbers may differ from an uninterrupted run")
                env["first_run"] = first
            atomic_write_bytes(run_dir / "config.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
            write_json(env_path, env)
            write_json(run_dir / "splits.json", description)
            timer.exit()

        # Resume: the latest finished session's checkpoint.
        start, ckpt = 0, None
        ckpt_dir = run_dir / "checkpoints"
        if self.resume and ckpt_dir.is_dir():
            done = sorted(int(p.stem.split("_")[1]) for p in ckpt_dir.glob("session_*.pt"))
            if done:
                with ph("checkpoint"):
                    ckpt = torch.load(ckpt_dir / f"session_{done[-1]}.pt", map_location="cpu", weights_only=True)
                start = self._resume_start = done[-1] + 1

        if ckpt is not None and self.main and self.tensorboard:
            # Drop what the killed process logged after its last checkpoint: eval/* are indexed by session,
            # train/* by optimiser step, so one purge step cannot serve both.
            with ph("logging"):
                truncate_events(run_dir, session_start=start, train_step=int(ckpt["global_step"]))
        tb = self._tb = TensorBoardLogger(run_dir, enabled=self.tensorboard and self.main)
        ctx = RunContext(
            device=self.device,
            seed=seed,
            scenario={
                "kind": kind,
                "num_classes": scenario.num_classes,
                "input_shape": scenario.input_shape,
                "num_sessions": scenario.num_sessions,
                "fingerprint": fingerprint,
            },
            backbone=recipe.backbone.model_dump(),
            base=TrainConfig.from_dict(recipe.base.model_dump()),
            # profiled: cache loads/saves (state dicts) count as checkpoint, train scalars as logging
            cache=self.cache if not timer.enabled else _TimedCache(self.cache, timer),
            amp=recipe.amp,
            log_every=recipe.log_every,
            progress=self.progress and self.main,
            eval_batch_size=recipe.eval_batch_size,
            num_workers=recipe.num_workers,
            log_scalar=timer.wrap("logging", tb.scalar),
            memo=self._memo,
        )
        with ph("train"):
            strategy.setup(ctx)
        history = History(
            kind="cil" if kind == "cil" else "fscil",
            session_acc="acc" if recipe.metrics.session_acc == "sample" else "batch_mean",
        )
        sessions_out: list[dict] = []
        raw: list[dict] = []
        if ckpt is not None:
            with ph("checkpoint"):
                strategy.load_state_dict(ckpt["strategy"])
                sessions_out = json.loads(ckpt["sessions_json"])
                raw = json.loads(ckpt["raw_json"])
            ctx.global_step = int(ckpt["global_step"])
            timer.enter("metrics")  # the cross-session history, replayed
            for r in raw if kind in CROSS_SESSION_KINDS else []:
                test = r["metrics"].get("test", {})
                row = [test[f"task_{j:02d}/acc"] for j in range(r["index"] + 1) if f"task_{j:02d}/acc" in test]
                if row:
                    history.set_row(r["index"], row)
                history.record(r["index"], {k: v for k, v in test.items() if "/" not in k})
            timer.exit()
        features: dict = {}
        flags = {
            "selection": recipe.base.selection,
            "protocol": recipe.protocol,
            "session_acc": recipe.metrics.session_acc,
            "hm_rounding": recipe.metrics.hm_rounding,
        }
        record.update(
            recipe=recipe.name,
            scenario=kind,
            strategy_class=f"{cls.__module__}.{cls.__qualname__}",
            params=strategy.get_params(),
            config={k: v for k, v in flatten(resolved).items()
                    if not k.startswith(("strategies.", "strategy_params.")) and k not in ("seed", "device")},
            flags=flags,
            transductive=bool(cls.transductive),
            split_fingerprint=fingerprint,
            config_fingerprint=config_fp,
            splits={k: description[k] for k in ("index_source", "index_files", "class_order") if k in description},
            sessions=sessions_out,
        )
        if recipe.base.selection == "test":
            record["warning"] = "base-session epochs selected on the TEST set (protocol: paper) — not a clean result"
        elif strategy.selects_on_test():
            record["warning"] = "epochs selected on the TEST set (strategy opted in) — not a clean result"
            flags["selection"] = "test"

        bar = ctx.progress_bar(
            total=scenario.num_sessions, desc=f"{entry} seed {seed}", unit="session", leave=True, initial=start
        )
        oracle = strategy.uses_oracle_data()
        if oracle:
            flags["oracle"] = True
            msg = ("trained on ORACLE data the protocol withholds (e.g. joint data: full) — "
                   "an upper bound, not comparable")
            record["warning"] = f"{record['warning']}; {msg}" if "warning" in record else msg
        for session in timer.iterate("data", scenario.sessions()):
            with ph("data"):
                visible = session.visible(oracle=oracle)
            if session.index < start:
                with ph("checkpoint"):  # resume: rebuilding what the checkpoint refers to
                    strategy.restore_session(visible)
                continue
            t0 = time.perf_counter()
            timer.enter("train")
            ctx.start_session(session.index)
            if recipe.base.selection == "test" and "test" in session.eval_sets:
                ctx.selection_override = session.eval_sets["test"].data
            elif strategy.selects_on_test():
                ctx.selection_override = self._selection_set(session)
            strategy.learn(visible)
            ctx.selection_override = None
            timer.exit()
            train_s = time.perf_counter() - t0
            if not self.main:
                continue  # other ranks only train; rank 0 evaluates, logs and checkpoints
            metrics, confusion, per_class, heads, rocs, diagnostics = {}, {}, {}, {}, {}, {}
            thresholds = {}
            timer.enter("eval")  # metrics and data loading inside are charged to those phases
            self._label_metric = self._label_metric_of(session, scenario.num_classes)
            for set_name, eval_set in session.eval_sets.items():
                self._roc, self._threshold = None, None
                strategy.begin_eval_set(set_name)
                m, cm, pc, head = self.evaluate(strategy, eval_set, scenario.num_classes, features, set_name)
                if self._roc is not None:
                    rocs[set_name] = self._roc
                if self._threshold is not None:
                    thresholds[set_name] = self._threshold
                diag = {k: float(v) for k, v in strategy.eval_diagnostics().items()}  # e.g. SADE's α for this set
                if diag:
                    diagnostics[set_name] = diag
                metrics[set_name], confusion[set_name], per_class[set_name] = m, cm, pc
                if head != "default":
                    heads[set_name] = head
            timer.exit()
            timer.enter("metrics")
            if recipe.metrics.hm_rounding and "test" in metrics:
                _round_hm(metrics["test"])
            if "test" in metrics and kind in CROSS_SESSION_KINDS:
                test = metrics["test"]
                row = [test[f"task_{j:02d}/acc"] for j in range(session.index + 1) if f"task_{j:02d}/acc" in test]
                if row:
                    history.set_row(session.index, row)
                test.update(history.record(session.index, {k: v for k, v in test.items() if "/" not in k}))
            timer.exit()
            raw.append({"index": session.index, "metrics": metrics})
            rec = {
                "index": session.index,
                "name": session.name,
                "num_seen_classes": len(session.classes.seen),
                "new_classes": list(session.classes.new),
                "metrics": {s: {k: _finite_or_none(reported_value(k, v)) for k, v in m.items()}
                            for s, m in metrics.items()},
                "per_class_acc": {
                    s: [_finite_or_none(v * 100) for v in pc] for s, pc in per_class.items() if pc is not None
                },
                "confusion": confusion,
                **({"reported_head": heads} if heads else {}),
                **({"roc": rocs} if rocs else {}),
                **({"diagnostics": diagnostics} if diagnostics else {}),  # as the strategy reports them, not ×100
                **({"thresholds": thresholds} if thresholds else {}),  # the engine's known/unknown decision
                **({"strategy_info": info} if (info := strategy.run_info()) else {}),
                # active scenarios: the round's label queries, as the scenario's own handle logged them
                **({"queries": q.record()} if (q := session.info.get("label_query")) is not None else {}),
                "train_seconds": round(train_s, 3),
                "eval_seconds": round(time.perf_counter() - t0 - train_s, 3),
            }
            sessions_out.append(rec)
            timer.enter("logging")
            for set_name, m in rec["metrics"].items():
                for name, value in m.items():
                    tb.scalar(f"eval/{set_name}/{name}", value, session.index)
                for name, value in diagnostics.get(set_name, {}).items():
                    tb.scalar(f"eval/{set_name}/{name}", value, session.index)
                if set_name in rec["per_class_acc"]:
                    tb.histogram(f"eval/{set_name}/per_class_acc", rec["per_class_acc"][set_name], session.index)
            test_set = session.eval_sets.get("test")
            if test_set is not None and "tasks" in test_set.options and self.tensorboard:
                from openworld.plots import acc_matrix_image, acc_matrix_table

                matrix = history.acc_matrix(session.index) * 100
                tb.image("eval/test/acc_matrix", acc_matrix_image(matrix), session.index)
                tb.text("eval/test/acc_matrix", acc_matrix_table(matrix), session.index)
            tb.flush()
            timer.exit()
            with ph("checkpoint"):
                atomic_torch_save(
                    {
                        "strategy": strategy.state_dict(),
                        "sessions_json": json.dumps(sessions_out),
                        "raw_json": json.dumps(raw),
                        "global_step": ctx.global_step,
                    },
                    run_dir / "checkpoints" / f"session_{session.index}.pt",
                )
                if scenario.episodic and session.index > 0:  # episodes are independent: keep the last one only
                    (run_dir / "checkpoints" / f"session_{session.index - 1}.pt").unlink(missing_ok=True)
            with ph("logging"):
                write_json(run_dir / "results.json", record)
                write_metrics_csv(run_dir / "metrics.csv", sessions_out)
            bar.update(1)
            acc = rec["metrics"].get("test", {}).get("acc")
            if acc is not None:
                bar.set_postfix(acc=f"{acc:.1f}")
            if self.stop_after_session is not None and session.index >= self.stop_after_session:
                raise KeyboardInterrupt(f"stopped after session {session.index} (stop_after_session)")
        bar.close()
        if not self.main:
            distributed.barrier()
            return RunResult(entry, seed, "finished", run_dir, {}, [])

        with ph("metrics"):
            summary = episodic_summary(sessions_out) if scenario.episodic else run_summary(sessions_out)
        record.update(status="finished", summary=summary)
        timer.enter("logging")
        hp = flatten({k: v for k, v in resolved.items() if k not in ("strategies",)})
        hp.update({f"strategy.{k}": v for k, v in strategy.get_params().items()})
        # what the strategy decided while learning (e.g. a detector's τ and the rule that chose it)
        last_info = sessions_out[-1].get("strategy_info", {}) if sessions_out else {}
        hp.update({f"info.{k}": v for k, v in last_info.items() if isinstance(v, (bool, int, float, str))})
        hp.update(strategy=entry, scenario=kind, seed=seed, device=str(self.device), **flags)
        if "index_source" in description:
            hp["index_source"] = description["index_source"]
        last = sessions_out[-1]["index"] if sessions_out else 0
        hmetrics = {
            f"hparam/{k}" if "/" in k else f"hparam/test/{k}": v
            for k, v in summary.items()
            if isinstance(v, (int, float))
        }
        tb.hparams(hp, hmetrics, last)
        tb.close()
        write_json(run_dir / "results.json", record)
        timer.exit()
        distributed.barrier()
        return RunResult(entry, seed, "finished", run_dir, summary, sessions_out)

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _adapt_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded permutation (seed from the run's seed and the set's name): the first ``round(f·n)``
        rows (at least one, at most n − 1) are adapted on, the rest are scored."""
        if not 0 < fraction < 1:
            raise ValueError(f"adapt_fraction: a number in (0, 1) is required, got {fraction!r}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        k = min(max(round(fraction * n), 1), n - 1)
        return perm[:k].sort().values, perm[k:].sort().values

    @staticmethod
    def _selection_set(session):
        """The labelled set a run that opted in to test-set selection selects on: ``test``, else ``uniform``."""
        for name in ("test", "uniform"):
            if name in session.eval_sets:
                return session.eval_sets[name].data
        raise ValueError(
            f"test-set selection: the session has no eval set named 'test' or 'uniform' "
            f"(it has {', '.join(session.eval_sets)}); use checkpoint 'val' or 'last'")

    def _label_metric_of(self, session, num_classes: int):
        """``metrics.label_metric`` as a [K, K] tensor for the classification engines (None when unset)."""
        cfg = self.recipe.metrics
        if cfg.label_metric is None:
            return None
        names = tuple(str(x) for x in session.classes.names)
        key = (cfg.label_metric, cfg.hierarchy_sep, names)
        if key not in self._label_metrics:
            where = "metrics.label_metric 'hierarchy'"
            if len(names) != num_classes:
                raise ValueError(f"{where}: the scenario names {len(names)} classes of {num_classes}; it needs a "
                                 f"name for every class")
            self._label_metrics[key] = hierarchy_distances(class_paths(names, cfg.hierarchy_sep, where))
        return self._label_metrics[key]

    def _engine(self, eval_set: EvalSet, num_classes: int):
        kwargs = {"num_classes": num_classes, "device": self.device}
        if eval_set.task == "classification":
            kwargs.update(
                groups={k: list(v) for k, v in eval_set.groups.items()},
                topk=tuple(self.recipe.metrics.topk),
                chunk_size=self.recipe.metrics.chunk_size,
            )
            if self._label_metric is not None:
                kwargs["label_metric"] = self._label_metric
        kwargs.update({k: v for k, v in eval_set.options.items() if k != "tasks"})
        return create_engine(eval_set.task, **kwargs)

    @torch.no_grad()
    def evaluate(self, strategy, eval_set: EvalSet, num_classes: int, features: dict, set_name: str = "eval"):
        """Predictions of ``strategy`` on one eval set, scored by its engine; labels stay here.

        Returns ``(metrics, confusion, per_class, reported_head)``.
        """
        device = self.device
        data = eval_set.data
        timer = self._timer
        ph = timer.phase
        if getattr(strategy, "transductive", False):
            # Transductive strategies (e.g. SADE's test-time aggregation) see the inputs, never the labels.
            fraction = strategy.adapt_fraction()
            if fraction is None:
                strategy.adapt(data.hide_labels())
            else:  # adapt on a seeded part, score the rest (the inductive cost of transduction)
                seed = strategy.ctx.derive_seed("adapt_split", set_name)
                adapt_idx, score_idx = self._adapt_split(len(data), fraction, seed)
                strategy.adapt(data.subset(adapt_idx).hide_labels())
                data = data.subset(score_idx)
        with ph("metrics"):
            engine = self._engine(eval_set, num_classes)
        allowed = None
        if eval_set.classes:
            allowed = torch.zeros(num_classes, dtype=torch.bool, device=device)
            allowed[list(eval_set.classes)] = True
        bs = self.recipe.eval_batch_size
        key = strategy.feature_cache_key()
        root, idx = getattr(data, "origin", (data, None))
        if key is not None:
            cache_key = (key, id(root))
            if cache_key not in features:
                feats = [
                    strategy.encode(xb)
                    for xb, _ in timer.iterate(
                        "data", batches(root, bs, device=device, num_workers=self.recipe.num_workers)
                    )
                ]
                features[cache_key] = (root, torch.cat(feats))  # keep root alive: its id stays unique
            root_feats = features[cache_key][1]
            z_all = root_feats if idx is None else root_feats[idx.to(device)]
            y_all = data.targets.to(device)
            stream = (
                (strategy.predict_features(z_all[i : i + bs]), y_all[i : i + bs]) for i in range(0, len(y_all), bs)
            )
        else:
            stream = (
                (strategy.predict(xb), yb)
                for xb, yb in timer.iterate(
                    "data", batches(data, bs, device=device, num_workers=self.recipe.num_workers)
                )
            )
        alt_engines: dict = {}
        for pred, yb in stream:
            timer.enter("metrics")
            heads = {"default": pred.logits, **(pred.alternatives or {})}
            for head, logits in heads.items():
                if logits.dtype not in (torch.float32, torch.float64):  # keep float64 (metrics.md §1)
                    logits = logits.float()
                logits = self._restrict(logits, allowed, num_classes)
                if head == "default":
                    if pred.selected is not None and getattr(engine, "scores_selection", False):
                        engine.observe(logits, yb, pred.unknown_score, selected=pred.selected)
                    else:
                        engine.observe(logits, yb, pred.unknown_score)
                else:
                    if head not in alt_engines:
                        alt_engines[head] = self._engine(eval_set, num_classes)
                    alt_engines[head].observe(logits, yb, pred.unknown_score)
            timer.exit()
        timer.enter("metrics")
        where = f"strategy {self._entry or type(strategy).__name__!r}, eval set {set_name!r}"
        chosen, metrics = "default", self._compute(engine, where)
        # released-code protocols only (Prediction.alternatives): the better head by the accuracy the
        # recipe reports (``metrics.session_acc``), e.g. TEEN's batch-mean accuracy under protocol: paper
        key = "acc_batch_mean" if self.recipe.metrics.session_acc == "batch_mean" else "acc"
        for head, alt in alt_engines.items():
            m = self._compute(alt, f"{where}, head {head!r}")
            if m.get(key, m["acc"]) > metrics.get(key, metrics["acc"]):
                chosen, metrics, engine = head, m, alt
        if "tasks" in eval_set.options:  # class-incremental: R[t][j] from the same counts
            for j, acc in enumerate(engine.task_accuracies(eval_set.options["tasks"])):
                metrics[f"task_{j:02d}/acc"] = acc
        if hasattr(engine, "roc_points"):
            self._roc = engine.roc_points()
        if getattr(engine, "tau_used", None) is not None:  # open set: the decision the metrics applied
            self._threshold = {"rule": engine.threshold_rule, "tau": float(engine.tau_used)}
        cm, per_class = engine.confusion(), engine.per_class()
        if cm is not None and eval_set.classes:
            seen = list(eval_set.classes)
            cm, per_class = cm[seen][:, seen], per_class[seen]
        out = (metrics, None if cm is None else cm.tolist(), None if per_class is None else per_class.tolist(), chosen)
        timer.exit()
        return out

    @staticmethod
    def _compute(engine, where: str) -> dict:
        """``engine.compute()``; non-finite outputs fail the run with a reason naming the strategy and set."""
        try:
            return engine.compute()
        except NonFiniteError as exc:
            err = NonFiniteError(exc.what, exc.rows, exc.total, exc.detail, exc.note)
            err.args = (f"{where}: {exc}",)
            raise err from None

    @staticmethod
    def _restrict(logits, allowed, num_classes: int):
        """Pad absent classes with -inf, then mask classes outside the eval set's label space."""
        if allowed is None:
            return logits
        if logits.shape[1] > num_classes:
            raise ValueError(f"strategy returned {logits.shape[1]} logit columns for {num_classes} classes")
        if logits.shape[1] < num_classes:
            pad = logits.new_full((logits.shape[0], num_classes - logits.shape[1]), float("-inf"))
            logits = torch.cat([logits, pad], dim=1)
        return logits.masked_fill(~allowed, float("-inf"))


class _TimedCache:
    """The run's :class:`Cache` under ``--profile``: loads and saves (state dicts) timed as ``checkpoint``."""

    def __init__(self, cache: Cache, timer: PhaseTimer):
        self._cache, self._timer = cache, timer

    def load(self, key: str):
        with self._timer.phase("checkpoint"):
            return self._cache.load(key)

    def save(self, key: str, state: dict, meta: dict | None = None):
        with self._timer.phase("checkpoint"):
            return self._cache.save(key, state, meta)

    def __getattr__(self, name: str):  # everything else is the cache's own
        if name.startswith("__") or name in ("_cache", "_timer"):  # copy/pickle probes before __init__
            raise AttributeError(name)
        return getattr(self._cache, name)


def write_custom_scalars_layout(out: Path, results: list[RunResult]) -> None:
    """A TensorBoard custom-scalars layout for the recipe: one chart per metric, every strategy and
    seed of the recipe on it (each run is one line). Written once into ``<recipe>/_layout``."""
    charts: dict[str, list[str]] = {}
    for r in results:
        for s in r.sessions:
            for set_name, metrics in s.get("metrics", {}).items():
                for name in metrics:
                    if "/" not in name:
                        charts.setdefault(set_name, [])
                        if name not in charts[set_name]:
                            charts[set_name].append(name)
    if not charts:
        return
    layout = {f"eval/{set_name}": {m: ["Multiline", [f"^eval/{set_name}/{m}$"]] for m in names}
              for set_name, names in charts.items()}
    layout["train"] = {"loss": ["Multiline", ["^train/loss$"]], "lr": ["Multiline", ["^train/lr$"]]}
    from torch.utils.tensorboard import SummaryWriter

    layout_dir = out / "_layout"
    if layout_dir.exists():
        shutil.rmtree(layout_dir)
    with SummaryWriter(log_dir=str(layout_dir)) as w:
        w.add_custom_scalars(layout)


def _round_hm(m: dict) -> None:
    """``hm_rounding`` (released TEEN code): base/novel rounded to 3 decimals in % before the HM."""
    base, novel = m.get("acc_base"), m.get("acc_novel")
    if base is None or novel is None or not (math.isfinite(base) and math.isfinite(novel)):
        return
    b, n = round(base * 100, 3), round(novel * 100, 3)
    m["hm"] = round(harmonic_mean(b, n), 3) / 100


def run_summary(sessions: list[dict]) -> dict:
    """Run-level values (×100): the last session's metrics of ``test`` (including the running
    cross-session ones: ``avg``, ``pd``, ``last``, …), ``<set>/<metric>`` for other eval sets, and the
    per-session accuracy."""
    if not sessions:
        return {}
    out: dict[str, Any] = {}
    for set_name, metrics in sessions[-1]["metrics"].items():
        for k, v in metrics.items():
            if "/" not in k:
                out[k if set_name == "test" else f"{set_name}/{k}"] = v
    out["acc_per_session"] = [s["metrics"].get("test", {}).get("acc") for s in sessions]
    return out


def episodic_summary(sessions: list[dict]) -> dict:
    """Run-level values (×100) of an episodic scenario: ``<set>/<metric>`` = the mean over episodes and
    ``<set>/<metric>_ci95`` = 1.96·std/√E (std with ddof = 0; the DA-FSOS card's interval); episodes
    without a value are skipped for that metric. ``episodes`` = E."""
    values: dict[str, list[float]] = {}
    for s in sessions:
        for set_name, metrics in s["metrics"].items():
            for k, v in metrics.items():
                if "/" not in k and v is not None:
                    values.setdefault(f"{set_name}/{k}", []).append(float(v))
    out: dict[str, Any] = {}
    for key, vals in values.items():
        out[key], out[f"{key}_ci95"] = mean_ci95(vals)
    out["episodes"] = len(sessions)
    return out


def _mean_std(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f}±{statistics.stdev(vals):.2f}"


def summary_table(results: list[RunResult], kind: str, episodic: bool = False) -> str:
    """Per strategy: mean ± std over seeds of per-session accuracy and the headline metrics (episodic
    scenarios: of the per-run means over episodes, with their 95 % interval when there is one seed)."""
    by_strategy: dict[str, list[RunResult]] = {}
    for r in results:
        by_strategy.setdefault(r.strategy, []).append(r)
    n_sessions = max((len(r.summary.get("acc_per_session", [])) for r in results), default=0)
    heads = HEADLINES.get(kind, ["acc"])
    if episodic:
        heads = EPISODIC_HEADLINES.get(kind, heads)
        n_sessions = 0
    if n_sessions <= 1:
        n_sessions = 0  # single-session scenarios: the headline metrics say it all
    headers = ["strategy", "seeds"] + [f"s{i}" for i in range(n_sessions)] + heads
    rows = []
    for name, runs in by_strategy.items():
        ok = [r for r in runs if r.status == "finished"]
        row: list[Any] = [name, f"{len(ok)}/{len(runs)}"]
        for i in range(n_sessions):
            row.append(
                _mean_std(
                    [
                        r.summary.get("acc_per_session", [None] * n_sessions)[i]
                        if i < len(r.summary.get("acc_per_session", []))
                        else None
                        for r in ok
                    ]
                )
            )
        for h in heads:
            cell = _mean_std([r.summary.get(h) for r in ok])
            if episodic and len(ok) == 1 and ok[0].summary.get(f"{h}_ci95") is not None:
                cell += f"±{ok[0].summary[f'{h}_ci95']:.2f}"
            row.append(cell)
        rows.append(row)
    title = "Session accuracy (%, test) and summary" if n_sessions else "Summary (%)"
    if episodic:
        title = "Means over episodes (%; with one seed, ± the 95 % interval over episodes)"
    return format_table(headers, rows, title=f"{title} — mean±std over seeds (sample std, ddof = 1)")
