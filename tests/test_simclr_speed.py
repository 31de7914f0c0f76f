"""The faster SimCLR stage 0 computes the same numbers as before, bit for bit: the fused ReLU + 2×2 max-pool
and the layout-matched ReLU gradient (`openworld.models.pooling`) against the separate native ops, and whole
`simclr_pretrain` runs against the same runs with the fusion switched off (the plain modules)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from openworld.data.transforms import get_transforms
from openworld.data.views import TensorData
from openworld.models import create_backbone
from openworld.models.pooling import MaxPool2x2, ReLULayoutGrad, ReLUMaxPool2x2, fused_relu_pool, relu_max_pool2x2
from openworld.strategies import simclr as simclr_mod
from openworld.strategies.simclr import simclr_pretrain


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (signed zeros and NaN payloads included), shape and strides."""
    return a.shape == b.shape and a.stride() == b.stride() and torch.equal(_bits(a), _bits(b))


def _inputs(shape, channels_last, trial, gen):
    # many exact ties, zeros and negatives; `+ 0.0` turns the -0.0 of round() into +0.0 (see the -0.0 test)
    x = torch.randn(shape, generator=gen).mul_(2).round_() + 0.0
    if trial == 1:
        x[..., :2, :2] = -float("inf")
    if trial == 2:
        x[0, 0, 0, 1] = float("nan")
        x[-1, -1, 1, 0] = float("nan")
        x[-1, -1, 1, 1] = float("nan")  # two NaNs in one window
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 16, 6, 10), (3, 2, 7, 9), (1, 1, 2, 2)])
def test_fused_relu_pool_equals_relu_then_maxpool(shape, channels_last):
    gen = torch.Generator().manual_seed(sum(shape))
    for trial in range(4):
        x = _inputs(shape, channels_last, trial, gen)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref = F.max_pool2d(F.relu(a * 1.0, inplace=True), 2)  # `* 1.0`: the in-place ReLU needs a non-leaf
        got = relu_max_pool2x2(b * 1.0)
        assert _same(ref, got)
        g = torch.randn(ref.shape, generator=gen).round_()
        if trial == 3:
            g = g.contiguous(memory_format=torch.channels_last)
        ref.backward(g)
        got.backward(g)
        assert _same(a.grad, b.grad)
        with torch.no_grad():
            assert torch.allclose(relu_max_pool2x2(x), ref.detach(), rtol=0, atol=0, equal_nan=True)


def test_fused_relu_pool_exact_routing():
    # the first maximum in row-major order gets the gradient; a window with maximum <= 0 passes none
    x = torch.tensor([[[[1.0, 3.0, -1.0, -2.0], [3.0, 3.0, -1.0, 0.0]]]], requires_grad=True)
    y = relu_max_pool2x2(x * 1.0)
    assert y.tolist() == [[[[3.0, 0.0]]]]
    y.backward(torch.tensor([[[[5.0, 7.0]]]]))
    assert x.grad.tolist() == [[[[0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]]


def test_fused_relu_pool_negative_zero_is_the_one_difference():
    # documented: a window with no positive value that holds an exact -0.0 may give +0.0 where the separate
    # ops give -0.0 (equal as numbers; BN outputs are never exactly -0.0 in practice). Gradients: identical.
    x = torch.tensor([[[[-1.0, -0.0], [-2.0, -3.0]]]])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, got = F.max_pool2d(F.relu(a * 1.0), 2), relu_max_pool2x2(b * 1.0)
    assert torch.equal(ref, got) and ref.item() == 0.0
    ref.backward(torch.ones(1, 1, 1, 1))
    got.backward(torch.ones(1, 1, 1, 1))
    assert torch.equal(_bits(a.grad), _bits(b.grad))


@pytest.mark.parametrize("grad_layout", [torch.contiguous_format, torch.channels_last])
def test_relu_layout_grad_equals_relu(grad_layout):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 5, 5, generator=gen).round_().contiguous(memory_format=torch.channels_last)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, got = nn.ReLU()(a * 1.0), ReLULayoutGrad()(b * 1.0)
    assert _same(ref, got)
    g = torch.randn(ref.shape, generator=gen).contiguous(memory_format=grad_layout)
    ref.backward(g)
    got.backward(g)
    assert torch.equal(_bits(a.grad), _bits(b.grad))
    v = torch.randn(6, 3, generator=gen, requires_grad=True)  # 2-D (an MLP's last ReLU): plain threshold backward
    ReLULayoutGrad()(v * 1.0).backward(torch.ones(6, 3))
    assert v.grad.tolist() == (v > 0).float().tolist()


def test_fused_relu_pool_swaps_and_restores():
    enc = create_backbone("cnn28", in_channels=1, input_size=(1, 28, 28))
    head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Linear(64, 8))
    model = nn.ModuleDict({"encoder": enc, "head": head})
    before = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    with fused_relu_pool(model):
        assert [type(m) for m in enc.block1] == [nn.Conv2d, nn.BatchNorm2d, nn.Identity, ReLUMaxPool2x2]
        assert [type(m) for m in enc.block2] == [nn.Conv2d, nn.BatchNorm2d, nn.Identity, ReLUMaxPool2x2]
        assert [type(m) for m in enc.block3] == [nn.Conv2d, nn.BatchNorm2d, ReLULayoutGrad]
        assert type(head[1]) is nn.ReLU  # not the last module, not before a pool: untouched
        assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == before
    assert type(enc.block1[3]) is MaxPool2x2
    with pytest.raises(RuntimeError, match="boom"), fused_relu_pool(model):
        raise RuntimeError("boom")
    assert [type(m) for m in model.modules()] == before


# ---------------------------------------------------------------------------------------------------------------
# Whole stage-0 runs against the same loop on the plain modules (fused_relu_pool switched off)
# ---------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_fusion(model):
    yield model


def _images(n: int, seed: int) -> TensorData:
    """Fashion-MNIST-like uint8 images: a zero background (exact ties everywhere) with bright blobs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    top = torch.randint(2, 14, (n,), generator=gen)
    left = torch.randint(2, 14, (n,), generator=gen)
    rows = torch.arange(28)[None, :, None]
    cols = torch.arange(28)[None, None, :]
    blob = (rows >= top[:, None, None]) & (rows < top[:, None, None] + 12) & (cols >= left[:, None, None])
    blob &= cols < left[:, None, None] + 10
    x[:, 0][blob] = torch.randint(60, 256, (int(blob.sum()),), generator=gen, dtype=torch.uint8)
    return TensorData(x, torch.zeros(n, dtype=torch.long), transforms=get_transforms("gray28", "crop"), name="imgs")


@pytest.mark.parametrize("backbone", ["cnn28", "cnn8"])
def test_simclr_pretrain_bitwise_equal_to_the_old_loop(backbone):
    data = _images(384, seed=3)
    if backbone == "cnn8":  # 8×8 digits-sized inputs: one pooled block, no channels-last
        data = TensorData(data.x[:, :, ::3, ::3][:, :, :8, :8].float() / 255, data.targets, name="small")
    kw = {"epochs": 3, "batch_size": 128, "temperature": 0.5, "proj_dim": 32,
          "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 1e-6}}
    shape = tuple(data.x.shape[1:])
    encoders = []
    for _ in range(2):
        torch.manual_seed(0)
        encoders.append(create_backbone(backbone, in_channels=1, input_size=shape))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simclr_mod, "fused_relu_pool", _no_fusion)
        ref = simclr_pretrain(encoders[0], data, generator=torch.Generator().manual_seed(5), **kw)
    info = simclr_pretrain(encoders[1], data, generator=torch.Generator().manual_seed(5), **kw)
    assert info["epoch_loss"] == ref["epoch_loss"] and info["steps"] == ref["steps"] == 3 * (384 // 128)
    ref, got = encoders[0].state_dict(), encoders[1].state_dict()
    assert list(ref) == list(got)
    for k in ref:
        assert torch.equal(_bits(ref[k]), _bits(got[k])), k
    assert [type(m) for m in encoders[0].modules()] == [type(m) for m in encoders[1].modules()]
