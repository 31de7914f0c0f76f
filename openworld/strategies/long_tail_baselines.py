"""Long-tail baselines (card ``long-tail-sade-rcal`` §2.6) and the training loop SADE/RCAL share.

* ``ce`` — plain cross-entropy; predict ``argmax v``.
* ``balanced_softmax`` — train with ``CE(v + log π, y)``; predict ``argmax v``.
* ``logit_adjustment`` — Menon et al.: ``mode="posthoc"`` (default) trains with CE and predicts
  ``argmax(v − τ·log π)``; ``mode="loss"`` trains with ``CE(v + τ·log π, y)`` and predicts ``argmax v``.

π is always the prior of the **observed** (possibly noisy) training counts, ``log(π + ε)`` with
ε = 1e-9 (SADE's constant, so an absent class gives a finite offset). The network is the recipe's
backbone as a single branch at full width (a multi-expert layout such as ``resnet32_experts``
becomes its one-expert twin) with a linear classifier. Training follows the LT schedule of the card
(§2.3, scaled per §9): SGD + Nesterov, linear warm-up over ``warmup_epochs`` (default
``ceil(E/40)``), ×``gamma`` at ``milestones`` (default ``0.8E`` and ``0.9E``). Checkpoint selection
(§1.5): ``val`` (default; best balanced accuracy on the session's validation split, whose labels
may be noisy), ``last``, or ``test`` (opt-in, the official SADE CIFAR/iNat protocol: the runner hands
over the labelled ``uniform`` test set for selection only and marks the results as not clean; the
card's pitfall 1).

The trained network is **cached** (like FACT's own base model): its state and selection record are stored
under a content key of everything that determines them (:meth:`_LTClassifier.model_key`: scenario splits,
backbone, the training settings, the loss offset τ, the selection rule and the τ it scores with, seed,
training and selection data), in this process (``ctx._memo``) and in the run's cache folder. A second
entry with the same settings — ``logit_adjustment`` (post-hoc, ``checkpoint: last``) after ``ce``, or the
decoupled classifiers ``crt``/``tau_norm`` (:mod:`openworld.strategies.crt_tau_norm`), whose stage 1 is this
CE network — loads it instead of training again; whoever comes first trains it and stores it the same way,
so the numbers are the same either way. ``run_info()["lt_model"]`` says which happened.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import batches
from openworld.models.experts import single_branch_backbone
from openworld.registry import register_strategy
from openworld.strategies.base import NonFiniteLossError, Prediction, Strategy, stable_hash

logger = logging.getLogger(__name__)

EPS = 1e-9
CHECKPOINTS = ("val", "last", "test")


# ------------------------------------------------------------------------------------------------
# Pure pieces (unit-tested against the card's vectors)
# ------------------------------------------------------------------------------------------------
def prior_from_counts(counts: Sequence[int] | Tensor, device=None) -> Tensor:
    """``π_c = n_c / N`` (float32)."""
    n = torch.as_tensor(list(counts) if not isinstance(counts, Tensor) else counts, dtype=torch.float64)
    if n.sum() <= 0:
        raise ValueError("prior_from_counts: no training sample")
    return (n / n.sum()).to(device=device, dtype=torch.float32)


def balanced_softmax_loss(logits: Tensor, y: Tensor, prior: Tensor, tau: float = 1.0) -> Tensor:
    """``CE(v + τ·log(π + ε), y)`` — Balanced Softmax (τ = 1) / loss-form logit adjustment."""
    return F.cross_entropy(logits + tau * torch.log(prior + EPS), y)


def posthoc_adjust(logits: Tensor, prior: Tensor, tau: float = 1.0) -> Tensor:
    """Post-hoc logit adjustment: ``v − τ·log(π + ε)``."""
    return logits - tau * torch.log(prior + EPS)


# ------------------------------------------------------------------------------------------------
# LT training schedule and loop
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LTSchedule:
    """``lr(e) = lr · gamma^{#milestones ≤ e} · ((e+1)/warmup if e < warmup)`` (card §2.3)."""

    epochs: int
    lr: float
    warmup_epochs: int | None = None
    milestones: Sequence[int] | None = None
    gamma: float = 0.1

    def resolved(self) -> tuple[int, tuple[int, ...]]:
        warm = math.ceil(self.epochs / 40) if self.warmup_epochs is None else int(self.warmup_epochs)
        ms = (int(0.8 * self.epochs), int(0.9 * self.epochs)) if self.milestones is None else tuple(self.milestones)
        return warm, tuple(int(m) for m in ms)

    def lr_at(self, epoch: int) -> float:
        warm, ms = self.resolved()
        lr = self.lr * self.gamma ** sum(1 for m in ms if m <= epoch)
        if epoch < warm:
            lr *= (epoch + 1) / warm
        return lr


def check_checkpoint(value: str) -> str:
    if value not in CHECKPOINTS:
        raise ValueError(f"checkpoint: allowed values are {', '.join(CHECKPOINTS)}; got {value!r}")
    return value


def selection_data(strategy, session):
    """The labelled data epochs are selected on: the session's validation split (``val``), the test set
    the runner put in ``ctx.selection_override`` (``test``, opt-in), or none (``last``)."""
    if strategy.checkpoint == "last":
        return None
    if strategy.checkpoint == "val":
        return session.validation
    data = strategy.ctx.selection_override
    if data is None:
        raise RuntimeError(f"{type(strategy).__name__}: checkpoint='test' but the runner provided no test set "
                           "for selection (run it through openworld's Runner)")
    return data


@torch.no_grad()
def balanced_accuracy_of(predict: Callable[[Tensor], Tensor], data, num_classes: int, device, batch_size: int = 256,
                         num_workers: int = 0) -> float:
    """Mean per-class recall (classes present in ``data``) of ``argmax predict(x)``; one host sync."""
    k = num_classes
    counts = torch.zeros(k * k, dtype=torch.long, device=device)
    for xb, yb in batches(data, batch_size, device=device, num_workers=num_workers):
        p = predict(xb).argmax(1)
        counts.scatter_add_(0, yb.clamp(0, k - 1) * k + p.clamp(0, k - 1), (yb >= 0).long())
    cm = counts.view(k, k).double()
    support = cm.sum(1)
    rec = torch.diagonal(cm) / support.clamp(min=1)
    present = support > 0
    return float(rec[present].mean()) if bool(present.any()) else float("nan")


def fit(
    module: nn.Module,
    data,
    loss_fn: Callable[[Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]],
    *,
    ctx,
    schedule: LTSchedule,
    batch_size: int,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    checkpoint: str = "val",
    validate: Callable[[], float] | None = None,
    generator: torch.Generator | None = None,
    param_groups=None,
    desc: str = "training",
) -> dict:
    """SGD over ``data`` with ``loss_fn(x, y) -> (loss, {name: term})``; one host sync per epoch.

    ``checkpoint="val"`` keeps the state with the best ``validate()`` (ties keep the later epoch).
    ``param_groups``: optional list of ``{"params": …, "lr_scale": s}`` (each group's LR = s·lr(e)).
    """
    groups = param_groups or [{"params": [p for p in module.parameters() if p.requires_grad], "lr_scale": 1.0}]
    opt = torch.optim.SGD([{"params": g["params"]} for g in groups], lr=schedule.lr, momentum=momentum,
                          nesterov=nesterov and momentum > 0, weight_decay=weight_decay)
    best, best_state, best_epoch = -1.0, None, schedule.epochs - 1
    history = []
    module.train()
    for epoch in ctx.progress_bar(range(schedule.epochs), desc=desc, unit="ep"):
        lr = schedule.lr_at(epoch)
        for g, spec in zip(opt.param_groups, groups):
            g["lr"] = lr * float(spec.get("lr_scale", 1.0))
        total = torch.zeros((), device=ctx.device)
        finite = torch.ones((), dtype=torch.bool, device=ctx.device)
        steps = 0
        for xb, yb in batches(data, batch_size, train=True, shuffle=True, device=ctx.device, generator=generator,
                              num_workers=ctx.num_workers):
            loss, parts = loss_fn(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ld = loss.detach()
            finite &= torch.isfinite(ld)
            total += ld
            steps += 1
            ctx.log_train({"loss": ld, **{f"loss_{k}": v.detach() for k, v in parts.items()}, "lr": lr,
                           "epoch": epoch})
        if not bool(finite):
            raise NonFiniteLossError(f"{desc}: non-finite loss in epoch {epoch} (lr {lr:g})")
        record = {"epoch": epoch, "loss": float(total) / max(steps, 1), "lr": lr}
        if checkpoint in ("val", "test") and validate is not None:
            module.eval()
            score = validate()
            module.train()
            record["val_balanced_acc"] = score
            if score >= best:
                best, best_epoch = score, epoch
                best_state = copy.deepcopy(module.state_dict())
        history.append(record)
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return {"best_epoch": best_epoch, "best_val": best if best_state is not None else None, "history": history}


# ------------------------------------------------------------------------------------------------
# Baselines
# ------------------------------------------------------------------------------------------------
class _LTClassifier(Strategy):
    """Single-branch network + linear head trained with a (prior-adjusted) cross-entropy."""

    supports = frozenset({"long_tail"})
    train_tau = 0.0      # τ of the loss offset (0 = plain CE)
    predict_tau = 0.0    # τ of the post-hoc offset subtracted at prediction

    def __init__(self, epochs: int = 30, batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, warmup_epochs: int | None = None,
                 milestones: Sequence[int] | None = None, gamma: float = 0.1, checkpoint: str = "val"):
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.milestones = None if milestones is None else list(milestones)
        self.gamma = gamma
        self.checkpoint = check_checkpoint(checkpoint)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.net = None
        self.prior = None
        self.info: dict = {}
        self.model_source: dict | None = None

    def _build(self) -> nn.Module:
        enc = single_branch_backbone(self.ctx.backbone_cfg, self.ctx.scenario["input_shape"])
        return nn.Sequential(enc, nn.Linear(enc.out_features, self.ctx.scenario["num_classes"])).to(self.ctx.device)

    def model_key(self, session) -> str:
        """The content key of the network :meth:`learn` trains (cached in memory and in the run's cache).

        Everything that determines the trained state enters: scenario splits, backbone, input shape and
        classes, every training setting, the loss offset τ, the selection rule and the post-hoc τ that
        selection scores with (``logit_adjustment`` selects on adjusted scores), the seed (initialisation
        and batch order derive from it), the training data (noisy labels included) and the selection data.
        The strategy's class name does not: ``ce`` and the decoupled classifiers share one network.
        """
        sel = selection_data(self, session)
        warm, ms = self._schedule().resolved()
        spec = {
            "what": "lt_classifier",
            "scenario": self.ctx.scenario.get("fingerprint"),
            "backbone": self.ctx.backbone_cfg,
            "input_shape": list(self.ctx.scenario["input_shape"]),
            "num_classes": self.ctx.scenario["num_classes"],
            "train": {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "momentum": self.momentum,
                      "nesterov": True, "weight_decay": self.weight_decay, "warmup_epochs": warm,
                      "milestones": list(ms), "gamma": self.gamma},
            "train_tau": float(self.train_tau),
            "checkpoint": self.checkpoint,
            "select_tau": float(self.predict_tau) if self.checkpoint != "last" else 0.0,
            "seed": self.ctx.seed,
            "data": session.labeled.fingerprint(),
            "val": sel.fingerprint() if sel is not None and len(sel) else None,
        }
        return stable_hash(spec)

    def learn(self, session) -> None:
        self.prior = prior_from_counts(session.classes.train_counts, self.ctx.device)
        key = self.model_key(session)
        memo = getattr(self.ctx, "_memo", None)
        cache = self.ctx.cache
        state, source = None, "trained"
        if memo is not None and key in memo:
            state, source = memo[key], "memo"
        elif cache is not None and (cached := cache.load(key)) is not None and "info" in cached:
            state, source = cached, "cache"
        torch.manual_seed(self.ctx.derive_seed("lt_classifier", "init"))  # same init for every baseline
        self.net = self._build()
        if state is not None:
            self.net.load_state_dict(state["state_dict"])
            self.net.eval()
            self.info = copy.deepcopy(state["info"])
            logger.info("%s: network loaded from the %s (key %s); not retrained", type(self).__name__, source,
                        key[:16])
        else:
            self._train(session)
            state = {"state_dict": copy.deepcopy(self.net.state_dict()),
                     "info": {"best_epoch": self.info["best_epoch"], "best_val": self.info["best_val"],
                              "history": self.info["history"]}}
            if cache is not None:
                cache.save(key, state, meta={"tag": "lt_classifier", "strategy": type(self).__name__,
                                             "best_epoch": self.info["best_epoch"], "best_val": self.info["best_val"]})
        if memo is not None:
            memo[key] = copy.deepcopy(state)
        self.model_source = {"source": source, "key": key[:16]}

    def _train(self, session) -> None:
        c = session.classes.num_classes
        offset = self.train_tau * torch.log(self.prior + EPS)

        def loss_fn(x, y):
            return F.cross_entropy(self.net(x) + offset, y), {}

        val = selection_data(self, session)
        validate = None
        if val is not None and len(val):
            def validate():
                return balanced_accuracy_of(self._scores, val, c, self.ctx.device, self.ctx.eval_batch_size)
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("lt_classifier", "train"))
        self.info = fit(self.net, session.labeled, loss_fn, ctx=self.ctx, schedule=self._schedule(),
                        batch_size=self.batch_size, momentum=self.momentum, weight_decay=self.weight_decay,
                        checkpoint=self.checkpoint, validate=validate, generator=gen, desc=f"{type(self).__name__}")

    def run_info(self) -> dict:
        src = getattr(self, "model_source", None)
        return {"lt_model": dict(src)} if src else {}

    def selects_on_test(self) -> bool:
        return self.checkpoint == "test"

    def _schedule(self) -> LTSchedule:
        return LTSchedule(self.epochs, self.lr, self.warmup_epochs, self.milestones, self.gamma)

    def _scores(self, x: Tensor) -> Tensor:
        v = self.net(x).float()
        return v - self.predict_tau * torch.log(self.prior + EPS) if self.predict_tau else v

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.net.eval()
        return Prediction(logits=self._scores(x))

    def state_dict(self) -> dict:
        info = getattr(self, "info", {}) or {}
        return {"net": self.net.state_dict(), "prior": self.prior.cpu(),
                "selection": {"best_epoch": info.get("best_epoch"), "best_val": info.get("best_val")}}

    def load_state_dict(self, state: dict) -> None:
        self.net = self._build()
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.prior = state["prior"].to(self.ctx.device)


@register_strategy("ce")
class CE(_LTClassifier):
    """Plain cross-entropy on the long-tailed (possibly noisy) training set (card §2.6)."""


@register_strategy("balanced_softmax")
class BalancedSoftmax(_LTClassifier):
    """Balanced Softmax: train with ``CE(v + log π, y)``, predict ``argmax v`` (card §2.6)."""

    train_tau = 1.0


@register_strategy("logit_adjustment")
class LogitAdjustment(_LTClassifier):
    """Logit adjustment (Menon et al.): ``mode="posthoc"`` trains with CE and predicts
    ``argmax(v − τ·log π)``; ``mode="loss"`` trains with ``CE(v + τ·log π)`` and predicts ``argmax v``."""

    def __init__(self, tau: float = 1.0, mode: str = "posthoc", epochs: int = 30, batch_size: int = 128,
                 lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: int | None = None,
                 milestones: Sequence[int] | None = None, gamma: float = 0.1, checkpoint: str = "val"):
        if mode not in ("posthoc", "loss"):
            raise ValueError(f"logit_adjustment: mode must be 'posthoc' or 'loss', got {mode!r}")
        super().__init__(epochs, batch_size, lr, momentum, weight_decay, warmup_epochs, milestones, gamma, checkpoint)
        self.tau = tau
        self.mode = mode
        self.train_tau = float(tau) if mode == "loss" else 0.0
        self.predict_tau = float(tau) if mode == "posthoc" else 0.0
