"""Published tables as generated blocks: ``openworld report`` rewrites them from run directories.

A document (``BENCHMARKS.md``, ``docs/results/*.md``, ``docs/evidence.md``) holds blocks between markers::

    <!-- report:begin id=cil_small_prompts recipe=scenarios/cil_small.yaml strategies=ovor,oneprompt
         seeds=0,1,2 std=population metrics=avg_acc_tasks,forgetting data=../shared/data -->
    …generated: the exact command, then the ``openworld compare`` table…
    <!-- report:end -->

The attributes (``key=value``, shell quoting, ``set=`` repeatable) say which runs a block shows:

* ``id`` (required, unique over all documents): its runs live in ``<runs root>/<id>/`` (so two blocks
  never share run directories, whatever their overrides), or in ``<runs root>/<runs>/`` with ``runs=`` (a
  second view of the same runs; give it the same recipe, overrides and seeds);
* ``recipe`` (required), ``strategies`` / ``seeds`` (default: the recipe's), ``set=KEY=VALUE`` (recipe
  overrides), ``data`` (the data root, passed as ``OPENWORLD_DATA``), ``threads`` (CPU threads per run,
  default 1: results on CPU depend on it);
* ``metrics`` (default: the scenario's headline metrics), ``std`` (``sample`` | ``population``);
  ``sessions=acc,acc_novel,…`` adds a per-session table (mean ± std of ``test/<metric>`` per session;
  ``<set>/<metric>`` reads another evaluation set, e.g. ``target/auroc`` per domain);
* ``per_seed=<metric>`` adds a table of that metric per seed (rows) and strategy (columns);
* ``times=<limit seconds>`` shows, instead of metrics, the seconds each strategy's runs took (training +
  evaluation of every session, as recorded in ``results.json``; mean and max over seeds) and whether the
  slowest run stayed within the limit;
* ``bench=bench/<script>.py`` (instead of ``recipe``) makes a *measurement* block: ``--run`` executes
  ``python <script> <args> --json <runs root>/<id>/bench.json`` (``args=`` the script's options) and the
  block renders the tables that the script stored with :func:`write_bench_result`, with the machine it ran
  on. Timings are one measurement: ``--check`` compares the text rendered from the stored result; delete
  ``<runs root>/<id>/`` and ``--run`` again for a new measurement;
* ``claim`` (optional) makes the block an evidence claim: ``method``, ``baseline``, ``metric`` and
  ``direction`` (``higher`` | ``lower``) are then required; the claim's per-seed values, means, paired
  t-test p-value and ``holds`` go into ``docs/evidence.json`` (:func:`evidence_entry`).

``report`` regenerates every block from the finished runs; ``--run`` first runs what is missing (the same
command the block shows, resumable: finished runs are kept, a changed recipe is refused); ``--check``
regenerates and fails when the text of a block differs from the committed one. Timings are never part of a
run block (except the recorded ones a ``times=`` block asks for, read from the runs on disk), so a rerun on
the same CPU with the same threads reproduces it exactly; measurement (``bench=``)
blocks show the stored timings of one bench run.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openworld.compare import (
    SIGNIFICANCE_LEVEL,
    STD_CONVENTIONS,
    STD_LABELS,
    compare,
    mean_std,
    metric_values,
    paired_p_value,
    session_values,
)

BEGIN = "<!-- report:begin "
END = "<!-- report:end -->"
_BLOCK = re.compile(r"<!-- report:begin (?P<attrs>.*?)-->\n(?P<body>.*?)<!-- report:end -->", re.S)
DEFAULT_DOCS = ("BENCHMARKS.md", "docs/results", "docs/evidence.md")
DEFAULT_RUNS = Path("runs") / "report"
EVIDENCE_JSON = Path("docs") / "evidence.json"
_KEYS = {"id", "recipe", "strategies", "seeds", "set", "data", "threads", "metrics", "std", "claim", "method",
         "baseline", "metric", "direction", "note", "runs", "sessions", "per_seed", "bench", "args", "times"}
BENCH_RESULT = "bench.json"
_CLAIM_KEYS = ("method", "baseline", "metric", "direction")


class ReportError(ValueError):
    """A block that cannot be generated: names the document, the block and what is wrong."""


@dataclass
class Block:
    doc: Path
    id: str
    recipe: str
    attrs: dict[str, Any]
    body: str
    sets: list[str] = field(default_factory=list)

    def where(self) -> str:
        return f"{self.doc}: block {self.id!r}"

    def get(self, key: str, default=None):
        return self.attrs.get(key, default)

    @property
    def strategies(self) -> list[str] | None:
        s = self.get("strategies")
        return s.split(",") if s else None

    @property
    def seeds(self) -> list[int] | None:
        s = self.get("seeds")
        if not s:
            return None
        try:
            return [int(x) for x in s.split(",")]
        except ValueError:
            raise ReportError(f"{self.where()}: seeds = {s!r}: expected comma-separated integers") from None

    @property
    def threads(self) -> int:
        try:
            n = int(self.get("threads", 1))
        except ValueError:
            n = 0
        if n < 1:
            raise ReportError(f"{self.where()}: threads = {self.get('threads')!r}: expected an integer >= 1")
        return n

    @property
    def std(self) -> str:
        std = self.get("std", "sample")
        if std not in STD_CONVENTIONS:
            raise ReportError(f"{self.where()}: std = {std!r}; allowed: {', '.join(STD_CONVENTIONS)}")
        return std

    @property
    def is_claim(self) -> bool:
        return "claim" in self.attrs

    @property
    def is_bench(self) -> bool:
        return "bench" in self.attrs

    def bench_result(self, runs_root: Path) -> Path:
        return self.run_dir(runs_root) / BENCH_RESULT

    def run_dir(self, runs_root: Path) -> Path:
        # runs=<other id>: share another block's runs (e.g. two claims on one set of runs)
        return runs_root / self.attrs.get("runs", self.id)

    def command(self, runs_root: Path) -> str:
        """The exact command that makes this block's runs (what ``--run`` executes)."""
        if self.is_bench:
            args = shlex.split(self.get("args", ""))
            return " ".join(["python", self.get("bench"), *map(shlex.quote, args), "--json",
                             str(self.bench_result(runs_root))])
        parts = []
        if self.get("data"):
            parts.append(f"OPENWORLD_DATA={shlex.quote(self.get('data'))}")
        parts += ["openworld", "run", self.recipe]
        if self.strategies:
            parts += ["--strategies", ",".join(self.strategies)]
        if self.seeds is not None:
            parts += ["--seeds", ",".join(map(str, self.seeds))]
        for s in self.sets:
            parts += ["--set", shlex.quote(s)]
        parts += ["--threads", str(self.threads), "--out", str(self.run_dir(runs_root)), "--resume"]
        return " ".join(parts)


def parse_blocks(doc: Path, text: str | None = None) -> list[Block]:
    text = doc.read_text() if text is None else text
    blocks = []
    for m in _BLOCK.finditer(text):
        try:
            tokens = shlex.split(m.group("attrs").replace("\n", " "))
        except ValueError as exc:
            raise ReportError(f"{doc}: a report block's attributes do not parse ({exc})") from None
        attrs: dict[str, Any] = {}
        sets: list[str] = []
        for tok in tokens:
            key, sep, value = tok.partition("=")
            if not sep:
                raise ReportError(f"{doc}: report block attribute {tok!r}: expected key=value")
            if key not in _KEYS:
                raise ReportError(
                    f"{doc}: report block attribute {key!r}: unknown; allowed: {', '.join(sorted(_KEYS))}")
            if key == "set":
                sets.append(value)
            else:
                attrs[key] = value
        for key in ("id",) if attrs.get("bench") else ("id", "recipe"):
            if not attrs.get(key):
                raise ReportError(f"{doc}: a report block has no {key}= (attributes: {m.group('attrs').strip()!r})")
        block = Block(doc, attrs["id"], attrs.get("recipe", ""), attrs, m.group("body"), sets)
        if block.is_bench:
            extra = sorted(set(attrs) - {"id", "bench", "args"})
            if extra or sets:
                raise ReportError(f"{block.where()}: a bench= block takes only id, bench and args "
                                  f"(also given: {', '.join(extra + ['set'] * bool(sets))})")
        if block.is_claim:
            missing = [k for k in _CLAIM_KEYS if not attrs.get(k)]
            if missing:
                raise ReportError(f"{block.where()}: a claim needs {', '.join(missing)}")
            if attrs["direction"] not in ("higher", "lower"):
                raise ReportError(f"{block.where()}: direction = {attrs['direction']!r}; allowed: higher, lower")
        blocks.append(block)
    if text.count(BEGIN) != len(blocks) or text.count(END) != len(blocks):
        raise ReportError(f"{doc}: unbalanced report markers ({text.count(BEGIN)} begin, {text.count(END)} end, "
                          f"{len(blocks)} well-formed blocks)")
    return blocks


def find_docs(paths: list[str | Path] | None = None) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths or DEFAULT_DOCS):
        if p.is_dir():
            out += sorted(p.glob("*.md"))
        elif p.is_file():
            out.append(p)
        elif paths:  # a path the user named must exist; the defaults may not
            raise ReportError(f"{p}: no such document or folder")
    return out


# ------------------------------------------------------------------------------------------------
# Running and rendering
# ------------------------------------------------------------------------------------------------
def expected_runs(block: Block) -> tuple[list[tuple[str, int]], str]:
    """(strategy entry, seed) pairs the block shows (from the recipe and the block's selection), and the
    recipe's name (the folder its runs go to)."""
    from openworld.config import ConfigError, load_recipe

    try:
        recipe = load_recipe(block.recipe, block.sets)
    except ConfigError as exc:
        raise ReportError(f"{block.where()}: {exc}") from None
    strategies = block.strategies or list(recipe.strategies)
    unknown = [s for s in strategies if s not in recipe.strategies]
    if unknown:
        raise ReportError(f"{block.where()}: strategies {', '.join(unknown)} are not in {block.recipe} "
                          f"(it has {', '.join(recipe.strategies)})")
    seeds = block.seeds if block.seeds is not None else list(recipe.seeds)
    return [(s, k) for s in strategies for k in seeds], recipe.name


def missing_runs(block: Block, runs_root: Path) -> list[str]:
    if block.is_bench:
        return [] if block.bench_result(runs_root).is_file() else [BENCH_RESULT]
    pairs, name = expected_runs(block)
    missing = []
    for strategy, seed in pairs:
        f = block.run_dir(runs_root) / name / strategy / f"seed{seed}" / "results.json"
        status = json.loads(f.read_text()).get("status") if f.is_file() else None
        if status not in ("finished", "failed"):
            missing.append(f"{strategy}/seed{seed}")
    return missing


def run_block(block: Block, runs_root: Path, stream=None) -> None:
    """Run (or resume) the block's missing runs with exactly the command it shows."""
    if block.is_bench:
        script = Path(block.get("bench"))
        if not script.is_file():
            raise ReportError(f"{block.where()}: bench script {script} not found (run from the repository root)")
        out = block.bench_result(runs_root)
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(script), *shlex.split(block.get("args", "")), "--json", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if stream is not None and proc.stdout:
            print(proc.stdout, end="", file=stream)
        if proc.returncode != 0 or not out.is_file():
            raise ReportError(f"{block.where()}: `{' '.join(cmd)}` failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:] or 'no output'}")
        return
    from openworld.config import load_recipe
    from openworld.runner import Runner

    env_before = os.environ.get("OPENWORLD_DATA")
    if block.get("data"):
        os.environ["OPENWORLD_DATA"] = block.get("data")
    try:
        recipe = load_recipe(block.recipe, block.sets)
        Runner(recipe, out=block.run_dir(runs_root), resume=True, strategies=block.strategies, seeds=block.seeds,
               progress=False, threads=block.threads, stream=stream).run()
    finally:
        if block.get("data"):
            if env_before is None:
                os.environ.pop("OPENWORLD_DATA", None)
            else:
                os.environ["OPENWORLD_DATA"] = env_before


def _runs_of(block: Block, runs_root: Path) -> list[Path]:
    pairs, name = expected_runs(block)
    return [block.run_dir(runs_root) / name / s / f"seed{k}" for s, k in pairs]


def evidence_entry(block: Block, runs_root: Path) -> dict[str, Any]:
    """The claim's record: per-seed values of method and baseline, means, paired t-test p, ``holds``."""
    result = compare(_runs_of(block, runs_root), [block.get("metric")], std=block.std)
    groups = {g.label: g for g in result.groups}
    for role in ("method", "baseline"):
        if block.get(role) not in groups:
            raise ReportError(f"{block.where()}: {role} {block.get(role)!r} has no runs (groups: {', '.join(groups)})")
    metric = block.get("metric")
    a = metric_values(groups[block.get("method")], metric)
    b = metric_values(groups[block.get("baseline")], metric)
    seeds = sorted(set(a) & set(b))
    mean_a = mean_std([a[s] for s in seeds])[0]
    mean_b = mean_std([b[s] for s in seeds])[0]
    p = paired_p_value(a, b)
    right = mean_a is not None and mean_b is not None and (
        mean_a > mean_b if block.get("direction") == "higher" else mean_a < mean_b)
    return {
        "claim": block.get("claim"),
        "method": block.get("method"),
        "baseline": block.get("baseline"),
        "recipe": block.recipe,
        "overrides": block.sets,
        "metric": metric,
        "direction": block.get("direction"),
        "seeds": seeds,
        "method_values": [a[s] for s in seeds],
        "baseline_values": [b[s] for s in seeds],
        "method_mean": mean_a,
        "baseline_mean": mean_b,
        "difference": None if mean_a is None or mean_b is None else mean_a - mean_b,
        "p_value": p,
        "test": "two-sided paired t-test over seeds (scipy.stats.ttest_rel)",
        "holds": bool(right and p is not None and p < SIGNIFICANCE_LEVEL),
        "command": block.command(DEFAULT_RUNS),
        "doc": str(block.doc),
        "note": block.get("note", ""),
    }


def session_table(result, metrics: list[str], std: str) -> str:
    """Per strategy and metric, mean ± std over seeds of ``<set>/<metric>`` at every session.

    A metric without a ``<set>/`` prefix is read from the ``test`` set. Columns are the sessions' names
    when the scenario gives them meaning (domains: ``clean``, ``contrast:5``), else ``s0 … sN``."""
    runs = [r for g in result.groups for r in g.finished]
    n = max((len(r.sessions) for r in runs), default=0)
    longest = next((r for r in runs if len(r.sessions) == n), None)
    names = [str(sess.get("name", "")) for sess in longest.sessions] if longest else []
    if not names or any(not x or re.fullmatch(r"(session|task|episode)_\d+", x) for x in names):
        names = [f"s{i}" for i in range(n)]
    where = "test set, " if all("/" not in m for m in metrics) else ""
    lines = [f"Per session ({where}%, mean ± {STD_LABELS[std]}; — = undefined):", "",
             "| strategy | metric | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * n]
    for g in result.groups:
        for m in metrics:
            eval_set, _, name = m.rpartition("/")
            cells = []
            for values in session_values(g, name, eval_set or "test"):
                mean, sd = mean_std(list(values.values()), std)
                cells.append("—" if mean is None else f"{mean:.1f}" + ("" if sd is None else f" ± {sd:.1f}"))
            cells += ["—"] * (n - len(cells))
            lines.append(f"| {g.label} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(result, metric: str) -> str:
    """``metric`` per seed (rows) and strategy (columns)."""
    values = {g.label: metric_values(g, metric) for g in result.groups}
    seeds = sorted({s for v in values.values() for s in v})
    labels = list(values)
    lines = [f"{metric} per seed (%; — = no finished run):", "",
             "| seed | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for k in seeds:
        lines.append(f"| {k} | " + " | ".join(_fmt(values[g].get(k)) for g in labels) + " |")
    return "\n".join(lines)


def run_seconds(run_dir: Path) -> tuple[float, str]:
    """(training + evaluation seconds over every session, status) recorded in a run's ``results.json``."""
    res = json.loads((Path(run_dir) / "results.json").read_text())
    total = sum(float(s.get("train_seconds", 0.0)) + float(s.get("eval_seconds", 0.0)) for s in res.get("sessions", []))
    return total, str(res.get("status", ""))


def times_table(block: Block, runs_root: Path) -> str:
    """Per strategy: seconds per run (mean and max over its seeds) against the block's ``times`` limit."""
    try:
        limit = float(block.get("times"))
    except ValueError:
        raise ReportError(f"{block.where()}: times={block.get('times')!r} must be a number of seconds") from None
    pairs, name = expected_runs(block)
    per: dict[str, list[float]] = {}
    for strategy, seed in pairs:
        seconds, _ = run_seconds(block.run_dir(runs_root) / name / strategy / f"seed{seed}")
        per.setdefault(strategy, []).append(seconds)
    lines = [f"| strategy | runs | mean s | max s | within {limit:g} s |", "|---|---|---|---|---|"]
    for strategy, values in per.items():
        ok = "yes" if max(values) <= limit else "**no**"
        lines.append(f"| {strategy} | {len(values)} | {statistics.mean(values):.0f} | {max(values):.0f} | {ok} |")
    lines += ["", f"Seconds per strategy × seed: training + evaluation of every session as recorded in each run's "
              f"`results.json` ({block.threads} CPU thread{'s' * (block.threads != 1)} per run; start-up and data "
              "loading, a few seconds, not included)."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Measurement (bench=) blocks
# ------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """Where a measurement ran: CPU, cores, torch and its threads, GPU if any, load average, date."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(terse=True),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    if hasattr(os, "getloadavg"):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_bench_result(path: str | Path, tables: list[dict], notes: list[str] = (),
                       params: dict[str, Any] | None = None) -> Path:
    """Store one bench run for a ``bench=`` block (called by the ``bench/`` scripts' ``--json``).

    ``tables``: ``[{"title": str (optional), "columns": [str], "rows": [[cell]]}]``, every cell already
    formatted as the table should show it (a string), so the rendered block is exactly what the script
    measured. ``notes``: lines shown under the tables. ``params``: the script's options.
    """
    for t in tables:
        width = len(t["columns"])
        bad = [r for r in t["rows"] if len(r) != width]
        if bad:
            raise ValueError(f"bench table {t.get('title', '')!r}: row {bad[0]!r} has {len(bad[0])} cells, "
                             f"the header {width}")
    payload = {"tables": [{"title": t.get("title", ""), "columns": list(map(str, t["columns"])),
                           "rows": [[str(c) for c in r] for r in t["rows"]]} for t in tables],
               "notes": [str(n) for n in notes],
               "params": {k: v for k, v in (params or {}).items() if k != "json"}, "machine": machine_info()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def render_bench(result: dict[str, Any]) -> str:
    lines: list[str] = []
    for t in result["tables"]:
        if t.get("title"):
            lines += [f"**{t['title']}**", ""]
        lines += ["| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])]
        lines += ["| " + " | ".join(r) + " |" for r in t["rows"]]
        lines.append("")
    lines += [f"- {n}" for n in result.get("notes", [])]
    m = result.get("machine", {})
    where = ", ".join(x for x in (
        m.get("cpu"), f"{m['cpu_count']} CPUs" if m.get("cpu_count") else None, m.get("gpu"),
        f"torch {m['torch']} ({m.get('torch_threads')} thread{'s' * (m.get('torch_threads') != 1)})"
        if m.get("torch") else None,
        f"load average {m['load_average'][0]:.2f}" if m.get("load_average") else None) if x)
    if result.get("notes"):
        lines.append("")
    lines.append(f"Measured {m.get('date', '?')} on {where or 'an unrecorded machine'}; one measurement "
                 "(`--check` compares the text rendered from it, a new measurement needs a rerun).")
    return "\n".join(lines)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def render(block: Block, runs_root: Path) -> str:
    """The block's generated text (between its markers): the command, then the table."""
    missing = missing_runs(block, runs_root)
    if missing:
        raise ReportError(
            f"{block.where()}: runs missing under {block.run_dir(runs_root)}: {', '.join(missing)} "
            f"(make them with `openworld report --run --only {block.id}`)"
        )
    lines = ["```bash", block.command(DEFAULT_RUNS), "```", ""]
    if block.is_bench:
        return "\n".join(lines + [render_bench(json.loads(block.bench_result(runs_root).read_text()))]) + "\n"
    if block.get("times"):
        return "\n".join(lines + [times_table(block, runs_root)]) + "\n"
    metrics = block.get("metrics")
    result = compare(_runs_of(block, runs_root), metrics.split(",") if metrics else None, std=block.std)
    table = result.to_markdown()
    # failed runs are listed with their directory: print it relative to the runs root (machine-independent)
    table = table.replace(str(runs_root.resolve()) + os.sep, "").replace(str(runs_root) + os.sep, "")
    lines.append(table)
    if block.get("sessions"):
        lines += ["", session_table(result, block.get("sessions").split(","), block.std)]
    if block.get("per_seed"):
        lines += ["", per_seed_table(result, block.get("per_seed"))]
    if block.is_claim:
        e = evidence_entry(block, runs_root)
        per_seed = ", ".join(f"{s}: {_fmt(x)} vs {_fmt(y)}" for s, x, y in
                             zip(e["seeds"], e["method_values"], e["baseline_values"]))
        lines += ["", f"**Claim `{e['claim']}`**: {e['method']} {e['direction']} {e['metric']} than {e['baseline']} — "
                  f"{_fmt(e['method_mean'])} vs {_fmt(e['baseline_mean'])} (Δ {_fmt(e['difference'])}), paired "
                  f"t-test p = {_fmt(e['p_value'], 4)} over {len(e['seeds'])} seeds → "
                  f"**{'holds' if e['holds'] else 'does not hold'}** "
                  f"(holds = the right sign and p < {SIGNIFICANCE_LEVEL}). "
                  f"Per seed ({e['method']} vs {e['baseline']}): {per_seed}."]
    return "\n".join(lines) + "\n"


@dataclass
class ReportResult:
    changed: list[str]          # "doc: block id" whose text differs from the committed one
    diffs: list[str]
    evidence: list[dict]
    written: list[Path]


def report(docs: list[str | Path] | None = None, runs_root: str | Path = DEFAULT_RUNS, *, run: bool = False,
           check: bool = False, only: list[str] | None = None, evidence_path: str | Path | None = EVIDENCE_JSON,
           stream=None) -> ReportResult:
    """Regenerate the blocks of ``docs`` (default: BENCHMARKS.md, docs/results/*.md, docs/evidence.md).

    ``run``: run the missing runs first. ``check``: write nothing; report every block whose regenerated
    text differs. ``only``: block ids to handle (default all). Evidence claims go to ``evidence_path``.
    """
    runs_root = Path(runs_root)
    paths = find_docs(docs)
    all_blocks = {p: parse_blocks(p) for p in paths}
    ids: dict[str, Block] = {}
    for blocks in all_blocks.values():
        for b in blocks:
            if b.id in ids:
                raise ReportError(f"{b.where()}: id also used in {ids[b.id].doc}")
            ids[b.id] = b
    if only:
        unknown = [i for i in only if i not in ids]
        if unknown:
            raise ReportError(f"--only {', '.join(unknown)}: no such block (blocks: {', '.join(ids) or 'none'})")
    selected = [b for b in ids.values() if not only or b.id in only]
    if run:
        for b in selected:
            if missing_runs(b, runs_root):
                if stream is not None:
                    print(f"report: running {b.where()}: {b.command(runs_root)}", file=stream)
                run_block(b, runs_root, stream=stream)
    changed, diffs, evidence, written = [], [], [], []
    new_text: dict[Path, str] = {}
    for doc, blocks in all_blocks.items():
        text = doc.read_text()
        for b in blocks:
            if b not in selected:
                continue
            body = render(b, runs_root)
            if b.is_claim:
                evidence.append(evidence_entry(b, runs_root))
            if body != b.body:
                changed.append(b.where())
                diffs.append("".join(difflib.unified_diff(
                    b.body.splitlines(keepends=True), body.splitlines(keepends=True),
                    fromfile=f"{doc} [{b.id}] committed", tofile=f"{doc} [{b.id}] regenerated")))
                text = _replace_body(text, b, body)
        new_text[doc] = text
    if not check:
        for doc, text in new_text.items():
            if text != doc.read_text():
                doc.write_text(text)
                written.append(doc)
        if evidence and evidence_path is not None:
            written.append(_write_evidence(Path(evidence_path), evidence, replace_all=not only))
    return ReportResult(changed, diffs, evidence, written)


def _replace_body(text: str, block: Block, body: str) -> str:
    for m in _BLOCK.finditer(text):
        attrs = m.group("attrs")
        if re.search(rf"(^|\s)id={re.escape(block.id)}(\s|$)", attrs):
            return text[: m.start("body")] + body + text[m.end("body"):]
    raise ReportError(f"{block.where()}: block vanished while rewriting")  # pragma: no cover


def _write_evidence(path: Path, entries: list[dict], replace_all: bool) -> Path:
    """``docs/evidence.json``: all claims (with ``--only``, the named ones are updated in place)."""
    old = []
    if not replace_all and path.is_file():
        old = json.loads(path.read_text()).get("claims", [])
    by_claim = {e["claim"]: e for e in old}
    by_claim.update({e["claim"]: e for e in entries})
    claims = sorted(by_claim.values(), key=lambda e: e["claim"])
    payload = {
        "significance_level": SIGNIFICANCE_LEVEL,
        "std": STD_LABELS,
        "generated_by": "openworld report",
        "claims": claims,
        "summary": {"claims": len(claims), "hold": sum(bool(e["holds"]) for e in claims)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")
    return path
