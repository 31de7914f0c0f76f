"""2×2 max-pooling that gives the same numbers as ``nn.MaxPool2d(2)``, faster on the CPU without autograd.

Without gradients, PyTorch's CPU kernel for NCHW max-pooling was 7–30× slower than two element-wise
``maximum`` passes over the same tensor (rows, then columns) and took a third of the small CNNs'
evaluation and test-time adaptation time (``bench/bench_pooling.py``). A maximum is exact, so the values
are bit for bit those of ``F.max_pool2d``. When autograd needs the pooling (training), the native kernel
runs: it records which input won each window, and its forward + backward is not slower than ours would
be. Anything else — CUDA tensors (the native kernel is fast there), channels-last or non-contiguous
inputs, odd sizes — also goes to ``F.max_pool2d``.

Training the small CNNs (conv → BN → ReLU → pool) spends time around the pooling that a fused ReLU + pool
saves without changing a number (:func:`relu_max_pool2x2`, :func:`fused_relu_pool`): the native pooling
kernels run on the pre-ReLU input and the ReLU on the pooled quarter, so the full-size ReLU forward and
backward passes go. And the last block's ReLU got its gradient from the global-average-pool backward in
NCHW while its output is channels-last (the 1-channel input makes the whole cnn28 channels-last), which
made ``threshold_backward`` ~25× slower; :class:`ReLULayoutGrad` hands it the gradient in the output's
layout. ``bench/bench_simclr.py`` measures both.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "MaxPool2x2",
    "ReLULayoutGrad",
    "ReLUMaxPool2x2",
    "fused_relu_pool",
    "max_pool2x2",
    "relu_max_pool2x2",
]


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


class _ReLUMaxPool2x2Fn(torch.autograd.Function):
    """``max_pool2d(relu(x), 2)`` with the numbers of the two separate ops.

    The ReLU is monotone, so pooling first and rectifying the pooled values gives the same values
    (up to the sign of a zero in an all-non-positive window that holds an exact ``-0.0``). The
    gradient: where the window maximum is > 0 the winner is the same element with or without the ReLU
    (first maximum in row-major order, the kernel's rule, also for ties); where it is <= 0 the ReLU's
    backward zeroes the gradient either way; NaN passes both ways. So the ReLU's ``threshold_backward``
    runs on the pooled gradient and the native pooling backward routes it: bit for bit the same input
    gradient, in the same memory layout, with a quarter of the ReLU work.
    """

    @staticmethod
    def forward(ctx, x):
        y, idx = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
        y = torch.relu_(y)
        ctx.save_for_backward(x, y, idx)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y, idx = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, y, 0.0)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)


def relu_max_pool2x2(x: torch.Tensor) -> torch.Tensor:
    """``max_pool2x2(relu(x))`` with the same forward and backward numbers, fused when autograd records it."""
    if torch.is_grad_enabled() and x.requires_grad and x.dim() == 4 and x.device.type == "cpu":
        return _ReLUMaxPool2x2Fn.apply(x)
    return max_pool2x2(torch.relu(x))


class ReLUMaxPool2x2(nn.Module):
    """``nn.ReLU`` followed by :class:`MaxPool2x2`, as one module (:func:`relu_max_pool2x2`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_max_pool2x2(x)


class _ReLULayoutGradFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        if y.dim() == 4 and y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
            grad = grad.contiguous(memory_format=torch.channels_last)  # element-wise op: same values, one layout
        return torch.ops.aten.threshold_backward(grad, y, 0.0)


class ReLULayoutGrad(nn.Module):
    """``nn.ReLU`` (same values and gradients) whose backward first brings the incoming gradient into the
    memory layout of its output: ``threshold_backward`` over two layouts is a slow strided loop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad and x.device.type == "cpu":
            return _ReLULayoutGradFn.apply(x)
        return torch.relu(x)


@contextlib.contextmanager
def fused_relu_pool(model: nn.Module):
    """Within the block, every ``nn.Sequential`` of ``model`` that has an ``nn.ReLU`` directly followed by a
    :class:`MaxPool2x2` runs them as one :class:`ReLUMaxPool2x2`, and a trailing ``nn.ReLU`` runs as
    :class:`ReLULayoutGrad` (the conv blocks of ``cnn28``/``cnn8``). Neither holds state, so the state dict
    and every number stay as they are; the original modules are put back on exit."""
    swapped: list[tuple[nn.Sequential, str, nn.Module]] = []
    try:
        for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
            names = list(seq._modules)
            for i, name in enumerate(names):
                mod = seq._modules[name]
                if type(mod) is not nn.ReLU:
                    continue
                nxt = seq._modules[names[i + 1]] if i + 1 < len(names) else None
                if type(nxt) is MaxPool2x2:
                    swapped += [(seq, name, mod), (seq, names[i + 1], nxt)]
                    seq._modules[name] = nn.Identity()
                    seq._modules[names[i + 1]] = ReLUMaxPool2x2()
                elif nxt is None:
                    swapped.append((seq, name, mod))
                    seq._modules[name] = ReLULayoutGrad()
        yield model
    finally:
        for seq, name, mod in reversed(swapped):
            seq._modules[name] = mod
