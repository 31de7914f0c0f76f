"""Benchmark the device open-set curve metrics against scikit-learn, measured in the same run.

Command (from the repository root):

    .venv/bin/python bench/bench_open_set.py --n 1000000 --device cpu --repeats 3

One synthetic eval set of ``--n`` scores (40% unknown, scores rounded to 3 decimals so that ties are
frequent; known scores shifted so AUROC ≈ 0.8) is scored two ways:

1. ours (``openworld.metrics.open_set``): one stable sort, then AUROC (integer rank form), FPR@95
   (full curve, integer test), AUPR-In and AUPR-Out (trapezoid) from the scores on ``--device`` —
   what the ``open_set`` engine's compute() does;
2. scikit-learn on the same values (numpy, CPU): ``roc_auc_score``, ``roc_curve(drop_intermediate=
   False)`` + ``fpr[argmax(tpr >= 0.95)]``, ``auc(*precision_recall_curve(...)[1::-1])`` for both
   directions.

The numbers are checked to agree to 1e-6 (the run fails otherwise). Times are medians over
``--repeats`` runs after one warm-up; ratio = scikit-learn time / ours (> 1: ours is faster). On CUDA
the timing synchronises once per metric set (the host transfer of the results does it).
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
from openworld.metrics.open_set import _aupr_t, _auroc_t, _fpr_at_tpr_t, _Sorted  # noqa: E402

SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def ours(v: torch.Tensor, unk: torch.Tensor) -> list[float]:
    srt = _Sorted(v)  # one stable sort shared by the four metrics, as in the engine's compute()
    known = ~unk
    vals = [_auroc_t(srt, unk, known), _fpr_at_tpr_t(srt, unk, known, 19, 20),
            _aupr_t(srt, known, unk, False)[0], _aupr_t(srt, unk, known, True)[0]]
    return torch.stack(vals).cpu().tolist()  # one host transfer


def sklearn_ref(v: np.ndarray, unk: np.ndarray) -> list[float]:
    from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(unk, v, drop_intermediate=False)
    p_in, r_in, _ = precision_recall_curve(~unk, -v)
    p_out, r_out, _ = precision_recall_curve(unk, v)
    return [roc_auc_score(unk, v), float(fpr[np.argmax(tpr >= 0.95)]), auc(r_in, p_in), auc(r_out, p_out)]


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def power_of_ten(n: int) -> str:
    """``10⁶`` for an exact power of ten, else ``1,234,567``."""
    e = len(str(n)) - 1
    return f"10{str(e).translate(SUPERSCRIPT)}" if n >= 10 and n == 10**e else f"{n:,}"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.1f} ms" if ms < 100 else f"{ms:,.0f} ms"


def fmt_ratio(r: float) -> str:
    return f"{r:.2f}×" if r < 1 else f"{r:,.1f}×"


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
    dev = torch.device(args.device)
    vt, ut = torch.from_numpy(v).to(dev), torch.from_numpy(unk).to(dev)
    t_ours, r_ours = timed(lambda: ours(vt, ut), args.repeats)
    t_sk, r_sk = timed(lambda: sklearn_ref(v, unk), args.repeats)
    names = ["auroc", "fpr95", "aupr_in", "aupr_out"]
    diff = max(abs(a - b) for a, b in zip(r_ours, r_sk))
    print(f"open-set curve metrics on n={args.n:,} scores ({len(np.unique(v)):,} distinct values), "
          f"device {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else platform.processor() or 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("  " + "  ".join(f"{n}={a:.6f}" for n, a in zip(names, r_ours)) + f"   max |ours − sklearn| = {diff:.2e}")
    print(f"  ours (auroc+fpr95+aupr_in+aupr_out): {t_ours * 1e3:9.1f} ms")
    print(f"  scikit-learn (same four, CPU):       {t_sk * 1e3:9.1f} ms")
    print(f"  ratio sklearn / ours: {t_sk / t_ours:.2f}x")
    if diff > 1e-6:
        print("FAIL: results differ by more than 1e-6", file=sys.stderr)
        return 1
    if args.json:
        from openworld.report import write_bench_result

        threads = torch.get_num_threads()
        where = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                 f"{os.cpu_count()}-core {platform.machine()} CPU, {threads} thread{'s' * (threads != 1)}")
        table = {"columns": ["device", "n", "ours: AUROC + FPR@95 + AUPR-In + AUPR-Out", "scikit-learn (CPU)", "ratio"],
                 "rows": [[where, power_of_ten(args.n), fmt_ms(t_ours), fmt_ms(t_sk), fmt_ratio(t_sk / t_ours)]]}
        notes = [f"n = {args.n:,} float32 scores ({len(np.unique(v)):,} distinct values, 40 % unknown), "
                 f"median of {args.repeats} after one warm-up; ratio = scikit-learn time / ours; "
                 f"max |ours − sklearn| = {diff:.1e} (tolerance 1e-6)."]
        write_bench_result(args.json, [table], notes, params=vars(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
