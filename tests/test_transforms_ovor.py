"""The OVOR recipe's transforms (card cil-ovor §1): [0, 1] inputs, RandomResizedCrop 224 + flip, and
Resize 224 (CIFAR, no crop) / Resize 256 + CenterCrop 224 (image files) at test time."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from openworld.data import transforms as T
from openworld.data.transforms import get_transforms, resized_crop, rrc_params
from openworld.data.views import TensorData, batches


def uint8_batch(b: int = 8, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ovor_is_listed_and_named():
    assert "ovor" in T.FAMILIES["cifar"] and "ovor" in T.FAMILIES["imagenet"]
    assert get_transforms("cifar", "ovor").name == "cifar/ovor@224"
    assert get_transforms("cifar", "ovor", 224).name == "cifar/ovor@224"
    assert get_transforms("cifar", "ovor", 96).name == "cifar/ovor@96"
    assert get_transforms("imagenet", "ovor").name == "imagenet/ovor@224"
    # the defaults are unchanged
    assert get_transforms("cifar").name == "cifar/crop_flip"
    assert get_transforms("imagenet").name == "imagenet/crop_flip"


def test_cifar_ovor_test_transform_is_torchvision_resize_without_crop():
    x = uint8_batch(6)
    pair = get_transforms("cifar", "ovor", 224)
    assert pair.batched
    out = pair.test(x)
    xf = x.float() / 255.0
    expected = torch.nn.functional.interpolate(xf, size=224, mode="bilinear", align_corners=False, antialias=True)
    assert out.dtype == torch.float32 and tuple(out.shape) == (6, 3, 224, 224)
    assert torch.equal(out, expected)
    assert torch.equal(out, TF.resize(xf, 224))  # torchvision's Resize(224) of the float image: the same op
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0  # identity normalisation: [0, 1] kept
    assert torch.equal(out, pair.test(xf))  # uint8 and [0, 1] float inputs agree


def test_cifar_ovor_train_shapes_range_and_seeded_reproducibility():
    x = uint8_batch(16)
    pair = get_transforms("cifar", "ovor", 224)
    a = pair.train(x, generator=gen(1))
    b = pair.train(x, generator=gen(1))
    assert a.dtype == torch.float32 and tuple(a.shape) == (16, 3, 224, 224)
    assert torch.equal(a, b)
    assert not torch.equal(a, pair.train(x, generator=gen(2)))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # a constant image stays constant (convex resampling weights, no normalisation)
    c = pair.train(torch.full((4, 3, 32, 32), 255, dtype=torch.uint8), generator=gen(3))
    torch.testing.assert_close(c, torch.ones_like(c), rtol=0, atol=1e-6)


def test_rrc_params_follow_torchvision_rule():
    boxes = rrc_params(4000, 32, 32, gen(0))
    assert boxes.dtype == torch.long and tuple(boxes.shape) == (4000, 4)
    top, left, h, w = boxes.unbind(1)
    assert bool((h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all())
    assert bool((top + h <= 32).all() and (left + w <= 32).all())
    area = (h * w).double() / (32 * 32)
    # rounding of w and h widens the area/ratio bounds by a pixel
    assert float(area.min()) >= 0.05 and float(area.max()) <= 1.0
    ratio = w.double() / h.double()
    assert float(ratio.min()) >= 0.6 and float(ratio.max()) <= 1.6
    assert torch.equal(boxes, rrc_params(4000, 32, 32, gen(0)))
    # no valid try (a 1-pixel-high image with a strict ratio): torchvision's centre fallback, ratio clamped
    fb = rrc_params(3, 1, 64, gen(0))
    assert fb.tolist() == [[0, 31, 1, 1]] * 3


@pytest.mark.parametrize(("h", "w", "size"), [(32, 32, 224), (50, 40, 24)])
def test_resized_crop_equals_interpolate_per_sample(h, w, size):
    x = torch.rand(12, 3, h, w, generator=gen(4))
    boxes = rrc_params(12, h, w, gen(5))
    out = resized_crop(x, boxes, size)
    assert tuple(out.shape) == (12, 3, size, size)
    for i, (t, left, bh, bw) in enumerate(boxes.tolist()):
        crop = x[i : i + 1, :, t : t + bh, left : left + bw]
        ref = torch.nn.functional.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(out[i], ref[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[i], TF.resized_crop(x[i], t, left, bh, bw, [size, size]), rtol=0, atol=1e-5)


def test_cifar_ovor_train_is_crop_then_flip_of_the_drawn_boxes():
    x = uint8_batch(10)
    out = get_transforms("cifar", "ovor", 64).train(x, generator=gen(7))
    g = gen(7)
    boxes = rrc_params(10, 32, 32, g)
    flip = torch.rand(10, generator=g) < 0.5
    ref = resized_crop(x.float() / 255.0, boxes, 64).clamp(0, 1)
    ref = torch.where(flip[:, None, None, None], ref.flip(-1), ref)
    assert torch.equal(out, ref)
    assert 0 < int(flip.sum()) < 10


def test_cifar_ovor_through_batches_is_reproducible():
    data = TensorData(uint8_batch(20), torch.arange(20) % 4, get_transforms("cifar", "ovor", 32))
    a = [xb for xb, _ in batches(data, 8, train=True, shuffle=True, generator=gen(0))]
    b = [xb for xb, _ in batches(data, 8, train=True, shuffle=True, generator=gen(0))]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert tuple(a[0].shape) == (8, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cifar_ovor_same_batch_on_cpu_and_gpu():
    x = uint8_batch(8)
    pair = get_transforms("cifar", "ovor", 224)
    cpu = pair.train(x, generator=gen(9))
    gpu = pair.train(x.cuda(), generator=gen(9)).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5)
    torch.testing.assert_close(pair.test(x.cuda()).cpu(), pair.test(x), rtol=0, atol=1e-5)


def test_imagenet_ovor_pair():
    pair = get_transforms("imagenet", "ovor")
    assert not pair.batched
    img = Image.new("RGB", (300, 260), (255, 0, 128))
    t = pair.test(img)
    assert t.dtype == torch.float32 and tuple(t.shape) == (3, 224, 224)
    # identity normalisation: pixel values / 255
    torch.testing.assert_close(t[:, 100, 100], torch.tensor([1.0, 0.0, 128 / 255]))
    torch.manual_seed(0)
    tr = pair.train(img)
    assert tuple(tr.shape) == (3, 224, 224) and float(tr.min()) >= 0.0 and float(tr.max()) <= 1.0
    # test = Resize(256) of the shorter side + CenterCrop(224), on a gradient image
    arr = torch.arange(260 * 300, dtype=torch.float64).reshape(260, 300)
    grad = Image.fromarray((arr % 251).to(torch.uint8).numpy()).convert("RGB")
    expected = TF.to_image(TF.center_crop(TF.resize(grad, 256), 224)).float() / 255.0  # PIL resize, as the code
    torch.testing.assert_close(pair.test(grad), expected, rtol=0, atol=1e-6)
    small = get_transforms("imagenet", "ovor", 96)
    assert small.name == "imagenet/ovor@96" and tuple(small.test(img).shape) == (3, 96, 96)
