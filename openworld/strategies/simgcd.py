"""SimGCD: parametric generalized category discovery (card ``specs/gcd-ncd.md`` §2.1–2.3).

Model: backbone → feature ``h``; a projector MLP (``Linear–GELU–Linear–GELU–Linear``, trunc-normal
std 0.02, zero biases, on the un-normalised ``h``) gives ``u``; a weight-normalised linear classifier
with gain fixed at 1 and no bias gives cosine logits ``z_k = <w_k/||w_k||, h/||h||>``.

Loss per iteration on two views (rows ``0..B-1`` view 1, ``B..2B-1`` view 2):
``L = (1−λ)(L_u + ε R) + λ L_s + (1−λ) L_c + λ L_sc`` with supervised CE ``L_s`` (labelled rows, both
views), cross-view self-distillation ``L_u`` (teacher temperature schedule :func:`teacher_temperatures`),
the mean-entropy regulariser ``R = log K − H(p̄)`` (:func:`mean_entropy_regulariser`), InfoNCE on
projections with τ_c = 1 (:func:`info_nce_loss`) and SupCon on labelled projections with
τ = τ_b = 0.07 (:func:`supcon_loss`). Both are written directly: SupCon because
pytorch-metric-learning's ``SupConLoss`` differs from the official one (0 without negative pairs,
anchors without a positive dropped from the mean); InfoNCE because ``NTXentLoss``, though equal (both
tested against the card's formula in ``tests/test_gcd_losses.py``), is about 1000× slower on CPU at B = 128.

Data: each epoch draws ``|D_L|+|D_U|`` samples with replacement, weight 1 per labelled item and
``|D_L|/|D_U|`` per unlabelled one; batches of B with ``drop_last``. SGD (momentum 0.9, no weight
decay on biases and 1-D parameters), LR cosine-annealed per epoch to ``1e-3·lr``. Evaluation is the
last epoch (no model selection). Unlabelled targets are -1 (``Session.visible``); the labelled mask
is ``y >= 0``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import FileData, TensorData
from openworld.registry import register_strategy
from openworld.strategies.base import NonFiniteLossError, Prediction, Strategy

# ------------------------------------------------------------------------------------------------
# Loss terms (pure functions; card §2.3)
# ------------------------------------------------------------------------------------------------


def teacher_temperatures(
    epochs: int, warmup: int, start: float = 0.07, end: float = 0.04, kind: Literal["linear", "cosine"] = "linear"
) -> np.ndarray:
    """``τ_t(e)`` for e = 0…E-1: ``linspace(start, end, W)`` then ``end`` (``linear``, the released code).

    ``cosine`` (the LegoGCD text): ``end + (start−end)(1+cos(π e/(W−1)))/2`` for ``e < W``, then ``end``.
    """
    epochs, warmup = int(epochs), int(warmup)
    if epochs < 1 or warmup < 1:
        raise ValueError(f"teacher schedule needs epochs >= 1 and warmup >= 1, got {epochs}, {warmup}")
    w = min(warmup, epochs)
    if kind == "linear":
        head = np.linspace(start, end, warmup)[:w]
    elif kind == "cosine":
        e = np.arange(warmup, dtype=np.float64)
        head = (end + (start - end) * (1 + np.cos(np.pi * e / max(warmup - 1, 1))) / 2)[:w]
    else:
        raise ValueError(f"teacher_schedule must be 'linear' or 'cosine', got {kind!r}")
    return np.concatenate([head, np.full(epochs - w, end)])


def distill_loss(logits: Tensor, tau_t: float, tau_s: float = 0.1) -> Tensor:
    """Cross-view self-distillation ``L_u`` (card §2.3.2) on ``logits`` [2B, K] (two views stacked).

    Teacher ``q = softmax(sg(z)/τ_t)``; ``L_u = ½[mean H(q¹, p²) + mean H(q², p¹)]``, ``p = softmax(z/τ_s)``.
    """
    q1, q2 = torch.softmax(logits.detach() / tau_t, dim=-1).chunk(2)
    lp1, lp2 = F.log_softmax(logits / tau_s, dim=-1).chunk(2)
    return 0.5 * (-(q1 * lp2).sum(-1).mean() - (q2 * lp1).sum(-1).mean())


def mean_entropy_regulariser(logits: Tensor, tau_s: float = 0.1) -> Tensor:
    """``R = log K − H(p̄)`` with ``p̄`` the mean of ``softmax(z/τ_s)`` over all rows (≥ 0; added with ε)."""
    return mean_entropy_from_probs(torch.softmax(logits / tau_s, dim=-1).mean(0))


def mean_entropy_from_probs(p_mean: Tensor) -> Tensor:
    """``log K + Σ_k p̄_k log p̄_k`` (0·log 0 = 0)."""
    k = p_mean.shape[-1]
    return math.log(k) + torch.special.xlogy(p_mean, p_mean).sum(-1)


def info_nce_loss(proj: Tensor, temperature: float = 1.0) -> Tensor:
    """InfoNCE on projections [2B, d] (card §2.3.4): positive = the other view, the 2B−2 others negative.

    ``mean_i CE([s_i,pos, s_i,negs]/τ_c, 0)`` with cosine similarities and self excluded, computed as a
    cross-entropy over the similarity row with the diagonal masked (the order of the negatives does
    not change a cross-entropy). pytorch-metric-learning's ``NTXentLoss`` gives the same value
    (``tests/test_gcd_losses.py``) but materialises a [positive pairs × negative pairs] mask,
    about 2.5 s per 256-row batch on one CPU core against a millisecond here, so it is not used.
    """
    n = proj.shape[0]
    f = F.normalize(proj, dim=-1)
    sim = (f @ f.T) / temperature
    eye = torch.eye(n, dtype=torch.bool, device=proj.device)
    target = (torch.arange(n, device=proj.device) + n // 2) % n
    return F.cross_entropy(sim.masked_fill(eye, float("-inf")), target)


def supcon_loss(proj: Tensor, labels: Tensor, temperature: float = 0.07, base_temperature: float = 0.07) -> Tensor:
    """SupCon on labelled projections [n, d] with ``labels`` [n] (card §2.3.5): the official definition
    (Khosla et al.; HobbitLong/SupContrast ``SupConLoss``, contrast_mode ``all``, which SimGCD's
    ``model.py`` copies), on L2-normalised rows.

    ``L = mean_a −(τ/τ_b)·mean_{p∈P(a)} log(exp(s_ap/τ) / Σ_{j≠a} exp(s_aj/τ))``: the denominator runs over
    every j ≠ a, positives included, so a batch whose rows all share one class still has a loss.
    An anchor with no positive (a class with one row) contributes 0 and still counts in the mean over
    anchors, as in the official code's current edge-case fix (it divides by max(|P(a)|, 1); SimGCD's
    older copy divides by |P(a)| and gives NaN, a case SimGCD never meets since every labelled anchor has
    its other view). Fewer than two rows (no j ≠ a at all, NaN in the official code) give 0.

    Written directly rather than through pytorch-metric-learning's ``SupConLoss``: that one is not
    equal to the official loss — it returns 0 when there is no negative pair (all rows one class) and
    its non-zero-average reducer leaves anchors without a positive out of the mean.
    """
    n = proj.shape[0]
    if n < 2:
        return proj.sum() * 0.0
    f = F.normalize(proj, dim=-1)
    sim = (f @ f.T) / temperature
    eye = torch.eye(n, dtype=torch.bool, device=proj.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1).clamp(min=1).to(log_prob.dtype)
    mean_log_prob_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1) / n_pos
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask`` (0 when the mask is empty; no host sync)."""
    m = mask.to(values.dtype)
    n = m.sum()
    return torch.where(n > 0, (values * m).sum() / n.clamp(min=1), values.new_zeros(()))


# ------------------------------------------------------------------------------------------------
# Model (card §2.1)
# ------------------------------------------------------------------------------------------------
class Projector(nn.Module):
    """``Linear(d,h)–GELU–Linear(h,h)–GELU–Linear(h,out)``; trunc-normal std 0.02, zero biases, no BN."""

    def __init__(self, in_dim: int, hidden: int = 2048, out_dim: int = 256, nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden] * (max(nlayers, 1) - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.mlp(h)


class CosinePrototypes(nn.Module):
    """Weight-normalised linear layer without bias and with gain fixed at 1 (not trained): ``z = n̂(V) n̂(h)``.

    ``V`` keeps PyTorch's default ``nn.Linear`` initialisation (created after the projector's init).
    """

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(in_dim, num_classes, bias=False).weight.detach().clone())

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(F.normalize(h, dim=-1), F.normalize(self.weight, dim=-1))


class GCDModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int, proj_hidden: int, proj_dim: int, proj_layers: int):
        super().__init__()
        self.backbone = backbone
        d = int(backbone.out_features)
        self.projector = Projector(d, proj_hidden, proj_dim, proj_layers)
        self.head = CosinePrototypes(d, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.backbone(x)
        return h, self.projector(h), self.head(h)


def last_block(backbone: nn.Module) -> nn.Module:
    """The backbone's last block: ViT ``blocks[-1]`` (timm), SmallCNN ``block3``, ResNet last stage's last block."""
    inner = getattr(backbone, "model", backbone)
    if hasattr(inner, "blocks") and len(inner.blocks):
        return inner.blocks[-1]
    if hasattr(inner, "block3"):
        return inner.block3
    for name in ("layer4", "layer3"):
        stage = getattr(inner, name, None)
        if stage is not None:
            return stage[-1]
    raise ValueError(
        f"finetune: 'last_block' is not supported for backbone {type(inner).__name__} "
        "(known: timm ViT blocks, SmallCNN, ResNet stages); use finetune: all"
    )


def set_trainable(backbone: nn.Module, finetune: str) -> None:
    """``all``: train every parameter; ``last_block``: only :func:`last_block` (card §2.1; for ViT the
    embeddings, CLS token and final norm stay frozen); ``none``: frozen backbone."""
    if finetune not in ("all", "last_block", "none"):
        raise ValueError(f"finetune must be 'all', 'last_block' or 'none', got {finetune!r}")
    if finetune == "all":
        return
    for p in backbone.parameters():
        p.requires_grad_(False)
    if finetune == "last_block":
        for p in last_block(backbone).parameters():
            p.requires_grad_(True)


# ------------------------------------------------------------------------------------------------
# Two-view batches
# ------------------------------------------------------------------------------------------------
class _TwoViewFiles(torch.utils.data.Dataset):
    def __init__(self, data: FileData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        img = self.data.loader(self.data.paths[i])
        tf = self.data.transforms.train if self.data.transforms is not None else (lambda v: v)
        return tf(img), tf(img), int(self.data.targets[i])


def two_view_batches(data, order: Tensor, batch_size: int, *, device, generator: torch.Generator, num_workers: int = 0):
    """Yield ``(x [2B, …], y [B])`` for consecutive ``batch_size`` slices of ``order`` (drop_last):
    rows ``0..B-1`` are view 1 and ``B..2B-1`` view 2 of the same samples (train transform twice)."""
    n_batches = len(order) // batch_size
    if isinstance(data, TensorData):
        x_all = data.x.to(device)
        y_all = data.targets.to(device)
        order = order.to(device)
        tf = data.transforms.train if data.transforms is not None else None
        for b in range(n_batches):
            idx = order[b * batch_size : (b + 1) * batch_size]
            xb = x_all[idx]
            v1 = tf(xb, generator=generator) if tf is not None else xb
            v2 = tf(xb, generator=generator) if tf is not None else xb
            yield torch.cat([v1, v2]), y_all[idx]
        return
    loader = torch.utils.data.DataLoader(
        _TwoViewFiles(data),
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=num_workers,
        drop_last=True,
        pin_memory=torch.device(device).type == "cuda",
    )
    for v1, v2, yb in loader:
        yield torch.cat([v1, v2]).to(device, non_blocking=True), yb.to(device, non_blocking=True)


def _concat_train(labeled, unlabeled):
    from openworld.data.views import concat

    parts = [d for d in (labeled, unlabeled) if d is not None and len(d)]
    if not parts:
        raise ValueError("GCD strategy: the session has neither labelled nor unlabelled data")
    return parts[0] if len(parts) == 1 else concat(parts)


def balanced_train_draw(labeled, unlabeled, batch_size: int, name: str):
    """The training pool D_L ∪ D_U and its per-sample draw weights (labelled 1, unlabelled |D_L|/|D_U|: the
    released samplers' balance of labelled and unlabelled rows); returns (data, weights, n_draw)."""
    data = _concat_train(labeled, unlabeled)
    n_l = len(labeled) if labeled is not None else 0
    n_u = len(unlabeled) if unlabeled is not None else 0
    weights = torch.cat(
        [
            torch.ones(n_l, dtype=torch.float64),
            torch.full((n_u,), n_l / n_u if n_u and n_l else 1.0, dtype=torch.float64),
        ]
    )
    n_draw = n_l + n_u
    if n_draw < batch_size:
        raise ValueError(f"{name}: {n_draw} training samples < batch_size {batch_size} (drop_last)")
    return data, weights, n_draw


# ------------------------------------------------------------------------------------------------
# Strategy
# ------------------------------------------------------------------------------------------------
@register_strategy("simgcd")
class SimGCD(Strategy):
    """SimGCD (card §2.1–2.3; hyperparameters §3).

    Parameters:
        epochs, batch_size, lr, momentum, weight_decay, lr_min_factor: optimiser and schedule
            (SGD, cosine per epoch to ``lr_min_factor·lr``; no weight decay on biases/1-D params).
        sup_weight: λ. memax_weight: ε (mean-entropy term). student_temp: τ_s.
        teacher_temp_start / teacher_temp_end / teacher_warmup: τ_t schedule (warmup ``None`` →
            ``max(1, ceil(0.15·epochs))``, = 30 at 200 epochs). teacher_schedule: ``linear`` (code) | ``cosine``.
        infonce_temp: τ_c (1.0). supcon_temp: τ = τ_b (0.07).
        proj_hidden, proj_dim, proj_layers: projector MLP.
        finetune: ``last_block`` (card: only the last ViT block trains) | ``all`` | ``none``.
        k_estimate: used when the scenario does not give K (``k_mode: estimated``, card §2.7): ``auto``
            = bounded Brent on gcd (:func:`~openworld.strategies.kmeans.estimate_k_brent`, labelled-row
            Hungarian accuracy) and silhouette of the D_U features on ncd
            (:func:`~openworld.strategies.kmeans.estimate_k_silhouette`; head = K_old + K̂_u);
            ``brent`` is accepted as the former name of ``auto``.
        k_features: the latent space of the estimate: ``backbone`` (the recipe's backbone as built,
            pre-trained when the recipe has a ``pretrain:`` stage) or ``base_model`` (its encoder after
            the recipe's ``base:`` training on D_L, the card's "model trained with D_L" for NCD).
            L2-normalised. Only D_L labels are used.
        k_max: upper bound of the search (``None`` → ``4·K_old`` on gcd, ``2·K_old`` novel clusters on
            ncd, the card's small-data choices).
    """

    name = "simgcd"
    supports = frozenset({"gcd", "ncd"})

    def __init__(
        self,
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
    ):
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.lr_min_factor = lr_min_factor
        self.sup_weight = sup_weight
        self.memax_weight = memax_weight
        self.student_temp = student_temp
        self.teacher_temp_start = teacher_temp_start
        self.teacher_temp_end = teacher_temp_end
        self.teacher_warmup = teacher_warmup
        self.teacher_schedule = teacher_schedule
        self.infonce_temp = infonce_temp
        self.supcon_temp = supcon_temp
        self.proj_hidden = proj_hidden
        self.proj_dim = proj_dim
        self.proj_layers = proj_layers
        self.finetune = finetune
        self.k_estimate = k_estimate
        self.k_features = k_features
        self.k_max = k_max
        self.k_hat: int | None = None

    # -- hooks for LegoGCD ---------------------------------------------------------------------------
    def _extra_loss(self, z: Tensor, labelled: Tensor, step: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(term added inside the clustering bracket, term added outside, logs). SimGCD: none."""
        zero = z.new_zeros(())
        return zero, zero, {}

    def _after_step(self, z: Tensor) -> None:
        pass

    def _start_training(self, num_classes: int, num_old: int, total_steps: int) -> None:
        pass

    # -- learning ------------------------------------------------------------------------------------
    def _num_clusters(self, session) -> int:
        """Head size: K from the scenario, or (``k_mode: estimated``) K̂ on gcd / K_old + K̂_u on ncd."""
        k = session.info.get("num_clusters")
        if k is not None:
            return int(k)
        from openworld.strategies.kmeans import estimate_num_clusters, l2_features, record_k_hat

        if self.k_estimate not in ("auto", "brent"):
            raise ValueError(f"{self.name}: k_estimate must be 'auto' or 'brent', got {self.k_estimate!r}")
        k_old = int(session.info["num_old"])
        with torch.random.fork_rng(devices=[]):  # the estimate leaves the training's random stream alone
            if self.k_features == "base_model":
                encoder = self.ctx.base_model(session, num_active=k_old, tag="k_estimate").encoder
            elif self.k_features == "backbone":
                encoder = self.ctx.create_backbone().to(self.ctx.device)
            else:
                raise ValueError(f"{self.name}: k_features must be 'backbone' or 'base_model', got {self.k_features!r}")
            feats_l, y_l = self.ctx.extract_features(encoder, session.labeled)
            feats_u, _ = self.ctx.extract_features(encoder, session.unlabeled)
        k_hat = estimate_num_clusters(
            self.ctx.scenario.get("kind", "gcd"), l2_features(feats_l), y_l, l2_features(feats_u), k_old, self.k_max
        )
        record_k_hat(self, k_hat, k_old)
        return k_hat

    def run_info(self) -> dict:
        """``{"k_hat", "num_clusters"}``: K̂ (None when K was given) and the head size."""
        from openworld.strategies.kmeans import run_info

        return run_info(self)

    def learn(self, session) -> None:
        ctx = self.ctx
        device = ctx.device
        labeled, unlabeled = session.labeled, session.unlabeled
        k_old = int(session.info.get("num_old", len(session.classes.known)))
        K = self._num_clusters(session)
        self.num_clusters = K
        torch.manual_seed(ctx.derive_seed("simgcd-model"))
        backbone = ctx.create_backbone()
        set_trainable(backbone, self.finetune)
        self.model = GCDModel(backbone, K, self.proj_hidden, self.proj_dim, self.proj_layers).to(device)
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        opt = torch.optim.SGD(
            [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        data, weights, n_draw = balanced_train_draw(labeled, unlabeled, self.batch_size, self.name)
        steps_per_epoch = n_draw // self.batch_size
        warmup = self.teacher_warmup or max(1, math.ceil(0.15 * self.epochs))
        taus = teacher_temperatures(
            self.epochs, warmup, self.teacher_temp_start, self.teacher_temp_end, self.teacher_schedule
        )
        self._start_training(K, k_old, steps_per_epoch * self.epochs)
        gen = torch.Generator().manual_seed(ctx.derive_seed("simgcd-train"))
        lr_min = self.lr * self.lr_min_factor
        self.model.train()
        step = 0
        for epoch in ctx.progress_bar(range(self.epochs), desc=self.name, unit="ep"):
            lr = lr_min + (self.lr - lr_min) * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
            for g in opt.param_groups:
                g["lr"] = lr
            order = torch.multinomial(weights, n_draw, replacement=True, generator=gen)
            finite = torch.ones((), dtype=torch.bool, device=device)
            for x, y in two_view_batches(
                data, order, self.batch_size, device=device, generator=gen, num_workers=ctx.num_workers
            ):
                with ctx.autocast():
                    _, u, z = self.model(x)
                loss, logs = self.batch_loss(z.float(), u.float(), y, y >= 0, float(taus[epoch]), step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self._after_step(z.detach().float())
                finite &= torch.isfinite(loss.detach())
                step += 1
                ctx.log_train({**logs, "lr": lr, "epoch": epoch})
            if not bool(finite):
                raise NonFiniteLossError(f"{self.name}: non-finite loss in epoch {epoch} (lr {lr:g})")
        self.model.eval()

    def batch_loss(
        self, z: Tensor, u: Tensor, y: Tensor, labelled: Tensor, tau_t: float, step: int = 0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The card's total loss on one two-view batch.

        ``z`` [2B, K] cosine logits and ``u`` [2B, d] projections (view 1 rows first); ``y`` [B] labels,
        read only where ``labelled`` [B] is True (unlabelled targets are -1 in training; any value
        there gives the same loss — card T10).
        """
        lam = self.sup_weight
        lab2 = labelled.repeat(2)
        y2 = torch.where(lab2, y.repeat(2), torch.zeros_like(y).repeat(2))
        loss_sup = masked_mean(F.cross_entropy(z / self.student_temp, y2, reduction="none"), lab2)
        loss_u = distill_loss(z, tau_t, self.student_temp)
        reg = mean_entropy_regulariser(z, self.student_temp)
        loss_c = info_nce_loss(u, self.infonce_temp)
        if bool(lab2.any()):  # card pitfall 4: no SupCon on a batch without labelled rows
            loss_sc = supcon_loss(u[lab2], y2[lab2], self.supcon_temp, self.supcon_temp)
        else:
            loss_sc = z.new_zeros(())
        inner, outer, extra = self._extra_loss(z, lab2, step)
        loss = (
            (1 - lam) * (loss_u + inner + self.memax_weight * reg)
            + lam * loss_sup
            + (1 - lam) * loss_c
            + lam * loss_sc
            + outer
        )
        logs = {
            "loss": loss.detach(),
            "loss_sup_ce": loss_sup.detach(),
            "loss_distill": loss_u.detach(),
            "loss_memax": reg.detach(),
            "loss_infonce": loss_c.detach(),
            "loss_supcon": loss_sc.detach(),
            **extra,
        }
        return loss, logs

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.model.eval()
        with self.ctx.autocast():
            _, _, z = self.model(x)
        return Prediction(logits=z.float())

    def state_dict(self) -> dict:
        return {"num_clusters": self.num_clusters, "k_hat": self.k_hat, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.num_clusters = int(state["num_clusters"])
        self.k_hat = state.get("k_hat")
        backbone = self.ctx.create_backbone()
        self.model = GCDModel(backbone, self.num_clusters, self.proj_hidden, self.proj_dim, self.proj_layers).to(
            self.ctx.device
        )
        self.model.load_state_dict(state["model"])
        self.model.eval()
