"""RCAL — representation calibration for noisy long-tailed data (card ``long-tail-sade-rcal`` §2.5).

There is no official code; every choice the paper leaves open is a constructor parameter with the
card's default (table "RCAL unspecified hyperparameters").

**Stage 1 — contrastive representation.** MoCo: a query encoder (the recipe's backbone as a single
branch, e.g. ResNet-32 → 64-d) with a 2-layer projector ``d→d→128``, a momentum key encoder
(``moco_momentum``), a queue of ``moco_queue`` keys and InfoNCE at temperature ``moco_temperature``.
The queue + InfoNCE is :class:`MoCoQueueLoss`, a dense equal of pytorch-metric-learning's
``CrossBatchMemory(NTXentLoss)`` with one fresh label per image (query and key share it; the keys are
enqueued, the queries are scored against the memory) — unit-tested equal to that library and to MoCo's
InfoNCE, and about 1,200× faster per step on a CPU (``bench/bench_moco_queue.py``).
SGD lr ``moco_lr`` with cosine decay, weight decay 5e-4,
batch ``moco_batch_size``, two strong views per image (the SADE view of
:func:`openworld.strategies.sade.strong_view`: padded random crop instead of RandomResizedCrop).
``z0(x)`` is the frozen query encoder (eval mode, pre-projector).

**Stage 2a — distributional calibration** on ``z0`` of the training set with the observed labels:
per-class :class:`sklearn.neighbors.LocalOutlierFactor` (``k = min(20, n_c − 1)``, ``contamination="auto"``,
skipped when ``n_c ≤ 2``) removes outliers; mean and covariance (divisor n'−1; 0 when n' < 2) per
class; head = the shortest prefix of classes sorted by observed count (descending) holding ≥ 50 % of the
samples; each tail class k is calibrated from its ``q`` nearest heads (squared distances between means,
ties by class id) with weights ``ω_c ∝ n_c·||μ_c − μ_k||²`` (``omega="as_paper"``) or ``1/q``
(``"equal"``): ``μ' = γ Σ ω μ_c + (1−γ) μ_k``, ``Σ' = γ Σ ω Σ_c + (1−γ) Σ_k + α·J`` with J the all-ones
matrix (``cov_jitter="all_ones"``, paper) or the identity (``"identity"``). ``S_c`` samples per class
(default: the largest observed count) are drawn once from ``N(μ_c, Σ_c)`` by eigendecomposition with
negative eigenvalues clipped to 0.

**Stage 2b — classifier training.** Encoder f initialised from the MoCo query encoder, linear head
h: d→C. Each iteration: a real batch (weak augmentation = the data's train transform) with mixup
``λ ~ Beta(a, a)``: ``L = λ·CE(h(f(x̃)), y_i) + (1−λ)·CE(h(f(x̃)), y_j) + β·mean||f(x̃) − z0(x̃)||²``
(``reg_norm="squared"``; ``reg_on="clean"`` regularises on the un-mixed input), stepped by optimiser A
(SGD momentum 0.9, backbone lr 0.01 and head lr 1.0, ×0.1 at 20/40/60/80 % of the epochs, weight
decay 5e-4); then a sampled batch (128 pairs, cycled) ``CE(h(z), c)`` stepped by optimiser B (head
only, SGD lr 0.001, momentum 0.9). Checkpoint: ``last`` (the paper does not say) or ``val``.
Prediction: ``argmax h(f(x))``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import TensorData, batches
from openworld.models import experts as _experts  # noqa: F401  (registers the multi-expert backbones)
from openworld.models.experts import single_branch_backbone
from openworld.registry import register_strategy
from openworld.strategies.base import NonFiniteLossError, Prediction, Strategy
from openworld.strategies.long_tail_baselines import balanced_accuracy_of, check_checkpoint, selection_data
from openworld.strategies.sade import make_view

OMEGA = ("as_paper", "equal")
JITTER = ("all_ones", "identity")
REG_NORM = ("squared", "plain")
REG_ON = ("mixed", "clean")


# ------------------------------------------------------------------------------------------------
# Stage 2a pure pieces
# ------------------------------------------------------------------------------------------------
def lof_keep(z: np.ndarray, k: int = 20) -> tuple[np.ndarray, np.ndarray | None]:
    """Inlier mask of one class's features by LocalOutlierFactor(``min(k, n−1)``, contamination auto)
    and the LOF scores (``−negative_outlier_factor_``); all kept, scores None when ``n ≤ 2``."""
    from sklearn.neighbors import LocalOutlierFactor

    z = np.asarray(z, dtype=np.float64)
    n = len(z)
    if n <= 2:
        return np.ones(n, dtype=bool), None
    lof = LocalOutlierFactor(n_neighbors=min(int(k), n - 1), contamination="auto")
    pred = lof.fit_predict(z)
    return pred == 1, -lof.negative_outlier_factor_


def class_gaussians(z: np.ndarray, y: np.ndarray, num_classes: int, lof: bool = True, k: int = 20):
    """Per-class mean ``[C, m]``, covariance ``[C, m, m]`` (divisor n'−1; 0 for n' < 2) and kept
    counts after LOF filtering; classes without a sample get zeros. Also the removed fraction."""
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    m = z.shape[1]
    mu, cov = np.zeros((num_classes, m)), np.zeros((num_classes, m, m))
    kept = np.zeros(num_classes, dtype=np.int64)
    removed = 0
    for c in range(num_classes):
        zc = z[y == c]
        if lof and len(zc):
            keep, _ = lof_keep(zc, k)
            removed += int((~keep).sum())
            zc = zc[keep]
        kept[c] = len(zc)
        if len(zc):
            mu[c] = zc.mean(0)
        if len(zc) >= 2:
            cov[c] = np.cov(zc, rowvar=False, ddof=1).reshape(m, m)
    return mu, cov, kept, removed / max(len(y), 1)


def head_tail_split(counts: Sequence[int]) -> tuple[list[int], list[int]]:
    """Head = the shortest prefix of classes sorted by count (descending, ties by id) whose
    cumulative share is ≥ 50 %; tail = the rest (both ascending)."""
    n = np.asarray(counts, dtype=np.int64)
    order = np.argsort(-n, kind="stable")
    cum = np.cumsum(n[order])
    h = int(np.searchsorted(cum * 2 >= n.sum(), True)) + 1  # first index where 2·cum ≥ N
    return sorted(int(c) for c in order[:h]), sorted(int(c) for c in order[h:])


def calibrate_tail(mu: np.ndarray, cov: np.ndarray, counts: Sequence[int], head: Sequence[int],
                   tail: Sequence[int], q: int = 3, gamma: float = 0.5, alpha: float = 0.01,
                   omega: str = "as_paper", jitter: str = "all_ones"):
    """Calibrated ``(μ', Σ')`` (heads unchanged) and, per tail class, ``(selected heads, ω)``."""
    if omega not in OMEGA:
        raise ValueError(f"rcal: omega must be one of {', '.join(OMEGA)}; got {omega!r}")
    if jitter not in JITTER:
        raise ValueError(f"rcal: cov_jitter must be one of {', '.join(JITTER)}; got {jitter!r}")
    mu = np.asarray(mu, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    heads = np.asarray(sorted(head), dtype=np.int64)
    m = mu.shape[1]
    extra = np.ones((m, m)) if jitter == "all_ones" else np.eye(m)
    mu2, cov2, chosen = mu.copy(), cov.copy(), {}
    if len(heads) == 0:
        return mu2, cov2, chosen
    qq = min(int(q), len(heads))
    for k in tail:
        d = ((mu[heads] - mu[k]) ** 2).sum(1)
        order = np.lexsort((heads, d))[:qq]  # smallest squared distance, ties by class id
        sel = heads[order]
        if omega == "equal":
            w = np.full(qq, 1.0 / qq)
        else:
            raw = n[sel] * d[order]
            w = raw / raw.sum() if raw.sum() > 0 else np.full(qq, 1.0 / qq)
        mu2[k] = gamma * (w[:, None] * mu[sel]).sum(0) + (1 - gamma) * mu[k]
        cov2[k] = gamma * (w[:, None, None] * cov[sel]).sum(0) + (1 - gamma) * cov[k] + alpha * extra
        chosen[int(k)] = ([int(c) for c in sel], w.tolist())
    return mu2, cov2, chosen


def sample_gaussians(mu: np.ndarray, cov: np.ndarray, per_class: Sequence[int], rng: np.random.Generator):
    """``per_class[c]`` draws from ``N(μ_c, Σ_c)`` via eigendecomposition (negative eigenvalues
    clipped to 0: Σ may be singular). Returns ``(z float32 [S, m], y int64 [S])``."""
    zs, ys = [], []
    for c, s in enumerate(per_class):
        if s <= 0:
            continue
        vals, vecs = np.linalg.eigh((cov[c] + cov[c].T) / 2)
        a = vecs * np.sqrt(np.clip(vals, 0.0, None))[None, :]
        zs.append(mu[c] + rng.standard_normal((int(s), len(vals))) @ a.T)
        ys.append(np.full(int(s), c, dtype=np.int64))
    return np.concatenate(zs).astype(np.float32), np.concatenate(ys)


# ------------------------------------------------------------------------------------------------
# Strategy
# ------------------------------------------------------------------------------------------------
class _Projector(nn.Sequential):
    def __init__(self, d: int, hidden: int, out: int):
        super().__init__(nn.Linear(d, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))


class MoCoQueueLoss:
    """MoCo's InfoNCE with a FIFO queue of ``size`` keys, computed densely.

    Each call enqueues the batch's keys ``k`` (overwriting the oldest), then scores every query ``q_i``
    against all keys held (the queue, the batch's own keys included): ``CE(q_i·K / τ, index of k_i)``.
    This is exactly pytorch-metric-learning's ``CrossBatchMemory(NTXentLoss(τ))`` with one fresh label
    per image and the keys enqueued (tested equal, wrap-around included); that implementation enumerates
    every (anchor, negative) pair (≈ 11 s per step on one CPU thread at a 4,096-key queue, batch 256), this
    one is a single matrix product (≈ 9 ms; ``bench/bench_moco_queue.py``). ``q``/``k`` must be
    L2-normalised (NTXent's cosine similarity).
    """

    def __init__(self, dim: int, size: int, temperature: float, device=None):
        self.memory = torch.zeros(int(size), int(dim), device=device)
        self.size = int(size)
        self.temperature = float(temperature)
        self.ptr = 0
        self.filled = 0

    def __call__(self, q: Tensor, k: Tensor) -> Tensor:
        n = len(k)
        if n > self.size:
            raise ValueError(f"MoCo queue of {self.size} keys is smaller than the batch ({n})")
        slots = (self.ptr + torch.arange(n, device=self.memory.device)) % self.size
        self.memory[slots] = k.detach().to(self.memory.dtype)
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.filled + n, self.size)
        logits = q @ self.memory[: self.filled].T / self.temperature
        return F.cross_entropy(logits, slots)


@register_strategy("rcal")
class RCAL(Strategy):
    """RCAL (Zhang et al., ICCV 2023) on the recipe's backbone (single branch)."""

    supports = frozenset({"long_tail"})

    def __init__(
        self,
        moco_epochs: int = 1000,
        moco_batch_size: int = 256,
        moco_lr: float = 0.06,
        moco_weight_decay: float = 5e-4,
        moco_temperature: float = 0.2,
        moco_momentum: float = 0.999,
        moco_queue: int = 4096,
        moco_dim: int = 128,
        epochs: int = 100,
        batch_size: int = 128,
        backbone_lr: float = 0.01,
        head_lr: float = 1.0,
        sampled_lr: float = 0.001,
        sampled_batch_size: int = 128,
        weight_decay: float = 5e-4,
        q: int = 3,
        gamma: float = 0.5,
        alpha: float = 0.01,
        beta: float = 0.1,
        mixup_alpha: float = 1.0,
        lof_k: int = 20,
        samples_per_class: int | None = None,
        omega: str = "as_paper",
        cov_jitter: str = "all_ones",
        reg_norm: str = "squared",
        reg_on: str = "mixed",
        checkpoint: str = "last",
    ):
        for name, value, allowed in (("omega", omega, OMEGA), ("cov_jitter", cov_jitter, JITTER),
                                     ("reg_norm", reg_norm, REG_NORM), ("reg_on", reg_on, REG_ON)):
            if value not in allowed:
                raise ValueError(f"rcal: {name} must be one of {', '.join(allowed)}; got {value!r}")
        self.moco_epochs = moco_epochs
        self.moco_batch_size = moco_batch_size
        self.moco_lr = moco_lr
        self.moco_weight_decay = moco_weight_decay
        self.moco_temperature = moco_temperature
        self.moco_momentum = moco_momentum
        self.moco_queue = moco_queue
        self.moco_dim = moco_dim
        self.epochs = epochs
        self.batch_size = batch_size
        self.backbone_lr = backbone_lr
        self.head_lr = head_lr
        self.sampled_lr = sampled_lr
        self.sampled_batch_size = sampled_batch_size
        self.weight_decay = weight_decay
        self.q = q
        self.gamma = gamma
        self.alpha = alpha
        self.beta = beta
        self.mixup_alpha = mixup_alpha
        self.lof_k = lof_k
        self.samples_per_class = samples_per_class
        self.omega = omega
        self.cov_jitter = cov_jitter
        self.reg_norm = reg_norm
        self.reg_on = reg_on
        self.checkpoint = check_checkpoint(checkpoint)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.encoder = None
        self.head = None
        self.info: dict = {}

    def _encoder(self) -> nn.Module:
        return single_branch_backbone(self.ctx.backbone_cfg, self.ctx.scenario["input_shape"]).to(self.ctx.device)

    # -- stage 1 -------------------------------------------------------------------------------------
    def pretrain(self, data) -> nn.Module:
        """MoCo on the training images (labels unused); returns the query encoder."""
        if not isinstance(data, TensorData):
            raise ValueError("rcal: MoCo pre-training supports in-memory (TensorData) training sets only")
        dev = self.ctx.device
        torch.manual_seed(self.ctx.derive_seed("rcal", "moco_init"))
        enc_q = self._encoder()
        proj_q = _Projector(enc_q.out_features, enc_q.out_features, self.moco_dim).to(dev)
        enc_k, proj_k = copy.deepcopy(enc_q), copy.deepcopy(proj_q)
        for p in list(enc_k.parameters()) + list(proj_k.parameters()):
            p.requires_grad_(False)
        loss_fn = MoCoQueueLoss(self.moco_dim, self.moco_queue, self.moco_temperature, device=dev)
        params = list(enc_q.parameters()) + list(proj_q.parameters())
        opt = torch.optim.SGD(params, lr=self.moco_lr, momentum=0.9, weight_decay=self.moco_weight_decay)
        raw = TensorData(data.x, torch.arange(len(data)), None, data.name)  # labels replaced by row ids
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("rcal", "moco"))
        bs = min(self.moco_batch_size, len(data))
        for epoch in self.ctx.progress_bar(range(self.moco_epochs), desc="rcal moco", unit="ep"):
            lr = 0.5 * self.moco_lr * (1 + math.cos(math.pi * epoch / self.moco_epochs))
            for g in opt.param_groups:
                g["lr"] = lr
            finite = torch.ones((), dtype=torch.bool, device=dev)
            for xb, _ in batches(raw, bs, shuffle=True, device=dev, generator=gen, drop_last=True):
                x1 = make_view(data, xb, gen, 0.5)
                x2 = make_view(data, xb, gen, 0.5)
                q = F.normalize(proj_q(enc_q(x1)), dim=1)
                with torch.no_grad():
                    for pq, pk in zip(params, list(enc_k.parameters()) + list(proj_k.parameters())):
                        pk.mul_(self.moco_momentum).add_(pq.detach(), alpha=1 - self.moco_momentum)
                    k = F.normalize(proj_k(enc_k(x2)), dim=1)
                loss = loss_fn(q, k)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                finite &= torch.isfinite(loss.detach())
                self.ctx.log_train({"loss_moco": loss.detach(), "lr": lr, "epoch": epoch})
            if not bool(finite):
                raise NonFiniteLossError(f"rcal moco: non-finite loss in epoch {epoch}")
        return enc_q.eval()

    # -- stage 2 -------------------------------------------------------------------------------------
    def selects_on_test(self) -> bool:
        return self.checkpoint == "test"

    def learn(self, session) -> None:
        dev = self.ctx.device
        c = session.classes.num_classes
        data = session.labeled
        z0_net = self.pretrain(data)
        for p in z0_net.parameters():
            p.requires_grad_(False)
        z, y = self.ctx.extract_features(z0_net, data)
        z_np, y_np = z.double().cpu().numpy(), y.cpu().numpy()
        mu, cov, kept, removed = class_gaussians(z_np, y_np, c, lof=True, k=self.lof_k)
        observed = np.bincount(y_np, minlength=c)
        head, tail = head_tail_split(observed)
        mu2, cov2, chosen = calibrate_tail(mu, cov, observed, head, tail, self.q, self.gamma, self.alpha, self.omega,
                                           self.cov_jitter)
        s = int(observed.max()) if self.samples_per_class is None else int(self.samples_per_class)
        per_class = [s if observed[k] > 0 else 0 for k in range(c)]
        rng = np.random.default_rng(self.ctx.derive_seed("rcal", "sample"))
        zs, ys = sample_gaussians(mu2, cov2, per_class, rng)
        zs_t, ys_t = torch.from_numpy(zs).to(dev), torch.from_numpy(ys).to(dev)
        self.ctx.log_train({"rcal_lof_removed_frac": removed, "rcal_n_head": len(head)})
        self.info = {"lof_removed_frac": removed, "head": head, "tail": tail, "calibration": chosen,
                     "samples_per_class": s}

        torch.manual_seed(self.ctx.derive_seed("rcal", "head_init"))
        self.encoder = copy.deepcopy(z0_net)
        for p in self.encoder.parameters():
            p.requires_grad_(True)
        self.head = nn.Linear(self.encoder.out_features, c).to(dev)
        opt_a = torch.optim.SGD([{"params": self.encoder.parameters(), "lr": self.backbone_lr},
                                 {"params": self.head.parameters(), "lr": self.head_lr}],
                                momentum=0.9, weight_decay=self.weight_decay)
        opt_b = torch.optim.SGD(self.head.parameters(), lr=self.sampled_lr, momentum=0.9)
        milestones = [int(f * self.epochs) for f in (0.2, 0.4, 0.6, 0.8)]
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("rcal", "train"))
        a_mix = torch.tensor(float(self.mixup_alpha))
        beta_dist = torch.distributions.Beta(a_mix, a_mix)
        perm_s = torch.randperm(len(ys_t), generator=gen).to(dev)
        s_pos = 0
        val = selection_data(self, session)
        best, best_state = -1.0, None
        for epoch in self.ctx.progress_bar(range(self.epochs), desc="rcal", unit="ep"):
            factor = 0.1 ** sum(1 for m in milestones if m <= epoch)
            opt_a.param_groups[0]["lr"] = self.backbone_lr * factor
            opt_a.param_groups[1]["lr"] = self.head_lr * factor
            self.encoder.train()
            finite = torch.ones((), dtype=torch.bool, device=dev)
            for xb, yb in batches(data, self.batch_size, train=True, shuffle=True, device=dev, generator=gen,
                                  num_workers=self.ctx.num_workers):
                lam = float(beta_dist.sample()) if self.mixup_alpha > 0 else 1.0  # one draw per step
                j = torch.randperm(len(yb), generator=gen).to(dev)
                xm = lam * xb + (1 - lam) * xb[j]
                feat = self.encoder(xm)
                logits = self.head(feat)
                l_c = lam * F.cross_entropy(logits, yb) + (1 - lam) * F.cross_entropy(logits, yb[j])
                reg_x, reg_f = (xm, feat) if self.reg_on == "mixed" else (xb, self.encoder(xb))
                with torch.no_grad():
                    target = z0_net(reg_x)
                d2 = ((reg_f - target) ** 2).sum(1)
                l_reg = (d2 if self.reg_norm == "squared" else d2.clamp(min=1e-12).sqrt()).mean()
                loss = l_c + self.beta * l_reg
                opt_a.zero_grad(set_to_none=True)
                loss.backward()
                opt_a.step()
                # sampled batch: head only
                if s_pos + self.sampled_batch_size > len(perm_s):
                    perm_s = torch.randperm(len(ys_t), generator=gen).to(dev)
                    s_pos = 0
                idx = perm_s[s_pos:s_pos + self.sampled_batch_size]
                s_pos += self.sampled_batch_size
                l_s = F.cross_entropy(self.head(zs_t[idx]), ys_t[idx])
                opt_b.zero_grad(set_to_none=True)
                l_s.backward()
                opt_b.step()
                finite &= torch.isfinite(loss.detach()) & torch.isfinite(l_s.detach())
                self.ctx.log_train({"loss": loss.detach(), "loss_mix_ce": l_c.detach(), "loss_reg": l_reg.detach(),
                                    "loss_sampled_ce": l_s.detach(), "epoch": epoch})
            if not bool(finite):
                raise NonFiniteLossError(f"rcal: non-finite loss in epoch {epoch}")
            if val is not None and len(val):
                self.encoder.eval()
                score = balanced_accuracy_of(self._scores, val, c, dev, self.ctx.eval_batch_size)
                if score >= best:
                    best = score
                    best_state = (copy.deepcopy(self.encoder.state_dict()), copy.deepcopy(self.head.state_dict()))
        if best_state is not None:
            self.encoder.load_state_dict(best_state[0])
            self.head.load_state_dict(best_state[1])
        self.encoder.eval()

    def _scores(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x)).float()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.encoder.eval()
        return Prediction(logits=self._scores(x))

    def state_dict(self) -> dict:
        return {"encoder": self.encoder.state_dict(), "head": self.head.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.encoder = self._encoder()
        self.encoder.load_state_dict(state["encoder"])
        self.encoder.eval()
        self.head = nn.Linear(self.encoder.out_features, self.ctx.scenario["num_classes"]).to(self.ctx.device)
        self.head.load_state_dict(state["head"])


__all__ = ["RCAL", "calibrate_tail", "class_gaussians", "head_tail_split", "lof_keep", "sample_gaussians"]
