"""MaxPool2x2 gives nn.MaxPool2d(2)'s numbers (forward values and gradient routing, ties included), and the
allocator tuning of `openworld run` is skipped when the user chose their own malloc settings."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openworld.models.pooling import MaxPool2x2, max_pool2x2


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 5, 12, 10), (1, 1, 2, 2), (3, 2, 7, 9), (2, 3, 6, 8)])
def test_forward_and_gradient_equal_maxpool_with_ties(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    for trial in range(5):
        # rounded ReLU outputs: windows of zeros, of equal positives, and -inf, as after conv-BN-ReLU
        x = torch.relu(torch.randn(shape, generator=gen)).round()
        if trial == 1:
            x[..., :2, :2] = -float("inf")
        if trial == 2:
            x = x.contiguous(memory_format=torch.channels_last)  # the fallback path
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref, got = F.max_pool2d(a, 2), max_pool2x2(b)
        assert torch.equal(ref, got)
        g = torch.randn(ref.shape, generator=gen)
        ref.backward(g)
        got.backward(g)
        assert torch.equal(a.grad, b.grad)


def test_first_maximum_in_row_major_order_gets_the_gradient():
    x = torch.tensor([[[[1.0, 3.0], [3.0, 3.0]]]], requires_grad=True)
    max_pool2x2(x).sum().backward()
    assert x.grad.tolist() == [[[[0.0, 1.0], [0.0, 0.0]]]]


def test_training_is_bit_identical_to_nn_maxpool():
    torch.manual_seed(0)

    def net(pool):
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), pool,
                             nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(inplace=True), pool, nn.Flatten(),
                             nn.Linear(8 * 3 * 3, 3))

    ref = net(nn.MaxPool2d(2))
    ours = net(MaxPool2x2())
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    x = torch.zeros(16, 1, 12, 12)  # a constant background with a few strokes: many exact ties
    x[:, :, 3:9, 5] = torch.rand(16, 1, 6)
    y = torch.arange(16) % 3
    for model in (ref, ours):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for (n, p), q in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(p, q), n
    assert isinstance(MaxPool2x2(), nn.MaxPool2d) and MaxPool2x2().state_dict() == {}


def _tuned(env: dict) -> str:
    code = "from openworld.allocator import tune_allocator; print(tune_allocator())"
    full = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "OPENWORLD_MALLOC"}
    return subprocess.run([sys.executable, "-c", code], env={**full, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_tuning_respects_the_users_settings():
    assert _tuned({"OPENWORLD_MALLOC": "default"}) == "False"
    assert _tuned({"MALLOC_ARENA_MAX": "2"}) == "False"
    assert _tuned({}) in ("True", "False")  # True on glibc; musl has no mallopt
