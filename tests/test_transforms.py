"""Transforms: families, shapes/dtypes, normalisation, seeded reproducibility, vectorised augmentation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from openworld.data import transforms as T
from openworld.data.transforms import BatchedAutoAugment, get_transforms
from openworld.data.views import TensorData, batches


def uint8_batch(b: int = 16, c: int = 3, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


BATCHED = [
    ("digits", "none", (1, 8, 8)),
    ("gray28", "none", (1, 28, 28)),
    ("gray28", "crop", (1, 28, 28)),
    ("cifar", "none", (3, 32, 32)),
    ("cifar", "crop_flip", (3, 32, 32)),
    ("cifar", "autoaugment_cutout", (3, 32, 32)),
]


@pytest.mark.parametrize(("family", "augment", "shape"), BATCHED)
def test_batched_shapes_dtype_and_reproducibility(family, augment, shape):
    pair = get_transforms(family, augment)
    assert pair.batched and pair.name == f"{family}/{augment}"
    x = uint8_batch(32, *shape)
    a = pair.train(x, generator=gen(1))
    b = pair.train(x, generator=gen(1))
    assert a.dtype == torch.float32 and tuple(a.shape) == (32, *shape)
    assert torch.equal(a, b)
    t = pair.test(x)
    assert t.dtype == torch.float32 and tuple(t.shape) == (32, *shape)
    assert torch.equal(t, pair.test(x))
    if augment != "none":
        assert not torch.equal(a, pair.train(x, generator=gen(2)))
    else:
        assert torch.equal(a, t)


def test_default_augment_per_family():
    assert get_transforms("cifar").name == "cifar/crop_flip"
    assert get_transforms("gray28").name == "gray28/none"
    assert get_transforms("digits").name == "digits/none"
    assert get_transforms("vector").name == "vector/none"
    assert get_transforms("imagenet").name == "imagenet/crop_flip"


def test_normalisation_constants():
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    out = get_transforms("cifar", "none").test(x)
    expected = -torch.tensor(T.CIFAR100_MEAN) / torch.tensor(T.CIFAR100_STD)
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    g = get_transforms("gray28").test(torch.full((1, 1, 28, 28), 255, dtype=torch.uint8))
    torch.testing.assert_close(g[0, 0, 0, 0], torch.tensor((1 - 0.1307) / 0.3081))
    d = get_transforms("digits").test(torch.full((1, 1, 8, 8), 0.5))
    assert torch.all(d == 0.5)


def test_uint8_and_float_inputs_agree():
    x = uint8_batch(8)
    pair = get_transforms("cifar", "crop_flip")
    a = pair.train(x, generator=gen(3))
    b = pair.train(x.float() / 255, generator=gen(3))
    torch.testing.assert_close(a, b)


def test_vector_family_is_identity():
    pair = get_transforms("vector")
    x = torch.randn(5, 256, dtype=torch.float64)
    out = pair.train(x, generator=gen(0))
    assert out.dtype == torch.float32 and torch.equal(out, x.float()) and torch.equal(pair.test(x), x.float())


def test_random_crop_is_a_crop_of_the_padded_image():
    x = uint8_batch(6, 1, 8, 8)
    out = T.random_crop(x, 2, gen(5))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        crops = [padded[i, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], crop) for crop in crops)


def test_hflip_flips_about_half():
    x = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 1, 1, 4)
    out = T.random_hflip(x, gen(0))
    flipped = (out != x).any(dim=(1, 2, 3))
    assert torch.equal(out[flipped], x[flipped].flip(-1))
    assert 16 < int(flipped.sum()) < 48


def test_cutout_makes_one_square_hole():
    x = torch.ones(50, 3, 32, 32)
    out = T.cutout(x, 16, gen(0))
    for i in range(len(x)):
        hole = (out[i] == 0).all(dim=0)
        rows, cols = hole.any(dim=1), hole.any(dim=0)
        assert 0 < int(rows.sum()) <= 16 and 0 < int(cols.sum()) <= 16
        assert int(hole.sum()) == int(rows.sum()) * int(cols.sum())  # a rectangle (a square clipped at borders)
        assert torch.all(out[i][:, ~hole] == 1)


def test_autoaugment_ops_match_torchvision():
    from torchvision.transforms import v2

    aa = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=T.AUTOAUGMENT_FILL)
    if not hasattr(aa, "_apply_image_or_video_transform"):
        pytest.skip("torchvision internals changed")
    x = uint8_batch(4)
    for op in aa._AUGMENTATION_SPACE:
        mags = {"Posterize": (4.0, 6.0), "Solarize": (0.5, 0.9)}.get(op, (0.0, 0.3, -0.3))
        for mag in mags:
            if op in ("TranslateX", "TranslateY", "Rotate"):
                mag *= 20
            ours = T._apply_op(x, op, mag, [float(T.AUTOAUGMENT_FILL)] * 3)
            ref = aa._apply_image_or_video_transform(x, op, mag, interpolation=aa.interpolation, fill=aa._fill)
            assert torch.equal(ours, ref), op


def test_batched_autoaugment_equals_per_sample_application():
    x = uint8_batch(40)
    aug = BatchedAutoAugment("CIFAR10")
    out = aug(x, gen(7))
    # replay the same draws sample by sample
    g = gen(7)
    choice = torch.randint(len(aug.policies), (40,), generator=g)
    apply_u = torch.rand(40, 2, generator=g)
    sign_u = torch.rand(40, 2, generator=g)
    for i in range(40):
        img = x[i : i + 1]
        for j, (op, p, idx) in enumerate(aug.policies[int(choice[i])]):
            if apply_u[i, j] < p:
                mag, signed = aug._magnitude(op, idx, 32, 32)
                if signed and sign_u[i, j] < 0.5:
                    mag = -mag
                img = T._apply_op(img, op, mag, [128.0] * 3)
        assert torch.equal(out[i : i + 1], img), i
    assert len(aug.policies) == 25


def test_resize_to_image_size():
    pair = get_transforms("cifar", "crop_flip", image_size=64)
    out = pair.train(uint8_batch(4), generator=gen(0))
    assert tuple(out.shape) == (4, 3, 64, 64)
    g = get_transforms("digits", image_size=28).test(torch.rand(3, 1, 8, 8))
    assert tuple(g.shape) == (3, 1, 28, 28)


def test_unknown_family_or_augment_lists_allowed_values():
    with pytest.raises(ValueError, match="allowed: digits, gray28, cifar, vector, imagenet"):
        get_transforms("audio")
    with pytest.raises(ValueError, match="none, crop_flip, autoaugment_cutout"):
        get_transforms("cifar", "mixup")


@pytest.mark.parametrize(
    ("augment", "size", "expected"),
    [("mini", None, 84), ("mini_autoaugment", None, 84), ("cub", None, 224), ("none", 32, 32), ("crop_flip", 48, 48)],
)
def test_imagenet_per_sample(augment, size, expected):
    pair = get_transforms("imagenet", augment, image_size=size)
    assert not pair.batched
    img = Image.new("RGB", (120, 100), (200, 30, 60))
    torch.manual_seed(0)
    a = pair.train(img)
    torch.manual_seed(0)
    b = pair.train(img)
    t = pair.test(img)
    assert a.dtype == torch.float32 and tuple(a.shape) == (3, expected, expected) and torch.equal(a, b)
    assert tuple(t.shape) == (3, expected, expected)
    torch.testing.assert_close(
        t[:, expected // 2, expected // 2],
        (torch.tensor([200, 30, 60]) / 255 - torch.tensor(T.IMAGENET_MEAN)) / torch.tensor(T.IMAGENET_STD),
    )


def test_batches_drive_train_transform_with_the_generator():
    x = uint8_batch(20)
    data = TensorData(x, torch.arange(20) % 10, get_transforms("cifar", "autoaugment_cutout"))
    run1 = [xb for xb, _ in batches(data, 8, train=True, shuffle=True, generator=gen(11))]
    run2 = [xb for xb, _ in batches(data, 8, train=True, shuffle=True, generator=gen(11))]
    assert [tuple(b.shape) for b in run1] == [(8, 3, 32, 32), (8, 3, 32, 32), (4, 3, 32, 32)]
    assert all(torch.equal(a, b) for a, b in zip(run1, run2))
    test = next(batches(data, 20))[0]
    torch.testing.assert_close(test, get_transforms("cifar", "none").test(x))


def test_autoaugment_batch_cost_is_bounded():
    import time

    x = uint8_batch(256)
    tf = get_transforms("cifar", "autoaugment_cutout").train
    tf(x[:8], generator=gen(0))  # warm-up
    start = time.perf_counter()
    tf(x, generator=gen(0))
    assert time.perf_counter() - start < 10.0


def test_rotate_equals_torchvision_nearest_rotation():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    from openworld.data.transforms import rotate

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    angles = torch.cat([(torch.rand(9, generator=g) * 2 - 1) * 15, torch.tensor([0.0, 90.0, -45.0])])
    ours = rotate(x, angles)
    ref = torch.stack([tvf.rotate(x[i], float(angles[i]), interpolation=InterpolationMode.NEAREST) for i in range(12)])
    assert ours.dtype == torch.uint8 and torch.equal(ours, ref)
    assert torch.equal(rotate(x, torch.zeros(12)), x)


def test_sade_cifar_augmentation_is_seeded_and_normalised_as_the_card():
    from openworld.data.transforms import SADE_CIFAR_MEAN, SADE_CIFAR_STD, get_transforms

    pair = get_transforms("cifar", "sade")
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    a = pair.train(x, generator=torch.Generator().manual_seed(3))
    b = pair.train(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (8, 3, 32, 32)
    mean = torch.tensor(SADE_CIFAR_MEAN)[None, :, None, None]
    std = torch.tensor(SADE_CIFAR_STD)[None, :, None, None]
    assert torch.allclose(pair.test(x), (x.float() / 255 - mean) / std)
    assert pair.name == "cifar/sade"
