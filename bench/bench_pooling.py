"""2×2 max-pooling on the CPU: ``openworld.models.pooling.MaxPool2x2`` against ``nn.MaxPool2d(2)``, and one
training step / one no-grad forward of the small CNNs that use it, measured in the same run.

Command (from the repository root):

    .venv/bin/python bench/bench_pooling.py --threads 1 --repeats 5

Rows: the pooling alone (forward, and forward + backward) on the activation shapes of ``cnn_experts`` at
28×28 (Fashion-MNIST) and 32×32 (CIFAR), then a whole ``cnn_experts`` training step (batch 128) and a
no-grad forward (batch 1000, as in evaluation and SADE's test-time adaptation) with either pooling module.
Each pair is timed interleaved (median of ``--repeats`` after one warm-up); outputs and gradients are
checked bit-identical before timing (the run fails otherwise). ratio = ``nn.MaxPool2d`` time / ours.
"""

# ruff: noqa: B023  (every lambda below is timed before its loop variable moves on)
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openworld.models.experts import CNNExperts  # noqa: E402
from openworld.models.pooling import MaxPool2x2, max_pool2x2  # noqa: E402


def _swap_pools(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every MaxPool2x2 replaced by the native ``nn.MaxPool2d(2)``."""
    ref = copy.deepcopy(model)
    for mod in ref.modules():
        for name, child in mod.named_children():
            if isinstance(child, MaxPool2x2):
                setattr(mod, name, nn.MaxPool2d(2))
    return ref


def _pair(fn_ref, fn_ours, repeats: int) -> tuple[float, float]:
    fn_ref(), fn_ours()
    a, b = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        fn_ref()
        a.append(time.perf_counter() - t)
        t = time.perf_counter()
        fn_ours()
        b.append(time.perf_counter() - t)
    return statistics.median(a), statistics.median(b)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="PATH", help="also store the table (openworld.report.write_bench_result)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []

    def add(what, shape, t_ref, t_ours):
        rows.append([what, shape, f"{t_ref * 1e3:.2f}", f"{t_ours * 1e3:.2f}", f"{t_ref / t_ours:.1f}×"])
        print(f"{what:34s} {shape:18s} nn.MaxPool2d {t_ref * 1e3:9.2f} ms   ours {t_ours * 1e3:9.2f} ms   "
              f"ratio {t_ref / t_ours:5.1f}×")

    for shape in [(128, 16, 28, 28), (128, 32, 14, 14), (128, 32, 32, 32), (128, 64, 16, 16), (1000, 16, 28, 28)]:
        x = torch.relu(torch.randn(shape, generator=g))
        assert torch.equal(F.max_pool2d(x, 2), max_pool2x2(x))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        gy = torch.randn(F.max_pool2d(x, 2).shape, generator=g)
        F.max_pool2d(xa, 2).backward(gy)
        max_pool2x2(xb).backward(gy)
        assert torch.equal(xa.grad, xb.grad)
        label = "×".join(map(str, shape))
        with torch.no_grad():
            add("pool forward (no grad)", label, *_pair(lambda: F.max_pool2d(x, 2), lambda: max_pool2x2(x),
                                                          args.repeats))
        add("pool forward + backward", label,
            *_pair(lambda: F.max_pool2d(xa, 2).backward(gy), lambda: max_pool2x2(xb).backward(gy), args.repeats))

    for cin, hw, widths in [(1, 28, (16, 32, 64)), (3, 32, (32, 64, 128))]:
        ours = CNNExperts(3, cin, widths)
        ref = _swap_pools(ours)
        x = torch.rand(128, cin, hw, hw, generator=g)
        xe = torch.rand(1000, cin, hw, hw, generator=g)

        def step(model):
            model.train()
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()

        step(ref), step(ours)
        for p, q in zip(ref.parameters(), ours.parameters()):
            assert torch.equal(p.grad, q.grad)
        label = f"{cin}×{hw}×{hw}, widths {'/'.join(map(str, widths))}"
        add("cnn_experts train step, batch 128", label, *_pair(lambda: step(ref), lambda: step(ours), args.repeats))
        ref.eval(), ours.eval()
        with torch.no_grad():
            assert torch.equal(ref(xe), ours(xe))
            add("cnn_experts forward, batch 1000", label, *_pair(lambda: ref(xe), lambda: ours(xe), args.repeats))
    if args.json:
        from openworld.report import write_bench_result

        table = {"columns": ["what", "shape", "nn.MaxPool2d ms", "MaxPool2x2 ms", "ratio"], "rows": rows}
        notes = [f"CPU, {args.threads} thread{'s' * (args.threads != 1)}; median of {args.repeats} interleaved "
                 "repeats after one warm-up; outputs and gradients bit-identical (checked); ratio = "
                 "nn.MaxPool2d time / MaxPool2x2 time (> 1: ours faster)."]
        write_bench_result(args.json, [table], notes, params=vars(args))


if __name__ == "__main__":
    main()
