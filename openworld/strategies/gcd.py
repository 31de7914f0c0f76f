"""GCD (Vaze et al., CVPR 2022): contrastive fine-tuning, then semi-supervised k-means (card
``docs/methods/gcd.md``).

Stage 1, representation: the backbone (only its last block trainable, the analogue of the official
``grad_from_block 11``) and a projection head are trained on two augmented views of every image of
``D_L ∪ D_U`` with

``L = (1−λ)·L_u + λ·L_s``,

``L_u`` the InfoNCE loss over all 2B projections (positive = the other view of the same image,
τ_u = 1) and ``L_s`` the supervised contrastive loss over the labelled rows of both views
(τ = τ_b = 0.07). Both are the shared implementations of :mod:`openworld.strategies.simgcd`
(:func:`~openworld.strategies.simgcd.info_nce_loss`, :func:`~openworld.strategies.simgcd.supcon_loss`).
The projection head is the official DINO head: MLP ``d→2048→2048→256`` (GELU, trunc-normal std 0.02,
zero biases), L2 normalisation, then a weight-normalised bias-free linear layer ``256→65536`` with its
gain fixed at 1, i.e. cosine similarities to 65,536 learned directions (``proj_out_dim: null`` drops it).

Stage 2, clustering: semi-supervised k-means (:func:`~openworld.strategies.kmeans.ss_kmeans_gcd`, the
project's one implementation) on L2-normalised **backbone** features (test transform) of
``D_L ∪ D_U``: labelled points stay in their class cluster. Predictions are ``-‖ẑ − c_k‖²``, so the
argmax on ``D_U`` reproduces the ss-k-means assignment (transductive) and the test split is assigned
to the nearest centroid (inductive), exactly as the ``ss_kmeans`` baseline predicts.

Data and optimiser as released: each epoch draws ``|D_L|+|D_U|`` samples with replacement (weight 1
per labelled, ``|D_L|/|D_U|`` per unlabelled item), batches of B with ``drop_last``; SGD (momentum 0.9,
weight decay on **every** trainable parameter), LR cosine-annealed per epoch to ``1e-3·lr``.
Unlabelled targets are -1 (``Session.visible``); the labelled mask is ``y >= 0``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.registry import register_strategy
from openworld.strategies.base import NonFiniteLossError
from openworld.strategies.kmeans import _FeatureClustering, l2_features, ss_kmeans_gcd
from openworld.strategies.simgcd import (
    CosinePrototypes,
    Projector,
    balanced_train_draw,
    info_nce_loss,
    set_trainable,
    supcon_loss,
    two_view_batches,
)

SELECTIONS = ("last", "test_old")


# ------------------------------------------------------------------------------------------------
# Loss (pure function; card "Formulas")
# ------------------------------------------------------------------------------------------------
def gcd_loss(
    proj: Tensor,
    y: Tensor,
    labelled: Tensor,
    *,
    sup_weight: float = 0.35,
    infonce_temp: float = 1.0,
    supcon_temp: float = 0.07,
    contrast_unlabel_only: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(L, L_u, L_s)`` on one two-view batch, as the released training loop forms them.

    ``proj`` [2B, d]: projections, rows ``0..B-1`` view 1 and ``B..2B-1`` view 2 (normalised inside
    the shared losses). ``y`` [B]: labels, read only where ``labelled`` [B] is True (unlabelled
    targets may hold anything; they never enter a term). ``L_u``: InfoNCE over all 2B rows, or
    (``contrast_unlabel_only``) over the unlabelled rows of both views only. ``L_s``: SupCon over the
    labelled rows of both views with labels ``y``. ``L = (1−λ) L_u + λ L_s``. A term with fewer than
    two rows is 0 (the official code gives NaN there; at B = 128 it never happens).
    """
    v1, v2 = proj.chunk(2)
    lab = labelled.bool()
    if contrast_unlabel_only:
        con = torch.cat([v1[~lab], v2[~lab]])
        loss_u = info_nce_loss(con, infonce_temp) if con.shape[0] >= 2 else proj.sum() * 0.0
    else:
        loss_u = info_nce_loss(proj, infonce_temp)
    y_l = y[lab]
    loss_s = supcon_loss(torch.cat([v1[lab], v2[lab]]), torch.cat([y_l, y_l]), supcon_temp, supcon_temp)
    return (1 - sup_weight) * loss_u + sup_weight * loss_s, loss_u, loss_s


class GCDProjectionHead(nn.Module):
    """The official DINO head: ``Projector(d, hidden, bottleneck, nlayers)`` → L2 normalisation →
    weight-normalised linear ``bottleneck → out_dim`` without bias, gain fixed at 1 (``out_dim=None``:
    the normalised bottleneck itself)."""

    def __init__(self, in_dim: int, hidden: int = 2048, bottleneck: int = 256, out_dim: int | None = 65536,
                 nlayers: int = 3):
        super().__init__()
        self.mlp = Projector(in_dim, hidden, bottleneck, nlayers)
        self.last_layer = CosinePrototypes(bottleneck, out_dim) if out_dim else None

    def forward(self, h: Tensor) -> Tensor:
        x = self.mlp(h)
        return self.last_layer(x) if self.last_layer is not None else F.normalize(x, dim=-1)


# ------------------------------------------------------------------------------------------------
# Strategy
# ------------------------------------------------------------------------------------------------
@register_strategy("gcd")
class GCD(_FeatureClustering):
    """GCD (Vaze et al.): supervised + self-supervised contrastive fine-tuning, then ss-k-means.

    Parameters:
        epochs, batch_size, lr, momentum, weight_decay, lr_min_factor: optimiser and schedule (SGD,
            weight decay on every trainable parameter, cosine per epoch to ``lr_min_factor·lr``).
        sup_weight: λ (``sup_con_weight``; 0.35 in the paper and the released script, 0.5 the
            argparse default). infonce_temp: τ_u (1.0). supcon_temp: τ = τ_b (0.07).
        contrast_unlabel_only: InfoNCE on the unlabelled rows only (released option, off).
        proj_hidden, proj_bottleneck, proj_out_dim, proj_layers: DINO projection head
            (2048, 256, 65536, 3); ``proj_out_dim: null`` contrasts the normalised bottleneck.
        finetune: ``last_block`` (``grad_from_block`` = the last block) | ``all`` | ``none``.
        selection: ``last`` (the last epoch; default) | ``test_old`` (released: keep the epoch whose
            k-means on the labelled TEST split has the best v1 Old accuracy — test-set selection,
            flagged in the results).
        kmeans_n_init, kmeans_max_iter, kmeans_tol: ss-k-means restarts / iterations / tolerance
            (released ``k_means.sh``: 100, 200, 1e-4; argparse defaults 10, 10).
        k_max: upper bound of the K search under ``k_mode: estimated`` (``None`` → 4·K_old); K̂ is
            estimated on the fine-tuned features, as the official pipeline does.
    """

    name = "gcd"
    supports = frozenset({"gcd"})

    def __init__(
        self,
        epochs: int = 200,
        batch_size: int = 128,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-5,
        lr_min_factor: float = 1e-3,
        sup_weight: float = 0.35,
        infonce_temp: float = 1.0,
        supcon_temp: float = 0.07,
        contrast_unlabel_only: bool = False,
        proj_hidden: int = 2048,
        proj_bottleneck: int = 256,
        proj_out_dim: int | None = 65536,
        proj_layers: int = 3,
        finetune: Literal["all", "last_block", "none"] = "last_block",
        selection: Literal["last", "test_old"] = "last",
        kmeans_n_init: int = 100,
        kmeans_max_iter: int = 200,
        kmeans_tol: float = 1e-4,
        k_max: int | None = None,
    ):
        super().__init__(features="backbone", normalize=True, n_init=kmeans_n_init, k_max=k_max)
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.lr_min_factor = lr_min_factor
        self.sup_weight = sup_weight
        self.infonce_temp = infonce_temp
        self.supcon_temp = supcon_temp
        self.contrast_unlabel_only = contrast_unlabel_only
        self.proj_hidden = proj_hidden
        self.proj_bottleneck = proj_bottleneck
        self.proj_out_dim = proj_out_dim
        self.proj_layers = proj_layers
        self.finetune = finetune
        self.selection = selection
        self.kmeans_n_init = kmeans_n_init
        self.kmeans_max_iter = kmeans_max_iter
        self.kmeans_tol = kmeans_tol
        self.num_clusters: int | None = None
        self.selected_epoch: int | None = None

    def selects_on_test(self) -> bool:
        return self.selection == "test_old"

    def _check(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"gcd: selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.finetune not in ("all", "last_block", "none"):
            raise ValueError(f"gcd: finetune must be 'all', 'last_block' or 'none', got {self.finetune!r}")
        if not 0 <= float(self.sup_weight) <= 1:
            raise ValueError(f"gcd: sup_weight must be in [0, 1], got {self.sup_weight!r}")
        if int(self.epochs) < 0 or int(self.batch_size) < 2:
            raise ValueError(f"gcd: epochs must be >= 0 and batch_size >= 2, got {self.epochs}, {self.batch_size}")

    # -- stage 1: contrastive fine-tuning --------------------------------------------------------------
    def _train_backbone(self, session) -> nn.Module:
        ctx = self.ctx
        device = ctx.device
        labeled, unlabeled = session.labeled, session.unlabeled
        torch.manual_seed(ctx.derive_seed("gcd-model"))
        backbone = ctx.create_backbone()
        set_trainable(backbone, self.finetune)
        head = GCDProjectionHead(
            int(backbone.out_features), self.proj_hidden, self.proj_bottleneck, self.proj_out_dim, self.proj_layers
        )
        model = nn.Sequential(backbone, head).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.epochs == 0 or not params:
            return backbone.eval()
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        data, weights, n_draw = balanced_train_draw(labeled, unlabeled, self.batch_size, "gcd")
        selector = _TestOldSelector(self, session) if self.selection == "test_old" else None
        gen = torch.Generator().manual_seed(ctx.derive_seed("gcd-train"))
        lr_min = self.lr * self.lr_min_factor
        for epoch in ctx.progress_bar(range(self.epochs), desc=self.name, unit="ep"):
            model.train()
            lr = lr_min + (self.lr - lr_min) * (1 + math.cos(math.pi * epoch / self.epochs)) / 2
            for g in opt.param_groups:
                g["lr"] = lr
            order = torch.multinomial(weights, n_draw, replacement=True, generator=gen)
            finite = torch.ones((), dtype=torch.bool, device=device)
            for x, y in two_view_batches(
                data, order, self.batch_size, device=device, generator=gen, num_workers=ctx.num_workers
            ):
                with ctx.autocast():
                    u = model(x)
                loss, loss_u, loss_s = gcd_loss(
                    u.float(),
                    y,
                    y >= 0,
                    sup_weight=self.sup_weight,
                    infonce_temp=self.infonce_temp,
                    supcon_temp=self.supcon_temp,
                    contrast_unlabel_only=self.contrast_unlabel_only,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                finite &= torch.isfinite(loss.detach())
                ctx.log_train(
                    {"loss": loss.detach(), "loss_infonce": loss_u.detach(), "loss_supcon": loss_s.detach(),
                     "lr": lr, "epoch": epoch}
                )
            if not bool(finite):
                raise NonFiniteLossError(f"gcd: non-finite loss in epoch {epoch} (lr {lr:g})")
            if selector is not None:
                selector.observe(backbone, epoch)
        if selector is not None:
            selector.restore(backbone)
            self.selected_epoch = selector.best_epoch
        else:
            self.selected_epoch = self.epochs - 1
        return backbone.eval()

    # -- stage 2: ss-k-means ---------------------------------------------------------------------------
    def learn(self, session) -> None:
        self._check()
        self.encoder = self._train_backbone(session)
        x_l, y_l = self._encode(session.labeled)
        x_u, _ = self._encode(session.unlabeled)
        k_old = int(session.info.get("num_old", len(session.classes.known)))
        k = self._k(session, x_l, y_l, x_u)
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("gcd-ss_kmeans"))
        self.centroids, _ = ss_kmeans_gcd(
            x_l,
            y_l,
            x_u,
            k,
            k_old,
            n_init=int(self.kmeans_n_init),
            max_iter=int(self.kmeans_max_iter),
            tol=float(self.kmeans_tol),
            generator=gen,
        )

    def feature_cache_key(self) -> str | None:
        """No runner feature cache: GCD's two eval sets have different roots (train, test), so the cache
        would only add an encoding of each whole root (all 60k Fashion-MNIST images for a 3k subset)."""
        return None

    def run_info(self) -> dict:
        return {**super().run_info(), "selected_epoch": self.selected_epoch}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "num_clusters": self.num_clusters, "selected_epoch": self.selected_epoch}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.num_clusters = state.get("num_clusters")
        self.selected_epoch = state.get("selected_epoch")


class _TestOldSelector:
    """``selection: test_old`` (released code): after every epoch, k-means (scikit-learn, K clusters,
    ``random_state=0``, 10 restarts) on L2-normalised backbone features of the labelled test split the
    runner hands over (``ctx.selection_override``); the backbone of the epoch with the highest v1 Old
    accuracy (strictly better than the best so far, starting from 0) is kept."""

    def __init__(self, strategy: GCD, session):
        self.ctx = strategy.ctx
        self.data = self.ctx.selection_override
        if self.data is None:
            raise ValueError("gcd: selection 'test_old' needs the labelled test split (the runner provides it)")
        k = session.info.get("num_clusters")
        self.k = int(k) if k is not None else int(session.classes.num_classes)
        self.k_old = int(session.info.get("num_old", len(session.classes.known)))
        self.best, self.best_epoch, self.state = 0.0, None, None

    def observe(self, backbone: nn.Module, epoch: int) -> None:
        import copy

        from sklearn.cluster import KMeans

        from openworld.metrics.clustering import cluster_accuracy

        feats, y = self.ctx.extract_features(backbone, self.data)
        pred = KMeans(self.k, n_init=10, random_state=0).fit(l2_features(feats).cpu().numpy()).labels_
        old = cluster_accuracy(y.cpu().numpy(), pred, old_classes=range(self.k_old), variant="v1")["old"]
        if old > self.best:
            self.best, self.best_epoch = old, epoch
            self.state = copy.deepcopy(backbone.state_dict())

    def restore(self, backbone: nn.Module) -> None:
        if self.state is not None:
            backbone.load_state_dict(self.state)
