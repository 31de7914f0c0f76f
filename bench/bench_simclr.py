"""SimCLR stage 0 of ``scenarios/gcd_fashion_small_simclr.yaml`` (cnn28, batch 256, two crop views, NT-Xent
τ 0.5, Adam): seconds per training step of the old path (plain modules) against the new one (inside
``openworld.models.pooling.fused_relu_pool``, as ``simclr_pretrain`` now trains), measured interleaved step by
step in one process so that other load on the machine hits both alike, and the projected full stage 0
(``--epochs``, default the recipe's 6, × 234 steps). The two models' weights are checked bit-identical at
the end (the run fails otherwise).

Command (from the repository root):

    OPENWORLD_DATA=../shared/data .venv/bin/python bench/bench_simclr.py --threads 1 --steps 40

``--profile N`` then profiles N more steps of the new path with ``torch.profiler`` and prints the share of
the step's CPU time per op family (convolution, batch norm, pooling, rest), forward and backward together.

Without the Fashion-MNIST files it falls back to synthetic 28×28 images (say so in any reported number).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from openworld.allocator import tune_allocator  # noqa: E402
from openworld.models import create_backbone  # noqa: E402
from openworld.models.pooling import fused_relu_pool  # noqa: E402
from openworld.strategies.simgcd import info_nce_loss, two_view_batches  # noqa: E402


def _data(n: int):
    root = os.environ.get("OPENWORLD_DATA")
    try:
        import openworld.scenarios.discovery  # noqa: F401
        from openworld.registry import DATASETS

        train = DATASETS.get("fashion_mnist")(root=root, augment="crop").train
        return train.subset(torch.arange(n)).detach_origin().hide_labels(), "fashion_mnist"
    except Exception as exc:  # no data files here: synthetic images of the same shape and dtype
        from openworld.data.transforms import get_transforms
        from openworld.data.views import TensorData

        print(f"(Fashion-MNIST not available: {type(exc).__name__}; synthetic images)")
        x = (torch.rand(n, 1, 28, 28) * 255).to(torch.uint8) * (torch.rand(n, 1, 28, 28) > 0.5)
        return TensorData(x, torch.full((n,), -1), transforms=get_transforms("gray28", "crop")), "synthetic"


FAMILIES = {"convolution": ("convolution",), "batch norm": ("batch_norm",), "pooling": ("max_pool",)}


def _profile(model, opt, batches) -> None:
    """Share of the profiled steps' self CPU time per op family (aten ops only, so nothing counts twice)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x in batches:
            loss = info_nce_loss(model["head"](model["encoder"](x)), 0.5)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    shares = dict.fromkeys([*FAMILIES, "rest"], 0.0)
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        family = next((f for f, keys in FAMILIES.items() if any(k in ev.key for k in keys)), "rest")
        shares[family] += ev.self_cpu_time_total
    total = sum(shares.values()) or 1.0
    print(f"profile of {len(batches)} steps (self CPU time of aten ops, forward + backward): "
          + ", ".join(f"{f} {100 * v / total:.0f} %" for f, v in shares.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per path (after 3 warm-up steps)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=6, help="stage-0 epochs for the projection (the recipe's)")
    ap.add_argument("--profile", type=int, default=0, help="profile this many more steps of the new path")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tune_allocator()  # as `openworld run` does
    bs, warm = args.batch_size, 3
    data, name = _data(bs * (args.steps + warm))
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=gen)
    t = time.process_time()
    batches = [x for x, _ in two_view_batches(data, order, bs, device="cpu", generator=gen)]
    t_batch = (time.process_time() - t) / len(batches)

    torch.manual_seed(0)
    enc = create_backbone("cnn28", in_channels=1, input_size=(1, 28, 28))
    head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 128))
    runs = {}
    for path in ("old", "new"):
        model = nn.ModuleDict({"encoder": copy.deepcopy(enc), "head": copy.deepcopy(head)}).train()
        runs[path] = (model, torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6))
    times = {"old": [], "new": []}
    with fused_relu_pool(runs["new"][0]["encoder"]):
        for i, x in enumerate(batches):
            for path in ("old", "new") if i % 2 == 0 else ("new", "old"):
                model, opt = runs[path]
                t = time.process_time()
                loss = info_nce_loss(model["head"](model["encoder"](x)), 0.5)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i >= warm:
                    times[path].append(time.process_time() - t)
    sd_old, sd_new = runs["old"][0].state_dict(), runs["new"][0].state_dict()
    same = all(torch.equal(v.view(torch.int32) if v.dtype == torch.float32 else v,
                           sd_new[k].view(torch.int32) if v.dtype == torch.float32 else sd_new[k])
               for k, v in sd_old.items())
    if not same:
        raise SystemExit("weights differ between the old and the new path")
    full_steps = args.epochs * (60000 // 256)
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"data={name} threads={args.threads} batch={bs} steps={len(times['old'])} (CPU time, median per step)")
    print(f"batch building (two crop views): {t_batch * 1e3:.1f} ms/step")
    print(f"old path: {old * 1e3:.1f} ms/step   new path: {new * 1e3:.1f} ms/step   ratio old/new {old / new:.3f}")
    print(f"weights after {len(batches)} steps bit-identical: {same}")
    print(f"projected stage 0 ({full_steps} steps, + batch building): old {full_steps * (old + t_batch):.0f} s, "
          f"new {full_steps * (new + t_batch):.0f} s")
    if args.profile:  # after the weight check: these steps train the new path further
        with fused_relu_pool(runs["new"][0]["encoder"]):
            _profile(*runs["new"], batches[: args.profile])


if __name__ == "__main__":
    main()
