"""OVOR: OnePrompt with Virtual Outlier Regularization, and OnePrompt alone (``specs/cil-ovor.md`` §2).

A frozen ViT with one shared prefix prompt (blocks 0–4, :mod:`openworld.models.prompts`) and one
linear head over all classes with logit masking. Each task t has up to three phases over one Adam
optimiser (re-created per task, weight decay 0) and one cosine schedule (:func:`lr_factor`):

1. warm-up (t > 0 only): head-only CE on detached features;
2. regular: CE over the current task's logits ``[s, e)`` with targets ``y − s`` (prompt + head);
3. VOR: per epoch, the task's features (training transform, no grad) → virtual outliers
   (:func:`generate_outliers`, modes ``official`` and ``npos``) → head-only
   CE + :func:`vor_loss` on the current task's logits.

``oneprompt`` is the same model with the VOR phase off. Inference: argmax over the seen classes.
Every fidelity switch of the card §4 is a constructor parameter and so goes into results/hparams.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import batches
from openworld.models.prompts import E_LAYERS, G_LAYERS, PromptedViT
from openworld.registry import register_strategy
from openworld.strategies.base import NonFiniteLossError, Prediction, Strategy


class OVORConfigError(ValueError):
    """An OVOR setting that cannot work with the data (e.g. k-NN K larger than the task's samples)."""


# --------------------------------------------------------------------------------------------------
# §2.5 — VOR loss
# --------------------------------------------------------------------------------------------------
def energy(logits: Tensor) -> Tensor:
    """E(z) = −logsumexp_c z_c per row (over the columns given: the current task's logits)."""
    return -torch.logsumexp(logits, dim=1)


def vor_loss(id_logits: Tensor, ood_logits: Tensor, thres_id: float = -15.0, thres_ood: float = -3.0,
             weight: float = 0.1, loss: Literal["huber", "mse"] = "huber") -> Tensor:
    """λ·[mean_i ρ(max(0, E(z_i^id) − τ_id)) + mean_k ρ(max(0, τ_ood − E(z_k^ood)))], ρ = Huber δ=1 (card §2.5).

    ``loss="mse"``: ρ(r) = r² (the card's ``vor.loss: mse`` option).
    """
    r_id = F.relu(energy(id_logits) - thres_id)
    r_ood = F.relu(thres_ood - energy(ood_logits))
    if loss == "huber":
        l_id = F.huber_loss(r_id, torch.zeros_like(r_id), reduction="mean", delta=1.0)
        l_ood = F.huber_loss(r_ood, torch.zeros_like(r_ood), reduction="mean", delta=1.0)
    elif loss == "mse":
        l_id, l_ood = (r_id**2).mean(), (r_ood**2).mean()
    else:
        raise ValueError(f"vor_loss: loss must be 'huber' or 'mse', got {loss!r}")
    return weight * (l_id + l_ood)


# --------------------------------------------------------------------------------------------------
# §2.7 — LR schedule
# --------------------------------------------------------------------------------------------------
def lr_factor(epoch: int, total_epochs: int, offset: Literal["released", "nominal"] = "released") -> float:
    """The per-epoch LR factor: g(k) = cos(99π·k / (200·(K−1))), at k = e (``nominal``) or
    k = max(e − 1, 0) (``released``: the released scheduler's one-epoch lag)."""
    if offset not in ("released", "nominal"):
        raise ValueError(f"lr_offset must be 'released' or 'nominal', got {offset!r}")
    K = int(total_epochs)
    if K < 1 or not 0 <= int(epoch) < K:
        raise ValueError(f"lr_factor: epoch {epoch} outside 0…{K - 1}")
    k = max(int(epoch) - 1, 0) if offset == "released" else int(epoch)
    if K == 1:
        return 1.0
    return math.cos(99 * math.pi * k / (200 * (K - 1)))


# --------------------------------------------------------------------------------------------------
# §2.6 — virtual outliers
# --------------------------------------------------------------------------------------------------
def kth_sq_distance(queries: Tensor, index: Tensor, k: int, chunk: int = 4096) -> Tensor:
    """K-th smallest squared Euclidean distance from each query row to the rows of ``index`` (float64,
    brute force: the equivalent of a flat L2 index; a row in the index is its own 1st neighbour)."""
    q64, u64 = queries.double(), index.double()
    u_sq = (u64 * u64).sum(1)
    out = []
    for start in range(0, len(q64), chunk):
        q = q64[start : start + chunk]
        d = ((q * q).sum(1, keepdim=True) + u_sq[None, :] - 2.0 * q @ u64.T).clamp_min_(0.0)
        out.append(torch.topk(d, k, dim=1, largest=False).values[:, -1])
    return torch.cat(out) if out else q64.new_zeros(0)


def num_outliers(num_select: int, sample_from: int, num_per_class: int, num_classes: int) -> int:
    """M = min(s'·S, p·m)."""
    return min(int(num_select) * int(sample_from), int(num_per_class) * int(num_classes))


def generate_outliers(
    features: Tensor,
    num_classes: int,
    *,
    mode: Literal["official", "npos"] = "official",
    k: int = 50,
    sample_from: int = 600,
    select: int = 50,
    sigma: float = 0.1,
    num_per_class: int = 40,
    score_space: Literal["normalized", "raw"] = "normalized",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Virtual outliers of one task's features X [n, D] (stacked in class order), card §2.6.

    ``noise`` (S×D) replaces the draws of N(0, I) (for tests); otherwise they come from ``generator``
    (on the CPU, then moved to X's device). Returns the M kept candidates, unnormalised, in
    descending score order.
    """
    if mode not in ("official", "npos"):
        raise ValueError(f"outlier_mode must be 'official' or 'npos', got {mode!r}")
    if score_space not in ("normalized", "raw"):
        raise ValueError(f"npos_score_space must be 'normalized' or 'raw', got {score_space!r}")
    X = features.float()
    n, D = X.shape
    if k > n:
        raise OVORConfigError(f"virtual outliers: k-NN K = {k} exceeds the task's {n} training features; "
                              "lower knn_k or use more samples per task")
    Z = noise if noise is not None else torch.randn(int(sample_from), D, generator=generator)
    Z = Z.to(X.device, X.dtype)
    S = len(Z)
    U = F.normalize(X, dim=1)
    s = min(int(select), n)
    r = kth_sq_distance(U, U, k)
    boundary = torch.topk(r, s).indices
    if mode == "official":
        cand = (sigma * Z).repeat(s, 1)
        query = cand
    else:
        cand = (X[boundary][:, None, :] + sigma * Z[None, :, :]).reshape(s * S, D)
        query = F.normalize(cand, dim=1) if score_space == "normalized" else cand
    scores = kth_sq_distance(query, U, k)
    M = min(s * S, int(num_per_class) * int(num_classes))
    keep = torch.topk(scores, M).indices
    return cand[keep]


def ood_batch_size(n: int, num_outliers_: int, id_batch_size: int = 128) -> int:
    """b_ood = floor(|O| / ceil(n / b_id)); 0 is a configuration error (card V6)."""
    n_b = math.ceil(int(n) / int(id_batch_size))
    b = int(num_outliers_) // max(n_b, 1)
    if b == 0:
        raise OVORConfigError(
            f"VOR: OOD batch size is 0 (n = {n} task features, M = {num_outliers_} outliers, b_id = {id_batch_size}: "
            f"{n_b} ID batches for {num_outliers_} outliers); raise num_per_class or the batch size"
        )
    return b


# --------------------------------------------------------------------------------------------------
# Strategy
# --------------------------------------------------------------------------------------------------
@register_strategy("ovor")
class OVOR(Strategy):
    """OVOR (card §2): OnePrompt prefix tuning + a masked linear head + the VOR phase.

    Epochs are the card's triple (``epochs_warmup``, ``epochs_regular``, ``epochs_vor``);
    ``epochs_vor: 0`` is OnePrompt. All defaults are the card's CIFAR-100 values.
    """

    supports = frozenset({"cil"})

    def __init__(
        self,
        epochs_warmup: int = 0,
        epochs_regular: int = 16,
        epochs_vor: int = 4,
        lr: float = 1.0e-3,
        batch_size: int = 128,
        lr_offset: Literal["released", "nominal"] = "released",
        vor_weight: float = 0.1,
        thres_id: float = -15.0,
        thres_ood: float = -3.0,
        vor_loss: Literal["huber", "mse"] = "huber",
        outlier_mode: Literal["official", "npos"] = "official",
        npos_score_space: Literal["normalized", "raw"] = "normalized",
        knn_k: int = 50,
        sample_from: int = 600,
        select: int = 50,
        sigma: float = 0.1,
        num_per_class: int = 40,
        ood_shuffle: bool = False,
        g_layers: tuple[int, ...] = G_LAYERS,
        g_length: int = 10,
        e_layers: tuple[int, ...] = E_LAYERS,
        e_length: int = 40,
    ):
        self.epochs_warmup = epochs_warmup
        self.epochs_regular = epochs_regular
        self.epochs_vor = epochs_vor
        self.lr = lr
        self.batch_size = batch_size
        self.lr_offset = lr_offset
        self.vor_weight = vor_weight
        self.thres_id = thres_id
        self.thres_ood = thres_ood
        self.vor_loss = vor_loss
        self.outlier_mode = outlier_mode
        self.npos_score_space = npos_score_space
        self.knn_k = knn_k
        self.sample_from = sample_from
        self.select = select
        self.sigma = sigma
        self.num_per_class = num_per_class
        self.ood_shuffle = ood_shuffle
        self.g_layers = tuple(g_layers)
        self.g_length = g_length
        self.e_layers = tuple(e_layers)
        self.e_length = e_length

    # -- model -----------------------------------------------------------------------------------
    def _build(self) -> None:
        ctx = self.ctx
        torch.manual_seed(ctx.derive_seed("ovor", "init"))
        self.encoder = PromptedViT(ctx.create_backbone(), self.g_layers, self.g_length, self.e_layers,
                                   self.e_length).to(ctx.device)
        self.head = nn.Linear(self.encoder.out_features, int(ctx.scenario["num_classes"])).to(ctx.device)
        self.num_seen = 0
        self._version = 0
        self.diagnostics: list[dict] = []

    def setup(self, ctx) -> None:
        super().setup(ctx)
        for name in ("epochs_warmup", "epochs_regular", "epochs_vor"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{self.name}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.epochs_warmup + self.epochs_regular + self.epochs_vor < 1:
            raise ValueError(f"{self.name}: at least one epoch per task is required")
        self._build()

    def _logits(self, feats: Tensor, s: int, e: int) -> Tensor:
        return F.linear(feats, self.head.weight[s:e], self.head.bias[s:e])

    # -- training --------------------------------------------------------------------------------
    def learn(self, session) -> None:
        ctx = self.ctx
        new = list(session.classes.new)
        s, e = new[0], new[-1] + 1
        if new != list(range(s, e)) or list(session.classes.seen) != list(range(e)):
            raise ValueError(f"{self.name}: needs contiguous task labels (task {session.index}: {new[:10]}…)")
        data = session.labeled
        self.encoder.train()
        self.head.train()
        params = self.encoder.prompt_parameters() + list(self.head.parameters())
        opt = torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        K = self.epochs_warmup + self.epochs_regular + self.epochs_vor
        gen = torch.Generator().manual_seed(int(ctx.seed))
        phases = (["warmup"] * self.epochs_warmup if session.index > 0 else []) + ["regular"] * self.epochs_regular
        phases += ["vor"] * self.epochs_vor
        bar = ctx.progress_bar(range(len(phases)), desc=f"{self.name} task {session.index}", unit="ep")
        for epoch in bar:
            phase = phases[epoch]
            lr = self.lr * lr_factor(epoch, K, self.lr_offset)
            for group in opt.param_groups:
                group["lr"] = lr
            if phase == "vor":
                self._vor_epoch(data, s, e, opt, gen, epoch, lr)
            else:
                self._ce_epoch(data, s, e, opt, gen, epoch, lr, detach=phase == "warmup")
        self.num_seen = e
        self._version += 1
        self.encoder.eval()
        self.head.eval()

    def _check_finite(self, finite: Tensor, what: str, epoch: int, lr: float) -> None:
        if not bool(finite):
            raise NonFiniteLossError(f"{self.name}: non-finite {what} loss in epoch {epoch} (lr {lr:g})")

    def _ce_epoch(self, data, s, e, opt, gen, epoch, lr, detach: bool) -> None:
        ctx = self.ctx
        finite = torch.ones((), dtype=torch.bool, device=ctx.device)
        for xb, yb in batches(data, self.batch_size, train=True, shuffle=True, device=ctx.device, generator=gen,
                              num_workers=ctx.num_workers):
            if detach:
                with torch.no_grad():
                    feats = self.encoder(xb)
            else:
                feats = self.encoder(xb)
            loss = F.cross_entropy(self._logits(feats, s, e), yb - s)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            finite &= torch.isfinite(loss.detach())
            ctx.log_train({"loss": loss.detach(), "lr": lr, "epoch": epoch, "session": ctx.session_index})
        self._check_finite(finite, "CE", epoch, lr)

    @torch.no_grad()
    def _task_features(self, data, gen) -> tuple[Tensor, Tensor]:
        """h_P(x) with the TRAIN transform for the task's images, stacked in class order (card §2.4)."""
        ctx = self.ctx
        feats, ys = [], []
        for xb, yb in batches(data, max(self.batch_size, ctx.eval_batch_size), train=True, device=ctx.device,
                              generator=gen, num_workers=ctx.num_workers):
            feats.append(self.encoder(xb).float())
            ys.append(yb)
        f, y = torch.cat(feats), torch.cat(ys)
        order = torch.sort(y, stable=True).indices
        return f[order], y[order]

    def _vor_epoch(self, data, s, e, opt, gen, epoch, lr) -> None:
        ctx = self.ctx
        feats, ys = self._task_features(data, gen)
        outliers = generate_outliers(
            feats, e - s, mode=self.outlier_mode, k=self.knn_k, sample_from=self.sample_from, select=self.select,
            sigma=self.sigma, num_per_class=self.num_per_class, score_space=self.npos_score_space, generator=gen,
        )
        n = len(feats)
        b_ood = ood_batch_size(n, len(outliers), self.batch_size)
        if self.ood_shuffle:
            outliers = outliers[torch.randperm(len(outliers), generator=gen).to(outliers.device)]
        perm = torch.randperm(n, generator=gen).to(feats.device)
        finite = torch.ones((), dtype=torch.bool, device=ctx.device)
        active_id = torch.zeros((), device=ctx.device)
        active_ood = torch.zeros((), device=ctx.device)
        for step, start in enumerate(range(0, n, self.batch_size)):
            idx = perm[start : start + self.batch_size]
            ood = outliers[step * b_ood : (step + 1) * b_ood]
            z_id = self._logits(feats[idx], s, e)
            z_ood = self._logits(ood, s, e)
            loss = F.cross_entropy(z_id, ys[idx] - s) + vor_loss(
                z_id, z_ood, self.thres_id, self.thres_ood, self.vor_weight, self.vor_loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                active_id += (energy(z_id) > self.thres_id).float().mean()
                active_ood += (energy(z_ood) < self.thres_ood).float().mean()
            finite &= torch.isfinite(loss.detach())
            ctx.log_train({"loss": loss.detach(), "lr": lr, "epoch": epoch, "session": ctx.session_index})
        self._check_finite(finite, "VOR", epoch, lr)
        steps = math.ceil(n / self.batch_size)
        with torch.no_grad():
            median_norm = feats.norm(dim=1).median()
        record = {
            "session": ctx.session_index, "epoch": epoch, "num_outliers": len(outliers), "b_ood": b_ood,
            "active_id": float(active_id) / steps, "active_ood": float(active_ood) / steps,
            "rho": float(self.sigma * math.sqrt(feats.shape[1]) / max(float(median_norm), 1e-12)),
        }
        self.diagnostics.append(record)
        for key in ("active_id", "active_ood", "rho"):
            ctx.log_train({f"vor/{key}": record[key]})

    # -- inference -------------------------------------------------------------------------------
    def feature_cache_key(self) -> str | None:
        return f"{self.name}:{id(self)}:{self._version}"

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        self.encoder.eval()
        return self.encoder(x).float()

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Prediction:
        return Prediction(logits=self._logits(z, 0, self.num_seen).float())

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        return self.predict_features(self.encode(x))

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "prompt": {k: v.detach().cpu().clone() for k, v in self.encoder.prompt.state_dict().items()},
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            "num_seen": self.num_seen,
            "version": self._version,
        }

    def load_state_dict(self, state: dict) -> None:
        self.encoder.prompt.load_state_dict(state["prompt"])
        self.head.load_state_dict(state["head"])
        self.num_seen = int(state["num_seen"])
        self._version = int(state.get("version", 0))
        self.encoder.eval()
        self.head.eval()


@register_strategy("oneprompt")
class OnePromptStrategy(OVOR):
    """OnePrompt (card §2.8): OVOR's model and training without the VOR phase (E = (0, E_r, 0))."""

    supports = frozenset({"cil"})

    def __init__(
        self,
        epochs_warmup: int = 0,
        epochs_regular: int = 20,
        lr: float = 1.0e-3,
        batch_size: int = 128,
        lr_offset: Literal["released", "nominal"] = "released",
        g_layers: tuple[int, ...] = G_LAYERS,
        g_length: int = 10,
        e_layers: tuple[int, ...] = E_LAYERS,
        e_length: int = 40,
    ):
        super().__init__(epochs_warmup=epochs_warmup, epochs_regular=epochs_regular, epochs_vor=0, lr=lr,
                         batch_size=batch_size, lr_offset=lr_offset, g_layers=g_layers, g_length=g_length,
                         e_layers=e_layers, e_length=e_length)

    def get_params(self) -> dict:
        keys = ("epochs_warmup", "epochs_regular", "lr", "batch_size", "lr_offset", "g_layers", "g_length",
                "e_layers", "e_length")
        return {k: getattr(self, k) for k in keys}
