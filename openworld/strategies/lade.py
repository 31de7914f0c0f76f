"""LADE (Hong et al., CVPR 2021): label-distribution disentangling loss + test-prior post-adjustment.

Card: ``docs/methods/lade.md``. Official code read: github.com/hyperconnect/LADE (commit 5db5d134),
``loss/PriorCELoss.py``, ``loss/LADELoss.py``, ``run_networks.py`` (loss weighting, evaluation offset),
``utils.py`` (``WarmupMultiStepLR``, ``calculate_prior``), ``config/CIFAR100_LT/lade.yaml``, ``README.md``.

With logits v = h(f(x)) (the recipe's backbone as one branch + a linear head), π the observed training prior
(ε = 1e-9) and a batch of N samples, n_c of them of class c:

* ``PriorCE = CE(v + log(π + ε), y)`` (LADE-CE, the same as Balanced Softmax).
* LADE regulariser (a regularised Donsker–Varadhan bound per class, released ``LADELoss``):
  ``T1_c = (1/(n_c + 1e-8)) Σ_{i: y_i = c} v_c(x_i)``;
  ``T2_c = logsumexp_i (v_c(x_i) − log(π_c + ε) + log(1/C + ε)) − log N`` over the **whole** batch;
  ``L_LADE = −Σ_c π_c (T1_c − T2_c − λ·T2_c²)`` (classes absent from the batch keep their T2 term).
* ``L = PriorCE + α·L_LADE``. Released CIFAR-100-LT (IF 100, README): α = 0.1, λ = 0.01; ImageNet-LT
  α = 0.05, λ = 0.5; Places-LT α = 0.005, λ = 0.1; iNaturalist-18 α = 0.05, λ = 0.1 (config default).
* Prediction: ``v + log p_t`` with p_t the test prior. ``test_prior="known"`` (default; the released
  evaluation adds the log of the evaluated split's class distribution) uses, for each evaluation set whose
  name gives its distribution (``uniform``, ``forward<ρ>``, ``backward<ρ>`` of the long-tail scenario;
  their sizes are in ``session.info["test_sizes"]``), the exact class counts of that set (card §1.2:
  ``int(m·(1/ρ)^{i/(C−1)})``, reversed for backward, m solved from the set's size); any other set, and
  ``test_prior="uniform"``, get the uniform prior (then the prediction is ``argmax v``). The known prior
  is information about the test labels' distribution (not the labels): LADE's protocol, recorded in
  ``run_info()``; ``uniform`` is the inductive variant. Which set is being scored: the runner evaluates the
  sets in the order of ``session.info["test_sizes"]`` and calls :meth:`eval_diagnostics` after each one;
  LADE advances its pointer there and checks that it scored exactly that set's size (else the run fails,
  rather than report a mismatched prior). A runner that names the set first may call
  :meth:`begin_eval_set`, which overrides the order.
* Training (released ``config/CIFAR100_LT/lade.yaml``): SGD with momentum 0.9, no Nesterov, weight decay
  5e-4, batch 256, lr 0.2, 200 epochs, ``WarmupMultiStepLR`` stepped before each epoch: with t = e + 1
  (e the 0-based epoch), ``lr·w(t)·γ^{#{m ≤ t}}``, ``w(t) = f + (1 − f)·t/W`` for t < W (f = 1/3, W = 5)
  and 1 after, milestones 120 and 160, γ = 0.01. Defaults scale with ``epochs``: W = ceil(E/40),
  milestones ``int(0.6E), int(0.8E)``.
* Checkpoint ``val`` (balanced validation accuracy of ``argmax v``) / ``last`` / ``test`` (opt-in).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.models.experts import single_branch_backbone
from openworld.registry import register_strategy
from openworld.strategies.base import Prediction, Strategy
from openworld.strategies.long_tail_baselines import (
    EPS,
    balanced_accuracy_of,
    check_checkpoint,
    fit,
    prior_from_counts,
    selection_data,
)

TEST_PRIORS = ("known", "uniform")


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------
def prior_ce_loss(logits: Tensor, y: Tensor, prior: Tensor) -> Tensor:
    """``CE(v + log(π + ε), y)`` (LADE's PriorCELoss)."""
    return F.cross_entropy(logits + torch.log(prior + EPS), y)


def lade_regularizer(logits: Tensor, y: Tensor, prior: Tensor, remine_lambda: float = 0.01) -> Tensor:
    """``−Σ_c π_c (T1_c − T2_c − λ T2_c²)`` (module docstring); vectorised over classes and samples."""
    n, c = logits.shape
    prior = prior.to(dtype=logits.dtype, device=logits.device)
    member = (y.unsqueeze(0) == torch.arange(c, device=y.device).unsqueeze(1)).to(logits.dtype)  # [C, N]
    n_c = member.sum(1)
    first = (logits.T * member).sum(1) / (n_c + 1e-8)
    spread = logits.T - torch.log(prior + EPS).unsqueeze(1) + math.log(1.0 / c + EPS)
    second = torch.logsumexp(spread, dim=1) - math.log(n)
    estimate = first - second - remine_lambda * second.pow(2)
    return -(estimate * prior).sum()


def lade_loss(logits: Tensor, y: Tensor, prior: Tensor, alpha: float = 0.1, remine_lambda: float = 0.01
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """``PriorCE + α·L_LADE`` and its two terms."""
    ce = prior_ce_loss(logits, y, prior)
    reg = lade_regularizer(logits, y, prior, remine_lambda)
    return ce + alpha * reg, {"prior_ce": ce.detach(), "lade": reg.detach()}


def lt_test_counts(m: int, rho: float, num_classes: int, reverse: bool = False) -> list[int]:
    """The class counts of a forward/backward test set (long-tail card §1.2): ``int(m·(1/ρ)^{i/(C−1)})``
    in float64, truncated; ``reverse`` uses the exponent ``(C−1−i)/(C−1)``."""
    c = int(num_classes)
    if c == 1:
        return [int(m)]
    r = 1.0 / float(rho)
    return [int(float(m) * r ** (((c - 1 - i) if reverse else i) / (c - 1))) for i in range(c)]


def known_test_prior(name: str, size: int, num_classes: int) -> tuple[Tensor | None, str]:
    """The class prior of the test set called ``name`` with ``size`` samples, and how it was obtained.

    ``uniform`` → 1/C; ``forward<ρ>``/``backward<ρ>`` → the exact counts of :func:`lt_test_counts` with the
    per-class count m that gives ``size`` (the total is strictly increasing in m, so m is unique); any other
    name, or no m matching, → ``None`` (unknown)."""
    c = int(num_classes)
    if name == "uniform":
        return torch.full((c,), 1.0 / c, dtype=torch.float64), "uniform"
    for direction in ("forward", "backward"):
        if not name.startswith(direction):
            continue
        try:
            rho = float(name[len(direction):])
        except ValueError:
            return None, "unknown"
        if not (math.isfinite(rho) and rho >= 1):
            return None, "unknown"
        lo, hi = 1, max(int(size), 1)
        while lo < hi:  # the smallest m whose total reaches size
            mid = (lo + hi) // 2
            if sum(lt_test_counts(mid, rho, c, direction == "backward")) >= size:
                hi = mid
            else:
                lo = mid + 1
        counts = lt_test_counts(lo, rho, c, direction == "backward")
        if sum(counts) != size:
            return None, "unknown"
        n = torch.tensor(counts, dtype=torch.float64)
        return n / n.sum(), f"{direction} rho={rho:g}, m={lo}"
    return None, "unknown"


@dataclass(frozen=True)
class WarmupMultiStep:
    """LADE's ``WarmupMultiStepLR`` stepped before each epoch: epoch e uses t = e + 1 and
    ``lr · w(t) · γ^{#{m ∈ milestones : m ≤ t}}``, ``w(t) = f + (1 − f)·t/W`` for t < W, else 1."""

    epochs: int
    lr: float
    warmup_epochs: int = 5
    warmup_factor: float = 1.0 / 3.0
    milestones: Sequence[int] = (120, 160)
    gamma: float = 0.01

    def lr_at(self, epoch: int) -> float:
        t = epoch + 1
        w = 1.0
        if t < self.warmup_epochs:
            a = t / self.warmup_epochs
            w = self.warmup_factor * (1 - a) + a
        return self.lr * w * self.gamma ** bisect_right(list(self.milestones), t)


# ------------------------------------------------------------------------------------------------
# Strategy
# ------------------------------------------------------------------------------------------------
def _number(name: str, value, *, low: float = 0.0, strict: bool = False, upper: float | None = None):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if strict else value >= low) and (upper is None or value <= upper)
    if not ok:
        rng = f"{'>' if strict else '>='} {low:g}" + (f" and <= {upper:g}" if upper is not None else "")
        raise ValueError(f"lade: {name} must be a number {rng}; got {value!r}")
    return value


@register_strategy("lade")
class LADE(Strategy):
    """LADE loss (PriorCE + α·LADE regulariser) with the test-prior post-adjustment (module docstring)."""

    supports = frozenset({"long_tail"})

    def __init__(self, alpha: float = 0.1, remine_lambda: float = 0.01,
                 test_prior: Literal["known", "uniform"] = "known",
                 epochs: int = 200, batch_size: int = 256, lr: float = 0.2, momentum: float = 0.9,
                 nesterov: bool = False, weight_decay: float = 5e-4, warmup_epochs: int | None = None,
                 warmup_factor: float = 1.0 / 3.0, milestones: Sequence[int] | None = None, gamma: float = 0.01,
                 checkpoint: str = "val"):
        _number("alpha", alpha)
        _number("remine_lambda", remine_lambda)
        if test_prior not in TEST_PRIORS:
            raise ValueError(f"lade: test_prior must be one of {', '.join(TEST_PRIORS)}; got {test_prior!r}")
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"lade: epochs must be a positive integer; got {epochs!r}")
        _number("lr", lr, strict=True)
        _number("warmup_factor", warmup_factor, upper=1.0)
        if not isinstance(nesterov, bool):
            raise ValueError(f"lade: nesterov must be true or false; got {nesterov!r}")
        self.alpha = alpha
        self.remine_lambda = remine_lambda
        self.test_prior = test_prior
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        self.milestones = None if milestones is None else list(milestones)
        self.gamma = gamma
        self.checkpoint = check_checkpoint(checkpoint)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.net: nn.Module | None = None
        self.prior: Tensor | None = None
        self.info: dict = {}
        self.eval_order: list[str] = []
        self.eval_sizes: dict[str, int] = {}
        self.test_log_priors: dict[str, Tensor] = {}
        self.test_prior_rule: dict[str, str] = {}
        self._pos = 0
        self._scored = 0
        self._named: str | None = None

    def schedule(self) -> WarmupMultiStep:
        warm = math.ceil(self.epochs / 40) if self.warmup_epochs is None else int(self.warmup_epochs)
        ms = (int(0.6 * self.epochs), int(0.8 * self.epochs)) if self.milestones is None else tuple(self.milestones)
        return WarmupMultiStep(self.epochs, self.lr, warm, float(self.warmup_factor), tuple(int(m) for m in ms),
                               float(self.gamma))

    def _build(self) -> nn.Module:
        enc = single_branch_backbone(self.ctx.backbone_cfg, self.ctx.scenario["input_shape"])
        return nn.Sequential(enc, nn.Linear(enc.out_features, self.ctx.scenario["num_classes"])).to(self.ctx.device)

    def learn(self, session) -> None:
        c = session.classes.num_classes
        self.prior = prior_from_counts(session.classes.train_counts, self.ctx.device)
        torch.manual_seed(self.ctx.derive_seed("lade", "init"))
        self.net = self._build()

        def loss_fn(x, y):
            return lade_loss(self.net(x).float(), y, self.prior, self.alpha, self.remine_lambda)

        val = selection_data(self, session)
        validate = None
        if val is not None and len(val):
            def validate():
                return balanced_accuracy_of(lambda x: self.net(x).float(), val, c, self.ctx.device,
                                            self.ctx.eval_batch_size)
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("lade", "train"))
        self.info = fit(self.net, session.labeled, loss_fn, ctx=self.ctx, schedule=self.schedule(),
                        batch_size=self.batch_size, momentum=self.momentum, nesterov=self.nesterov,
                        weight_decay=self.weight_decay, checkpoint=self.checkpoint, validate=validate, generator=gen,
                        desc="LADE")
        self._set_test_priors(session.info.get("test_sizes") or {}, c)

    def _set_test_priors(self, sizes: dict, c: int) -> None:
        self.eval_order = [str(k) for k in sizes]
        self.eval_sizes = {str(k): int(v) for k, v in sizes.items()}
        self.test_log_priors, self.test_prior_rule = {}, {}
        for name in self.eval_order:
            prior, rule = (known_test_prior(name, self.eval_sizes[name], c) if self.test_prior == "known"
                           else (None, "uniform (test_prior: uniform)"))
            if prior is None:
                prior = torch.full((c,), 1.0 / c, dtype=torch.float64)
                rule = rule if self.test_prior == "uniform" else "uniform (distribution not known)"
            self.test_log_priors[name] = torch.log(prior).float().to(self.ctx.device)
            self.test_prior_rule[name] = rule
        self._pos, self._scored, self._named = 0, 0, None

    # -- which evaluation set is being scored ------------------------------------------------------
    def begin_eval_set(self, name: str) -> None:
        """Name the evaluation set the next ``predict`` calls score (overrides the runner's order)."""
        self._named, self._scored = str(name), 0

    def _current(self) -> str | None:
        if self._named is not None:
            return self._named
        return self.eval_order[self._pos] if self.eval_order else None

    def eval_diagnostics(self) -> dict[str, float]:
        name = self._current()
        if name is not None and self._named is None:
            expected = self.eval_sizes.get(name)
            if self.test_prior == "known" and expected is not None and self._scored != expected:
                raise RuntimeError(
                    f"lade: test_prior='known' expected to have scored the evaluation set {name!r} ({expected} "
                    f"samples) but scored {self._scored}; the evaluation order differs from session.info['test_sizes']"
                    " (use test_prior='uniform', or a runner that calls begin_eval_set)")
            self._pos = (self._pos + 1) % len(self.eval_order)
        self._scored, self._named = 0, None
        return {}

    def _log_prior_now(self, c: int, device) -> Tensor:
        name = self._current()
        lp = self.test_log_priors.get(name) if name is not None else None
        if lp is None:
            return torch.full((c,), -math.log(c), device=device)
        return lp.to(device)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.net.eval()
        v = self.net(x).float()
        self._scored += len(x)
        return Prediction(logits=v + self._log_prior_now(v.shape[1], v.device))

    def selects_on_test(self) -> bool:
        return self.checkpoint == "test"

    def run_info(self) -> dict:
        return {"test_prior": self.test_prior, "test_prior_per_set": dict(self.test_prior_rule),
                "best_epoch": (self.info or {}).get("best_epoch")}

    def state_dict(self) -> dict:
        info = self.info or {}
        return {"net": self.net.state_dict(), "prior": self.prior.cpu(), "eval_sizes": dict(self.eval_sizes),
                "eval_order": list(self.eval_order),
                "selection": {"best_epoch": info.get("best_epoch"), "best_val": info.get("best_val")}}

    def load_state_dict(self, state: dict) -> None:
        self.net = self._build()
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.prior = state["prior"].to(self.ctx.device)
        sel = state.get("selection", {})
        self.info = {"best_epoch": sel.get("best_epoch"), "best_val": sel.get("best_val")}
        order = list(state.get("eval_order", []))
        sizes = dict(state.get("eval_sizes", {}))
        self._set_test_priors({k: sizes[k] for k in order}, self.ctx.scenario["num_classes"])


__all__ = ["LADE", "WarmupMultiStep", "known_test_prior", "lade_loss", "lade_regularizer", "lt_test_counts",
           "prior_ce_loss"]
