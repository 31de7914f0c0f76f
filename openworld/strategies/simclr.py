"""SimCLR pre-training (stage 0 of the GCD/NCD small recipes, card ``specs/gcd-ncd.md`` §9 R2:
"SimCLR pretraining on all training images without labels: 10 epochs, batch 256, τ=0.5").

Called by :meth:`openworld.strategies.base.RunContext.pretrained_backbone` for a recipe's
``pretrain: {objective: simclr, …}`` section, so it is trained once per content hash and cached like
the supervised pre-training. The objective is NT-Xent on a projection of the encoder feature:
two views of each image from the data's train transform, positives = the other view, the other
2B−2 rows negatives, temperature τ (:func:`openworld.strategies.simgcd.info_nce_loss`, equal to
pytorch-metric-learning's ``NTXentLoss`` — ``tests/test_gcd_losses.py`` — and ~1000× faster on CPU).
Targets are never read: the data is passed through ``hide_labels()`` first.

Speed: the encoder trains inside :func:`openworld.models.pooling.fused_relu_pool` (ReLU + 2×2 max-pool as
one op, the last ReLU's gradient in its output's layout): the same numbers, bit for bit
(``tests/test_simclr_speed.py``), ~10 % less time per step on cnn28 (``bench/bench_simclr.py``). The rest of
a step is the native convolutions and batch norms (~75 %), which no exact rewrite here can shorten.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from openworld.models.pooling import fused_relu_pool
from openworld.strategies.base import NonFiniteLossError, OptimizerConfig, make_optimizer
from openworld.strategies.simgcd import info_nce_loss, two_view_batches

__all__ = ["simclr_pretrain"]


def simclr_pretrain(
    encoder: nn.Module,
    data,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    temperature: float = 0.5,
    optimizer: OptimizerConfig | dict | None = None,
    schedule: str = "cosine",
    proj_dim: int = 128,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    num_workers: int = 0,
    progress=None,
) -> dict:
    """Train ``encoder`` in place with SimCLR on ``data`` (its labels are hidden, never read).

    Projection head ``Linear(d,d)–ReLU–Linear(d,proj_dim)`` (dropped afterwards); each epoch visits a
    random permutation of the data in batches of ``batch_size`` (drop_last); LR per epoch
    (``cosine`` to 0 or ``constant``). Returns ``{"epoch_loss": [...], "steps": n}`` (mean loss per epoch).
    """
    with torch.enable_grad():  # callers may build the backbone inside no_grad (e.g. feature extraction)
        return _train(
            encoder,
            data,
            epochs,
            batch_size,
            temperature,
            optimizer,
            schedule,
            proj_dim,
            device,
            generator,
            num_workers,
            progress,
        )


def _train(
    encoder,
    data,
    epochs,
    batch_size,
    temperature,
    optimizer,
    schedule,
    proj_dim,
    device,
    generator,
    num_workers,
    progress,
) -> dict:
    if batch_size < 2:
        raise ValueError(f"simclr: batch_size must be >= 2, got {batch_size}")
    data = data.hide_labels()  # the firewall: SimCLR reads images only
    if len(data) < batch_size:
        raise ValueError(f"simclr: {len(data)} pre-training samples < batch_size {batch_size} (drop_last)")
    opt_cfg = optimizer if isinstance(optimizer, OptimizerConfig) else OptimizerConfig(**(optimizer or {}))
    device = torch.device(device)
    d = int(encoder.out_features)
    gen = generator or torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):  # the head's init comes from `generator`, not the global stream
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=gen)))
        head = nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, int(proj_dim)))
    model = nn.ModuleDict({"encoder": encoder, "head": head}).to(device).train()
    opt = make_optimizer(model.parameters(), opt_cfg)
    losses: list[float] = []
    steps = 0
    epochs_iter = range(int(epochs)) if progress is None else progress(range(int(epochs)), desc="SimCLR", unit="ep")
    with fused_relu_pool(encoder):  # same numbers, less time (module docstring)
        for epoch in epochs_iter:
            mean, n = _epoch(model, opt, opt_cfg, data, epoch, epochs, schedule, batch_size, temperature, device, gen,
                             num_workers)
            losses.append(mean)
            steps += n
    encoder.eval()
    return {"epoch_loss": losses, "steps": steps}


def _epoch(model, opt, opt_cfg, data, epoch, epochs, schedule, batch_size, temperature, device, gen, num_workers):
    """One epoch (LR for ``epoch``, a fresh permutation, drop_last batches); returns (mean loss, steps)."""
    lr = opt_cfg.lr * (0.5 * (1 + math.cos(math.pi * epoch / epochs)) if schedule == "cosine" else 1.0)
    for g in opt.param_groups:
        g["lr"] = lr
    order = torch.randperm(len(data), generator=gen)
    total = torch.zeros((), device=device)
    n = 0
    for x, _ in two_view_batches(data, order, batch_size, device=device, generator=gen, num_workers=num_workers):
        loss = info_nce_loss(model["head"](model["encoder"](x)), temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
        n += 1
    mean = float(total) / max(n, 1)
    if not math.isfinite(mean):
        raise NonFiniteLossError(f"simclr: non-finite loss in epoch {epoch} (lr {lr:g})")
    return mean, n
