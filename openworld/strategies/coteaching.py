"""Co-teaching (Han et al., NeurIPS 2018; card ``docs/methods/coteaching.md``) for noisy (long-tailed) labels.

Two networks with the same architecture (the recipe's backbone as one branch + a linear classifier) and
different initialisations see the same batches. In each batch every network ranks the samples by its own
cross-entropy and keeps the ``int((1 − R(t))·B)`` smallest-loss ones; each network is then updated on the
samples its **peer** kept (:func:`coteaching_loss`). The forget rate ``R(t)`` grows linearly to
``forget_rate`` over the first ``num_gradual`` (T_k = 10) epochs (:func:`forget_rate_at`):

* ``forget_schedule="paper"`` (default): ``R(e) = forget_rate · min(e / T_k, 1)`` at 0-based epoch e
  (the paper's R(T) = 1 − min(T/T_k·τ, τ) updated at the end of each epoch: epoch 0 keeps the whole batch);
* ``"released"``: the released ``rate_schedule`` (``linspace(0, τ^c, T_k)`` then τ), indexed like the
  released loop (its training epochs are 1 … n_epoch − 1: our epoch e uses index e + 1).

The noise rate of the scenario is never visible to a strategy, so ``forget_rate`` (τ) is a parameter
(default 0.2); set it to the known or estimated noise rate (the paper's setting: τ = ε).

Optimiser: ``"adam"`` (default, released): Adam lr 0.001, betas (0.9, 0.999); from ``decay_start`` on the
lr falls linearly to 0 and beta1 becomes 0.1 (:func:`released_adam_plan`, indexed like the released loop).
``"sgd"``: our long-tail schedule (:class:`~openworld.strategies.long_tail_baselines.LTSchedule`: SGD +
Nesterov, warm-up, steps), for comparisons on the CE baselines' optimiser.

Prediction: network 1 (``predict_with="net1"``, released) or the mean of both softmaxes (``"ensemble"``,
returned as log-probabilities). Checkpoint ``val`` (default; the same predictor on the validation split,
whose labels are as noisy as the training labels), ``last`` (the released code has no selection) or ``test``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import batches
from openworld.models import experts as _experts  # noqa: F401  (registers the multi-expert backbones)
from openworld.models.experts import single_branch_backbone
from openworld.registry import register_strategy
from openworld.strategies.base import NonFiniteLossError, Prediction, Strategy
from openworld.strategies.long_tail_baselines import (
    LTSchedule,
    balanced_accuracy_of,
    check_checkpoint,
    selection_data,
)

FORGET_SCHEDULES = ("paper", "released")
OPTIMIZERS = ("adam", "sgd")
PREDICT_WITH = ("net1", "ensemble")
LOSS_SCALING = ("mean", "released")

__all__ = ["CoTeaching", "coteaching_loss", "forget_rate_at", "released_adam_plan", "released_rate_schedule"]


# ------------------------------------------------------------------------------------------------
# Pure pieces (compared with the official code in tests/test_coteaching.py)
# ------------------------------------------------------------------------------------------------
def coteaching_loss(logits1: Tensor, logits2: Tensor, y: Tensor, forget_rate: float,
                    scaling: str = "mean") -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The two networks' losses on the peer-selected small-loss samples.

    ``k = int((1 − forget_rate)·B)`` (at least 1). Network 1 is trained on the k samples with the smallest
    loss under network 2 and vice versa: ``L1 = mean CE(logits1[S2], y[S2])``. ``scaling="released"``
    divides each mean once more by k, as the released ``loss_coteaching`` does (its returned loss is
    ``sum(mean)/num_remember``). Also returns the selections ``{"keep1": S1, "keep2": S2}``."""
    if scaling not in LOSS_SCALING:
        raise ValueError(f"coteaching: loss_scaling must be one of {', '.join(LOSS_SCALING)}; got {scaling!r}")
    b = len(y)
    k = max(1, int((1 - forget_rate) * b))
    l1 = F.cross_entropy(logits1, y, reduction="none")
    l2 = F.cross_entropy(logits2, y, reduction="none")
    keep1 = torch.argsort(l1.detach(), stable=True)[:k]
    keep2 = torch.argsort(l2.detach(), stable=True)[:k]
    loss1 = F.cross_entropy(logits1[keep2], y[keep2])
    loss2 = F.cross_entropy(logits2[keep1], y[keep1])
    if scaling == "released":
        loss1, loss2 = loss1 / k, loss2 / k
    return loss1, loss2, {"keep1": keep1, "keep2": keep2}


def released_rate_schedule(n_epoch: int, forget_rate: float, num_gradual: int = 10,
                           exponent: float = 1.0) -> np.ndarray:
    """The released forget-rate plan over epoch indices 0 … n_epoch−1: ``linspace(0, τ^c, T_k)`` for the
    first T_k indices, then τ."""
    plan = np.ones(n_epoch) * forget_rate
    head = min(n_epoch, num_gradual)
    plan[:head] = np.linspace(0, forget_rate ** exponent, num_gradual)[:head]
    return plan


def forget_rate_at(epoch: int, forget_rate: float, num_gradual: int = 10, schedule: str = "paper",
                   exponent: float = 1.0) -> float:
    """R(t) at 0-based training epoch ``epoch``: ``paper`` τ·min(e/T_k, 1); ``released`` the released plan
    at index e + 1 (the released loop trains epoch indices 1 … n_epoch−1)."""
    if schedule == "paper":
        return float(forget_rate * min(epoch / num_gradual, 1.0)) if num_gradual > 0 else float(forget_rate)
    if schedule != "released":
        raise ValueError(f"coteaching: forget_schedule must be one of {', '.join(FORGET_SCHEDULES)}; got {schedule!r}")
    return float(released_rate_schedule(epoch + 2, forget_rate, num_gradual, exponent)[epoch + 1])


def released_adam_plan(lr: float, n_epoch: int, decay_start: int) -> tuple[list[float], list[float]]:
    """The released Adam plans over epoch indices 0 … n_epoch−1: lr, then from ``decay_start`` on
    ``lr·(n_epoch − i)/(n_epoch − decay_start)``; beta1 0.9, then 0.1 from ``decay_start``."""
    alpha = [lr] * n_epoch
    beta1 = [0.9] * n_epoch
    for i in range(decay_start, n_epoch):
        alpha[i] = float(n_epoch - i) / (n_epoch - decay_start) * lr
        beta1[i] = 0.1
    return alpha, beta1


# ------------------------------------------------------------------------------------------------
# Strategy
# ------------------------------------------------------------------------------------------------
def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"coteaching: {name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


@register_strategy("coteaching")
class CoTeaching(Strategy):
    """Co-teaching: two networks exchange their small-loss samples (Han et al., NeurIPS 2018)."""

    supports = frozenset({"long_tail"})

    def __init__(
        self,
        forget_rate: float = 0.2,
        num_gradual: int = 10,
        exponent: float = 1.0,
        forget_schedule: str = "paper",
        epochs: int = 200,
        batch_size: int = 128,
        optimizer: str = "adam",
        lr: float | None = None,
        decay_start: int | None = None,
        momentum: float = 0.9,
        weight_decay: float | None = None,
        warmup_epochs: int | None = None,
        milestones: Sequence[int] | None = None,
        gamma: float = 0.1,
        loss_scaling: str = "mean",
        predict_with: str = "net1",
        checkpoint: str = "val",
    ):
        if isinstance(forget_rate, bool) or not isinstance(forget_rate, (int, float)) or not 0 <= forget_rate < 1:
            raise ValueError(f"coteaching: forget_rate must be a number in [0, 1); got {forget_rate!r}")
        if isinstance(num_gradual, bool) or not isinstance(num_gradual, int) or num_gradual < 0:
            raise ValueError(f"coteaching: num_gradual must be a non-negative integer; got {num_gradual!r}")
        self.forget_schedule = _choice("forget_schedule", forget_schedule, FORGET_SCHEDULES)
        if not exponent > 0:
            raise ValueError(f"coteaching: exponent must be > 0; got {exponent!r}")
        if exponent != 1 and forget_schedule != "released":
            raise ValueError("coteaching: exponent applies to forget_schedule='released' only; "
                             f"got exponent={exponent!r} with forget_schedule={forget_schedule!r}")
        if forget_schedule == "released" and num_gradual < 2:
            raise ValueError(f"coteaching: num_gradual must be >= 2 with forget_schedule='released'; got {num_gradual}")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"coteaching: epochs must be a positive integer; got {epochs!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"coteaching: batch_size must be an integer >= 2; got {batch_size!r}")
        self.optimizer = _choice("optimizer", optimizer, OPTIMIZERS)
        if lr is not None and not lr > 0:
            raise ValueError(f"coteaching: lr must be > 0 or None; got {lr!r}")
        if decay_start is not None and (isinstance(decay_start, bool) or not isinstance(decay_start, int)
                                        or not 0 <= decay_start <= epochs):
            raise ValueError(f"coteaching: decay_start must be an integer in [0, epochs] or None; got {decay_start!r}")
        if optimizer == "adam" and (warmup_epochs is not None or milestones is not None):
            raise ValueError("coteaching: warmup_epochs / milestones apply to optimizer='sgd' only "
                             "(Adam follows the released linear decay from decay_start)")
        if optimizer == "sgd" and decay_start is not None:
            raise ValueError("coteaching: decay_start applies to optimizer='adam' only (SGD uses milestones)")
        self.forget_rate = forget_rate
        self.num_gradual = num_gradual
        self.exponent = exponent
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.decay_start = decay_start
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.milestones = None if milestones is None else list(milestones)
        self.gamma = gamma
        self.loss_scaling = _choice("loss_scaling", loss_scaling, LOSS_SCALING)
        self.predict_with = _choice("predict_with", predict_with, PREDICT_WITH)
        self.checkpoint = check_checkpoint(checkpoint)

    # -- resolved defaults ---------------------------------------------------------------------------
    def _lr(self) -> float:
        return self.lr if self.lr is not None else (0.001 if self.optimizer == "adam" else 0.1)

    def _wd(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (0.0 if self.optimizer == "adam" else 5e-4)

    def _decay_start(self) -> int:
        return self.decay_start if self.decay_start is not None else int(0.4 * self.epochs)  # released 80 of 200

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.nets: list[nn.Module] | None = None
        self.info: dict = {}

    def _build(self) -> nn.Module:
        enc = single_branch_backbone(self.ctx.backbone_cfg, self.ctx.scenario["input_shape"])
        return nn.Sequential(enc, nn.Linear(enc.out_features, self.ctx.scenario["num_classes"])).to(self.ctx.device)

    def _scores(self, x: Tensor) -> Tensor:
        v1 = self.nets[0](x).float()
        if self.predict_with == "net1":
            return v1
        p = 0.5 * (torch.softmax(v1, 1) + torch.softmax(self.nets[1](x).float(), 1))
        return torch.log(p.clamp(min=1e-30))

    def selects_on_test(self) -> bool:
        return self.checkpoint == "test"

    # -- training ------------------------------------------------------------------------------------
    def learn(self, session) -> None:
        dev = self.ctx.device
        c = session.classes.num_classes
        data = session.labeled
        nets = []
        for k in (1, 2):
            torch.manual_seed(self.ctx.derive_seed("coteaching", "init", k))
            nets.append(self._build())
        self.nets = nets
        params = [list(n.parameters()) for n in nets]
        lr0, wd = self._lr(), self._wd()
        if self.optimizer == "adam":
            opts = [torch.optim.Adam(p, lr=lr0, betas=(0.9, 0.999), weight_decay=wd) for p in params]
            alpha, beta1 = released_adam_plan(lr0, self.epochs + 1, self._decay_start())
            schedule = None
        else:
            opts = [torch.optim.SGD(p, lr=lr0, momentum=self.momentum, nesterov=self.momentum > 0, weight_decay=wd)
                    for p in params]
            schedule = LTSchedule(self.epochs, lr0, self.warmup_epochs, self.milestones, self.gamma)
        val = selection_data(self, session)
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("coteaching", "train"))
        bs = min(self.batch_size, len(data))
        best, best_state, best_epoch = -1.0, None, self.epochs - 1
        history = []
        for epoch in self.ctx.progress_bar(range(self.epochs), desc="coteaching", unit="ep"):
            if schedule is None:  # the released loop trains epoch indices 1 … n_epoch−1
                lr, b1 = alpha[epoch + 1], beta1[epoch + 1]
                for opt in opts:
                    for g in opt.param_groups:
                        g["lr"], g["betas"] = lr, (b1, 0.999)
            else:
                lr = schedule.lr_at(epoch)
                for opt in opts:
                    for g in opt.param_groups:
                        g["lr"] = lr
            rate = forget_rate_at(epoch, self.forget_rate, self.num_gradual, self.forget_schedule, self.exponent)
            for n in nets:
                n.train()
            total = torch.zeros(2, device=dev)
            finite = torch.ones((), dtype=torch.bool, device=dev)
            steps = 0
            for xb, yb in batches(data, bs, train=True, shuffle=True, device=dev, generator=gen, drop_last=True,
                                  num_workers=self.ctx.num_workers):
                loss1, loss2, sel = coteaching_loss(nets[0](xb), nets[1](xb), yb, rate, self.loss_scaling)
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                (loss1 + loss2).backward()  # disjoint parameters: each network gets its own loss's gradient
                for opt in opts:
                    opt.step()
                ld = torch.stack([loss1.detach(), loss2.detach()])
                finite &= torch.isfinite(ld).all()
                total += ld
                steps += 1
                m1 = torch.zeros(len(yb), dtype=torch.bool, device=dev).index_fill_(0, sel["keep1"], True)
                m2 = torch.zeros(len(yb), dtype=torch.bool, device=dev).index_fill_(0, sel["keep2"], True)
                overlap = (m1 & m2).sum() / len(sel["keep1"])
                self.ctx.log_train({"loss_net1": ld[0], "loss_net2": ld[1], "coteaching_forget_rate": rate,
                                    "coteaching_selection_overlap": overlap, "lr": lr, "epoch": epoch})
            if not bool(finite):
                raise NonFiniteLossError(f"coteaching: non-finite loss in epoch {epoch} (lr {lr:g})")
            mean = (total / max(steps, 1)).tolist()
            record = {"epoch": epoch, "loss_net1": mean[0], "loss_net2": mean[1], "forget_rate": rate, "lr": lr}
            if val is not None and len(val):
                for n in nets:
                    n.eval()
                score = balanced_accuracy_of(self._scores, val, c, dev, self.ctx.eval_batch_size)
                record["val_balanced_acc"] = score
                if score >= best:
                    best, best_epoch = score, epoch
                    best_state = [copy.deepcopy(n.state_dict()) for n in nets]
            history.append(record)
        if best_state is not None:
            for n, s in zip(nets, best_state):
                n.load_state_dict(s)
        for n in nets:
            n.eval()
        self.info = {"best_epoch": best_epoch, "best_val": best if best_state is not None else None,
                     "final_forget_rate": history[-1]["forget_rate"] if history else None}

    # -- prediction and state ------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        for n in self.nets:
            n.eval()
        return Prediction(logits=self._scores(x))

    def run_info(self) -> dict:
        return {"coteaching": dict(self.info)} if self.info else {}

    def state_dict(self) -> dict:
        return {"net1": self.nets[0].state_dict(), "net2": self.nets[1].state_dict(),
                "selection": {k: v for k, v in self.info.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.nets = [self._build(), self._build()]
        for n, key in zip(self.nets, ("net1", "net2")):
            n.load_state_dict(state[key])
            n.eval()
        self.info = dict(state.get("selection", {}))
