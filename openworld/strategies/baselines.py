"""Baselines a fair comparison needs: prototypes (ncm), naive fine-tuning, joint training.

Card: ``specs/fscil-teen.md`` §2.1. All three start from the recipe's shared base model, so a
comparison with TEEN isolates what each method does after the base session.
"""

from __future__ import annotations

from typing import Literal

import torch

from openworld.data.views import concat
from openworld.registry import register_strategy
from openworld.strategies.base import (
    OptimizerConfig,
    Prediction,
    Strategy,
    TrainConfig,
    class_means,
    train_classifier,
)
from openworld.strategies.teen import TEEN


@register_strategy("ncm")
class NCM(TEEN):
    """Nearest-class-mean (cosine) on the frozen base-session encoder: TEEN with ``shift_weight = 0``."""

    supports = frozenset({"fscil", "cil"})

    def __init__(
        self,
        shots_batching: Literal["all", "last_batch"] = "all",
        shots_batch_size: int = 128,
        session0_report: Literal["prototype", "max"] = "prototype",
    ):
        super().__init__(shift_weight=0.0, shots_batching=shots_batching, shots_batch_size=shots_batch_size,
                         session0_report=session0_report)

    def get_params(self) -> dict:
        return {k: getattr(self, k) for k in ("shots_batching", "shots_batch_size", "session0_report")}


def _check_contiguous(name: str, session) -> int:
    seen = list(session.classes.seen)
    if seen != list(range(len(seen))):
        raise ValueError(f"{name}: needs seen classes 0..n-1 in order, got {seen[:10]}…")
    return len(seen)


@register_strategy("finetune")
class Finetune(Strategy):
    """Naive fine-tuning ("Ft-CNN"): the whole network trained on each session's data only.

    At session i ≥ 1 the new cosine rows start at the new classes' prototypes, then encoder and
    classifier are trained (BN in train mode, training augmentation) with cross-entropy over all
    seen classes, SGD at a constant LR. ``batch_size: null`` is full-batch (card §2.1).
    """

    supports = frozenset({"fscil", "cil"})

    def __init__(
        self,
        epochs: int = 100,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5.0e-4,
        batch_size: int | None = None,
    ):
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.batch_size = batch_size

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.net = None
        self.num_active = 0

    def learn(self, session) -> None:
        n_seen = _check_contiguous(self.name, session)
        if self.net is None:
            self.net = self.ctx.base_model(session)
        else:
            new = list(session.classes.new)
            feats, labels = self.ctx.extract_features(self.net.encoder, session.labeled)
            with torch.no_grad():
                self.net.head.weight[new] = class_means(feats, labels, new).to(self.net.head.weight.dtype)
            cfg = TrainConfig(
                epochs=self.epochs,
                batch_size=self.batch_size or len(session.labeled),
                optimizer=OptimizerConfig("sgd", self.lr, self.momentum, False, self.weight_decay),
                schedule="constant",
                temperature=self.ctx.base.temperature,
                selection="last",
            )
            train_classifier(self.net, session.labeled, cfg=cfg, ctx=self.ctx, num_active=n_seen,
                             generator=self.ctx.generator, desc=f"finetune session {session.index}")
        self.net.eval()
        self.num_active = n_seen

    def predict(self, x) -> Prediction:
        with self.ctx.autocast():
            return Prediction(logits=self.net(x, num_active=self.num_active).float())

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "num_active": self.num_active}

    def load_state_dict(self, state: dict) -> None:
        self.net = self.ctx.create_classifier_net()
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.num_active = int(state["num_active"])


@register_strategy("joint")
class Joint(Strategy):
    """Upper bound on data access: retrained from scratch on base data ∪ every shot seen so far.

    Uses the recipe's ``base:`` block at every session (session 0 is the shared base model itself)
    and selects epochs on the base-session validation split. It bounds data access, not accuracy:
    the union is heavily imbalanced, so novel recall may fall below TEEN's (card §2.1).

    ``data: full`` is the card's oracle variant (not comparable): base data ∪ **all** training images of
    every seen novel class, read from ``Session.oracle``. It is the only variant that asks for oracle
    data (:meth:`uses_oracle_data`), so the runner hands it ``session.visible(oracle=True)`` and flags
    the run; the selection set is still the base-session validation split, which the oracle data never
    overlaps (it holds base classes only).
    """

    supports = frozenset({"fscil", "cil"})

    def __init__(self, data: Literal["shots", "full"] = "shots"):
        self.data = data

    def uses_oracle_data(self) -> bool:
        return self.data == "full"

    def setup(self, ctx) -> None:
        if self.data not in ("shots", "full"):
            raise ValueError(f"{self.name or 'joint'}.data: must be 'shots' or 'full', got {self.data!r}")
        super().setup(ctx)
        self.net = None
        self.num_active = 0
        self._seen_data: list = []
        self._validation = None

    def _session_data(self, session):
        """What this session adds to the union: its labelled data (session 0 and ``shots``), or its
        oracle data (``full``: every training image of its new classes)."""
        if self.data == "shots" or session.index == 0:
            return session.labeled
        if session.oracle is None:
            raise ValueError(
                f"{self.name}: data 'full' needs the oracle data of session {session.index} (Session.oracle), "
                "which only session.visible(oracle=True) keeps; the runner passes it when "
                "uses_oracle_data() is True (this scenario may provide none)"
            )
        return session.oracle

    def restore_session(self, session) -> None:
        self._seen_data.append(self._session_data(session))
        if self._validation is None:
            self._validation = session.validation

    def learn(self, session) -> None:
        n_seen = _check_contiguous(self.name, session)
        self.restore_session(session)
        if session.index == 0 or len(self._seen_data) == 1:
            self.net = self.ctx.base_model(session)
        else:
            union = concat(self._seen_data)
            tag = f"joint_{session.index}" if self.data == "shots" else f"joint_full_{session.index}"
            self.net = self.ctx.base_model(
                session, data=union, validation=self._validation, num_active=n_seen, tag=tag
            )
        self.num_active = n_seen

    def predict(self, x) -> Prediction:
        with self.ctx.autocast():
            return Prediction(logits=self.net(x, num_active=self.num_active).float())

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "num_active": self.num_active}

    def load_state_dict(self, state: dict) -> None:
        self.net = self.ctx.create_classifier_net()
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.num_active = int(state["num_active"])
