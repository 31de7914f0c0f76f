"""Aggregate finished runs: mean ± std over seeds, the best strategy, paired significance, plots.

Reads only run directories (``results.json``), so it works on any scenario kind and on runs made
anywhere (local, sweep, cluster). Strategies are grouped by recipe and strategy name, and — when
the same name was run with different hyper-parameters (a sweep) — by the parameters that differ.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Metrics where lower is better; every other metric is higher-is-better.
LOWER_IS_BETTER = {"pd", "forgetting", "forgetting_mammoth", "forgetting_first_last", "fpr95", "fpr95_idpos",
                   "aurc", "e_aurc", "esd"}


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (``[eval_set/]name``) is better; ``esd_<group>`` like ``esd``."""
    name = metric.split("/")[-1]
    return name in LOWER_IS_BETTER or name.startswith("esd_")
SIGNIFICANCE_LEVEL = 0.05

HEADLINES = {
    "fscil": ["avg", "pd", "last", "acc_base", "acc_novel", "hm"],
    "cil": ["avg_acc_tasks", "forgetting", "acc", "aia", "bwt"],
    "gcd": ["unlabelled/all_v2", "unlabelled/old_v2", "unlabelled/new_v2", "all_v2", "old_v2", "new_v2"],
    "ncd": ["acc", "nmi", "ari"],
    "long_tail": ["uniform/acc", "uniform/many", "uniform/medium", "uniform/few", "forward50/acc", "backward50/acc"],
    "open_set": ["target/hos", "target/os_star", "target/unk", "target/auroc", "target/fpr95", "target/closed_acc",
                 # DA-FSOS (episodic): means over episodes
                 "episodes/hos", "episodes/os_star", "episodes/unk", "episodes/auroc", "episodes/closed_acc"],
}


@dataclass
class RunRecord:
    path: Path
    recipe: str
    strategy: str
    seed: int
    status: str
    kind: str
    params: dict
    summary: dict
    sessions: list
    reason: str | None = None
    config: dict = field(default_factory=dict)

    def settings(self) -> dict:
        """Everything that defines the run besides the seed: strategy params, then recipe fields (not the
        ones that cannot change its numbers: where it was written, how often it logged, its description)."""
        return {**self.params, **{k: v for k, v in self.config.items()
                                  if k not in self.params and k not in NOT_SETTINGS}}


# recipe fields that never change a run's numbers (the runner's fingerprint ignores them too, with threads)
NOT_SETTINGS = ("output", "log_every", "description")


@dataclass
class Group:
    label: str
    recipe: str
    kind: str
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def finished(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "finished"]


def find_results(paths: list[str | Path]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "results.json":
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(p.rglob("results.json")))
        else:
            raise FileNotFoundError(f"{p}: not a run directory or results.json (expected runs/<recipe>/…)")
    return sorted(set(found))


def load_runs(paths: list[str | Path]) -> list[RunRecord]:
    runs = []
    for f in find_results(paths):
        try:
            res = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{f}: not valid JSON ({exc})") from None
        runs.append(
            RunRecord(
                path=f.parent,
                recipe=res.get("recipe", f.parent.parent.parent.name),
                strategy=res.get("strategy", f.parent.parent.name),
                seed=int(res.get("seed", 0)),
                status=res.get("status", "unknown"),
                kind=res.get("scenario", "unknown"),
                params=res.get("params", {}),
                summary=res.get("summary", {}),
                sessions=res.get("sessions", []),
                reason=res.get("reason"),
                config=res.get("config", {}),
            )
        )
    if not runs:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, paths))}")
    return runs


def group_runs(runs: list[RunRecord]) -> list[Group]:
    """Group by (recipe, strategy); split a group further by the parameters that differ inside it."""
    by_name: dict[tuple[str, str], list[RunRecord]] = {}
    for r in runs:
        by_name.setdefault((r.recipe, r.strategy), []).append(r)
    recipes = {r.recipe for r in runs}
    groups: list[Group] = []
    for (recipe, name), members in by_name.items():
        keys = sorted({k for r in members for k in r.settings()})
        varying = [k for k in keys if len({json.dumps(r.settings().get(k), sort_keys=True) for r in members}) > 1]
        split: dict[str, list[RunRecord]] = {}
        for r in members:
            suffix = ",".join(f"{k}={r.settings().get(k)}" for k in varying)
            split.setdefault(suffix, []).append(r)
        for suffix, rs in split.items():
            label = name + (f"[{suffix}]" if suffix else "")
            if len(recipes) > 1:
                label = f"{recipe}/{label}"
            groups.append(Group(label, recipe, rs[0].kind, sorted(rs, key=lambda r: r.seed)))
    return groups


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def metric_values(group: Group, metric: str) -> dict[int, float]:
    """Seed -> run-level value of ``metric`` (summary key)."""
    out = {}
    for r in group.finished:
        v = _finite(r.summary.get(metric))
        if v is not None:
            out[r.seed] = v
    return out


def session_values(group: Group, metric: str, eval_set: str = "test") -> list[dict[int, float]]:
    """Per session: seed -> value of ``eval_set``/``metric``."""
    n = max((len(r.sessions) for r in group.finished), default=0)
    series: list[dict[int, float]] = [{} for _ in range(n)]
    for r in group.finished:
        for i, s in enumerate(r.sessions):
            v = _finite(s.get("metrics", {}).get(eval_set, {}).get(metric))
            if v is not None:
                series[i][r.seed] = v
    return series


STD_CONVENTIONS = ("sample", "population")
STD_LABELS = {
    "sample": "sample std (ddof = 1)",
    "population": "population std (ddof = 0)",
}


def mean_std(values: list[float], std: str = "sample") -> tuple[float | None, float | None]:
    """Mean and std over seeds: ``sample`` (ddof = 1, the default statisticians expect) or
    ``population`` (ddof = 0, e.g. the OVOR card's convention). None for the std of one value."""
    if std not in STD_CONVENTIONS:
        raise ValueError(f"std must be one of {', '.join(STD_CONVENTIONS)}, got {std!r}")
    if not values:
        return None, None
    if len(values) == 1:
        return statistics.fmean(values), None
    return statistics.fmean(values), (statistics.stdev(values) if std == "sample" else statistics.pstdev(values))


def paired_p_value(a: dict[int, float], b: dict[int, float]) -> float | None:
    """Two-sided paired t-test over the seeds both have (scipy); None with fewer than 2 pairs.

    Identical pairs give p = 1 (no evidence of a difference)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    if all(d == diffs[0] for d in diffs):
        return 1.0 if diffs[0] == 0 else 0.0
    from scipy.stats import ttest_rel

    return float(ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue)


@dataclass
class Cell:
    mean: float | None
    std: float | None
    n: int
    best: bool = False
    p_vs_best: float | None = None

    @property
    def not_significant(self) -> bool:
        return (not self.best) and self.p_vs_best is not None and self.p_vs_best >= SIGNIFICANCE_LEVEL

    def text(self, digits: int = 2) -> str:
        if self.mean is None:
            return "–"
        s = f"{self.mean:.{digits}f}" + (f" ± {self.std:.{digits}f}" if self.std is not None else "")
        return s + (" *" if self.best else "") + (" †" if self.not_significant else "")


def compare_table(groups: list[Group], metrics: list[str], std: str = "sample") -> dict[str, dict[str, Cell]]:
    """label -> metric -> Cell; the best mean per metric is marked, the others tested against it."""
    table: dict[str, dict[str, Cell]] = {g.label: {} for g in groups}
    for m in metrics:
        values = {g.label: metric_values(g, m) for g in groups}
        cells = {label: Cell(*mean_std(list(v.values()), std), n=len(v)) for label, v in values.items()}
        scored = [(label, c.mean) for label, c in cells.items() if c.mean is not None]
        if scored:
            pick = min if lower_is_better(m) else max
            best_label = pick(scored, key=lambda t: t[1])[0]
            cells[best_label].best = True
            for label, c in cells.items():
                if label != best_label and c.mean is not None:
                    c.p_vs_best = paired_p_value(values[best_label], values[label])
        for label, c in cells.items():
            table[label][m] = c
    return table


def headline_metrics(groups: list[Group]) -> list[str]:
    kinds = {g.kind for g in groups}
    present = {k for g in groups for r in g.finished for k in r.summary}
    ordered: list[str] = []
    for kind in sorted(kinds):
        for m in HEADLINES.get(kind, ["acc"]):
            if m in present and m not in ordered:
                ordered.append(m)
    return ordered or sorted(k for k in present if k != "acc_per_session")


# Facts a strategy records about its decisions (``sessions[-1].strategy_info``) that compare shows
# beside the metrics, not ranked: key -> column header.
INFO_COLUMNS = {"tau": "τ"}


def info_values(group: Group, key: str) -> tuple[dict[int, float], list[str]]:
    """Seed -> the last session's ``strategy_info[key]``, and the distinct ``<key>_rule`` texts."""
    values: dict[int, float] = {}
    rules: list[str] = []
    for r in group.finished:
        info = (r.sessions[-1].get("strategy_info") or {}) if r.sessions else {}
        v = _finite(info.get(key))
        if v is not None:
            values[r.seed] = v
        rule = info.get(f"{key}_rule")
        if rule and rule not in rules:
            rules.append(rule)
    return values, rules


@dataclass
class Comparison:
    groups: list[Group]
    metrics: list[str]
    table: dict[str, dict[str, Cell]]
    failed: list[RunRecord]
    std: str = "sample"

    def info_columns(self) -> dict[str, dict[str, tuple[Cell, list[str]]]]:
        """key -> label -> (mean ± std cell, rules) for the :data:`INFO_COLUMNS` some group records."""
        out: dict[str, dict[str, tuple[Cell, list[str]]]] = {}
        for key in INFO_COLUMNS:
            col = {}
            for g in self.groups:
                values, rules = info_values(g, key)
                col[g.label] = (Cell(*mean_std(list(values.values()), self.std), n=len(values)), rules)
            if any(c.n for c, _ in col.values()):
                out[key] = col
        return out

    def to_markdown(self) -> str:
        info = self.info_columns()
        heads = self.metrics + [INFO_COLUMNS[k] for k in info]
        lines = [f"Mean ± {STD_LABELS[self.std]} over seeds.", "",
                 "| strategy | seeds | " + " | ".join(heads) + " |",
                 "|---|---|" + "---|" * len(heads)]
        for g in self.groups:
            cells = [self.table[g.label][m].text() for m in self.metrics]
            for key in info:
                cell, rules = info[key][g.label]
                cells.append(cell.text(4) + (f" ({'; '.join(rules)})" if rules else ""))
            lines.append(f"| {g.label} | {len(g.finished)}/{len(g.runs)} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            f"Values in %, mean ± {STD_LABELS[self.std]} over seeds. `*` best; `†` not significantly different "
            "from the best "
            f"(two-sided paired t-test over common seeds, p ≥ {SIGNIFICANCE_LEVEL}); lower is better for "
            + ", ".join(sorted(m for m in self.metrics if lower_is_better(m)) or ["none shown"])
            + "."
        )
        if self.failed:
            lines.append("")
            lines.append("Failed runs (not included above):")
            lines += [f"- {r.recipe}/{r.strategy} seed {r.seed}: {r.reason} ({r.path})" for r in self.failed]
        return "\n".join(lines)

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["strategy", "recipe", "metric", "mean", "std", "n", "best", "p_vs_best", "std_convention", "rule"])
        info = self.info_columns()
        for g in self.groups:
            for m in self.metrics:
                c = self.table[g.label][m]
                w.writerow([g.label, g.recipe, m, c.mean, c.std, c.n, c.best, c.p_vs_best, self.std, ""])
            for key, col in info.items():
                c, rules = col[g.label]
                w.writerow([g.label, g.recipe, f"info.{key}", c.mean, c.std, c.n, "", "", self.std, "; ".join(rules)])
        return buf.getvalue()

    def to_json(self) -> dict[str, Any]:
        info = self.info_columns()
        return {
            "metrics": self.metrics,
            "std": STD_LABELS[self.std],
            "significance": {"test": "paired t-test over seeds (two-sided)", "level": SIGNIFICANCE_LEVEL},
            "groups": [
                {
                    "strategy": g.label,
                    "recipe": g.recipe,
                    "scenario": g.kind,
                    "seeds": [r.seed for r in g.finished],
                    "metrics": {m: vars(self.table[g.label][m]) for m in self.metrics},
                    "acc_per_session": [mean_std(list(v.values()))[0] for v in session_values(g, "acc")],
                    "info": {key: {**vars(col[g.label][0]), "rules": col[g.label][1]}
                             for key, col in info.items()},
                }
                for g in self.groups
            ],
            "failed": [{"path": str(r.path), "strategy": r.strategy, "seed": r.seed, "reason": r.reason}
                       for r in self.failed],
        }


def compare(paths: list[str | Path], metrics: list[str] | None = None, std: str = "sample") -> Comparison:
    """Group the runs under ``paths`` and tabulate ``metrics`` (default: the headline ones) as mean ±
    std over seeds; ``std`` is ``"sample"`` (ddof = 1, default) or ``"population"`` (ddof = 0)."""
    if std not in STD_CONVENTIONS:
        raise ValueError(f"std must be one of {', '.join(STD_CONVENTIONS)}, got {std!r}")
    runs = load_runs(paths)
    groups = group_runs(runs)
    metrics = metrics or headline_metrics(groups)
    return Comparison(groups, metrics, compare_table(groups, metrics, std),
                      [r for r in runs if r.status != "finished"], std)


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib, imported lazily, Agg backend)
# ------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, groups: list[Group], metric: str, eval_set: str = "test", label_suffix: str = "",
          std: str = "sample") -> bool:
    drawn = False
    for g in groups:
        series = session_values(g, metric, eval_set)
        pts = [(i, *mean_std(list(v.values()), std)) for i, v in enumerate(series) if v]
        if not pts:
            continue
        xs = [p[0] for p in pts]
        mu = [p[1] for p in pts]
        sd = [p[2] or 0.0 for p in pts]
        ax.plot(xs, mu, marker="o", ms=3, label=g.label + label_suffix)
        ax.fill_between(xs, [m - s for m, s in zip(mu, sd)], [m + s for m, s in zip(mu, sd)], alpha=0.2)
        drawn = True
    return drawn


def plot(comparison: Comparison, out_dir: str | Path) -> list[Path]:
    """Write the PNGs that fit the scenario kinds present; returns their paths."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    groups = [g for g in comparison.groups if g.finished]

    def save(fig, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    multi = [g for g in groups if max(len(r.sessions) for r in g.finished) > 1]
    if multi:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if _band(ax, multi, "acc", std=comparison.std):
            ax.set(xlabel="session", ylabel="accuracy (%)",
                   title=f"Accuracy per session (mean ± {comparison.std} std over seeds)")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
            save(fig, "acc_per_session.png")
        else:
            plt.close(fig)

    fscil = [g for g in groups if g.kind == "fscil"]
    if fscil:
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True)
        for ax, metric, title in zip(axes, ("acc_base", "acc_novel", "hm"), ("base classes", "novel classes", "HM")):
            _band(ax, fscil, metric, std=comparison.std)
            ax.set(xlabel="session", ylabel="%", title=title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        save(fig, "fscil_base_novel_hm.png")

    cil = [g for g in groups if g.kind == "cil"]
    for g in cil:
        matrix = _mean_acc_matrix(g)
        if matrix is None:
            continue
        fig, ax = plt.subplots(figsize=(5, 4.5))
        import numpy as np

        im = ax.imshow(np.array(matrix, dtype=float), vmin=0, vmax=100, cmap="viridis")
        for t, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, t, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
        ax.set(xlabel="task j", ylabel="after task t", title=f"Accuracy matrix R — {g.label}")
        fig.colorbar(im, ax=ax, fraction=0.046)
        save(fig, f"cil_acc_matrix_{_safe(g.label)}.png")

    lt = [g for g in groups if g.kind == "long_tail"]
    if lt:
        import numpy as np

        sets = sorted({s for g in lt for r in g.finished for s in r.sessions[-1]["metrics"]})
        fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), squeeze=False)
        for ax, eval_set in zip(axes[0], sets):
            width = 0.8 / len(lt)
            for k, g in enumerate(lt):
                vals = [mean_std(list(session_values(g, m, eval_set)[-1].values()))[0] if session_values(g, m, eval_set)
                        else None for m in ("many", "medium", "few")]
                ax.bar(np.arange(3) + k * width, [v if v is not None else 0 for v in vals], width, label=g.label)
            ax.set_xticks(np.arange(3) + 0.4 - width / 2, ["many", "medium", "few"])
            ax.set(title=eval_set, ylabel="accuracy (%)")
        axes[0][0].legend(fontsize=8)
        save(fig, "long_tail_groups.png")

    osr = [g for g in groups if g.kind == "open_set" or any("roc" in s for r in g.finished for s in r.sessions)]
    roc_groups = [(g, _roc(g)) for g in osr]
    roc_groups = [(g, c) for g, c in roc_groups if c]
    if roc_groups:
        fig, ax = plt.subplots(figsize=(5, 5))
        for g, (fpr, tpr) in roc_groups:
            ax.plot(fpr, tpr, label=g.label)
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set(xlabel="FPR (known flagged unknown)", ylabel="TPR (unknown caught)", title="ROC (first seed)")
        ax.legend(fontsize=8)
        save(fig, "open_set_roc.png")
    return written


def _safe(label: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in label)


def _mean_acc_matrix(g: Group) -> list[list[float]] | None:
    n = max(len(r.sessions) for r in g.finished)
    matrix = [[float("nan")] * n for _ in range(n)]
    any_value = False
    for t in range(n):
        for j in range(t + 1):
            vals = [r.sessions[t]["metrics"].get("test", {}).get(f"task_{j:02d}/acc") for r in g.finished
                    if t < len(r.sessions)]
            vals = [v for v in vals if isinstance(v, (int, float))]
            if vals:
                matrix[t][j] = statistics.fmean(vals)
                any_value = True
    return matrix if any_value else None


def _roc(g: Group):
    """ROC points stored by an open-set engine in the last session's record (``roc``: {fpr, tpr})."""
    for r in g.finished:
        for s in reversed(r.sessions):
            roc = s.get("roc")
            if isinstance(roc, dict):
                for curve in roc.values():
                    if isinstance(curve, dict) and "fpr" in curve and "tpr" in curve:
                        return curve["fpr"], curve["tpr"]
    return None
