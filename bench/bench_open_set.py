"""Benchmark the device open-set metrics against scikit-learn, OpenOOD and numpy, measured in the same run.

Command (from the repository root):

    .venv/bin/python bench/bench_open_set.py --n 1000000 --device cpu --repeats 3

One synthetic eval set of ``--n`` scores (40% unknown, scores rounded to 3 decimals so that ties are
frequent; known scores shifted so AUROC ≈ 0.8; 6 known and 4 unknown classes, pred_closed right for
70% of the knowns) is scored by:

1. ours, curve part (``openworld.metrics.open_set._curve_metrics_t``, what the ``open_set`` engine's
   compute() runs for its curve metrics): one stable sort, shared cumulative counts, and AUROC,
   FPR@95, FPR@95 (ID positive), AUPR-In/Out, AP-In/Out, OSCR and the ARPL OSCR from it, with one
   host transfer;
2. ours, end to end: ``OpenSetEngine.compute()`` on the same rows (observed beforehand, untimed):
   those nine plus the thresholded metrics, τ, ``cm_open`` and the bad-row counts, one transfer;
3. scikit-learn (numpy, CPU): ``roc_auc_score``, ``roc_curve(drop_intermediate=False)`` +
   ``fpr[argmax(tpr >= 0.95)]``, ``auc`` over ``precision_recall_curve`` for both directions;
4. OpenOOD-style: OpenOOD v1.5's ``auc_and_fpr_recall(conf, label, tpr_th)``
   (``openood/evaluators/metrics.py``), **re-implemented here from its definition** (not copied):
   ``roc_curve`` with its default ``drop_intermediate=True`` plus two ``precision_recall_curve`` calls,
   i.e. three sorts, for AUROC, FPR@95, AUPR-In and AUPR-Out;
5. numpy one-sort: a plain numpy implementation of those four metrics with one stable argsort
   (boolean compaction on the host, so not usable on a device).

Checks (the run fails otherwise): ours agrees with scikit-learn, OpenOOD-style and numpy to 1e-6 on
AUROC, AUPR-In and AUPR-Out, and with scikit-learn and numpy on FPR@95 (full curve). OpenOOD-style's
FPR@95 is read off the curve *with* dropped intermediate points, which can pick a later point on
some tie patterns (spec vector G); it is compared with ours under ``curve="sklearn_drop"``, the
parity option, and the line says whether it also equals our full-curve value here. compute()'s
curve metrics must equal the curve part's bit for bit.

Times are medians over ``--repeats`` rounds after one warm-up; in each round every candidate runs
once, interleaved, so that background load hits them alike. ratio = reference time / ours (> 1: ours
is faster). On CUDA the host transfer of the results synchronises each run. Our metrics run with
``open_set.CPU_THREADS`` intra-op threads on CPU (1 by default); one more line times the curve part
with torch's own thread count, for information.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openworld.metrics import create_engine  # noqa: E402
from openworld.metrics import open_set as osm  # noqa: E402

SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
NAMES = ["auroc", "fpr95", "aupr_in", "aupr_out"]
KNOWN, UNKNOWN = 6, 4


def ours(v: torch.Tensor, unk: torch.Tensor, drop: bool = False) -> list[float]:
    """The engine's curve part: every curve metric from one sort; one host transfer."""
    m = osm._curve_metrics_t(v, unk, drop=drop)
    host = dict(zip(m, torch.stack(list(m.values())).cpu().tolist()))
    return [host[k] for k in NAMES]


def sklearn_ref(v: np.ndarray, unk: np.ndarray) -> list[float]:
    from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(unk, v, drop_intermediate=False)
    p_in, r_in, _ = precision_recall_curve(~unk, -v)
    p_out, r_out, _ = precision_recall_curve(unk, v)
    return [roc_auc_score(unk, v), float(fpr[np.argmax(tpr >= 0.95)]), auc(r_in, p_in), auc(r_out, p_out)]


def openood_style(conf: np.ndarray, label: np.ndarray, tpr_th: float = 0.95) -> list[float]:
    """OpenOOD v1.5 ``auc_and_fpr_recall``, re-implemented from its definition: ID rows are label != -1,
    OOD rows label == -1; OOD is the positive class of the ROC with score −conf (higher conf = more ID)."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    ood = (label == -1).astype(np.int64)
    fpr_list, tpr_list, _ = roc_curve(ood, -conf)  # default drop_intermediate=True, as OpenOOD calls it
    fpr = fpr_list[np.argmax(tpr_list >= tpr_th)]
    precision_in, recall_in, _ = precision_recall_curve(1 - ood, conf)
    precision_out, recall_out, _ = precision_recall_curve(ood, -conf)
    auroc = auc(fpr_list, tpr_list)
    aupr_in = auc(recall_in, precision_in)
    aupr_out = auc(recall_out, precision_out)
    return [float(auroc), float(fpr), float(aupr_in), float(aupr_out)]


def numpy_one_sort(v: np.ndarray, unk: np.ndarray) -> list[float]:
    """The four metrics from one stable argsort, with the curve points compacted on the host."""
    order = np.argsort(v, kind="stable")
    vs, u = v[order], unk[order]
    end = np.ones(len(vs), dtype=bool)
    end[:-1] = vs[1:] != vs[:-1]  # tie-group ends, ascending v
    cu = np.cumsum(u)[end]  # unknowns with v ≤ the group's value
    ck = np.flatnonzero(end) + 1 - cu  # knowns likewise
    n_u, n_k = int(cu[-1]), int(ck[-1])
    pu, pk = np.r_[0, cu[:-1]], np.r_[0, ck[:-1]]  # the counts below each group
    auroc = float(((cu - pu) * (pk + ck)).sum()) / (2.0 * n_u * n_k)  # rank form, ties count ½
    g = np.flatnonzero(20 * (n_u - pu) >= 19 * n_u)[-1]  # descending v: the first point reaching 95%
    fpr95 = (n_k - pk[g]) / n_k

    def trap(tp: np.ndarray, fp: np.ndarray, n_p: int) -> float:  # PR curve from (R=0, P=1)
        r, p = np.r_[0.0, tp / n_p], np.r_[1.0, tp / (tp + fp)]
        return float(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2))

    return [auroc, float(fpr95), trap(ck, cu, n_k), trap((n_u - pu)[::-1], (n_k - pk)[::-1], n_u)]


def make_engine(v: np.ndarray, unk: np.ndarray, rng: np.random.Generator, dev: torch.device):
    """An ``open_set`` engine that has observed the rows (batches of 65,536, as an eval loop would)."""
    n = len(v)
    y = np.where(unk, KNOWN + rng.integers(0, UNKNOWN, n), rng.integers(0, KNOWN, n))
    pred = np.where(rng.random(n) < 0.7, np.minimum(y, KNOWN - 1), rng.integers(0, KNOWN, n))
    eng = create_engine("open_set", num_classes=KNOWN + UNKNOWN, device=dev, known_classes=range(KNOWN),
                        num_samples=n)
    for a in range(0, n, 65536):
        b = min(a + 65536, n)
        z = torch.zeros(b - a, KNOWN + UNKNOWN)
        z[torch.arange(b - a), torch.from_numpy(pred[a:b])] = 1.0
        eng.observe(z.to(dev), torch.from_numpy(y[a:b]).to(dev), torch.from_numpy(v[a:b]).to(dev))
    return eng


def timed_rounds(fns: dict, repeats: int) -> tuple[dict[str, float], dict]:
    """Median seconds per candidate; every round runs each candidate once, interleaved."""
    out = {k: f() for k, f in fns.items()}  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            out[k] = f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}, out


def with_torch_threads(fn):
    """``fn`` with the metrics on torch's own intra-op thread count (``CPU_THREADS = None``)."""

    def run():
        saved, osm.CPU_THREADS = osm.CPU_THREADS, None
        try:
            return fn()
        finally:
            osm.CPU_THREADS = saved

    return run


def power_of_ten(n: int) -> str:
    """``10⁶`` for an exact power of ten, else ``1,234,567``."""
    e = len(str(n)) - 1
    return f"10{str(e).translate(SUPERSCRIPT)}" if n >= 10 and n == 10**e else f"{n:,}"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.1f} ms" if ms < 100 else f"{ms:,.0f} ms"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}×" if r < 1 else f"{r:,.1f}×"


def max_diff(a: list[float], b: list[float], keys=range(4)) -> float:
    return max(abs(a[i] - b[i]) for i in keys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also store the table (openworld.report.write_bench_result)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    unk = rng.random(args.n) < 0.4
    v = np.round(rng.normal(size=args.n) + 1.2 * unk, 3).astype(np.float32)
    conf, label = -v, np.where(unk, -1, 0)  # OpenOOD's inputs: higher conf = more ID, label -1 = OOD
    dev = torch.device(args.device)
    vt, ut = torch.from_numpy(v).to(dev), torch.from_numpy(unk).to(dev)
    eng = make_engine(v, unk, rng, dev)
    threads = torch.get_num_threads()
    fns = {"curves": lambda: ours(vt, ut), "compute": eng.compute,
           "sklearn": lambda: sklearn_ref(v, unk), "openood": lambda: openood_style(conf, label),
           "numpy": lambda: numpy_one_sort(v, unk)}
    if dev.type == "cpu" and threads > (osm.CPU_THREADS or threads):
        fns["curves_torch_threads"] = with_torch_threads(lambda: ours(vt, ut))
    t, r = timed_rounds(fns, args.repeats)
    r_ours, r_sk, r_oo, r_np = r["curves"], r["sklearn"], r["openood"], r["numpy"]
    fpr_drop = ours(vt, ut, drop=True)[1]
    d_sk, d_np = max_diff(r_ours, r_sk), max_diff(r_ours, r_np)
    d_oo = max(max_diff(r_ours, r_oo, (0, 2, 3)), abs(fpr_drop - r_oo[1]))
    comp = [r["compute"][k] for k in NAMES]
    where_dev = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"open-set curve metrics on n={args.n:,} scores ({len(np.unique(v)):,} distinct values), "
          f"device {dev} ({where_dev}), torch {torch.__version__}, threads {threads}"
          + (f" (our metrics use {osm.CPU_THREADS}: open_set.CPU_THREADS)" if dev.type == "cpu" and osm.CPU_THREADS
             else ""))
    print("  " + "  ".join(f"{k}={a:.6f}" for k, a in zip(NAMES, r_ours))
          + f"   max |ours − sklearn| = {d_sk:.2e}, − OpenOOD-style = {d_oo:.2e}, − numpy = {d_np:.2e}")
    print(f"  fpr95: OpenOOD-style (roc_curve drop_intermediate=True) {r_oo[1]:.6f}; ours full curve "
          f"{r_ours[1]:.6f}, ours curve=sklearn_drop {fpr_drop:.6f}"
          f" ({'the same' if r_oo[1] == r_ours[1] else 'they differ'} on this data)")
    print(f"  ours, curve part (9 curve metrics, one sort):           {t['curves'] * 1e3:9.1f} ms")
    print(f"  ours, OpenSetEngine.compute() (all 18 metrics, τ, cm):  {t['compute'] * 1e3:9.1f} ms")
    if "curves_torch_threads" in t:
        print(f"  ours, curve part with torch's {threads} intra-op threads:    "
              f"{t['curves_torch_threads'] * 1e3:9.1f} ms   (information)")
    refs = [("sklearn", "scikit-learn (same four, CPU, 4 sorts)"),
            ("openood", "OpenOOD-style auc_and_fpr_recall (3 sorts)"),
            ("numpy", "numpy one-sort (same four, host compaction)")]
    for key, label_ in refs:
        print(f"  {label_ + ':':45s} {t[key] * 1e3:9.1f} ms   ratio ref / ours: curve part "
              f"{t[key] / t['curves']:.2f}x, compute() {t[key] / t['compute']:.2f}x")
    print(f"  ratio sklearn / ours: {t['sklearn'] / t['curves']:.2f}x")
    fails = []
    if d_sk > 1e-6 or d_np > 1e-6 or d_oo > 1e-6:
        fails.append("results differ by more than 1e-6")
    if comp != r_ours:
        fails.append(f"compute() {comp} differs from the curve part {r_ours}")
    if fails:
        print("FAIL: " + "; ".join(fails), file=sys.stderr)
        return 1
    if args.json:
        from openworld.report import write_bench_result

        where = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                 f"{os.cpu_count()}-core {platform.machine()} CPU, {threads} thread{'s' * (threads != 1)}")
        table = {"columns": ["device", "n", "ours: AUROC + FPR@95 + AUPR-In + AUPR-Out", "scikit-learn (CPU)", "ratio"],
                 "rows": [[where, power_of_ten(args.n), fmt_ms(t["curves"]), fmt_ms(t["sklearn"]),
                           fmt_ratio(t["sklearn"] / t["curves"])]]}
        notes = [f"n = {args.n:,} float32 scores ({len(np.unique(v)):,} distinct values, 40 % unknown), "
                 f"median of {args.repeats} interleaved rounds after one warm-up; ratio = scikit-learn time / ours; "
                 f"max |ours − sklearn| = {d_sk:.1e} (tolerance 1e-6).",
                 f"ours computes all nine curve metrics (AUROC, FPR@95 both conventions, AUPR/AP In and Out, OSCR, "
                 f"ARPL OSCR) from one sort; OpenSetEngine.compute() end to end (18 metrics, τ, cm_open): "
                 f"{fmt_ms(t['compute'])}.",
                 f"OpenOOD-style auc_and_fpr_recall (re-implemented from its definition, 3 sorts): "
                 f"{fmt_ms(t['openood'])}, ratio {fmt_ratio(t['openood'] / t['curves'])} (curve part), "
                 f"{fmt_ratio(t['openood'] / t['compute'])} (compute()); numpy one-sort: {fmt_ms(t['numpy'])}, "
                 f"ratio {fmt_ratio(t['numpy'] / t['curves'])}."]
        if dev.type == "cpu" and osm.CPU_THREADS:
            notes.append(f"our metrics ran with open_set.CPU_THREADS = {osm.CPU_THREADS} intra-op thread(s)"
                         + (f"; with torch's {threads}: {fmt_ms(t['curves_torch_threads'])}"
                            if "curves_torch_threads" in t else "") + ".")
        write_bench_result(args.json, [table], notes, params=vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
