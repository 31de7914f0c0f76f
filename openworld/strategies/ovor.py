"""OVOR: OnePrompt with Virtual Outlier Regularization, and OnePrompt alone (``specs/cil-ovor.md`` §2).

A frozen ViT with one shared prefix prompt (blocks 0–4, :mod:`openworld.models.prompts`) and one
linear head over all classes with logit masking. Each task t has up to three phases over one Adam
optimiser (re-created per task, weight decay 0) and one cosine schedule (:func:`lr_factor`; with
``lr_offset: released`` the released one-epoch lag applies unless the task's first epoch is a VOR one):

1. warm-up (t > 0 only): head-only CE on detached features;
2. regular: CE over the current task's logits ``[s, e)`` with targets ``y − s`` (prompt + head);
3. VOR: per epoch, the task's features (training transform, no grad) → virtual outliers
   (:func:`generate_outliers`, modes ``official`` and ``npos``) → head-only
   CE + :func:`vor_loss` on the current task's logits.

Thresholds (τ_id, τ_ood): ``thresholds="fixed"`` uses ``thres_id``/``thres_ood`` (the official −15/−3 by
default); ``thresholds="pilot"`` calibrates them once, on task 0, as the card's §9 reduced-scale recipe
prescribes (:func:`pilot_thresholds`): after task 0's regular epochs (= OnePrompt with VOR off), τ_id =
median E over the task-0 training features and τ_ood = median E over the outliers of the chosen mode,
with τ_ood ≥ τ_id + 1; they are then frozen and kept in :meth:`OVOR.state_dict`.

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


def vor_loss(
    id_logits: Tensor,
    ood_logits: Tensor,
    thres_id: float = -15.0,
    thres_ood: float = -3.0,
    weight: float = 0.1,
    loss: Literal["huber", "mse"] = "huber",
) -> Tensor:
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


PILOT_MIN_GAP = 1.0  # card §9: enforce τ_ood ≥ τ_id + 1


def pilot_thresholds(id_logits: Tensor, ood_logits: Tensor, min_gap: float = PILOT_MIN_GAP) -> tuple[float, float]:
    """Card §9's pilot calibration: τ_id = median E(z^id), τ_ood = max(median E(z^ood), τ_id + ``min_gap``).

    The logits are the current task's slice (as in :func:`vor_loss`). The median is the middle value
    for an odd count and the mean of the two middle values for an even count (numpy's median); the gap
    is enforced by raising τ_ood, so the ID threshold stays at its median.
    """
    if len(id_logits) == 0 or len(ood_logits) == 0:
        raise ValueError(f"pilot_thresholds: needs ID and OOD logits, got {len(id_logits)} and {len(ood_logits)} rows")
    tau_id = float(torch.quantile(energy(id_logits.double()), 0.5))
    tau_ood = float(torch.quantile(energy(ood_logits.double()), 0.5))
    return tau_id, max(tau_ood, tau_id + float(min_gap))


def hinge_activity(id_logits: Tensor, ood_logits: Tensor, thres_id: float, thres_ood: float) -> tuple[Tensor, Tensor]:
    """Fractions of active VOR hinges: E(z^id) > τ_id (ID term > 0) and E(z^ood) < τ_ood (OOD term > 0)."""
    return ((energy(id_logits) > thres_id).float().mean(), (energy(ood_logits) < thres_ood).float().mean())


# --------------------------------------------------------------------------------------------------
# §2.7 — LR schedule
# --------------------------------------------------------------------------------------------------
def lr_factor(
    epoch: int,
    total_epochs: int,
    offset: Literal["released", "nominal"] = "released",
    *,
    first_epoch_vor: bool = False,
) -> float:
    """The per-epoch LR factor: g(k) = cos(99π·k / (200·(K−1))) (card §2.7), at k = e (``nominal``) or as
    the released scheduler steps it (``released``).

    The released loop (``learners/default.py``, CODA-Prompt's scheduler class) starts the counter one step
    behind and steps it at the start of every regular/warm-up epoch with counter e > 0 and of **every**
    VOR epoch, e = 0 included. So:

    * the task's first epoch is a regular or warm-up one (``first_epoch_vor=False``, every released
      config): k = max(e − 1, 0), the card's one-epoch lag (epochs 0 and 1 share lr₀);
    * the task's first epoch is a VOR one (``first_epoch_vor=True``: E = (E_w, E_r, E_v) with E_r = 0, and
      E_w = 0 or task 0, whose warm-up is skipped): every epoch steps, k = e, no lag. E.g. E = (0, 0, 3):
      factors 1, 0.712639, 0.015707, not 1, 1, 0.712639.

    ``first_epoch_vor`` does not change ``nominal``. K = 1 gives 1 (the released formula divides by 0).
    """
    if offset not in ("released", "nominal"):
        raise ValueError(f"lr_offset must be 'released' or 'nominal', got {offset!r}")
    K = int(total_epochs)
    if K < 1 or not 0 <= int(epoch) < K:
        raise ValueError(f"lr_factor: epoch {epoch} outside 0…{K - 1}")
    lag = offset == "released" and not first_epoch_vor
    k = max(int(epoch) - 1, 0) if lag else int(epoch)
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
        raise OVORConfigError(
            f"virtual outliers: k-NN K = {k} exceeds the task's {n} training features; "
            "lower knn_k or use more samples per task"
        )
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

    ``thresholds``: ``"fixed"`` uses ``thres_id``/``thres_ood`` as given; ``"pilot"`` ignores them and
    calibrates (τ_id, τ_ood) on task 0 (card §9, :func:`pilot_thresholds`) from the model after task 0's
    regular epochs. With ``epochs_regular: 0`` a separate pilot of ``pilot_epochs`` regular epochs runs on
    a throw-away copy of the prompt and head (its own Adam and schedule), which is then discarded.
    ``pilot_epochs`` is used only then.
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
        thresholds: Literal["fixed", "pilot"] = "fixed",
        pilot_epochs: int = 8,
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
        self.thresholds = thresholds
        self.pilot_epochs = pilot_epochs
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
        self.encoder = PromptedViT(
            ctx.create_backbone(), self.g_layers, self.g_length, self.e_layers, self.e_length
        ).to(ctx.device)
        self.head = nn.Linear(self.encoder.out_features, int(ctx.scenario["num_classes"])).to(ctx.device)
        self.num_seen = 0
        self._version = 0
        self.diagnostics: list[dict] = []
        # (τ_id, τ_ood) in use: the fixed values, or None until the task-0 pilot has run
        self.tau: tuple[float, float] | None = (
            None if self.thresholds == "pilot" else (float(self.thres_id), float(self.thres_ood))
        )
        self.pilot: dict | None = None

    def setup(self, ctx) -> None:
        super().setup(ctx)
        for name in ("epochs_warmup", "epochs_regular", "epochs_vor"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{self.name}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.epochs_warmup + self.epochs_regular + self.epochs_vor < 1:
            raise ValueError(f"{self.name}: at least one epoch per task is required")
        if self.thresholds not in ("fixed", "pilot"):
            raise ValueError(f"{self.name}.thresholds: must be 'fixed' or 'pilot', got {self.thresholds!r}")
        if self.thresholds == "fixed":
            for name in ("thres_id", "thres_ood"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(
                        f"{self.name}.{name}: must be a finite number with thresholds: fixed, got {value!r} "
                        "(for calibrated thresholds set thresholds: pilot)"
                    )
        if isinstance(self.pilot_epochs, bool) or not isinstance(self.pilot_epochs, int) or self.pilot_epochs < 1:
            raise ValueError(f"{self.name}.pilot_epochs: must be an integer >= 1, got {self.pilot_epochs!r}")
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
        if self.tau is None and self.epochs_vor > 0 and self.epochs_regular == 0:
            self._separate_pilot(data, s, e)
        # released lag only when the task starts with a regular/warm-up epoch (lr_factor, card §2.7)
        first_vor = bool(phases) and phases[0] == "vor"
        for epoch in bar:
            phase = phases[epoch]
            if phase == "vor" and self.tau is None:
                self._calibrate(data, s, e)
            lr = self.lr * lr_factor(epoch, K, self.lr_offset, first_epoch_vor=first_vor)
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

    def _ce_epoch(self, data, s, e, opt, gen, epoch, lr, detach: bool, log: bool = True) -> None:
        ctx = self.ctx
        finite = torch.ones((), dtype=torch.bool, device=ctx.device)
        for xb, yb in batches(
            data,
            self.batch_size,
            train=True,
            shuffle=True,
            device=ctx.device,
            generator=gen,
            num_workers=ctx.num_workers,
        ):
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
            if log:
                ctx.log_train({"loss": loss.detach(), "lr": lr, "epoch": epoch, "session": ctx.session_index})
        self._check_finite(finite, "CE" if log else "pilot CE", epoch, lr)

    @torch.no_grad()
    def _task_features(self, data, gen) -> tuple[Tensor, Tensor]:
        """h_P(x) with the TRAIN transform for the task's images, stacked in class order (card §2.4)."""
        ctx = self.ctx
        feats, ys = [], []
        for xb, yb in batches(
            data,
            max(self.batch_size, ctx.eval_batch_size),
            train=True,
            device=ctx.device,
            generator=gen,
            num_workers=ctx.num_workers,
        ):
            feats.append(self.encoder(xb).float())
            ys.append(yb)
        f, y = torch.cat(feats), torch.cat(ys)
        order = torch.sort(y, stable=True).indices
        return f[order], y[order]

    def _log_now(self, values: dict[str, float]) -> None:
        """Write ``train/<name>`` scalars now, at the current step (per-epoch/per-task diagnostics, which
        :meth:`RunContext.log_train`'s every-``log_every``-steps sampling would mostly drop)."""
        self.ctx.log_scalars(values)

    def _outliers(self, feats: Tensor, num_classes: int, gen: torch.Generator) -> Tensor:
        return generate_outliers(
            feats,
            num_classes,
            mode=self.outlier_mode,
            k=self.knn_k,
            sample_from=self.sample_from,
            select=self.select,
            sigma=self.sigma,
            num_per_class=self.num_per_class,
            score_space=self.npos_score_space,
            generator=gen,
        )

    def _rho(self, feats: Tensor) -> float:
        """ρ = σ√D / median‖h‖ (card §9)."""
        median_norm = float(feats.norm(dim=1).median())
        return float(self.sigma * math.sqrt(feats.shape[1]) / max(median_norm, 1e-12))

    @torch.no_grad()
    def _calibrate(self, data, s: int, e: int) -> None:
        """Card §9 pilot: E over the task's training features (train transform) and over one draw of the
        chosen mode's outliers, from the current model; τ = medians with τ_ood ≥ τ_id + 1. Uses its own
        generator, so the training stream's randomness is the same as with fixed thresholds."""
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("ovor", "pilot"))
        feats, _ = self._task_features(data, gen)
        outliers = self._outliers(feats, e - s, gen)
        z_id, z_ood = self._logits(feats, s, e), self._logits(outliers, s, e)
        tau_id, tau_ood = pilot_thresholds(z_id, z_ood)
        e_id, e_ood = energy(z_id.double()), energy(z_ood.double())
        self.tau = (tau_id, tau_ood)
        self.pilot = {
            "session": self.ctx.session_index,
            "tau_id": tau_id,
            "tau_ood": tau_ood,
            "median_e_id": float(torch.quantile(e_id, 0.5)),
            "median_e_ood": float(torch.quantile(e_ood, 0.5)),
            "gap_enforced": tau_ood > float(torch.quantile(e_ood, 0.5)),
            "num_id": len(feats),
            "num_ood": len(outliers),
            "rho": self._rho(feats),
            "outlier_mode": self.outlier_mode,
        }
        self._log_now({"vor/tau_id": tau_id, "vor/tau_ood": tau_ood, "vor/pilot_rho": self.pilot["rho"]})

    def _separate_pilot(self, data, s: int, e: int) -> None:
        """No regular epochs in task 0: ``pilot_epochs`` regular epochs on a throw-away copy of the prompt
        and head (own Adam, own schedule over ``pilot_epochs``, own generator), calibrate, restore."""
        prompt0 = {k: v.detach().clone() for k, v in self.encoder.prompt.state_dict().items()}
        head0 = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        params = self.encoder.prompt_parameters() + list(self.head.parameters())
        opt = torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("ovor", "pilot-train"))
        try:
            for epoch in range(self.pilot_epochs):
                lr = self.lr * lr_factor(epoch, self.pilot_epochs, self.lr_offset)
                for group in opt.param_groups:
                    group["lr"] = lr
                self._ce_epoch(data, s, e, opt, gen, epoch, lr, detach=False, log=False)
            self._calibrate(data, s, e)
        finally:
            self.encoder.prompt.load_state_dict(prompt0)
            self.head.load_state_dict(head0)
            for p in params:
                p.grad = None
        self.pilot["separate_epochs"] = self.pilot_epochs

    def _vor_epoch(self, data, s, e, opt, gen, epoch, lr) -> None:
        ctx = self.ctx
        feats, ys = self._task_features(data, gen)
        outliers = self._outliers(feats, e - s, gen)
        tau_id, tau_ood = self.tau
        n = len(feats)
        b_ood = ood_batch_size(n, len(outliers), self.batch_size)
        if self.ood_shuffle:
            outliers = outliers[torch.randperm(len(outliers), generator=gen).to(outliers.device)]
        perm = torch.randperm(n, generator=gen).to(feats.device)
        finite = torch.ones((), dtype=torch.bool, device=ctx.device)
        active_id = torch.zeros((), device=ctx.device)
        active_ood = torch.zeros((), device=ctx.device)
        vor_sum = torch.zeros((), device=ctx.device)
        for step, start in enumerate(range(0, n, self.batch_size)):
            idx = perm[start : start + self.batch_size]
            ood = outliers[step * b_ood : (step + 1) * b_ood]
            z_id = self._logits(feats[idx], s, e)
            z_ood = self._logits(ood, s, e)
            l_vor = vor_loss(z_id, z_ood, tau_id, tau_ood, self.vor_weight, self.vor_loss)
            loss = F.cross_entropy(z_id, ys[idx] - s) + l_vor
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                a_id, a_ood = hinge_activity(z_id, z_ood, tau_id, tau_ood)
                active_id += a_id
                active_ood += a_ood
                vor_sum += l_vor.detach()
            finite &= torch.isfinite(loss.detach())
            ctx.log_train({"loss": loss.detach(), "lr": lr, "epoch": epoch, "session": ctx.session_index})
        self._check_finite(finite, "VOR", epoch, lr)
        steps = math.ceil(n / self.batch_size)
        record = {
            "session": ctx.session_index,
            "epoch": epoch,
            "num_outliers": len(outliers),
            "b_ood": b_ood,
            "tau_id": tau_id,
            "tau_ood": tau_ood,
            "active_id": float(active_id) / steps,
            "active_ood": float(active_ood) / steps,
            "vor_loss": float(vor_sum) / steps,
            "rho": self._rho(feats),
        }
        self.diagnostics.append(record)
        self._log_now({f"vor/{key}": record[key] for key in ("active_id", "active_ood", "vor_loss", "rho")})

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

    def run_info(self) -> dict:
        """The VOR thresholds in use (pilot-calibrated or fixed), the pilot's medians and ρ, and the
        last VOR epoch's hinge activity: stored in ``results.json`` → ``sessions[i].strategy_info``."""
        if self.epochs_vor == 0:
            return {}
        info = {"tau_id": None if self.tau is None else float(self.tau[0]),
                "tau_ood": None if self.tau is None else float(self.tau[1]), "thresholds": self.thresholds}
        if self.pilot is not None:
            info["pilot"] = dict(self.pilot)
        if self.diagnostics:
            info["last_vor_epoch"] = dict(self.diagnostics[-1])
        return info

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "prompt": {k: v.detach().cpu().clone() for k, v in self.encoder.prompt.state_dict().items()},
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            "num_seen": self.num_seen,
            "version": self._version,
            # the thresholds in use (pilot: frozen after task 0) and the VOR diagnostics, so --resume
            # reproduces the run and the checkpoints record what was used (plain floats / dicts)
            "tau": None if self.tau is None else [float(self.tau[0]), float(self.tau[1])],
            "pilot": None if self.pilot is None else dict(self.pilot),
            "diagnostics": [dict(d) for d in self.diagnostics],
        }

    def load_state_dict(self, state: dict) -> None:
        self.encoder.prompt.load_state_dict(state["prompt"])
        self.head.load_state_dict(state["head"])
        self.num_seen = int(state["num_seen"])
        self._version = int(state.get("version", 0))
        if "tau" in state:  # older checkpoints carry no thresholds: keep the constructor's
            tau = state["tau"]
            self.tau = None if tau is None else (float(tau[0]), float(tau[1]))
            self.pilot = None if state.get("pilot") is None else dict(state["pilot"])
            self.diagnostics = [dict(d) for d in state.get("diagnostics", [])]
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
        super().__init__(
            epochs_warmup=epochs_warmup,
            epochs_regular=epochs_regular,
            epochs_vor=0,
            lr=lr,
            batch_size=batch_size,
            lr_offset=lr_offset,
            g_layers=g_layers,
            g_length=g_length,
            e_layers=e_layers,
            e_length=e_length,
        )

    def get_params(self) -> dict:
        keys = (
            "epochs_warmup",
            "epochs_regular",
            "lr",
            "batch_size",
            "lr_offset",
            "g_layers",
            "g_length",
            "e_layers",
            "e_length",
        )
        return {k: getattr(self, k) for k in keys}
