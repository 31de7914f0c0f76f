"""RCAL's MoCo loss: the dense queue InfoNCE (``openworld.strategies.rcal.MoCoQueueLoss``) against the
reference it replaced, pytorch-metric-learning's ``CrossBatchMemory(NTXentLoss)``, measured in the same run.

Command (from the repository root):

    .venv/bin/python bench/bench_moco_queue.py --queue 4096 --batch 256 --dim 128 --steps 5 --threads 1

Both losses are fed the same normalised queries/keys step after step (so their queues fill identically);
each step's loss values are checked equal (1e-5) and each step's forward + backward is timed. The first
``--queue / --batch`` steps (queue filling) are run untimed first, so the timed steps see a full queue, as
in training. Reports the median time per step and the ratio reference / openworld (> 1: openworld faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.1f}" if ms < 100 else f"{ms:,.0f}"


def fmt_ratio(r: float) -> str:
    return f"{r:,.0f}×" if r >= 10 else f"{r:.2f}×" if r < 1 else f"{r:.1f}×"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--json", metavar="PATH", help="also store the table (openworld.report.write_bench_result)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pytorch_metric_learning.losses import CrossBatchMemory, NTXentLoss

    from openworld.strategies.rcal import MoCoQueueLoss

    ref = CrossBatchMemory(NTXentLoss(temperature=args.tau), embedding_size=args.dim, memory_size=args.queue)
    ours = MoCoQueueLoss(args.dim, args.queue, args.tau)
    g = torch.Generator().manual_seed(0)
    fill = -(-args.queue // args.batch)
    times = {"pml": [], "openworld": []}
    worst = 0.0  # largest |loss difference| over all steps
    for step in range(fill + args.steps):
        q = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1)
        k = F.normalize(torch.randn(args.batch, args.dim, generator=g), dim=1)
        lab = torch.arange(step * args.batch, (step + 1) * args.batch)
        mask = torch.tensor([False] * args.batch + [True] * args.batch)
        values = {}
        for name in ("pml", "openworld"):
            qq = q.clone().requires_grad_()
            t0 = time.perf_counter()
            if name == "pml":
                loss = ref(torch.cat([qq, k]), torch.cat([lab, lab]), enqueue_mask=mask)
            else:
                loss = ours(qq, k)
            loss.backward()
            dt = time.perf_counter() - t0
            values[name] = float(loss.detach())
            if step >= fill:
                times[name].append(dt)
        assert abs(values["pml"] - values["openworld"]) < 1e-5, (step, values)
        worst = max(worst, abs(values["pml"] - values["openworld"]))
    t_ref, t_ours = statistics.median(times["pml"]), statistics.median(times["openworld"])
    print(f"queue {args.queue}, batch {args.batch}, dim {args.dim}, {args.threads} thread(s), "
          f"{args.steps} timed steps (losses equal to 1e-5 at every step)")
    print(f"pytorch-metric-learning CrossBatchMemory(NTXent): {t_ref * 1e3:10.1f} ms/step")
    print(f"openworld MoCoQueueLoss:                         {t_ours * 1e3:10.1f} ms/step")
    print(f"ratio (reference / openworld): {t_ref / t_ours:.0f}×")
    if args.json:
        from openworld.report import write_bench_result

        shape = [str(args.queue), str(args.batch), str(args.dim)]
        table = {"columns": ["queue", "batch", "dim", "path", "ms/step", "ratio"],
                 "rows": [[*shape, "openworld `MoCoQueueLoss`", fmt_ms(t_ours), "—"],
                          [*shape, "pytorch-metric-learning `CrossBatchMemory(NTXentLoss)`", fmt_ms(t_ref),
                           fmt_ratio(t_ref / t_ours)]]}
        notes = [f"Forward + backward per step on a full queue, median of {args.steps} timed steps after "
                 f"{fill} untimed queue-filling steps, {args.threads} thread{'s' * (args.threads != 1)}, "
                 f"τ = {args.tau}; same queries/keys fed to both, losses equal at every step "
                 f"(max |diff| = {worst:.1e}, tolerance 1e-5); ratio = reference time / openworld time."]
        write_bench_result(args.json, [table], notes, params=vars(args))


if __name__ == "__main__":
    main()
