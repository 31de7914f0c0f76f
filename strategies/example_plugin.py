"""An out-of-tree strategy plugin: SimpleShot-style nearest centroid (Wang et al., 2019).

Features of the frozen base-session encoder are centred on the base-class feature mean and
L2-normalised ("CL2N"); every class is its centroid; prediction is the nearest centroid.

Use it from a recipe without installing anything (run from the repository root, or put this
folder on PYTHONPATH):

    strategies:
      simpleshot: {strategy: "strategies.example_plugin:SimpleShot"}

or publish it from your own package:

    [project.entry-points."openworld.strategies"]
    simpleshot = "my_package.simpleshot:SimpleShot"
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openworld.strategies.base import Prediction, Strategy, class_means


class SimpleShot(Strategy):
    """Nearest centroid on centred, L2-normalised base-encoder features."""

    supports = frozenset({"fscil", "cil"})

    def __init__(self, center: bool = True):
        self.center = center

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.encoder = None
        self.mean = None
        self.centroids = None  # [K, d]
        self.num_seen = 0

    def _embed(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats - self.mean if self.center else feats, dim=-1)

    def learn(self, session) -> None:
        if self.encoder is None:
            self.encoder = self.ctx.base_model(session).encoder.eval()
            feats, _ = self.ctx.extract_features(self.encoder, session.labeled)
            self.mean = feats.mean(0)
            self.centroids = torch.zeros(session.classes.num_classes, feats.shape[1], device=feats.device)
        feats, labels = self.ctx.extract_features(self.encoder, session.labeled)
        new = list(session.classes.new)
        self.centroids[new] = class_means(self._embed(feats), labels, new)
        self.num_seen = len(session.classes.seen)

    @torch.no_grad()
    def predict(self, x) -> Prediction:
        z = self._embed(self.encoder(x))
        return Prediction(logits=-torch.cdist(z, self.centroids[: self.num_seen]))

    def state_dict(self) -> dict:
        return {
            "encoder": self.encoder.state_dict(),
            "mean": self.mean,
            "centroids": self.centroids,
            "num_seen": self.num_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.encoder = self.ctx.create_backbone().to(self.ctx.device).eval()
        self.encoder.load_state_dict(state["encoder"])
        self.mean, self.centroids = state["mean"].to(self.ctx.device), state["centroids"].to(self.ctx.device)
        self.num_seen = int(state["num_seen"])
