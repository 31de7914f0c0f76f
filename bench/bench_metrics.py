"""Benchmark the streaming MetricsEngine against references measured in the same run, on the same data.

Command (from the repository root):

    .venv/bin/python bench/bench_metrics.py --n 1000000 --classes 100 1000 --device cpu --repeats 3

For each class count K it builds one synthetic eval set (n labels, ~1% hidden labels y=-1, ~0.5%
rejections p=-1, ~70% correct predictions) and times the same metric set — acc, acc_balanced,
per-class recall, acc_batch_mean (chunks of 100), acc_base/acc_novel/hm — computed by:

1. the engine: ``update`` in batches of ``--batch`` samples already on ``--device`` + one ``compute``;
2. a vectorised reference: ``sklearn.metrics.confusion_matrix`` + numpy for everything derived from it;
3. a naive per-sample Python loop, timed on the first ``--loop-n`` samples and extrapolated linearly
   to n (labelled as such);
4. optionally (``--topk-n``) top-5 from logits: the engine with ``topk=(5,)`` against
   ``sklearn.metrics.top_k_accuracy_score`` on the same logits.

Every reference's numbers are checked against the engine's (max abs difference printed; the run
fails if any exceeds 1e-9). Times are the median over ``--repeats`` runs after one warm-up; the ratio
column is reference time / engine time (> 1: the engine is faster).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openworld.metrics import MetricsEngine

CHUNK = 100
SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def power_of_ten(n: int) -> str:
    """``10⁵`` for an exact power of ten, else ``123,456``."""
    e = len(str(n)) - 1
    return f"10{str(e).translate(SUPERSCRIPT)}" if n >= 10 and n == 10**e else f"{n:,}"


def make_data(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.7, y, rng.integers(0, k, n))
    p = np.where(rng.random(n) < 0.005, -1, p)  # rejections: errors
    y = np.where(rng.random(n) < 0.01, -1, y)  # hidden labels: ignored
    return y.astype(np.int64), p.astype(np.int64)


def groups_for(k: int) -> dict[str, list[int]]:
    b = max(1, (3 * k) // 5)
    return {"base": list(range(b)), "novel": list(range(b, k))}


def _hm(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def run_engine(y_d, p_d, k, device, batch, groups, chunk=CHUNK) -> tuple[dict, torch.Tensor]:
    eng = MetricsEngine(k, device, topk=(), chunk_size=chunk, groups=groups, num_samples=y_d.numel())
    for i in range(0, y_d.numel(), batch):
        eng.update(p_d[i : i + batch], y_d[i : i + batch])
    m = eng.compute()  # one host transfer; includes the device sync
    return m, eng.per_class()


def run_sklearn(y: np.ndarray, p: np.ndarray, k: int, groups) -> tuple[dict, np.ndarray]:
    from sklearn.metrics import confusion_matrix

    keep = y >= 0
    yv, pv = y[keep], p[keep]
    cm = confusion_matrix(yv, pv, labels=np.arange(k))  # drops rejected predictions, so:
    support = np.bincount(yv, minlength=k).astype(np.float64)  # supports from the labels
    diag = np.diag(cm).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = diag / support
    present = support > 0
    correct = (yv == pv).astype(np.int64)
    starts = np.arange(0, yv.size, CHUNK)
    chunk_acc = np.add.reduceat(correct, starts) / np.diff(np.append(starts, yv.size)) if yv.size else np.array([])
    out = {
        "acc": diag.sum() / yv.size,
        "acc_balanced": per_class[present].mean(),
        "acc_batch_mean": chunk_acc.mean(),
    }
    for g, cls in groups.items():
        sel = np.zeros(k, bool)
        sel[cls] = True
        sel &= present
        out[f"acc_{g}"] = per_class[sel].mean() if sel.any() else math.nan
    out["hm"] = _hm(out["acc_base"], out["acc_novel"])
    return out, per_class


def run_loop(y: list[int], p: list[int], k: int, groups) -> tuple[dict, list[float]]:
    cm = [[0] * (k + 1) for _ in range(k)]
    chunk_hits: list[int] = []
    chunk_sizes: list[int] = []
    seen = 0
    for yi, pi in zip(y, p):
        if yi < 0 or yi >= k:
            continue
        cm[yi][pi if 0 <= pi < k else k] += 1
        if seen % CHUNK == 0:
            chunk_hits.append(0)
            chunk_sizes.append(0)
        chunk_sizes[-1] += 1
        chunk_hits[-1] += int(yi == pi)
        seen += 1
    per_class = []
    for c in range(k):
        s = sum(cm[c])
        per_class.append(cm[c][c] / s if s else math.nan)
    present = [pc for pc in per_class if not math.isnan(pc)]
    out = {
        "acc": sum(cm[c][c] for c in range(k)) / seen,
        "acc_balanced": sum(present) / len(present),
        "acc_batch_mean": sum(h / s for h, s in zip(chunk_hits, chunk_sizes)) / len(chunk_sizes),
    }
    for g, cls in groups.items():
        vals = [per_class[c] for c in cls if not math.isnan(per_class[c])]
        out[f"acc_{g}"] = sum(vals) / len(vals) if vals else math.nan
    out["hm"] = _hm(out["acc_base"], out["acc_novel"])
    return out, per_class


def timed(fn, repeats: int, sync=None) -> tuple[float, object]:
    result = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        result = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def max_diff(a: dict, b: dict, pa, pb) -> float:
    d = 0.0
    for key, va in a.items():
        x, y = float(va), float(b[key])
        if math.isnan(x) != math.isnan(y):
            return math.inf
        if not math.isnan(x):
            d = max(d, abs(x - y))
    pa, pb = np.asarray(pa, dtype=np.float64), np.asarray(pb, dtype=np.float64)
    if not np.array_equal(np.isnan(pa), np.isnan(pb)):
        return math.inf
    ok = ~np.isnan(pa)
    return max(d, float(np.abs(pa[ok] - pb[ok]).max(initial=0.0)))


def bench_one(k: int, args, dev: torch.device, sync) -> tuple[float, list[list[str]]]:
    """Time and check one class count; print its rows; return the largest disagreement and the rows of
    the published table (``--json``: K, path, time (s), ns/sample, ratio)."""
    worst = 0.0
    table: list[list[str]] = []
    device = dev.type
    y, p = make_data(args.n, k, args.seed + k)
    groups = groups_for(k)
    y_d, p_d = torch.from_numpy(y).to(dev), torch.from_numpy(p).to(dev)

    t_eng, (m_eng, pc_eng) = timed(lambda: run_engine(y_d, p_d, k, dev, args.batch, groups), args.repeats, sync)
    t_skl, (m_skl, pc_skl) = timed(lambda: run_sklearn(y, p, k, groups), args.repeats)
    d_skl = max_diff(m_eng, m_skl, pc_eng.numpy(), pc_skl)

    m_loop_n = min(args.loop_n, args.n)
    yl, pl = y[:m_loop_n].tolist(), p[:m_loop_n].tolist()
    t_loop_sub, (m_loop, pc_loop) = timed(lambda: run_loop(yl, pl, k, groups), 1)
    t_loop = t_loop_sub * args.n / m_loop_n
    m_eng_sub, pc_eng_sub = run_engine(y_d[:m_loop_n], p_d[:m_loop_n], k, dev, args.batch, groups)
    d_loop = max_diff(m_eng_sub, m_loop, pc_eng_sub.numpy(), pc_loop)
    worst = max(worst, d_skl, d_loop)

    def row(name, published, t, ratio, diff, n=args.n, ns_digits=1):
        """Print one row and keep its published form (same time, ratio; ``published`` as the path)."""
        r = "—" if ratio is None else f"{ratio:8.2f}x"
        dd = "—" if diff is None else f"{diff:.1e}"
        print(f"{k:>6}  {name:<58} {t:>10.4f} {1e9 * t / n:>10.1f} {r:>9} {dd:>11}")
        table.append([str(k), published, f"{t:.3f}", f"{1e9 * t / n:.{ns_digits}f}",
                      "—" if ratio is None else f"{ratio:.2f}×" if ratio < 1 else f"{ratio:.1f}×"])

    n_upd = math.ceil(args.n / args.batch)
    row(f"engine ({device}): update x{n_upd} + compute",
        f"openworld `MetricsEngine` ({n_upd} × `update` + `compute`)", t_eng, None, None)
    row("sklearn confusion_matrix + numpy (host)", "scikit-learn `confusion_matrix` + numpy",
        t_skl, t_skl / t_eng, d_skl)
    row(f"python per-sample loop, EXTRAPOLATED from {m_loop_n:,} samples",
        "Python per-sample loop" + ("" if m_loop_n == args.n else f" (extrapolated from {m_loop_n:,})"),
        t_loop, t_loop / t_eng, d_loop)

    if args.topk_n > 0:
        from sklearn.metrics import top_k_accuracy_score

        nt = min(args.topk_n, args.n)
        rng = np.random.default_rng(args.seed + 7 * k)
        z = rng.standard_normal((nt, k)).astype(np.float32)
        yt = y[:nt].copy()
        yt[yt < 0] = 0
        z_d, yt_d = torch.from_numpy(z).to(dev), torch.from_numpy(yt).to(dev)

        def eng_topk():
            eng = MetricsEngine(k, dev, topk=(5,), chunk_size=CHUNK)
            for i in range(0, nt, args.batch):
                zb = z_d[i : i + args.batch]
                eng.update(zb.argmax(1), yt_d[i : i + args.batch], logits=zb)
            return eng.compute()["top5"]

        t_et, top5_eng = timed(eng_topk, args.repeats, sync)
        t_st, top5_skl = timed(lambda: top_k_accuracy_score(yt, z, k=5, labels=np.arange(k)), args.repeats)
        d_t = abs(top5_eng - top5_skl)
        worst = max(worst, d_t)
        row(f"engine ({device}) + top5 from logits, n={nt:,} (argmax incl.)",
            f"engine + top-5 from logits, n = {power_of_ten(nt)}", t_et, None, None, n=nt, ns_digits=0)
        row(f"sklearn top_k_accuracy_score, n={nt:,}", f"scikit-learn `top_k_accuracy_score`, n = {power_of_ten(nt)}",
            t_st, t_st / t_et, d_t, n=nt, ns_digits=0)
    print()
    return worst, table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="samples per eval set")
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000], help="class counts K")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4096, help="engine batch size")
    ap.add_argument("--loop-n", type=int, default=50_000, help="samples timed in the Python loop (extrapolated)")
    ap.add_argument("--topk-n", type=int, default=100_000, help="samples for the top-5 rows (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also store the table (openworld.report.write_bench_result)")
    args = ap.parse_args(argv)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    print(f"# bench_metrics: n={args.n:,} batch={args.batch} repeats={args.repeats} (median) device={device} "
          f"[{dev_name}] torch={torch.__version__} threads={torch.get_num_threads()}")
    print("# ratio = reference time / engine time (> 1: the engine is faster); same data, same run")
    header = f"{'K':>6}  {'method':<58} {'time (s)':>10} {'ns/sample':>10} {'ratio':>9} {'max |diff|':>11}"
    print(header)
    print("-" * len(header))
    worst = 0.0
    main_rows: list[list[str]] = []
    topk_rows: list[list[str]] = []
    for k in args.classes:
        k_worst, k_rows = bench_one(k, args, dev, sync)
        worst = max(worst, k_worst)
        main_rows += k_rows[:3]
        topk_rows += k_rows[3:]
    print(f"# all references agree with the engine: max |diff| = {worst:.1e} (tolerance 1e-9)")
    if worst > 1e-9:
        return 1
    if args.json:
        from openworld.report import write_bench_result

        table = {"columns": ["K", "path", "time (s)", "ns/sample", "ratio"], "rows": main_rows + topk_rows}
        notes = [f"n = {args.n:,} predictions (≈1 % hidden labels, 0.5 % rejections) on {device}"
                 + (f" [{dev_name}]" if dev_name != device else "") + f", "
                 f"batches of {args.batch:,}, median of {args.repeats} after one warm-up"
                 + (f"; the top-5 rows on the first {min(args.topk_n, args.n):,} samples" if args.topk_n > 0 else "")
                 + ". `ratio` = reference time / engine time.",
                 f"Every reference agrees with the engine: max |diff| = {worst:.1e} (tolerance 1e-9)."]
        write_bench_result(args.json, [table], notes, params=vars(args))
    return 0


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sys.exit(main())
