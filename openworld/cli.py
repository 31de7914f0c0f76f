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
    run.add_argument("--stop-after-session", type=int, help=argparse.SUPPRESS)  # tests: emulate a kill

    val = sub.add_parser("validate", help="check a recipe without running it")
    val.add_argument("recipe")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

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
        )
    except (ValueError, RuntimeError) as exc:
        print(f"openworld: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        results = runner.run()
    except FileNotFoundError as exc:  # DataNotFoundError: names the file, the places searched, the fix
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
    handler = {"run": cmd_run, "validate": cmd_validate, "list": cmd_list}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
