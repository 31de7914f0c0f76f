"""LDAM-DRW (Cao et al., NeurIPS 2019): label-distribution-aware margins + deferred re-weighting.

Card: ``docs/methods/ldam_drw.md``. Official code read: github.com/kaidic/LDAM-DRW (commit 2536330f),
``losses.py`` (``LDAMLoss``), ``cifar_train.py`` (train rules, learning-rate schedule),
``models/resnet_cifar.py`` (``NormedLinear``).

* Margins ``m_c = n_c^{−1/4}``, rescaled so that ``max_c m_c = max_m`` (0.5); a class with no training
  sample gets margin 0 (it never is a target).
* Classifier: the recipe's backbone as one branch + a **normalised linear** head, ``cos(f(x), w_c)`` with
  features and weight columns L2-normalised (released ``NormedLinear``, used whenever the loss is LDAM).
* Loss: ``CE(s·(cos − m_y·[c = y]), y, weight)``, s = 30: the margin is subtracted from the target cosine
  only, then everything is scaled by s (released).
* Deferred re-weighting (``train_rule="drw"``): before ``drw_epoch`` the class weights are those of β = 0
  (all 1); from ``drw_epoch`` on they are the class-balanced "effective number" weights
  ``w_c = (1−β)/(1−β^{n_c})`` with β = 0.9999, normalised to sum to the number of classes (a class with
  n_c = 0 gets 0). ``"reweight"`` uses those weights from the first epoch, ``"none"`` never.
  Released: epoch 160 of 200 (``drw_epoch=None`` → ``int(0.8·epochs)``, 160 at 200).
* Training (released ``cifar_train.py``): SGD with momentum 0.9, no Nesterov, weight decay 2e-4, batch 128,
  lr 0.1, 200 epochs; linear warm-up over the first 5 epochs (``lr·(e+1)/5``), then ×0.01 from epoch 160 and
  ×0.0001 from epoch 180 — :class:`~openworld.strategies.long_tail_baselines.LTSchedule` with warm-up
  ``ceil(E/40)``, milestones ``0.8E, 0.9E`` and γ = 0.01 gives exactly that at E = 200, and scales with E.
* Counts are the **observed** (possibly noisy) training counts. Prediction: ``argmax_c s·cos`` (the scale
  does not change the argmax). Checkpoint ``val`` (default) / ``last`` / ``test`` (opt-in): the released
  script reports the best epoch on the test set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.models.experts import NormedLinear, single_branch_backbone
from openworld.registry import register_strategy
from openworld.strategies.base import Prediction, Strategy
from openworld.strategies.long_tail_baselines import (
    LTSchedule,
    balanced_accuracy_of,
    check_checkpoint,
    fit,
    selection_data,
)

TRAIN_RULES = ("drw", "reweight", "none")


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------
def ldam_margins(counts: Sequence[int] | Tensor, max_m: float = 0.5) -> Tensor:
    """``m_c ∝ n_c^{-1/4}`` with ``max_c m_c = max_m`` (float64; absent classes 0)."""
    n = torch.as_tensor(list(counts) if not isinstance(counts, Tensor) else counts, dtype=torch.float64)
    m = torch.where(n > 0, n.clamp(min=1).pow(-0.25), torch.zeros_like(n))
    if not bool((m > 0).any()):
        raise ValueError("ldam_margins: no class has a training sample")
    return m * (max_m / m.max())


def class_balanced_weights(counts: Sequence[int] | Tensor, beta: float) -> Tensor:
    """Effective-number weights ``(1−β)/(1−β^{n_c})`` normalised to sum to C (float64; absent classes 0).
    β = 0 gives all ones."""
    n = torch.as_tensor(list(counts) if not isinstance(counts, Tensor) else counts, dtype=torch.float64)
    present = n > 0
    eff = 1.0 - torch.pow(torch.full_like(n, float(beta)), n)
    w = torch.where(present, (1.0 - beta) / torch.where(present, eff, torch.ones_like(eff)), torch.zeros_like(n))
    return w / w.sum() * len(n)


def ldam_loss(cosine: Tensor, target: Tensor, margins: Tensor, s: float = 30.0, weight: Tensor | None = None) -> Tensor:
    """``CE(s·(cos − m_y·onehot(y)), y, weight)`` — the margin only on the target column."""
    onehot = F.one_hot(target, cosine.shape[1]).to(cosine.dtype)
    m = margins.to(device=cosine.device, dtype=cosine.dtype)
    w = None if weight is None else weight.to(device=cosine.device, dtype=cosine.dtype)
    return F.cross_entropy(s * (cosine - onehot * m[target].unsqueeze(1)), target, weight=w)


def drw_weights_at(epoch: int, counts, rule: str, drw_epoch: int, beta: float) -> Tensor:
    """The class weights of ``epoch`` under ``rule`` (released ``train_rule`` None / Reweight / DRW)."""
    if rule == "none" or (rule == "drw" and epoch < drw_epoch):
        return class_balanced_weights(counts, 0.0)
    return class_balanced_weights(counts, beta)


# ------------------------------------------------------------------------------------------------
# Strategy
# ------------------------------------------------------------------------------------------------
class _LDAMNet(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = NormedLinear(encoder.out_features, num_classes, scale=1.0)  # cosine; s enters the loss

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


@register_strategy("ldam_drw")
class LDAMDRW(Strategy):
    """LDAM loss on a cosine classifier with deferred class-balanced re-weighting (defaults: released CIFAR)."""

    supports = frozenset({"long_tail"})

    def __init__(self, max_m: float = 0.5, s: float = 30.0, train_rule: Literal["drw", "reweight", "none"] = "drw",
                 beta: float = 0.9999, drw_epoch: int | None = None, epochs: int = 200, batch_size: int = 128,
                 lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 2e-4,
                 warmup_epochs: int | None = None, milestones: Sequence[int] | None = None, gamma: float = 0.01,
                 checkpoint: str = "val"):
        if not isinstance(max_m, (int, float)) or isinstance(max_m, bool) or max_m < 0:
            raise ValueError(f"ldam_drw: max_m must be a number >= 0; got {max_m!r}")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or s <= 0:
            raise ValueError(f"ldam_drw: s must be a number > 0; got {s!r}")
        if train_rule not in TRAIN_RULES:
            raise ValueError(f"ldam_drw: train_rule must be one of {', '.join(TRAIN_RULES)}; got {train_rule!r}")
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 <= beta < 1:
            raise ValueError(f"ldam_drw: beta must be in [0, 1); got {beta!r}")
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"ldam_drw: epochs must be a positive integer; got {epochs!r}")
        if drw_epoch is not None and (not isinstance(drw_epoch, int) or isinstance(drw_epoch, bool)
                                      or not 0 <= drw_epoch <= epochs):
            raise ValueError(f"ldam_drw: drw_epoch must be an integer in [0, epochs={epochs}] or null "
                             f"(int(0.8·epochs)); got {drw_epoch!r}")
        if not isinstance(nesterov, bool):
            raise ValueError(f"ldam_drw: nesterov must be true or false; got {nesterov!r}")
        self.max_m = max_m
        self.s = s
        self.train_rule = train_rule
        self.beta = beta
        self.drw_epoch = drw_epoch
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.milestones = None if milestones is None else list(milestones)
        self.gamma = gamma
        self.checkpoint = check_checkpoint(checkpoint)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.net: _LDAMNet | None = None
        self.counts: list[int] | None = None
        self.info: dict = {}

    @property
    def resolved_drw_epoch(self) -> int:
        return int(0.8 * self.epochs) if self.drw_epoch is None else int(self.drw_epoch)

    def _build(self) -> _LDAMNet:
        enc = single_branch_backbone(self.ctx.backbone_cfg, self.ctx.scenario["input_shape"])
        return _LDAMNet(enc, self.ctx.scenario["num_classes"]).to(self.ctx.device)

    def _schedule(self) -> LTSchedule:
        return LTSchedule(self.epochs, self.lr, self.warmup_epochs, self.milestones, self.gamma)

    def learn(self, session) -> None:
        c = session.classes.num_classes
        self.counts = [int(v) for v in session.classes.train_counts]
        margins = ldam_margins(self.counts, self.max_m).to(self.ctx.device)
        drw = self.resolved_drw_epoch
        w_plain = class_balanced_weights(self.counts, 0.0).float().to(self.ctx.device)
        w_cb = class_balanced_weights(self.counts, self.beta).float().to(self.ctx.device)
        steps_per_epoch = -(-len(session.labeled) // self.batch_size)  # fit's batches keep the last, short one
        step = [0]

        def loss_fn(x, y):
            epoch = step[0] // steps_per_epoch
            step[0] += 1
            cb = self.train_rule == "reweight" or (self.train_rule == "drw" and epoch >= drw)
            return ldam_loss(self.net(x).float(), y, margins, self.s, w_cb if cb else w_plain), {}

        torch.manual_seed(self.ctx.derive_seed("ldam_drw", "init"))
        self.net = self._build()
        val = selection_data(self, session)
        validate = None
        if val is not None and len(val):
            def validate():
                return balanced_accuracy_of(self._scores, val, c, self.ctx.device, self.ctx.eval_batch_size)
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("ldam_drw", "train"))
        self.info = fit(self.net, session.labeled, loss_fn, ctx=self.ctx, schedule=self._schedule(),
                        batch_size=self.batch_size, momentum=self.momentum, nesterov=self.nesterov,
                        weight_decay=self.weight_decay, checkpoint=self.checkpoint, validate=validate, generator=gen,
                        desc="LDAM-DRW")
        self.info["drw_epoch"] = drw

    def selects_on_test(self) -> bool:
        return self.checkpoint == "test"

    def _scores(self, x: Tensor) -> Tensor:
        return self.s * self.net(x).float()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.net.eval()
        return Prediction(logits=self._scores(x))

    def run_info(self) -> dict:
        info = self.info or {}
        return {"drw_epoch": info.get("drw_epoch"), "train_rule": self.train_rule, "best_epoch": info.get("best_epoch")}

    def state_dict(self) -> dict:
        info = self.info or {}
        return {"net": self.net.state_dict(), "counts": list(self.counts),
                "selection": {"best_epoch": info.get("best_epoch"), "best_val": info.get("best_val"),
                              "drw_epoch": info.get("drw_epoch")}}

    def load_state_dict(self, state: dict) -> None:
        self.net = self._build()
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.counts = list(state["counts"])
        sel = state.get("selection", {})
        self.info = {"best_epoch": sel.get("best_epoch"), "best_val": sel.get("best_val"),
                     "drw_epoch": sel.get("drw_epoch")}


__all__ = ["LDAMDRW", "class_balanced_weights", "drw_weights_at", "ldam_loss", "ldam_margins"]
