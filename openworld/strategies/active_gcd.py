"""Active GCD (Ma et al., CVPR 2024) on the SimGCD learner: three selection rules, one training loop.

Runs on the ``active_gcd`` scenario (:mod:`openworld.scenarios.active_gcd`): round 0 trains SimGCD on D_L ∪ D_U
(:class:`~openworld.strategies.simgcd.SimGCD`, unchanged). Each round r ≥ 1 then

1. scores the not-yet-queried rows of D_U with the student: ``p = softmax(z / T)`` (T = ``logits_temp``);
2. selects b rows (b = the round's budget) with the strategy's rule and asks their labels through
   ``session.info["label_query"]`` (the only label path);
3. trains ``round_epochs`` epochs from the current weights (fresh SGD starting at ``round_lr``, default the
   round-0 ``lr`` as in the official code, cosine to ``lr_min_factor·round_lr``), each epoch
   (a) one SimGCD epoch on D_L ∪ D_U (queried rows stay unlabelled there, as in the official loop), then
   (b) the *stable label mapping* on the EMA model (:func:`stable_label_mapping` on D_L ∪ every queried row)
   and one epoch over the queried rows: ``al_weight·λ·(al_cls_weight·CE(z/τ_s, map(y)) + al_supcon_weight·
   SupCon(u, y))``. The EMA model (decay ``ema_decay``) follows every step and serves only the mapping.

Selection rules (pure functions below, checked against the official code in ``tests/fixtures/active_gcd``):

* ``adaptive`` (the paper's, :func:`adaptive_novel_margin_select`): margin ``m = p_(1) − p_(2)``; rows sorted
  by m, descending (confident first) while ``r < adaptive_round``, ascending (uncertain first) after; from each
  predicted-novel cluster (argmax ≥ K_old) the first ``⌊b/K_new⌋`` rows, then the next predicted-novel rows in
  sorted order up to b (novelty: only predicted-novel rows; informativeness: the margin; diversity: the
  per-cluster quota). The official code stops with an assertion when fewer than b rows are predicted novel;
  we fill the rest with predicted-old rows in the same order and report the count (``run_info.num_fill_old``).
* ``entropy`` (:func:`entropy_select`): the b rows of largest entropy ``−Σ p log p``.
* ``random`` (:func:`random_select`): ``RandomState(seed).choice(pool, b, replace=False)``.

Prediction and evaluation: the student after the round's last epoch (the official script logs the best epoch
on the test set; we do no test-set selection).
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from openworld.data.views import FileData, TensorData, batches
from openworld.params import PosFloat
from openworld.registry import register_strategy
from openworld.strategies.base import NonFiniteLossError
from openworld.strategies.simgcd import SimGCD, balanced_train_draw, supcon_loss, two_view_batches

SELECTIONS = ("adaptive", "entropy", "random")


# ------------------------------------------------------------------------------------------------
# Selection rules and the label mapping (pure functions)
# ------------------------------------------------------------------------------------------------
def adaptive_novel_margin_select(
    probs: Tensor, pool: Tensor, n: int, num_old: int, num_new: int, round_index: int, adaptive_round: int
) -> Tensor:
    """The paper's adaptive novel-margin rule: ``n`` entries of ``pool`` (module docstring), in selection order.

    ``probs`` [P, K] class probabilities of the pool rows, ``pool`` [P] their row ids. Returns (selected ids,
    number of predicted-old rows used to fill up when fewer than ``n`` rows are predicted novel).
    """
    top2 = probs.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    pred = probs.argmax(dim=1)
    order = torch.argsort(margin, descending=round_index < adaptive_round, stable=True)
    pred_s, pool_s = pred[order], pool[order]
    novel = pred_s >= num_old
    # rank of each row among the sorted rows predicted in the same cluster (0 = first)
    one_hot = F.one_hot(pred_s, probs.shape[1])
    rank = ((one_hot.cumsum(0) - 1) * one_hot).sum(1)
    quota = int(n / num_new)
    first = novel & (rank < quota)
    pos = torch.arange(len(pool_s), device=pool.device)
    # the official concatenation: cluster K_old first, each cluster in sorted order
    key = pred_s[first] * len(pool_s) + pos[first]
    chosen = pool_s[first][torch.argsort(key)]
    rest_novel = pool_s[novel & ~first]
    chosen = torch.cat([chosen, rest_novel[: max(n - len(chosen), 0)]])
    fill = max(n - len(chosen), 0)
    if fill:
        chosen = torch.cat([chosen, pool_s[~novel][:fill]])
    return chosen[:n], fill


def entropy_select(probs: Tensor, pool: Tensor, n: int) -> Tensor:
    """The ``n`` pool ids of largest entropy (the official sort of ``Σ p log p``, ascending)."""
    neg_entropy = torch.special.xlogy(probs, probs).sum(1)
    return pool[torch.argsort(neg_entropy, stable=True)[:n]]


def random_select(pool: Tensor, n: int, seed: int) -> Tensor:
    """``RandomState(seed).choice(pool, n, replace=False)`` (the official ``np.random.choice`` after seeding)."""
    picked = np.random.RandomState(int(seed) % 2**32).choice(pool.cpu().numpy(), int(n), replace=False)
    return torch.as_tensor(picked, dtype=torch.long, device=pool.device)


def stable_label_mapping(preds: Tensor, targets: Tensor, num_classes: int) -> Tensor:
    """Stable label mapping: ``m[y]`` = the head column of true class y.

    Counts ``w[i, j]`` = rows predicted i with label j; the assignment maximising the matched count
    (``linear_sum_assignment(w.max() − w)``, as the official ``get_labeled_mapping``) gives ``m[j] = i``.
    """
    K = int(num_classes)
    w = torch.bincount(preds.long() * K + targets.long(), minlength=K * K).reshape(K, K).cpu().numpy()
    rows, cols = linear_sum_assignment(w.max() - w)
    mapping = torch.empty(K, dtype=torch.long)
    mapping[torch.as_tensor(cols, dtype=torch.long)] = torch.as_tensor(rows, dtype=torch.long)
    return mapping.to(preds.device)


def round_lr_schedule(base_lr: float, min_factor: float, epochs: int) -> list[float]:
    """Per-epoch lr of one query round: cosine from ``base_lr`` (epoch 0) towards ``min_factor·base_lr``, i.e.
    ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch (the official loop steps it twice: card)."""
    lr_min = base_lr * min_factor
    return [lr_min + (base_lr - lr_min) * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(int(epochs))]


def _with_targets(data, rows: Tensor, labels: Tensor):
    sub = data.subset(rows.cpu())
    if isinstance(sub, TensorData):
        return TensorData(sub.x, labels.cpu(), sub.transforms, sub.name)
    if isinstance(sub, FileData):
        return sub._copy(sub.paths, labels.cpu(), sub.train)
    raise TypeError(f"active GCD: unsupported data type {type(data).__name__}")


# ------------------------------------------------------------------------------------------------
# Strategy
# ------------------------------------------------------------------------------------------------
@register_strategy("active_gcd")
class ActiveGCD(SimGCD):
    """Active GCD on SimGCD (module docstring). SimGCD's parameters (``epochs`` = round 0) plus:

    selection: ``adaptive`` (paper) | ``entropy`` | ``random``. adaptive_round: first round of the
    uncertain-first order (official default 2). round_epochs: epochs per query round. al_batch_size: batch
    of the queried-rows epoch (no drop_last). al_weight, al_cls_weight, al_supcon_weight: its loss weights.
    logits_temp: T of the selection probabilities. ema_decay: EMA of the model used for the mapping.
    round_lr: the lr each query round restarts SGD at (cosine to ``lr_min_factor·round_lr``); None = ``lr``
    (the official setting).
    """

    name = "active_gcd"
    supports = frozenset({"gcd"})
    default_selection: str = "adaptive"

    def __init__(
        self,
        selection: Literal["adaptive", "entropy", "random"] | None = None,
        adaptive_round: int = 2,
        round_epochs: int = 5,
        al_batch_size: int = 8,
        al_weight: float = 1.0,
        al_cls_weight: float = 1.0,
        al_supcon_weight: float = 1.0,
        logits_temp: float = 0.1,
        ema_decay: float = 0.9,
        round_lr: PosFloat | None = None,
        epochs: int = 200,
        batch_size: int = 128,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-5,
        lr_min_factor: float = 1e-3,
        sup_weight: float = 0.35,
        memax_weight: float = 1.0,
        student_temp: float = 0.1,
        teacher_temp_start: float = 0.07,
        teacher_temp_end: float = 0.04,
        teacher_warmup: int | None = None,
        teacher_schedule: Literal["linear", "cosine"] = "linear",
        infonce_temp: float = 1.0,
        supcon_temp: float = 0.07,
        proj_hidden: int = 2048,
        proj_dim: int = 256,
        proj_layers: int = 3,
        finetune: Literal["all", "last_block", "none"] = "last_block",
        k_estimate: Literal["auto", "brent"] = "auto",
        k_features: Literal["backbone", "base_model"] = "backbone",
        k_max: int | None = None,
    ):  # SimGCD's parameters spelled out: recipe validation reads this signature
        super().__init__(
            epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
            lr_min_factor=lr_min_factor, sup_weight=sup_weight, memax_weight=memax_weight,
            student_temp=student_temp, teacher_temp_start=teacher_temp_start,
            teacher_temp_end=teacher_temp_end, teacher_warmup=teacher_warmup,
            teacher_schedule=teacher_schedule, infonce_temp=infonce_temp, supcon_temp=supcon_temp,
            proj_hidden=proj_hidden, proj_dim=proj_dim, proj_layers=proj_layers, finetune=finetune,
            k_estimate=k_estimate, k_features=k_features, k_max=k_max
        )
        self.selection = selection or self.default_selection
        self.adaptive_round = adaptive_round
        self.round_epochs = round_epochs
        self.al_batch_size = al_batch_size
        self.al_weight = al_weight
        self.al_cls_weight = al_cls_weight
        self.al_supcon_weight = al_supcon_weight
        self.logits_temp = logits_temp
        self.ema_decay = ema_decay
        if round_lr is not None and (
            isinstance(round_lr, bool) or not isinstance(round_lr, (int, float)) or not 0 < round_lr < math.inf
        ):
            raise ValueError(f"{self.name}: round_lr must be a finite float > 0 or null (= lr), got {round_lr!r}")
        self.round_lr = round_lr

    def _selection(self) -> str:
        if self.selection not in SELECTIONS:
            raise ValueError(f"{self.name}: selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        return self.selection

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.model = None
        self.ema = None
        self.queried_rows = torch.zeros(0, dtype=torch.long)
        self.queried_labels = torch.zeros(0, dtype=torch.long)
        self._info: dict = {}

    # -- learning ------------------------------------------------------------------------------------
    def learn(self, session) -> None:
        query = session.info.get("label_query")
        if query is None:
            raise ValueError(f"{self.name}: needs the active_gcd scenario (session.info['label_query'])")
        if session.info.get("num_clusters") is None:
            raise ValueError(f"{self.name}: the stable label mapping needs K (scenario k_mode: known)")
        r = int(session.info["round"])
        self._info = {"round": r, "selection": self._selection()}
        if r == 0 or self.model is None:
            if query.budget:
                raise ValueError(f"{self.name}: round {r} with a budget and no trained model (round 0 missing)")
            super().learn(session)  # plain SimGCD; the EMA starts from its weights
            self.ema = copy.deepcopy(self.model).eval()
            return
        rows = self._select(session, query.budget, r)
        labels = query(rows)
        self.queried_rows = torch.cat([self.queried_rows, rows.cpu()])
        self.queried_labels = torch.cat([self.queried_labels, labels.cpu()])
        self._train_round(session, r)

    @torch.no_grad()
    def _probs(self, data) -> Tensor:
        self.model.eval()
        out = []
        for xb, _ in batches(data, self.ctx.eval_batch_size, device=self.ctx.device, num_workers=self.ctx.num_workers):
            with self.ctx.autocast():
                z = self.model(xb)[2]
            out.append(torch.softmax(z.float() / self.logits_temp, dim=1))
        return torch.cat(out)

    def _select(self, session, n: int, r: int) -> Tensor:
        unl = session.unlabeled
        device = self.ctx.device
        free = torch.ones(len(unl), dtype=torch.bool)
        free[self.queried_rows] = False
        pool = torch.nonzero(free).flatten().to(device)
        sel = self._selection()
        if sel == "random":
            return random_select(pool, n, self.ctx.derive_seed("active-gcd-random", r))
        probs = self._probs(unl)[pool]
        if sel == "entropy":
            return entropy_select(probs, pool, n)
        k_old = int(session.info["num_old"])
        chosen, fill = adaptive_novel_margin_select(
            probs, pool, n, k_old, self.num_clusters - k_old, r, self.adaptive_round
        )
        self._info["num_fill_old"] = int(fill)
        return chosen

    def _ema_update(self) -> None:
        with torch.no_grad():
            e, s = list(self.ema.parameters()), list(self.model.parameters())
            torch._foreach_mul_(e, self.ema_decay)
            torch._foreach_add_(e, s, alpha=1 - self.ema_decay)

    @torch.no_grad()
    def _mapping(self, mapping_data) -> Tensor:
        preds = []
        for xb, _ in batches(mapping_data, self.ctx.eval_batch_size, device=self.ctx.device):
            with self.ctx.autocast():
                preds.append(self.ema(xb)[2].argmax(1))
        return stable_label_mapping(torch.cat(preds), mapping_data.targets.to(self.ctx.device), self.num_clusters)

    def _train_round(self, session, r: int) -> None:
        from openworld.data.views import concat

        ctx, device = self.ctx, self.ctx.device
        queried = _with_targets(session.unlabeled, self.queried_rows, self.queried_labels)
        mapping_data = concat([session.labeled, queried]) if session.labeled is not None else queried
        base_lr = float(self.lr if self.round_lr is None else self.round_lr)
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        opt = torch.optim.SGD(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=base_lr, momentum=self.momentum, weight_decay=self.weight_decay,
        )
        data, weights, n_draw = balanced_train_draw(session.labeled, session.unlabeled, self.batch_size, self.name)
        gen = torch.Generator().manual_seed(ctx.derive_seed("active-gcd-round", r))
        lam, lrs = self.sup_weight, round_lr_schedule(base_lr, self.lr_min_factor, self.round_epochs)
        tau_t = float(self.teacher_temp_end)  # the official rounds start from a trained model: no warm-up
        step = 0
        for epoch in range(self.round_epochs):
            lr = lrs[epoch]
            for g in opt.param_groups:
                g["lr"] = lr
            finite = torch.ones((), dtype=torch.bool, device=device)
            self.model.train()
            order = torch.multinomial(weights, n_draw, replacement=True, generator=gen)
            for x, y in two_view_batches(data, order, self.batch_size, device=device, generator=gen,
                                         num_workers=ctx.num_workers):
                with ctx.autocast():
                    _, u, z = self.model(x)
                loss, logs = self.batch_loss(z.float(), u.float(), y, y >= 0, tau_t, step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self._ema_update()
                finite &= torch.isfinite(loss.detach())
                step += 1
                ctx.log_train({**logs, "lr": lr, "epoch": epoch, "round": r})
            mapping = self._mapping(mapping_data)
            self.model.train()
            perm = torch.randperm(len(queried), generator=gen)
            # no drop_last: every queried row is seen once per epoch (a DataLoader with shuffle)
            for s in range(0, len(perm), self.al_batch_size):
                idx = perm[s : s + self.al_batch_size]
                (x, y), = two_view_batches(queried, idx, len(idx), device=device, generator=gen)
                with ctx.autocast():
                    _, u, z = self.model(x)
                z, u = z.float(), u.float()
                y2 = y.repeat(2)
                loss_ce = F.cross_entropy(z / self.student_temp, mapping[y2])
                loss_sc = supcon_loss(u, y2, self.supcon_temp, self.supcon_temp)
                loss = self.al_weight * lam * (self.al_cls_weight * loss_ce + self.al_supcon_weight * loss_sc)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self._ema_update()
                finite &= torch.isfinite(loss.detach())
                ctx.log_train({"loss_al": loss.detach(), "loss_al_ce": loss_ce.detach(),
                               "loss_al_supcon": loss_sc.detach()})
            if not bool(finite):
                raise NonFiniteLossError(f"{self.name}: non-finite loss in round {r} epoch {epoch} (lr {lr:g})")
        self._info["mapping_changed"] = int((mapping != torch.arange(len(mapping), device=mapping.device)).sum())
        self.model.eval()

    def run_info(self) -> dict:
        info = dict(super().run_info())
        info.update(self._info, num_queried_total=len(self.queried_rows))
        return info

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ema": self.ema.state_dict(),
                "queried_rows": self.queried_rows, "queried_labels": self.queried_labels}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ema = copy.deepcopy(self.model)
        self.ema.load_state_dict(state["ema"])
        self.ema.eval()
        self.queried_rows = state["queried_rows"].long()
        self.queried_labels = state["queried_labels"].long()


@register_strategy("active_gcd_entropy")
class ActiveGCDEntropy(ActiveGCD):
    """Baseline: the same learner, the b highest-entropy rows per round."""

    name = "active_gcd_entropy"
    default_selection = "entropy"


@register_strategy("active_gcd_random")
class ActiveGCDRandom(ActiveGCD):
    """Baseline: the same learner, b rows drawn uniformly per round."""

    name = "active_gcd_random"
    default_selection = "random"
