"""TEEN: training-free prototype calibration for few-shot class-incremental learning.

Card: ``specs/fscil-teen.md``. Base session: encoder + cosine classifier trained on the base classes
(shared base model, :meth:`RunContext.base_model`); the learned base rows are then replaced by class
means (test transform, inference BN); every new class's prototype is pulled toward a softmax mix of
base prototypes (:func:`calibrate`). No gradient step after the base session.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from openworld.registry import register_strategy
from openworld.strategies.base import Prediction, Strategy, class_means

_EPS = 1e-12


def calibrate(base_prototypes: Tensor, novel_prototypes: Tensor, softmax_t: float, shift_weight: float) -> Tensor:
    """Calibrated rows ``(1-β)·n̂(p_c) + β·n̂(Σ_j a_cj·n̂(b_j))``, ``a_c = softmax_j(τ·<n̂(p_c), n̂(b_j)>)``.

    ``base_prototypes`` [B, d] and ``novel_prototypes`` [W, d] are raw (un-normalised) means; τ =
    ``softmax_t``, β = ``shift_weight``. The result is returned un-renormalised, as the card's
    formula gives (cosine inference makes its norm irrelevant).
    """
    b = F.normalize(base_prototypes, dim=-1, eps=_EPS)
    u = F.normalize(novel_prototypes, dim=-1, eps=_EPS)
    weights = torch.softmax(softmax_t * (u @ b.T), dim=-1)
    mix = weights @ b
    norm = mix.norm(dim=-1, keepdim=True)
    if shift_weight != 0 and bool((norm < 1e-6).any()):
        warnings.warn(
            "TEEN calibrate: the softmax mix of base prototypes is (nearly) zero for some novel class; "
            "its shift direction is undefined (norm + 1e-12 used)",
            RuntimeWarning,
            stacklevel=2,
        )
    delta = mix / (norm + _EPS)
    return (1.0 - shift_weight) * u + shift_weight * delta


def _module_fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@register_strategy("teen")
class TEEN(Strategy):
    """Base-trained encoder, prototype classifier, training-free calibration of new prototypes.

    Parameters
    ----------
    softmax_t : τ, the temperature of the softmax over base classes in calibration.
    shift_weight : β, the weight of the calibrated shift (0 gives the plain prototype classifier).
    shots_batching : ``"all"`` averages every shot (ours); ``"last_batch"`` keeps only the last
        batch of ``shots_batch_size`` shots, as the released code does (``protocol: paper``).
    shots_batch_size : batch size of the shots loader (matters only for ``last_batch``).
    session0_report : ``"prototype"`` reports session 0 with the prototype classifier that later
        sessions use (ours); ``"max"`` reports the better of it and the learned base classifier on
        the test set, as the released code does (``protocol: paper``; recorded in results).
    """

    supports = frozenset({"fscil", "cil"})
    paper_protocol = {"shots_batching": "last_batch", "session0_report": "max"}

    def __init__(
        self,
        softmax_t: float = 16.0,
        shift_weight: float = 0.1,
        shots_batching: Literal["all", "last_batch"] = "all",
        shots_batch_size: int = 128,
        session0_report: Literal["prototype", "max"] = "prototype",
    ):
        self.softmax_t = softmax_t
        self.shift_weight = shift_weight
        self.shots_batching = shots_batching
        self.shots_batch_size = shots_batch_size
        self.session0_report = session0_report

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.encoder = None
        self.weights: Tensor | None = None  # [K, d] raw base prototypes / calibrated novel rows
        self.base_classes: list[int] = []
        self.num_active = 0
        self.learned_rows: Tensor | None = None  # the trained base classifier (session0_report: max)
        self.temperature = ctx.base.temperature
        self._fingerprint: str | None = None

    # -- learning --------------------------------------------------------------------------------
    def learn(self, session) -> None:
        seen = list(session.classes.seen)
        if seen != list(range(len(seen))):
            raise ValueError(f"{self.name}: needs seen classes 0..n-1 in order, got {seen[:10]}…")
        if self.encoder is None:
            self._learn_base(session)
        else:
            new = list(session.classes.new)
            if new:
                prototypes = self._session_prototypes(session.labeled, new)
                base_rows = self.weights[self.base_classes]
                self.weights[new] = calibrate(base_rows, prototypes, self.softmax_t, self.shift_weight).to(
                    self.weights.dtype
                )
        self.num_active = len(seen)

    def _learn_base(self, session) -> None:
        net = self.ctx.base_model(session)
        self.encoder = net.encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.base_classes = list(session.classes.base or session.classes.new)
        self.learned_rows = net.head.weight.detach()[: len(self.base_classes)].clone()
        # Prototypes over all base training images, val included (card §1.6), test transform.
        proto_data = session.info.get("prototype_data", session.labeled)
        feats, labels = self.ctx.extract_features(self.encoder, proto_data)
        self.weights = torch.zeros(session.classes.num_classes, feats.shape[1], dtype=feats.dtype, device=feats.device)
        self.weights[self.base_classes] = class_means(feats, labels, self.base_classes)
        self._fingerprint = _module_fingerprint(self.encoder)

    def _session_prototypes(self, data, classes) -> Tensor:
        if self.shots_batching == "last_batch":
            n = len(data)
            start = ((n - 1) // self.shots_batch_size) * self.shots_batch_size
            data = data.subset(torch.arange(start, n))
        feats, labels = self.ctx.extract_features(self.encoder, data, batch_size=self.shots_batch_size)
        return class_means(feats, labels, classes)

    # -- inference -------------------------------------------------------------------------------
    def feature_cache_key(self) -> str | None:
        return None if self._fingerprint is None else f"encoder:{self._fingerprint}"

    def encode(self, x: Tensor) -> Tensor:
        with self.ctx.autocast():
            return self.encoder(x).float()

    def predict_features(self, z: Tensor) -> Prediction:
        zn = F.normalize(z, dim=-1, eps=_EPS)
        rows = F.normalize(self.weights[: self.num_active], dim=-1, eps=_EPS)
        alternatives = None
        if self.session0_report == "max" and self.num_active == len(self.base_classes):
            learned = F.normalize(self.learned_rows, dim=-1, eps=_EPS)
            alternatives = {"learned": self.temperature * zn @ learned.T}
        return Prediction(logits=self.temperature * zn @ rows.T, alternatives=alternatives)

    def predict(self, x: Tensor) -> Prediction:
        return self.predict_features(self.encode(x))

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "encoder": self.encoder.state_dict(),
            "weights": self.weights,
            "learned_rows": self.learned_rows,
            "base_classes": list(self.base_classes),
            "num_active": self.num_active,
        }

    def load_state_dict(self, state: dict) -> None:
        self.encoder = self.ctx.create_backbone().to(self.ctx.device)
        self.encoder.load_state_dict(state["encoder"])
        self.encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.weights = state["weights"].to(self.ctx.device)
        self.learned_rows = state["learned_rows"].to(self.ctx.device)
        self.base_classes = list(state["base_classes"])
        self.num_active = int(state["num_active"])
        self._fingerprint = _module_fingerprint(self.encoder)
