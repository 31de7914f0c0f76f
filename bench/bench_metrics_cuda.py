"""Issue 15's GPU goals for the metrics engine, measured with CUDA events (run it on a GPU machine).

1. 10⁶ predictions, K = 1000, batches of 4096: every ``update`` plus ``compute`` end to end (goal < 50 ms),
   timed with ``torch.cuda.Event`` around the whole stream, median of 5 after a warm-up.
2. No host sync in ``update``: the same stream under ``torch.cuda.set_sync_debug_mode("error")``, which
   raises on any synchronising call (``compute`` syncs once by design and runs outside it).
3. The open-set engine on 10⁶ scores: ``observe`` under the same mode, ``compute`` timed with events.

Prints one line per goal with ``met`` / ``missed``; exit code 1 if a sync was found or results differ from the
CPU engine. On a machine without CUDA it says so and exits 2 (nothing is measured).

    python bench/bench_metrics_cuda.py [--n 1000000] [--classes 1000] [--batch 4096]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from openworld.metrics import MetricsEngine, create_engine


def _stream(eng, p, y, z, batch):
    for i in range(0, p.numel(), batch):
        eng.update(p[i : i + batch], y[i : i + batch], logits=None if z is None else z[i : i + batch])


def _without_sync(what: str, fn) -> bool:
    """Run ``fn`` under ``set_sync_debug_mode("error")``; print and return whether it made no host sync."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        print(f"{what} under set_sync_debug_mode('error'): no sync (met)")
        return True
    except RuntimeError as exc:
        print(f"{what} under set_sync_debug_mode('error'): SYNC FOUND (missed): {exc}")
        return False
    finally:
        torch.cuda.set_sync_debug_mode(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-ms", type=float, default=50.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_metrics_cuda: no CUDA device here; run it on a GPU machine (nothing measured)")
        return 2
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    k, n, b = args.classes, args.n, args.batch
    y = torch.randint(-1, k, (n,), generator=g)
    p = torch.where(torch.rand(n, generator=g) < 0.005, -1, torch.randint(0, k, (n,), generator=g))
    groups = {"base": list(range(k // 2)), "novel": list(range(k // 2, k))}
    yc, pc = y.to(dev), p.to(dev)
    print(f"# bench_metrics_cuda: n={n:,} K={k} batch={b} device={torch.cuda.get_device_name(dev)} "
          f"torch={torch.__version__}")
    bad = 0
    # 1. end to end with CUDA events
    times = []
    for r in range(args.repeats + 1):
        eng = MetricsEngine(k, dev, groups=groups, num_samples=n)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        _stream(eng, pc, yc, None, b)
        m_gpu = eng.compute()  # ends with the one host transfer
        end.record()
        torch.cuda.synchronize()
        if r:
            times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    print(f"update x {-(-n // b)} + compute: {ms:.2f} ms (median of {args.repeats}; goal < {args.budget_ms:g} ms: "
          f"{'met' if ms < args.budget_ms else 'missed'})")
    cpu = MetricsEngine(k, "cpu", groups=groups)
    _stream(cpu, p, y, None, b)
    m_cpu = cpu.compute()
    diff = max(abs(m_gpu[key] - m_cpu[key]) for key in m_cpu if m_cpu[key] == m_cpu[key])
    print(f"GPU vs CPU engine: max |diff| = {diff:.1e} (tolerance 1e-9)")
    bad += diff > 1e-9
    # 2. no sync in update (top-5 from logits included, on a shorter stream: logits are n x K floats)
    nz = min(n, 100_000)
    z = torch.randn(nz, k, generator=g).to(dev)
    eng = MetricsEngine(k, dev, groups=groups, num_samples=nz)
    bad += not _without_sync("update", lambda: (_stream(eng, pc[:nz], yc[:nz], None, b),
                                                _stream(eng, pc[:nz], yc[:nz], z, b)))
    # 3. open set: observe without sync, compute timed
    s = torch.randn(n, generator=g).to(dev)
    zk = torch.randn(b, 10, generator=g).to(dev)
    yo = torch.randint(-1, 10, (n,), generator=g).to(dev)
    osd = create_engine("open_set", num_classes=10, device=dev, known_classes=list(range(6)), num_samples=n)

    def observe_all():
        for i in range(0, n, b):
            m = min(b, n - i)
            osd.observe(zk[:m], yo[i : i + m], s[i : i + m])

    bad += not _without_sync("open-set observe", observe_all)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = osd.compute()
    end.record()
    torch.cuda.synchronize()
    print(f"open-set compute on {n:,} scores ({len(out)} metrics): {start.elapsed_time(end):.2f} ms")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
