"""2×2 max-pooling that gives the same numbers as ``nn.MaxPool2d(2)``, faster on the CPU without autograd.

Without gradients, PyTorch's CPU kernel for NCHW max-pooling was 7–30× slower than two element-wise
``maximum`` passes over the same tensor (rows, then columns) and took a third of the small CNNs'
evaluation and test-time adaptation time (``bench/bench_pooling.py``). A maximum is exact, so the values
are bit for bit those of ``F.max_pool2d``. When autograd needs the pooling (training), the native kernel
runs: it records which input won each window, and its forward + backward is not slower than ours would
be. Anything else — CUDA tensors (the native kernel is fast there), channels-last or non-contiguous
inputs, odd sizes — also goes to ``F.max_pool2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaxPool2x2", "max_pool2x2"]


def _pool(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    rows = x.view(b, c, h // 2, 2, w)
    m = torch.maximum(rows[:, :, :, 0], rows[:, :, :, 1]).view(b, c, h // 2, w // 2, 2)
    return torch.maximum(m[..., 0], m[..., 1])


def _fast_path(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.is_floating_point() and x.shape[-1] % 2 == 0
            and x.shape[-2] % 2 == 0 and x.numel() > 0 and x.is_contiguous())


def max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` with the same forward and backward numbers."""
    if not _fast_path(x):
        return F.max_pool2d(x, 2)
    if torch.is_grad_enabled() and x.requires_grad:
        return F.max_pool2d(x, 2)  # training: the native kernel with indices is fast enough (bench_pooling)
    return _pool(x)


class MaxPool2x2(nn.MaxPool2d):
    """Drop-in ``nn.MaxPool2d(2)`` (same repr, no state) that uses :func:`max_pool2x2`."""

    def __init__(self):
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2x2(x)
