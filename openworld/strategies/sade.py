"""SADE — self-supervised aggregation of diverse experts (card ``long-tail-sade-rcal`` §2.1–2.4).

Three experts on a shared trunk (a multi-expert backbone from :mod:`openworld.models.experts`), each
with a cosine head ``v_k = s·cos(φ_k(x), w_k)`` (s = 30), trained jointly with

* ``L1 = CE(v_1, y)`` (forward / long-tailed expert),
* ``L2 = CE(v_2 + log(π+ε), y)`` (Balanced Softmax: uniform expert),
* ``L3 = CE(v_3 + log(π+ε) − λ·log(π̄+ε), y)`` (inverse-softmax: backward expert),

with ε = 1e-9, π the observed training prior and π̄ the **sort-based** inverse prior
(:func:`inverse_prior`). Validation (checkpoint ``val``) uses the mean of the raw expert logits.

Test time (``transductive = True``): before each evaluation set the runner calls :meth:`SADE.adapt`
with the set's inputs (labels hidden). With ``tta="transductive"`` (default) the model is frozen in
eval mode and only ``w ∈ R³`` (α = softmax(w), from w = (⅓, ⅓, ⅓)) is trained by SGD (momentum 0.9,
Nesterov, the training weight decay) to maximise the cosine similarity of the predictions
``softmax(Σ_k α_k v_k)`` on two strong views of each image (batch 128, shuffled), for at most
``tta_epochs`` epochs; after each epoch α is rounded to 2 decimals and adaptation **stops** if any
rounded α_k < 0.05 (:func:`should_stop`). ``tta="off"`` keeps α uniform (the expert average).
``tta="split"`` adapts the same way on a seeded 50 % of each set and is scored on the other 50 %
(the runner draws the halves, :meth:`Strategy.adapt_fraction`): the cost of not being transductive.
Predictions are ``Σ_k α_k v_k`` with the test transform. The learned α and the epochs
run per adapted set are kept in ``state_dict()["tta_log"]``.

Strong views (§2.4): RandomCrop (pad 4), ColorJitter(.4, .4, .4, .1) with p = .8 (brightness,
contrast, saturation, hue applied in that fixed order — torchvision draws a random order), Grayscale
p = .2, Gaussian blur σ ∈ [.1, 2] with p = .2 (13-tap separable kernel, reflect padding — MoCo used
PIL's blur), horizontal flip. All per-sample and batched, random numbers from a CPU generator.
Vector inputs (card §9 R1) get Gaussian feature-noise views instead (``vector_view_noise``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.transforms import random_crop, random_hflip
from openworld.data.views import TensorData, batches
from openworld.models import experts as _experts  # noqa: F401  (registers the multi-expert backbones)
from openworld.models.experts import NormedLinear
from openworld.registry import register_strategy
from openworld.strategies.base import Prediction, Strategy
from openworld.strategies.long_tail_baselines import (
    EPS,
    LTSchedule,
    balanced_accuracy_of,
    check_checkpoint,
    fit,
    prior_from_counts,
    selection_data,
)

INVERSE_PRIOR_MODES = ("sort_stable", "sort_unstable", "flip")
TTA_MODES = ("transductive", "split", "off")


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------
def inverse_prior(prior, mode: str = "sort_stable") -> Tensor:
    """Rank-reversed prior ``π̄_c = a[C−1−r_c]``: ``a`` = π sorted ascending (stably: ties keep index
    order), ``r_c`` = the rank of class c. ``mode="sort_unstable"`` uses torch's default sort,
    ``"flip"`` is ``π.flip(0)`` (differs from the card's rule when counts tie)."""
    p = torch.as_tensor(prior)
    if p.dim() != 1:
        raise ValueError(f"inverse_prior: a 1-D prior is required, got shape {tuple(p.shape)}")
    if mode == "flip":
        return p.flip(0)
    if mode not in INVERSE_PRIOR_MODES:
        raise ValueError(f"inverse_prior: mode must be one of {', '.join(INVERSE_PRIOR_MODES)}; got {mode!r}")
    a, order = torch.sort(p, stable=mode == "sort_stable")
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(p), device=p.device)
    return a[len(p) - 1 - rank]


def expert_offsets(prior: Tensor, tau: float = 2.0, inverse_mode: str = "sort_stable") -> Tensor:
    """The additive loss offsets ``[3, C]``: 0; ``log(π+ε)``; ``log(π+ε) − λ·log(π̄+ε)``."""
    log_p = torch.log(prior + EPS)
    log_inv = torch.log(inverse_prior(prior, inverse_mode) + EPS)
    return torch.stack([torch.zeros_like(log_p), log_p, log_p - tau * log_inv])


def sade_losses(logits: Tensor, y: Tensor, offsets: Tensor) -> Tensor:
    """The three expert losses ``[3]`` for expert logits ``[B, 3, C]`` and offsets ``[3, C]``."""
    z = logits + offsets.unsqueeze(0)
    b, e, c = z.shape
    per = F.cross_entropy(z.reshape(b * e, c), y.repeat_interleave(e), reduction="none").view(b, e)
    return per.mean(0)


def aggregation_loss(w: Tensor, view1: Tensor, view2: Tensor) -> Tensor:
    """``−mean_b cos(softmax(Σ_k α_k v_k(x¹)), softmax(Σ_k α_k v_k(x²)))`` with α = softmax(w), eps 1e-6;
    views are expert logits ``[B, E, C]``."""
    alpha = torch.softmax(w, dim=0)
    p1 = torch.softmax(torch.einsum("e,bec->bc", alpha, view1), dim=1)
    p2 = torch.softmax(torch.einsum("e,bec->bc", alpha, view2), dim=1)
    return -F.cosine_similarity(p1, p2, dim=1, eps=1e-6).mean()


def should_stop(alpha, threshold: float = 0.05) -> bool:
    """Stop rule: round α to 2 decimals (NumPy rounding) and stop if any rounded weight < threshold."""
    a = np.round(np.asarray(alpha, dtype=np.float64), 2)
    return bool((a < threshold).any())


# ------------------------------------------------------------------------------------------------
# Strong views (batched, per-sample parameters)
# ------------------------------------------------------------------------------------------------
def _u(n: int, lo: float, hi: float, g: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = delta.clamp(min=1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = torch.stack([v, q, p, p, t, v], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    g = torch.stack([t, v, v, q, p, p], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    b = torch.stack([p, p, t, v, v, q], 1).gather(1, i.unsqueeze(1)).squeeze(1)
    return torch.stack([r, g, b], 1)


def _blur(x: Tensor, sigma: Tensor, taps: int = 13) -> Tensor:
    b, c, h, w = x.shape
    r = taps // 2
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(x) ** 2))
    k = k / k.sum(1, keepdim=True)  # [B, taps]
    k = k.repeat_interleave(c, 0)  # [B*C, taps]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect" if w > r else "replicate"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect" if h > r else "replicate"), k[:, None, :, None], groups=b * c)
    return y.view(b, c, h, w)


def strong_view(x: Tensor, generator: torch.Generator | None = None, pad: int = 4) -> Tensor:
    """One SADE/MoCo-v2 strong view of a float image batch in [0, 1] ``[B, C, H, W]``."""
    n = len(x)
    dev = x.device
    x = random_crop(x, pad, generator)
    jitter = (torch.rand(n, generator=generator) < 0.8).to(dev)
    bri, con = _u(n, 0.6, 1.4, generator).to(dev), _u(n, 0.6, 1.4, generator).to(dev)
    sat, hue = _u(n, 0.6, 1.4, generator).to(dev), _u(n, -0.1, 0.1, generator).to(dev)
    y = (x * bri[:, None, None, None]).clamp(0, 1)
    m = _gray(y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - m) * con[:, None, None, None] + m).clamp(0, 1)
    if x.shape[1] == 3:
        gr = _gray(y)
        y = ((y - gr) * sat[:, None, None, None] + gr).clamp(0, 1)
        hsv = _rgb_to_hsv(y)
        hsv = torch.stack([(hsv[:, 0] + hue[:, None, None]) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
        y = _hsv_to_rgb(hsv).clamp(0, 1)
    x = torch.where(jitter[:, None, None, None], y, x)
    if x.shape[1] == 3:
        gray = (torch.rand(n, generator=generator) < 0.2).to(dev)
        x = torch.where(gray[:, None, None, None], _gray(x).expand_as(x), x)
    blur = (torch.rand(n, generator=generator) < 0.2).to(dev)
    sigma = _u(n, 0.1, 2.0, generator).to(dev)
    x = torch.where(blur[:, None, None, None], _blur(x, sigma), x)
    return random_hflip(x, generator)


def _to_unit_float(x: Tensor) -> Tensor:
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    return x[:, None] if x.dim() == 3 else x


def make_view(data: TensorData, xb: Tensor, generator: torch.Generator | None, vector_noise: float) -> Tensor:
    """A strong view of the raw batch ``xb`` of ``data``, passed through ``data``'s test transform."""
    tf = data.transforms.test if data.transforms is not None else (lambda t: t)
    if xb.dim() == 2:  # feature vectors (card §9 R1): Gaussian feature noise
        z = tf(xb).float()
        return z + vector_noise * torch.randn(z.shape, generator=generator).to(z.device)
    return tf(strong_view(_to_unit_float(xb), generator))


# ------------------------------------------------------------------------------------------------
# Network
# ------------------------------------------------------------------------------------------------
class SADENet(nn.Module):
    """Multi-expert backbone (``[B, E, d]``) + one cosine head per expert → expert logits ``[B, E, C]``."""

    def __init__(self, backbone: nn.Module, num_classes: int, scale: float = 30.0):
        super().__init__()
        e = getattr(backbone, "num_experts", None)
        if e != 3:
            raise ValueError(
                f"sade needs a 3-expert backbone (resnet32_experts, cnn_experts, mlp_experts or experts with "
                f"num_experts: 3); got {type(backbone).__name__} with num_experts={e}"
            )
        self.backbone = backbone
        self.heads = nn.ModuleList([NormedLinear(backbone.out_features, num_classes, scale) for _ in range(e)])

    def forward(self, x: Tensor) -> Tensor:
        z = self.backbone(x)
        return torch.stack([h(z[:, k]) for k, h in enumerate(self.heads)], dim=1)


@register_strategy("sade")
class SADE(Strategy):
    """SADE (Zhang et al., NeurIPS 2022) with test-time self-supervised aggregation (transductive)."""

    supports = frozenset({"long_tail"})
    transductive = True

    def __init__(
        self,
        tau: float = 2.0,
        scale: float = 30.0,
        epochs: int = 200,
        batch_size: int = 128,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int | None = 5,
        milestones: Sequence[int] | None = (160, 180),
        gamma: float = 0.1,
        checkpoint: str = "val",
        inverse_prior: str = "sort_stable",
        tta: str = "transductive",
        tta_lr: float = 0.1,
        tta_epochs: int = 5,
        tta_batch_size: int = 128,
        tta_stop_threshold: float = 0.05,
        vector_view_noise: float = 0.5,
    ):
        if tta not in TTA_MODES:
            raise ValueError(f"sade: tta must be one of {', '.join(TTA_MODES)}; got {tta!r}")
        if inverse_prior not in INVERSE_PRIOR_MODES:
            raise ValueError(
                f"sade: inverse_prior must be one of {', '.join(INVERSE_PRIOR_MODES)}; got {inverse_prior!r}"
            )
        self.tau = tau
        self.scale = scale
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.milestones = None if milestones is None else list(milestones)
        self.gamma = gamma
        self.checkpoint = check_checkpoint(checkpoint)
        self.inverse_prior = inverse_prior
        self.tta = tta
        self.tta_lr = tta_lr
        self.tta_epochs = tta_epochs
        self.tta_batch_size = tta_batch_size
        self.tta_stop_threshold = tta_stop_threshold
        self.vector_view_noise = vector_view_noise

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.net: SADENet | None = None
        self.prior: Tensor | None = None
        self.alpha = torch.full((3,), 1.0 / 3.0)
        self.tta_log: list[dict] = []
        self.info: dict = {}
        if self.tta == "transductive" and ctx.scenario.get("num_classes", 10) < 10:
            import warnings

            warnings.warn("sade: test-time aggregation can collapse with fewer than 10 classes (card pitfall 2)",
                          stacklevel=2)

    def _build(self) -> SADENet:
        return SADENet(self.ctx.create_backbone(), self.ctx.scenario["num_classes"], self.scale).to(self.ctx.device)

    def learn(self, session) -> None:
        c = session.classes.num_classes
        self.prior = prior_from_counts(session.classes.train_counts, self.ctx.device)
        offsets = expert_offsets(self.prior, self.tau, self.inverse_prior)
        torch.manual_seed(self.ctx.derive_seed("sade", "init"))
        self.net = self._build()

        def loss_fn(x, y):
            losses = sade_losses(self.net(x).float(), y, offsets)
            return losses.sum(), {"e1": losses[0], "e2": losses[1], "e3": losses[2]}

        val = selection_data(self, session)
        validate = None
        if val is not None and len(val):
            def validate():
                return balanced_accuracy_of(lambda x: self.net(x).mean(1), val, c, self.ctx.device,
                                            self.ctx.eval_batch_size)
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("sade", "train"))
        schedule = LTSchedule(self.epochs, self.lr, self.warmup_epochs, self.milestones, self.gamma)
        self.info = fit(self.net, session.labeled, loss_fn, ctx=self.ctx, schedule=schedule,
                        batch_size=self.batch_size, momentum=self.momentum, weight_decay=self.weight_decay,
                        checkpoint=self.checkpoint, validate=validate, generator=gen, desc="sade")
        self.alpha = torch.full((3,), 1.0 / 3.0)

    # -- test-time aggregation ---------------------------------------------------------------------
    def adapt(self, inputs) -> None:
        """Fit α on the unlabelled ``inputs`` (their targets are all −1; never read)."""
        with torch.enable_grad():  # the runner evaluates under no_grad; only w gets gradients
            self._adapt(inputs)

    def _adapt(self, inputs) -> None:
        self.net.eval()
        if self.tta == "off":
            self.alpha = torch.full((3,), 1.0 / 3.0)
            self.tta_log.append({"alpha": self.alpha.tolist(), "epochs": 0, "n": len(inputs)})
            return
        if not isinstance(inputs, TensorData):
            raise ValueError("sade: test-time aggregation supports in-memory (TensorData) evaluation sets only")
        raw = TensorData(inputs.x, torch.full((len(inputs),), -1), None, inputs.name)  # untransformed inputs
        dev = self.ctx.device
        w = torch.full((3,), 1.0 / 3.0, device=dev, requires_grad=True)
        opt = torch.optim.SGD([w], lr=self.tta_lr, momentum=0.9, nesterov=True, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("sade_tta", len(self.tta_log)))
        epochs = 0
        for _ in range(self.tta_epochs):
            for xb, _y in batches(raw, self.tta_batch_size, shuffle=True, device=dev, generator=gen):
                with torch.no_grad():
                    v1 = self.net(make_view(inputs, xb, gen, self.vector_view_noise)).float()
                    v2 = self.net(make_view(inputs, xb, gen, self.vector_view_noise)).float()
                loss = aggregation_loss(w, v1, v2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            epochs += 1
            alpha = torch.softmax(w.detach().double(), 0).cpu().numpy()
            if should_stop(alpha, self.tta_stop_threshold):
                break
        self.alpha = torch.softmax(w.detach().float(), 0).cpu()
        self.tta_log.append({"alpha": self.alpha.tolist(), "epochs": epochs, "n": len(inputs)})

    def adapt_fraction(self) -> float | None:
        return 0.5 if self.tta == "split" else None

    def selects_on_test(self) -> bool:
        return self.checkpoint == "test"

    def eval_diagnostics(self) -> dict[str, float]:
        """The last adaptation's α and epoch count (card §5: ``sade_alpha_{1,2,3}``, ``sade_tta_epochs``),
        for a runner that logs strategy diagnostics next to the metrics of the eval set just adapted to."""
        out = {f"sade_alpha_{k + 1}": float(a) for k, a in enumerate(self.alpha.tolist())}
        out["sade_tta_epochs"] = float(self.tta_log[-1]["epochs"]) if self.tta_log else 0.0
        return out

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.net.eval()
        v = self.net(x).float()
        return Prediction(logits=torch.einsum("e,bec->bc", self.alpha.to(v.device), v))

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "prior": self.prior.cpu(), "alpha": self.alpha.clone(),
                "tta_log": [dict(r) for r in self.tta_log]}

    def load_state_dict(self, state: dict) -> None:
        self.net = self._build()
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.prior = state["prior"].to(self.ctx.device)
        self.alpha = state["alpha"].float()
        self.tta_log = list(state.get("tta_log", []))


__all__ = ["SADE", "SADENet", "aggregation_loss", "expert_offsets", "inverse_prior", "make_view", "sade_losses",
           "should_stop", "strong_view"]
