"""RIDE — routing diverse distribution-aware experts (Wang et al., ICLR 2021; card ``docs/methods/ride.md``).

Stage 1: a multi-expert network (the recipe's multi-expert backbone, e.g. ``resnet32_experts`` with
``reduce_dimension`` for CIFAR-100-LT or ``cnn_experts``: a shared trunk, per-expert later blocks) with one
classifier per expert (cosine ``s·cos`` by default, s = 30), trained with the RIDE loss
(:func:`ride_loss`), per expert k with logits ``z_k`` and the expert mean ``z̄ = (1/E) Σ_k z_k``:

* the LDAM margin cross-entropy ``CE_w(z_k − s·m_y·1_y, y)``, ``m_c ∝ n_c^{-1/4}`` scaled to ``max m = 0.5``
  (:func:`ldam_margins`), with deferred re-weighting (DRW) from ``drw_epoch`` on: class weights from the
  effective number ``(1−β)/(1−β^{n_c})``, normalised to sum C (:func:`effective_number_weights`);
* the distribution-aware diversity term ``λ·T̄²·KL(softmax(z̄/T) ‖ softmax(z_k/T))`` (batch mean, z̄
  detached) with λ = ``diversity_factor`` (−0.45 for CIFAR-100-LT: negative, so experts are pushed
  apart), T = ``diversity_temperature`` before DRW and, after it, the per-class vector
  ``T·w_c`` with ``w = (C·π·f + 1 − f)/max`` (:func:`diversity_temperature_weights`, f = ``reweight_factor``);
  ``T̄`` is the mean of T.

Stage 2 (``router=True``, the released expert-assignment module): the stage-1 network is frozen (eval
mode) and a small router is trained on class-balanced batches. Router k (k = 0…E−2) reads the L2-normalised
pooled feature of expert k and the top-``router_top_k`` values of the mean logits of experts 0…k, and
predicts whether expert k+1 is needed; its target is "experts 0…k are wrong and some longer prefix is right"
(:func:`router_targets`), the loss a binary cross-entropy with ``pos_weight``. At test time experts are
added one by one while the router's ``sigmoid > 0.5``; the prediction is the mean over the experts used
(:func:`routed_logits`). The experts are computed for every sample and masked (identical numbers; the
compute saving is reported as ``ride_experts_per_sample`` per evaluation set instead of realised).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import batches
from openworld.models import experts as _experts  # noqa: F401  (registers the multi-expert backbones)
from openworld.models.experts import NormedLinear
from openworld.registry import register_strategy
from openworld.strategies.base import NonFiniteLossError, Prediction, Strategy
from openworld.strategies.ldam_drw import class_balanced_weights
from openworld.strategies.ldam_drw import ldam_margins as _ldam_margins
from openworld.strategies.long_tail_baselines import (
    LTSchedule,
    balanced_accuracy_of,
    check_checkpoint,
    fit,
    selection_data,
)

__all__ = [
    "RIDE",
    "ExpertRouter",
    "RIDENet",
    "balanced_order",
    "diversity_temperature_weights",
    "effective_number_weights",
    "ldam_margins",
    "ride_loss",
    "routed_logits",
    "router_loss",
    "router_targets",
]


# ------------------------------------------------------------------------------------------------
# Pure pieces (compared with the official code in tests/test_ride.py)
# ------------------------------------------------------------------------------------------------
def _counts(counts) -> np.ndarray:
    n = np.asarray(list(counts) if not isinstance(counts, Tensor) else counts.cpu().numpy(), dtype=np.float64)
    if n.ndim != 1 or len(n) == 0 or (n <= 0).any():
        raise ValueError(f"ride: per-class training counts must all be positive, got {n.tolist()}")
    return n


def ldam_margins(counts, max_margin: float = 0.5) -> Tensor:
    """LDAM margins ``m_c = n_c^{-1/4} · max_margin / max_j n_j^{-1/4}`` (float64; RIDE requires every
    class to have training samples). The formula is LDAM-DRW's: :func:`openworld.strategies.ldam_drw.ldam_margins`."""
    return _ldam_margins(torch.from_numpy(_counts(counts)), max_margin)


def effective_number_weights(counts, beta: float = 0.9999) -> Tensor:
    """DRW class weights ``(1−β)/(1−β^{n_c})`` normalised to sum C (Cui et al.; float64), as LDAM-DRW's
    :func:`openworld.strategies.ldam_drw.class_balanced_weights`."""
    return class_balanced_weights(torch.from_numpy(_counts(counts)), beta)


def diversity_temperature_weights(counts, reweight_factor: float = 0.05) -> Tensor:
    """Per-class diversity-temperature factors ``w = C·π·f + 1 − f``, divided by their maximum."""
    n = _counts(counts)
    p = n / n.sum()
    w = len(n) * p * reweight_factor + 1.0 - reweight_factor
    w = w / w.max()
    if (w <= 0).any():
        raise ValueError(f"ride: reweight_factor {reweight_factor} is too large (a temperature factor is <= 0)")
    return torch.from_numpy(w)


def ride_loss(
    expert_logits: Tensor,
    y: Tensor,
    margins: Tensor,
    scale: float,
    *,
    class_weight: Tensor | None = None,
    temperature: float | Tensor = 1.0,
    diversity_factor: float = -0.45,
    base_factor: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The RIDE loss for expert logits ``[B, E, C]``: Σ_k base_factor·CE_w(z_k − s·m_y·1_y, y)
    + diversity_factor·T̄²·KL(softmax(z̄/T) ‖ softmax(z_k/T)), z̄ the (detached) expert mean.

    ``temperature``: a number or a per-class ``[C]`` vector; T̄ is its mean. ``class_weight``: per-class
    CE weights (weighted mean) or None. With ``diversity_factor == 0`` every expert's margin CE is taken on
    the mean logits z̄ (the released code's behaviour). Returns the total and ``{"base", "diversity"}``
    (sums over experts; ``diversity`` is the KL sum before the factor)."""
    b, e, c = expert_logits.shape
    mean = expert_logits.mean(dim=1)
    onehot = F.one_hot(y, c).to(expert_logits.dtype)
    shift = (scale * margins.to(expert_logits.device))[y].to(expert_logits)  # s·m_y, in the margins' dtype
    base_in = mean.unsqueeze(1).expand(b, e, c) if diversity_factor == 0 else expert_logits
    adjusted = base_in - shift[:, None, None] * onehot[:, None, :]
    per = F.cross_entropy(adjusted.reshape(b * e, c), y.repeat_interleave(e), reduction="none").view(b, e)
    if class_weight is None:
        base = per.mean(0)
    else:
        w = class_weight.to(expert_logits)[y]
        base = (w[:, None] * per).sum(0) / w.sum()
    if isinstance(temperature, Tensor):
        t = temperature.to(expert_logits).view(1, c)
        t_mean = temperature.double().mean().to(expert_logits)
    else:
        t = t_mean = float(temperature)
    log_q = F.log_softmax(expert_logits / (t.unsqueeze(1) if isinstance(t, Tensor) else t), dim=2)  # [B, E, C]
    p = F.softmax(mean.detach() / t, dim=1)
    kl = (torch.xlogy(p, p).unsqueeze(1) - p.unsqueeze(1) * log_q).sum(2).sum(0) / b  # [E], batchmean
    total = base_factor * base.sum() + diversity_factor * t_mean * t_mean * kl.sum()
    return total, {"base": base.sum().detach(), "diversity": kl.sum().detach()}


def router_targets(expert_logits: Tensor, y: Tensor) -> Tensor:
    """``[B, E−1]`` booleans: column k is True when the mean of experts 0…k is wrong and the mean of
    experts 0…j is right for some j > k (so adding expert k+1 onwards helps)."""
    cum = expert_logits.cumsum(dim=1)
    correct = cum.argmax(dim=2) == y[:, None]  # [B, E]
    e = correct.shape[1]
    later = torch.flip(torch.cummax(torch.flip(correct.int(), [1]), dim=1).values, [1]).bool()  # any j >= k
    return ~correct[:, : e - 1] & later[:, 1:]


class ExpertRouter(nn.Module):
    """The released expert-assignment module: per router k a ``Linear(d → hidden)`` + ReLU on the
    normalised pooled feature of expert k, and one shared ``Linear(top_k + hidden → 1)`` on
    ``[top-k mean logits, hidden]``."""

    def __init__(self, feat_dim: int, num_experts: int, top_k: int, hidden: int = 16):
        super().__init__()
        if num_experts < 2:
            raise ValueError(f"ride: the router needs at least 2 experts, got {num_experts}")
        self.top_k = int(top_k)
        self.hidden = nn.ModuleList([nn.Linear(feat_dim, hidden) for _ in range(num_experts - 1)])
        self.fc = nn.Linear(hidden + self.top_k, 1)
        for lin in [*self.hidden, self.fc]:
            nn.init.kaiming_normal_(lin.weight)

    def logit(self, k: int, feat: Tensor, mean_logits: Tensor) -> Tensor:
        f = feat / feat.norm(dim=1, keepdim=True)
        h = F.relu(self.hidden[k](f))
        top = torch.topk(mean_logits, k=self.top_k, dim=1).values
        return self.fc(torch.cat((top, h), dim=1)).squeeze(1)


def router_loss(router: ExpertRouter, feats: Tensor, expert_logits: Tensor, y: Tensor,
                pos_weight: float = 100.0) -> Tensor:
    """Mean over routers k of ``BCE_logits(router_k(feat_k, mean of experts 0…k), target_k; pos_weight)``."""
    e = expert_logits.shape[1]
    cum = expert_logits.cumsum(dim=1)
    target = router_targets(expert_logits, y).to(expert_logits.dtype)
    pw = expert_logits.new_tensor([float(pos_weight)])
    losses = [F.binary_cross_entropy_with_logits(router.logit(k, feats[:, k], cum[:, k] / (k + 1)), target[:, k],
                                                 pos_weight=pw) for k in range(e - 1)]
    return torch.stack(losses).mean()


def routed_logits(router: ExpertRouter, feats: Tensor, expert_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Test-time routing: start with expert 0; before expert k (k ≥ 1), samples still routed go on when
    ``sigmoid(router_{k−1}) > 0.5``. Returns the mean logits over the experts used and their number [B]."""
    b, e, _ = expert_logits.shape
    out = expert_logits[:, 0].clone()
    active = torch.ones(b, dtype=torch.bool, device=expert_logits.device)
    used = torch.ones(b, dtype=torch.long, device=expert_logits.device)
    for k in range(1, e):
        go = torch.sigmoid(router.logit(k - 1, feats[:, k - 1], out / k)) > 0.5
        active = active & go
        out = out + torch.where(active[:, None], expert_logits[:, k], torch.zeros_like(out))
        used = used + active.long()
    return out / used[:, None].to(out.dtype), used


def balanced_order(labels: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` row indices drawn class-balanced (the released ``BalancedSampler``): each draw picks a class
    uniformly (among the classes present), then the next row of that class's shuffled list, reshuffled
    when exhausted. Vectorised per class."""
    labels = torch.as_tensor(labels).cpu()
    present = torch.unique(labels)
    cls = present[torch.randint(len(present), (n,), generator=generator)]
    order = torch.empty(n, dtype=torch.long)
    for c in present.tolist():
        pos = torch.nonzero(cls == c).flatten()
        if len(pos) == 0:
            continue
        rows = torch.nonzero(labels == c).flatten()
        reps = -(-len(pos) // len(rows))
        perms = torch.argsort(torch.rand(reps, len(rows), generator=generator), dim=1)
        order[pos] = rows[perms.flatten()[: len(pos)]]
    return order


# ------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------
class RIDENet(nn.Module):
    """Multi-expert backbone (``[B, E, d]``) + one classifier per expert → (logits ``[B, E, C]``, features)."""

    def __init__(self, backbone: nn.Module, num_classes: int, scale: float = 30.0, cosine: bool = True):
        super().__init__()
        e = getattr(backbone, "num_experts", None)
        if not isinstance(e, int) or e < 1:
            raise ValueError(
                "ride needs a multi-expert backbone (resnet32_experts, cnn_experts, mlp_experts or experts); "
                f"got {type(backbone).__name__} without num_experts"
            )
        self.backbone = backbone
        self.num_experts = e
        d = backbone.out_features
        if cosine:
            self.heads = nn.ModuleList([NormedLinear(d, num_classes, scale) for _ in range(e)])
        else:
            self.heads = nn.ModuleList([nn.Linear(d, num_classes) for _ in range(e)])
            for h in self.heads:
                nn.init.kaiming_normal_(h.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.backbone(x)
        return torch.stack([h(z[:, k]) for k, h in enumerate(self.heads)], dim=1), z


# ------------------------------------------------------------------------------------------------
# Strategy
# ------------------------------------------------------------------------------------------------
def _positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"ride: {name} must be a positive integer{extra}; got {value!r}")
    return value


@register_strategy("ride")
class RIDE(Strategy):
    """RIDE (Wang et al., ICLR 2021): distribution-aware diverse experts + the expert-assignment router."""

    supports = frozenset({"long_tail"})

    def __init__(
        self,
        num_experts: int | None = None,
        scale: float = 30.0,
        cosine_head: bool = True,
        max_margin: float = 0.5,
        diversity_factor: float = -0.45,
        diversity_temperature: float = 1.0,
        reweight_factor: float = 0.05,
        base_loss_factor: float = 1.0,
        drw: bool = True,
        drw_epoch: int | None = None,
        drw_beta: float = 0.9999,
        epochs: int = 200,
        batch_size: int = 128,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int | None = 5,
        milestones: Sequence[int] | None = (160, 180),
        gamma: float = 0.01,
        checkpoint: str = "val",
        router: bool = True,
        router_epochs: int = 5,
        router_batch_size: int = 512,
        router_lr: float = 0.01,
        router_weight_decay: float = 5e-4,
        router_top_k: int = 30,
        router_hidden: int = 16,
        router_pos_weight: float = 100.0,
    ):
        self.num_experts = _positive_int("num_experts", num_experts, allow_none=True)
        if not scale > 0:
            raise ValueError(f"ride: scale must be > 0; got {scale!r}")
        if not max_margin >= 0:
            raise ValueError(f"ride: max_margin must be >= 0; got {max_margin!r}")
        if not diversity_temperature > 0:
            raise ValueError(f"ride: diversity_temperature must be > 0; got {diversity_temperature!r}")
        if not 0 <= reweight_factor < 1:
            raise ValueError(f"ride: reweight_factor must be in [0, 1); got {reweight_factor!r}")
        if not 0 < drw_beta < 1:
            raise ValueError(f"ride: drw_beta must be in (0, 1); got {drw_beta!r}")
        if drw_epoch is not None and (isinstance(drw_epoch, bool) or not isinstance(drw_epoch, int) or drw_epoch < 0):
            raise ValueError(f"ride: drw_epoch must be a non-negative integer or None; got {drw_epoch!r}")
        if not isinstance(router, bool):
            raise ValueError(f"ride: router must be true or false; got {router!r}")
        self.scale = scale
        self.cosine_head = cosine_head
        self.max_margin = max_margin
        self.diversity_factor = diversity_factor
        self.diversity_temperature = diversity_temperature
        self.reweight_factor = reweight_factor
        self.base_loss_factor = base_loss_factor
        self.drw = drw
        self.drw_epoch = drw_epoch
        self.drw_beta = drw_beta
        self.epochs = _positive_int("epochs", epochs)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.milestones = None if milestones is None else list(milestones)
        self.gamma = gamma
        self.checkpoint = check_checkpoint(checkpoint)
        self.router = router
        if isinstance(router_epochs, bool) or not isinstance(router_epochs, int) or router_epochs < 0:
            raise ValueError(f"ride: router_epochs must be a non-negative integer; got {router_epochs!r}")
        self.router_epochs = router_epochs
        self.router_batch_size = _positive_int("router_batch_size", router_batch_size)
        self.router_lr = router_lr
        self.router_weight_decay = router_weight_decay
        self.router_top_k = _positive_int("router_top_k", router_top_k)
        self.router_hidden = _positive_int("router_hidden", router_hidden)
        if not router_pos_weight > 0:
            raise ValueError(f"ride: router_pos_weight must be > 0; got {router_pos_weight!r}")
        self.router_pos_weight = router_pos_weight

    # -- set-up --------------------------------------------------------------------------------------
    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.net: RIDENet | None = None
        self.router_net: ExpertRouter | None = None
        self.info: dict = {}
        self._usage = None

    def _backbone(self) -> nn.Module:
        if self.num_experts is None:
            return self.ctx.create_backbone()
        from openworld.models import create_backbone

        cfg = dict(self.ctx.backbone_cfg)
        if cfg.get("pretrain"):
            raise ValueError("ride: num_experts cannot override a backbone with a `pretrain:` section; "
                             "set backbone.num_experts instead")
        name = cfg.pop("name")
        cfg.pop("pretrain", None)
        cfg["num_experts"] = self.num_experts
        shape = tuple(self.ctx.scenario["input_shape"])
        try:
            return create_backbone(name, in_channels=shape[0] if len(shape) == 3 else 1, input_size=shape, **cfg)
        except TypeError as exc:
            raise ValueError(f"ride: num_experts needs a multi-expert backbone; backbone {name!r}: {exc}") from None

    def _build(self) -> RIDENet:
        return RIDENet(self._backbone(), self.ctx.scenario["num_classes"], self.scale,
                       self.cosine_head).to(self.ctx.device)

    def _build_router(self, num_classes: int) -> ExpertRouter:
        return ExpertRouter(self.net.backbone.out_features, self.net.num_experts,
                            min(self.router_top_k, num_classes), self.router_hidden).to(self.ctx.device)

    def _drw_start(self) -> int:
        """DRW starts at ``drw_epoch`` (0-based), by default the first LR milestone (released: 160)."""
        if self.drw_epoch is not None:
            return self.drw_epoch
        _, ms = LTSchedule(self.epochs, self.lr, self.warmup_epochs, self.milestones, self.gamma).resolved()
        return ms[0] if ms else int(0.8 * self.epochs)

    # -- stage 1 -------------------------------------------------------------------------------------
    def learn(self, session) -> None:
        dev = self.ctx.device
        c = session.classes.num_classes
        # a class without a training sample is never a target: count it as 1 so its margin and weight stay finite
        counts = [max(int(n), 1) for n in session.classes.train_counts]
        margins = ldam_margins(counts, self.max_margin).to(dev, torch.float32)
        drw_w = effective_number_weights(counts, self.drw_beta).to(dev, torch.float32)
        div_t = (self.diversity_temperature * diversity_temperature_weights(counts, self.reweight_factor)).to(
            dev, torch.float32)
        drw_start = self._drw_start()
        torch.manual_seed(self.ctx.derive_seed("ride", "init"))
        self.net = self._build()
        self.router_net = None
        data = session.labeled
        steps_per_epoch = max(1, math.ceil(len(data) / self.batch_size))
        step = [0]

        def loss_fn(x, y):
            epoch = step[0] // steps_per_epoch
            step[0] += 1
            late = self.drw and epoch >= drw_start
            logits, _ = self.net(x)
            return ride_loss(logits.float(), y, margins, self.scale, class_weight=drw_w if late else None,
                             temperature=div_t if late else self.diversity_temperature,
                             diversity_factor=self.diversity_factor, base_factor=self.base_loss_factor)

        val = selection_data(self, session)
        validate = None
        if val is not None and len(val):
            def validate():
                return balanced_accuracy_of(lambda x: self.net(x)[0].float().mean(1), val, c, dev,
                                            self.ctx.eval_batch_size)
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("ride", "train"))
        schedule = LTSchedule(self.epochs, self.lr, self.warmup_epochs, self.milestones, self.gamma)
        info = fit(self.net, data, loss_fn, ctx=self.ctx, schedule=schedule, batch_size=self.batch_size,
                   momentum=self.momentum, weight_decay=self.weight_decay, checkpoint=self.checkpoint,
                   validate=validate, generator=gen, desc="ride")
        if step[0] != self.epochs * steps_per_epoch:  # the DRW switch counts batches: they must match the loop's
            raise RuntimeError(f"ride: expected {self.epochs * steps_per_epoch} training batches, saw {step[0]}")
        self.info = {"best_epoch": info["best_epoch"], "best_val": info["best_val"], "drw_epoch": drw_start}
        if self.router and self.router_epochs > 0 and self.net.num_experts > 1:
            self._train_router(data, c)
            if session.validation is not None and len(session.validation):
                self.info.update(self._validation_report(session.validation, c))
        elif self.router:
            self.info["router"] = "skipped (one expert or router_epochs: 0): every expert is used"
        self._usage = None

    # -- stage 2: expert assignment ------------------------------------------------------------------
    def _train_router(self, data, num_classes: int) -> None:
        dev = self.ctx.device
        torch.manual_seed(self.ctx.derive_seed("ride", "router_init"))
        self.router_net = self._build_router(num_classes)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()  # frozen: batch-norm uses its running statistics, as released
        opt = torch.optim.SGD(self.router_net.parameters(), lr=self.router_lr, momentum=0.9, nesterov=True,
                              weight_decay=self.router_weight_decay)
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("ride", "router"))
        labels = data.targets
        for epoch in self.ctx.progress_bar(range(self.router_epochs), desc="ride router", unit="ep"):
            lr = 0.5 * self.router_lr * (1 + math.cos(math.pi * epoch / self.router_epochs))
            for g in opt.param_groups:
                g["lr"] = lr
            order = balanced_order(labels, len(labels), gen)
            finite = torch.ones((), dtype=torch.bool, device=dev)
            for xb, yb in batches(data.subset(order), self.router_batch_size, train=True, device=dev,
                                  generator=gen, num_workers=self.ctx.num_workers):
                with torch.no_grad():
                    logits, feats = self.net(xb)
                loss = router_loss(self.router_net, feats.float(), logits.float(), yb, self.router_pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                finite &= torch.isfinite(loss.detach())
                self.ctx.log_train({"loss_router": loss.detach(), "lr": lr, "epoch": epoch})
            if not bool(finite):
                raise NonFiniteLossError(f"ride router: non-finite loss in epoch {epoch} (lr {lr:g})")
        self.router_net.eval()

    @torch.no_grad()
    def _validation_report(self, val, num_classes: int) -> dict:
        """Balanced validation accuracy with all experts and routed, and the experts used per sample."""
        dev = self.ctx.device
        acc_all = balanced_accuracy_of(lambda x: self.net(x)[0].float().mean(1), val, num_classes, dev,
                                       self.ctx.eval_batch_size)
        acc_routed = balanced_accuracy_of(lambda x: self._scores(x)[0], val, num_classes, dev,
                                          self.ctx.eval_batch_size)
        used = torch.zeros((), dtype=torch.long, device=dev)
        for xb, _ in batches(val, self.ctx.eval_batch_size, device=dev):
            used += self._scores(xb)[1].sum()
        return {"val_balanced_acc_all_experts": acc_all, "val_balanced_acc_routed": acc_routed,
                "val_experts_per_sample": float(used) / len(val)}

    # -- prediction ----------------------------------------------------------------------------------
    def _scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits, feats = self.net(x)
        logits = logits.float()
        if self.router_net is None:
            return logits.mean(1), torch.full((len(x),), logits.shape[1], dtype=torch.long, device=logits.device)
        return routed_logits(self.router_net, feats.float(), logits)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.net.eval()
        out, used = self._scores(x)
        if self._usage is None:
            self._usage = torch.zeros(2, dtype=torch.float64, device=out.device)
        self._usage += torch.stack([used.sum().double(), used.new_tensor(len(x)).double()])
        return Prediction(logits=out)

    def eval_diagnostics(self) -> dict[str, float]:
        """Mean number of experts used per sample on the evaluation set just scored (then reset)."""
        if self._usage is None:
            return {}
        used, n = self._usage.tolist()
        self._usage = None
        return {"ride_experts_per_sample": used / max(n, 1.0)}

    def run_info(self) -> dict:
        return {"ride": dict(self.info)} if self.info else {}

    def selects_on_test(self) -> bool:
        return self.checkpoint == "test"

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(),
                "router": None if self.router_net is None else self.router_net.state_dict(),
                "info": {k: v for k, v in self.info.items() if isinstance(v, (int, float)) or v is None}}

    def load_state_dict(self, state: dict) -> None:
        self.net = self._build()
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.router_net = None
        if state.get("router") is not None:
            c = self.ctx.scenario["num_classes"]
            self.router_net = self._build_router(c)
            self.router_net.load_state_dict(state["router"])
            self.router_net.eval()
        self.info = dict(state.get("info", {}))
        self._usage = None
