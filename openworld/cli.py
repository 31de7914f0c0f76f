"""``openworld`` command line: run, validate, list. Thin: parses arguments and calls the library.

Heavy modules (torch, tensorboard, the strategies) are imported inside the commands, so
``openworld --help`` starts fast. Configuration errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

EXIT_CONFIG = 2


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openworld",
        description="Continual and open-world learning experiments: one recipe, every strategy, one metrics engine.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="train and evaluate every strategy of a recipe")
    run.add_argument("recipe", help="recipe YAML, e.g. scenarios/quickstart.yaml")
    run.add_argument("--strategies", type=_csv, help="comma-separated subset of the recipe's strategies")
    run.add_argument("--seeds", type=_seeds, help="comma-separated seeds, overriding the recipe's")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set base.epochs=5 (repeatable)",
    )
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the recipe's device")
    run.add_argument("--out", help="output root (default: the recipe's `output`, usually runs/)")
    run.add_argument("--resume", action="store_true", help="continue unfinished runs after their last finished session")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--threads", type=int, help="CPU threads per run (default: the recipe's `threads`, else "
                     "torch's default); recorded, and kept on --resume")
    run.add_argument("--profile", action="store_true",
                     help="time each phase (data, train, eval, metrics, checkpoint, logging, other) and write "
                     "profile.json + profile.md into every run directory and the recipe's output folder; "
                     "results are unchanged, and it may be combined with --resume")
    run.add_argument("--stop-after-session", type=int, help=argparse.SUPPRESS)  # tests: emulate a kill

    val = sub.add_parser("validate", help="check a recipe without running it")
    val.add_argument("recipe")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    cmp = sub.add_parser("compare", help="mean ± std over seeds, best strategy, significance, plots")
    cmp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, e.g. runs/quickstart")
    cmp.add_argument("--metrics", type=_csv, help="comma-separated summary metrics (default: the scenario's headline)")
    cmp.add_argument("--out", help="where to write compare.md / compare.csv / compare.json (default: first RUN_DIR)")
    cmp.add_argument("--plot", metavar="DIR", help="also draw PNG plots into DIR")
    cmp.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown", help="what to print")
    cmp.add_argument("--std", choices=["sample", "population"], default="sample",
                     help="std over seeds: sample (ddof=1, default) or population (ddof=0, e.g. the OVOR card)")

    sw = sub.add_parser("sweep", help="run a grid of overrides × seeds locally or as a SLURM array")
    sw.add_argument("recipe")
    sw.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a recipe field and its values, e.g. --grid strategies.teen.shift_weight=0,0.1,0.5 (repeatable)",
    )
    sw.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: the recipe's)")
    sw.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fixed override applied to every job",
    )
    sw.add_argument("--out", default="runs/sweeps", help="sweep root; each grid point gets <out>/<tag>/")
    sw.add_argument("--launcher", choices=["local", "slurm"], default="local")
    sw.add_argument("--workers", type=int, default=1, help="local: parallel processes")
    sw.add_argument("--partition", help="slurm: partition")
    sw.add_argument("--gpus", type=int, default=1, help="slurm: GPUs per job")
    sw.add_argument("--cpus", type=int, default=8, help="slurm: CPUs per job")
    sw.add_argument("--time", type=int, default=24 * 60, help="slurm: time limit in minutes")
    sw.add_argument("--mem-gb", type=int, help="slurm: memory per job")
    sw.add_argument("--dry-run", action="store_true", help="list the jobs and stop")

    rep = sub.add_parser("report", help="regenerate the published tables (generated blocks in the docs) from runs")
    rep.add_argument("docs", nargs="*", metavar="DOC",
                     help="documents or folders (default: BENCHMARKS.md, docs/results/, docs/evidence.md)")
    rep.add_argument("--runs", default="runs/report",
                     help="runs root; block <id> uses <runs>/<id>/ (default runs/report)")
    rep.add_argument("--run", action="store_true", help="first run (or resume) every run a block needs and lacks")
    rep.add_argument("--check", action="store_true",
                     help="write nothing; fail (exit 1) when a regenerated block differs from the committed text")
    rep.add_argument("--only", type=_csv, help="comma-separated block ids (default: all)")
    rep.add_argument("--evidence", default="docs/evidence.json",
                     help="where the claims go (default docs/evidence.json)")

    lst = sub.add_parser("list", help="list registered components")
    lst.add_argument(
        "what", nargs="?", default="all", choices=["all", "strategies", "scenarios", "datasets", "backbones"]
    )
    return parser


def _load(path: str, overrides: list[str]):
    from openworld.config import ConfigError, load_recipe

    try:
        return load_recipe(path, overrides)
    except ConfigError as exc:
        print(f"openworld: error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None


def cmd_run(args) -> int:
    import time

    from openworld.allocator import tune_allocator

    started = time.perf_counter()  # --profile: the imports and recipe loading below are its "startup"
    tune_allocator()  # freed activation memory is reused instead of faulted in again (same numbers)
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"device={args.device}")
    recipe = _load(args.recipe, overrides)
    from openworld.runner import Runner

    try:
        runner = Runner(
            recipe,
            out=args.out,
            resume=args.resume,
            strategies=args.strategies,
            seeds=args.seeds,
            progress=not args.no_progress and sys.stderr.isatty(),
            stop_after_session=args.stop_after_session,
            threads=args.threads,
            profile=args.profile,
            profile_since=started,
        )
    except (ValueError, RuntimeError) as exc:
        print(f"openworld: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from openworld.config import ConfigError

    try:
        results = runner.run()
    except (FileNotFoundError, ConfigError) as exc:
        # DataNotFoundError names the file, the places searched, the fix; ResumeMismatchError the run
        # directory and what differs
        print(f"openworld: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 1 if any(r.status == "failed" for r in results) else 0


def cmd_validate(args) -> int:
    recipe = _load(args.recipe, args.overrides)
    n = len(recipe.strategies)
    print(
        f"{args.recipe}: ok — scenario {recipe.scenario.kind} on {recipe.scenario.data.source}, "
        f"{n} strateg{'y' if n == 1 else 'ies'} ({', '.join(recipe.strategies)}), seeds {recipe.seeds}"
    )
    return 0


def cmd_compare(args) -> int:
    import json
    from pathlib import Path

    from openworld.compare import compare, plot
    from openworld.logging import write_json

    try:
        result = compare(args.runs, args.metrics, std=args.std)
    except (FileNotFoundError, ValueError) as exc:
        print(f"openworld: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    out = Path(args.out or args.runs[0])
    if out.is_file():
        out = out.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(result.to_markdown() + "\n")
    (out / "compare.csv").write_text(result.to_csv())
    write_json(out / "compare.json", result.to_json())
    text = {
        "markdown": result.to_markdown,
        "csv": result.to_csv,
        "json": lambda: json.dumps(result.to_json(), indent=2, default=str),
    }[args.format]()
    print(text)
    if args.plot:
        for path in plot(result, args.plot):
            print(f"plot: {path}")
    print(f"written: {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare.json'}", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from openworld.config import ConfigError
    from openworld.report import ReportError, report

    try:
        result = report(args.docs or None, args.runs, run=args.run, check=args.check, only=args.only,
                        evidence_path=args.evidence, stream=sys.stderr)
    except (ReportError, ConfigError, FileNotFoundError) as exc:
        print(f"openworld: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        for diff in result.diffs:
            print(diff)
        if result.changed:
            print(f"openworld report --check: {len(result.changed)} block(s) differ from the committed text: "
                  + "; ".join(result.changed), file=sys.stderr)
            return 1
        print("openworld report --check: every block matches its runs", file=sys.stderr)
        return 0
    for path in result.written:
        print(f"written: {path}", file=sys.stderr)
    held = sum(bool(e["holds"]) for e in result.evidence)
    if result.evidence:
        print(f"claims: {held}/{len(result.evidence)} hold", file=sys.stderr)
    return 0


def cmd_sweep(args) -> int:
    from pathlib import Path

    from openworld.config import ConfigError
    from openworld.sweep import expand, parse_grid, run_local, run_slurm, write_manifest

    try:
        grid = parse_grid(args.grid)
        jobs = expand(args.recipe, grid, args.seeds, args.out, args.overrides)
    except ConfigError as exc:
        print(f"openworld: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    out = Path(args.out)
    manifest = write_manifest(jobs, out, grid)
    print(
        f"sweep: {len(jobs)} job(s) ({len(jobs) // max(1, len(set(j.seed for j in jobs)))} grid point(s)) → {out}"
        f" (manifest {manifest})"
    )
    if args.dry_run:
        for j in jobs:
            print(f"  {j.tag} seed {j.seed}: openworld {' '.join(j.argv())}")
        return 0
    if args.launcher == "slurm":
        submitted = run_slurm(
            jobs,
            out / ".submitit",
            partition=args.partition,
            gpus=args.gpus,
            cpus=args.cpus,
            time_min=args.time,
            mem_gb=args.mem_gb,
        )
        print(
            f"submitted array job {submitted[0].job_id.split('_')[0]} ({len(submitted)} tasks); "
            f"when done: openworld compare {out}"
        )
        return 0
    codes = run_local(jobs, args.workers, out / "logs")
    failed = [j for j, c in zip(jobs, codes) if c != 0]
    for j in failed:
        log = out / "logs" / f"{j.tag}_seed{j.seed}.log"
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
        errors = [ln for ln in lines if ln.startswith("openworld: error:")]
        why = f": {(errors or lines)[-1].strip()}" if lines else ""
        print(f"job {j.tag} seed {j.seed} exited non-zero{why} (log: {log})")
    print(f"done: {len(jobs) - len(failed)}/{len(jobs)} jobs ok; compare with: openworld compare {out}")
    return 1 if failed else 0


def cmd_list(args) -> int:
    from openworld.registry import REGISTRIES

    kinds = list(REGISTRIES) if args.what == "all" else [args.what]
    for kind in kinds:
        print(f"{kind}: {', '.join(REGISTRIES[kind].names())}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handler = {"run": cmd_run, "validate": cmd_validate, "list": cmd_list, "compare": cmd_compare, "sweep": cmd_sweep,
               "report": cmd_report}[
        args.command
    ]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
