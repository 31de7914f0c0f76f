"""Decoupled classifiers on a frozen CE network (Kang et al., ICLR 2020): ``crt`` and ``tau_norm``.

Cards: ``docs/methods/crt.md``, ``docs/methods/tau_norm.md``. Official code read:
github.com/facebookresearch/classifier-balancing (commit f162adef).

**Stage 1** is the plain cross-entropy network of :class:`~openworld.strategies.long_tail_baselines.CE`
(the recipe's backbone as one branch + a linear head, instance-balanced sampling), with the same
parameter names as ``ce`` (``epochs``, ``lr``, …). It is *not* trained again: the CE family is cached under a
content key of its training settings (``_LTClassifier.model_key``), so with the same settings ``ce``, ``crt``
and ``tau_norm`` share one trained network — whichever runs first trains and stores it, the others load it
(``run_info()["lt_model"]["source"]``: ``trained`` / ``memo`` / ``cache``).

* ``crt`` — classifier re-training: the encoder is frozen, the linear classifier re-initialised
  (``nn.Linear``'s default init) and trained with cross-entropy on **class-balanced** batches
  (:class:`ClassAwareSampler`: a random class, then ``samples_per_class`` samples of it, both drawn by
  cycling through reshuffled lists, as the released sampler does), SGD + momentum without Nesterov, cosine
  learning rate (released: the scheduler is stepped before each epoch, so epoch e ∈ 0…E−1 uses
  ``lr·(1 + cos(π(e+1)/E))/2``; ``crt_schedule="cosine"`` uses ``π·e/E``). An epoch is ``⌊N/B⌋`` batches
  of B (released: ``epoch_steps``; ``crt_epoch_size="max_count"`` gives the sampler's nominal
  ``C·n_max`` samples). ``backbone_bn="frozen"`` keeps the encoder in inference mode (the paper's fixed
  representation); ``"train"`` is the released code, which puts the frozen encoder in training mode so its
  batch-norm statistics are re-estimated on the balanced batches. With ``frozen`` and
  ``crt_augment=False`` the features are computed once.
* ``tau_norm`` — τ-normalisation: logits ``z·(W_c/‖W_c‖^τ)`` with the CE head's rows W_c and **no bias**
  (released ``tau_norm.py``). τ is chosen on the scenario's **validation split** (balanced accuracy) over
  ``tau_grid`` (released sweep: 0, 0.1, …, 2.0, which the released script scores on the evaluation split);
  ties keep the smallest τ. A number in ``tau`` fixes it instead. The choice is in ``run_info()``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import batches
from openworld.registry import register_strategy
from openworld.strategies.base import NonFiniteLossError, Prediction
from openworld.strategies.long_tail_baselines import _LTClassifier, balanced_accuracy_of

CRT_SCHEDULES = ("cosine_released", "cosine")
CRT_EPOCH_SIZES = ("natural", "max_count")
BACKBONE_BN = ("frozen", "train")
CRT_CHECKPOINTS = ("val", "last")
DEFAULT_TAU_GRID = tuple(i / 10 for i in range(21))


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------
def tau_normalize(weight: Tensor, tau: float) -> Tensor:
    """Rows ``W_c / ‖W_c‖₂^τ`` (τ = 0: unchanged; τ = 1: unit rows)."""
    return weight / weight.norm(dim=1, keepdim=True).pow(tau)


def crt_lr(epoch: int, epochs: int, lr: float, schedule: str = "cosine_released") -> float:
    """Cosine annealing to 0 over ``epochs``. ``cosine_released``: stepped before the epoch (the released
    loop calls ``scheduler.step()`` first), so epoch e uses ``t = e + 1``; ``cosine``: ``t = e``."""
    t = epoch + 1 if schedule == "cosine_released" else epoch
    return lr * (1.0 + math.cos(math.pi * t / epochs)) / 2.0


def tau_sweep(z: Tensor, y: Tensor, weight: Tensor, grid: Sequence[float], num_classes: int,
              bias: Tensor | None = None) -> tuple[list[float], float]:
    """Balanced accuracy (mean recall over the classes present in ``y``) of ``argmax z·(W/‖W‖^τ)ᵀ (+ b)`` for
    each τ of ``grid`` (one host read), and the τ with the best score (ties: the smallest τ)."""
    scores = []
    for t in grid:
        logits = z @ tau_normalize(weight, float(t)).T
        if bias is not None:
            logits = logits + bias
        scores.append(_balanced_accuracy(logits.argmax(1), y, num_classes))
    values = [float(v) for v in torch.stack(scores).cpu()]
    best = max(values)
    return values, min(float(t) for t, v in zip(grid, values) if v == best)


class _CycleStream:
    """Items of a fixed set, drawn by cycling through it and reshuffling at each wrap (the released
    ``RandomCycleIter``: the first draw starts with a shuffle)."""

    def __init__(self, items: Tensor, generator: torch.Generator):
        self.items = items
        self.gen = generator
        self.left = items[:0]

    def take(self, m: int) -> Tensor:
        if m <= 0:
            return self.items[:0]
        short = m - len(self.left)
        if short > 0:
            n = len(self.items)
            refills = -(-short // n)
            perms = torch.argsort(torch.rand(refills, n, generator=self.gen), dim=1)
            self.left = torch.cat([self.left, self.items[perms.reshape(-1)]])
        out, self.left = self.left[:m], self.left[m:]
        return out


class ClassAwareSampler:
    """Class-balanced indices: a stream of classes (cycled, reshuffled at each wrap); each class drawn
    contributes ``samples_per_class`` consecutive items of its own cycled stream. State carries over
    between calls (the released sampler's iterators persist across epochs). Only classes present in
    ``labels`` are drawn. Vectorised: one loop over classes per call, none over samples."""

    def __init__(self, labels: Tensor, samples_per_class: int = 4, generator: torch.Generator | None = None):
        labels = torch.as_tensor(labels).long().cpu()
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.k = int(samples_per_class)
        present = torch.unique(labels)
        self.classes = present
        self.class_stream = _CycleStream(present, self.gen)
        self.streams = {int(c): _CycleStream(torch.nonzero(labels == c).flatten(), self.gen) for c in present}
        counts = torch.bincount(labels)
        self.max_count = int(counts.max()) if len(counts) else 0

    @property
    def nominal_length(self) -> int:
        """The released sampler's ``__len__``: ``max_c n_c · (number of classes present)``."""
        return self.max_count * len(self.classes)

    def draw(self, n: int) -> Tensor:
        """The next ``n`` indices (a final block may be cut short; its unused items are consumed anyway,
        as in the released generator)."""
        blocks = -(-n // self.k)
        cls = self.class_stream.take(blocks)
        out = torch.empty(blocks, self.k, dtype=torch.long)
        for c in torch.unique(cls).tolist():
            rows = torch.nonzero(cls == c).flatten()
            out[rows] = self.streams[c].take(len(rows) * self.k).view(len(rows), self.k)
        return out.reshape(-1)[:n]


# ------------------------------------------------------------------------------------------------
# cRT
# ------------------------------------------------------------------------------------------------
def _check(name: str, param: str, value, allowed: Sequence[str]):
    if value not in allowed:
        raise ValueError(f"{name}: {param} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _positive(name: str, param: str, value, integer: bool = False):
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}: {param} must be {kind}; got {value!r}")
    return value


@register_strategy("crt")
class CRT(_LTClassifier):
    """Classifier re-training (cRT) on the frozen encoder of the cached CE network.

    Stage 1 (the CE network, shared with ``ce``): ``epochs``, ``batch_size``, ``lr``, ``momentum``,
    ``weight_decay``, ``warmup_epochs``, ``milestones``, ``gamma``, ``checkpoint`` — as for ``ce``.
    Stage 2 (released ImageNet-LT ``cls_crt.yaml``): ``crt_epochs`` 10, ``crt_lr`` 0.2, ``crt_batch_size``
    512, ``crt_momentum`` 0.9, ``crt_weight_decay`` 5e-4, ``samples_per_class`` 4, cosine schedule;
    ``crt_checkpoint`` ``val`` keeps the epoch with the best balanced validation accuracy (the released
    code keeps the best epoch on its validation split), ``last`` the final one.
    """

    def __init__(self, epochs: int = 30, batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, warmup_epochs: int | None = None,
                 milestones: Sequence[int] | None = None, gamma: float = 0.1, checkpoint: str = "val",
                 crt_epochs: int = 10, crt_lr: float = 0.2, crt_batch_size: int = 512, crt_momentum: float = 0.9,
                 crt_weight_decay: float = 5e-4,
                 crt_schedule: Literal["cosine_released", "cosine"] = "cosine_released", samples_per_class: int = 4,
                 crt_epoch_size: Literal["natural", "max_count"] = "natural",
                 backbone_bn: Literal["frozen", "train"] = "frozen", crt_augment: bool = True,
                 crt_checkpoint: Literal["val", "last"] = "val"):
        super().__init__(epochs, batch_size, lr, momentum, weight_decay, warmup_epochs, milestones, gamma, checkpoint)
        self.crt_epochs = _positive("crt", "crt_epochs", crt_epochs, integer=True)
        self.crt_lr = _positive("crt", "crt_lr", crt_lr)
        self.crt_batch_size = _positive("crt", "crt_batch_size", crt_batch_size, integer=True)
        if not isinstance(crt_momentum, (int, float)) or not 0 <= crt_momentum < 1:
            raise ValueError(f"crt: crt_momentum must be in [0, 1); got {crt_momentum!r}")
        self.crt_momentum = crt_momentum
        if not isinstance(crt_weight_decay, (int, float)) or crt_weight_decay < 0:
            raise ValueError(f"crt: crt_weight_decay must be >= 0; got {crt_weight_decay!r}")
        self.crt_weight_decay = crt_weight_decay
        self.crt_schedule = _check("crt", "crt_schedule", crt_schedule, CRT_SCHEDULES)
        self.samples_per_class = _positive("crt", "samples_per_class", samples_per_class, integer=True)
        self.crt_epoch_size = _check("crt", "crt_epoch_size", crt_epoch_size, CRT_EPOCH_SIZES)
        self.backbone_bn = _check("crt", "backbone_bn", backbone_bn, BACKBONE_BN)
        if not isinstance(crt_augment, bool):
            raise ValueError(f"crt: crt_augment must be true or false; got {crt_augment!r}")
        self.crt_augment = crt_augment
        self.crt_checkpoint = _check("crt", "crt_checkpoint", crt_checkpoint, CRT_CHECKPOINTS)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.crt_info: dict = {}

    def learn(self, session) -> None:
        super().learn(session)  # the CE network: loaded from the memo/cache, or trained once and stored
        self._retrain(session)

    def _retrain(self, session) -> None:
        ctx, c = self.ctx, session.classes.num_classes
        enc = self.net[0]
        for p in enc.parameters():
            p.requires_grad_(False)
        torch.manual_seed(ctx.derive_seed("crt", "classifier"))
        head = nn.Linear(self.net[1].in_features, c).to(ctx.device)
        self.net[1] = head
        data = session.labeled
        sampler = ClassAwareSampler(data.targets, self.samples_per_class,
                                    torch.Generator().manual_seed(ctx.derive_seed("crt", "sampler")))
        bs = self.crt_batch_size
        if self.crt_epoch_size == "natural":
            per_epoch = max(len(data) // bs, 1) * bs
        else:
            per_epoch = sampler.nominal_length
        precomputed = self.backbone_bn == "frozen" and not self.crt_augment
        if precomputed:
            feats, ys = ctx.extract_features(enc, data)
        opt = torch.optim.SGD(head.parameters(), lr=self.crt_lr, momentum=self.crt_momentum,
                              weight_decay=self.crt_weight_decay)
        gen = torch.Generator().manual_seed(ctx.derive_seed("crt", "augment"))
        val = session.validation if self.crt_checkpoint == "val" else None
        best, best_state, best_epoch = -1.0, None, self.crt_epochs - 1
        history = []
        for epoch in ctx.progress_bar(range(self.crt_epochs), desc="cRT", unit="ep"):
            lr = crt_lr(epoch, self.crt_epochs, self.crt_lr, self.crt_schedule)
            for g in opt.param_groups:
                g["lr"] = lr
            enc.train(self.backbone_bn == "train")
            head.train()
            idx = sampler.draw(per_epoch)
            total = torch.zeros((), device=ctx.device)
            finite = torch.ones((), dtype=torch.bool, device=ctx.device)
            steps = 0
            if precomputed:
                dev_idx = idx.to(feats.device)
                stream = ((feats[ch], ys[ch]) for ch in dev_idx.split(bs))
            else:
                stream = self._encoded(enc, data.subset(idx), bs, gen)
            for z, yb in stream:
                loss = F.cross_entropy(head(z), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ld = loss.detach()
                finite &= torch.isfinite(ld)
                total += ld
                steps += 1
                ctx.log_train({"loss_crt": ld, "lr": lr, "epoch": epoch})
            if not bool(finite):
                raise NonFiniteLossError(f"cRT: non-finite loss in epoch {epoch} (lr {lr:g})")
            record = {"epoch": epoch, "loss": float(total) / max(steps, 1), "lr": lr}
            if val is not None and len(val):
                self.net.eval()
                score = balanced_accuracy_of(self.net, val, c, ctx.device, ctx.eval_batch_size)
                record["val_balanced_acc"] = score
                if score >= best:
                    best, best_epoch = score, epoch
                    best_state = copy.deepcopy(self.net.state_dict())
            history.append(record)
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.net.eval()
        self.crt_info = {"best_epoch": best_epoch, "best_val": best if best_state is not None else None,
                         "samples_per_epoch": per_epoch, "backbone_bn": self.backbone_bn,
                         "features_precomputed": precomputed}

    def _encoded(self, enc, data, bs: int, gen: torch.Generator):
        for xb, yb in batches(data, bs, train=self.crt_augment, shuffle=False, device=self.ctx.device,
                              generator=gen, num_workers=self.ctx.num_workers):
            with torch.no_grad():
                z = enc(xb)
            yield z, yb

    def run_info(self) -> dict:
        return {**super().run_info(), "crt": dict(self.crt_info)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "crt": dict(self.crt_info)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.crt_info = dict(state.get("crt", {}))


# ------------------------------------------------------------------------------------------------
# τ-normalisation
# ------------------------------------------------------------------------------------------------
@register_strategy("tau_norm")
class TauNorm(_LTClassifier):
    """τ-normalised classifier on the cached CE network (stage-1 parameters as for ``ce``).

    ``tau``: ``None`` (default) chooses τ on the validation split over ``tau_grid``; a number fixes it.
    ``keep_bias``: add the CE head's bias back (released: dropped).
    """

    def __init__(self, epochs: int = 30, batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 5e-4, warmup_epochs: int | None = None,
                 milestones: Sequence[int] | None = None, gamma: float = 0.1, checkpoint: str = "val",
                 tau: float | None = None, tau_grid: Sequence[float] = DEFAULT_TAU_GRID, keep_bias: bool = False):
        super().__init__(epochs, batch_size, lr, momentum, weight_decay, warmup_epochs, milestones, gamma, checkpoint)
        if tau is not None and (not isinstance(tau, (int, float)) or isinstance(tau, bool) or tau < 0):
            raise ValueError(f"tau_norm: tau must be a number >= 0 or null (chosen on validation); got {tau!r}")
        grid = list(tau_grid) if isinstance(tau_grid, (list, tuple)) else None
        if not grid or any(not isinstance(t, (int, float)) or isinstance(t, bool) or t < 0 for t in grid):
            raise ValueError(f"tau_norm: tau_grid must be a non-empty list of numbers >= 0; got {tau_grid!r}")
        if not isinstance(keep_bias, bool):
            raise ValueError(f"tau_norm: keep_bias must be true or false; got {keep_bias!r}")
        self.tau = tau
        self.tau_grid = [float(t) for t in grid]
        self.keep_bias = keep_bias

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.chosen_tau: float | None = None
        self.tau_scores: list[float] | None = None
        self._w: Tensor | None = None

    def learn(self, session) -> None:
        super().learn(session)
        head = self.net[1]
        if self.tau is not None:
            self.chosen_tau, self.tau_scores = float(self.tau), None
        else:
            val = session.validation
            if val is None or not len(val):
                raise ValueError("tau_norm: tau=null chooses τ on the validation split, which this scenario does not "
                                 "have (val_per_class 0?); give tau a number")
            z, y = self.ctx.extract_features(self.net[0], val)
            bias = head.bias.detach() if self.keep_bias else None
            self.tau_scores, self.chosen_tau = tau_sweep(z, y, head.weight.detach(), self.tau_grid,
                                                         session.classes.num_classes, bias)
        self._w = tau_normalize(head.weight.detach(), self.chosen_tau)

    def _logits(self, z: Tensor, w: Tensor) -> Tensor:
        out = z @ w.T
        return out + self.net[1].bias.detach() if self.keep_bias else out

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.net.eval()
        return Prediction(logits=self._logits(self.net[0](x).float(), self._w))

    def run_info(self) -> dict:
        info = {**super().run_info(), "tau": self.chosen_tau,
                "tau_source": "fixed" if self.tau is not None else "validation"}
        if self.tau_scores is not None:
            info["tau_grid_val_balanced_acc"] = {f"{t:g}": s for t, s in zip(self.tau_grid, self.tau_scores)}
        return info

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tau": self.chosen_tau, "tau_scores": self.tau_scores}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.chosen_tau = float(state["tau"])
        self.tau_scores = state.get("tau_scores")
        self._w = tau_normalize(self.net[1].weight.detach(), self.chosen_tau)


def _balanced_accuracy(pred: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Mean recall over the classes present in ``y`` (a 0-d tensor; no host read)."""
    hit = torch.zeros(num_classes, dtype=torch.float64, device=y.device).scatter_add_(0, y, (pred == y).double())
    support = torch.bincount(y, minlength=num_classes).double()
    present = support > 0
    return (hit[present] / support[present]).mean()


__all__ = ["CRT", "ClassAwareSampler", "TauNorm", "crt_lr", "tau_normalize", "tau_sweep"]
