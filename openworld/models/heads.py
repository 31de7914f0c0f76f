"""Classifier heads and the encoder + head network.

Heads hold rows for every class of the scenario from the start; ``forward(z, num_active)`` uses
only rows ``0 … num_active-1``. The unused rows are sliced off (not masked with a finite value), so
they neither enter the softmax nor receive gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassifierNet", "CosineClassifier", "LinearClassifier"]


def _active(num_active: int | None, num_classes: int) -> int:
    if num_active is None:
        return num_classes
    num_active = int(num_active)
    if not 0 <= num_active <= num_classes:
        raise ValueError(f"num_active must be in [0, {num_classes}], got {num_active}")
    return num_active


class CosineClassifier(nn.Module):
    """Bias-free cosine classifier: ``logit_c = T · <n̂(z), n̂(w_c)>`` (fscil-teen card §2).

    ``weight`` has shape ``[num_classes, in_features]`` and is stored un-normalised (prototype
    replacement writes raw class means into it); normalisation is eps-safe, so an all-zero row or
    feature gives a logit of 0 rather than NaN.
    """

    def __init__(self, in_features: int, num_classes: int, temperature: float = 16.0):
        super().__init__()
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the default nn.Linear weight initialisation
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, z: torch.Tensor, num_active: int | None = None) -> torch.Tensor:
        w = self.weight[: _active(num_active, self.num_classes)]
        return self.temperature * F.linear(F.normalize(z, dim=-1), F.normalize(w, dim=-1))

    @torch.no_grad()
    def set_rows(self, start: int, rows: torch.Tensor) -> None:
        """Overwrite rows ``start … start+len(rows)-1`` (e.g. with class-mean prototypes), as stored."""
        rows = rows.detach().to(self.weight)
        if rows.ndim != 2 or rows.shape[1] != self.in_features or not 0 <= start <= self.num_classes - len(rows):
            raise ValueError(
                f"set_rows: rows of shape {tuple(rows.shape)} at {start} do not fit a weight of shape "
                f"{tuple(self.weight.shape)}"
            )
        self.weight[start : start + len(rows)] = rows

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, temperature={self.temperature}"


class LinearClassifier(nn.Module):
    """Ordinary linear classifier with bias, with the same ``num_active`` slicing as the cosine head."""

    def __init__(self, in_features: int, num_classes: int, bias: bool = True):
        super().__init__()
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.fc = nn.Linear(self.in_features, self.num_classes, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.fc.weight

    def forward(self, z: torch.Tensor, num_active: int | None = None) -> torch.Tensor:
        k = _active(num_active, self.num_classes)
        bias = self.fc.bias[:k] if self.fc.bias is not None else None
        return F.linear(z, self.fc.weight[:k], bias)


class ClassifierNet(nn.Module):
    """Encoder followed by a head: ``forward(x, num_active)`` gives logits, ``features(x)`` the
    encoder's pooled, un-normalised features."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    @property
    def out_features(self) -> int:
        return int(self.encoder.out_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor, num_active: int | None = None) -> torch.Tensor:
        return self.head(self.encoder(x), num_active)
