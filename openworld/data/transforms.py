"""Train/test transforms per data family.

``get_transforms(family, augment, image_size)`` returns a :class:`~openworld.data.views.TransformPair`.

Batched families (``digits``, ``gray28``, ``cifar``, ``vector``) work on a whole batch tensor
``[B, C, H, W]`` (uint8 in 0…255 or float in [0, 1]; ``[B, D]`` for ``vector``) on any device and
return float32, normalised. Their train transform takes a keyword ``generator``: every random number
is drawn from it **on the CPU** and only then moved to the batch's device, so a seeded generator gives
the same augmented batch on CPU and GPU, and no per-sample Python loop is involved.

The ``imagenet`` family is per-sample (PIL in, tensor out), applied in DataLoader workers.

``ovor`` (both ``cifar`` and ``imagenet``) is the OVOR/CODA-Prompt recipe (card cil-ovor §1): inputs stay in
[0, 1] (the code's mean (0,0,0) / std (1,1,1)); train RandomResizedCrop(size) (scale (0.08, 1), ratio
(3/4, 4/3)) + HFlip; test Resize(size) without a crop for ``cifar`` (32→224), Resize(round(size·256/224))
+ CenterCrop(size) for ``imagenet``. ``size`` = ``image_size`` or 224. The ``cifar`` version runs batched
on the batch's device: the crop boxes are drawn from the CPU generator like every batched augmentation
(torchvision's sampling rule, 10 tries then the centre fallback, not its random stream), and each box is
resized with PyTorch's antialiased bilinear weights, i.e. exactly ``interpolate(crop, size, "bilinear",
antialias=True)`` = torchvision's resize of a float tensor. Deviation: the released code resizes uint8
PIL images (PIL's bilinear, then rounding); here the resize is done in float32 on [0, 1] values.

Families and augmentations (``default`` in brackets):

========== ================================================================ =====================
family     augment                                                          normalisation
========== ================================================================ =====================
digits     [none]                                                           scale to [0, 1] only
gray28     [none], crop (random crop, zero padding 2)                       MNIST mean/std
cifar      none, [crop_flip] (RandomCrop 32 pad 4 + HFlip),                 CIFAR-100 mean/std
           autoaugment_cutout (crop_flip + AutoAugment CIFAR10 + Cutout 16)  (FSCIL card §3)
           ovor (RandomResizedCrop 224 + HFlip; test Resize 224)              none ([0, 1])
           sade (crop_flip + RandomRotation 15, nearest, fill 0)              SADE's CIFAR mean/std
vector     [none] (identity, cast to float32)                               none
imagenet   none, [crop_flip], mini, mini_autoaugment, cub                   ImageNet mean/std
           ovor (RandomResizedCrop 224 + HFlip; test Resize 256 + CenterCrop) none ([0, 1])
========== ================================================================ =====================

Deviation (recorded in the pair's name): AutoAugment uses torchvision's policy tables with fill 128
(the released FSCIL code uses a PIL re-implementation with the same fill); the ImageNet policy is cut
to its first 24 sub-policies as in the released code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from openworld.data.views import TransformPair

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
# the constants SADE's released code normalises CIFAR-10 and CIFAR-100 with (long-tail card §2.1)
SADE_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
SADE_CIFAR_STD = (0.2023, 0.1994, 0.2010)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

AUTOAUGMENT_FILL = 128
OVOR_SIZE = 224  # the OVOR recipe's default output side
RRC_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop defaults
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_TRIES = 10

FAMILIES: dict[str, tuple[str, ...]] = {
    "digits": ("none",),
    "gray28": ("none", "crop"),
    "cifar": ("none", "crop_flip", "autoaugment_cutout", "ovor", "sade"),
    "vector": ("none",),
    "imagenet": ("none", "crop_flip", "mini", "mini_autoaugment", "cub", "ovor"),
}
DEFAULT_AUGMENT: dict[str, str] = {
    "digits": "none",
    "gray28": "none",
    "cifar": "crop_flip",
    "vector": "none",
    "imagenet": "crop_flip",
}


# ----------------------------------------------------------------------------------------------
# Batched transforms
# ----------------------------------------------------------------------------------------------
def _rand(n: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator)


def _randint(high: int, n: int, generator: torch.Generator | None) -> Tensor:
    return torch.randint(high, (n,), generator=generator)


def _to_uint8(x: Tensor) -> Tensor:
    if x.dtype == torch.uint8:
        return x
    return (x.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)


def random_crop(x: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random crop of the original size from the zero-padded batch (RandomCrop(size, pad))."""
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    oy = _randint(2 * pad + 1, b, generator).to(x.device)
    ox = _randint(2 * pad + 1, b, generator).to(x.device)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [B, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [B, 1, W]
    bi = torch.arange(b, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[bi, rows, cols].permute(0, 3, 1, 2).contiguous()


def rotate(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate each image of ``x`` [B, C, H, W] counter-clockwise by ``angles[b]`` degrees about its centre,
    nearest neighbour, outside filled with 0, same size (torchvision's ``rotate(img, angle)`` defaults).
    Each output pixel centre, taken relative to the image centre, is mapped back through the inverse
    rotation and sampled with ``grid_sample(mode="nearest", align_corners=False)``; uint8 stays uint8."""
    b, _, h, w = x.shape
    rad = torch.deg2rad(angles.to(device=x.device, dtype=torch.float32))
    cos, sin = torch.cos(rad), torch.sin(rad)
    ys = torch.arange(h, device=x.device, dtype=torch.float32) - (h - 1) / 2  # pixel centres, y down
    xs = torch.arange(w, device=x.device, dtype=torch.float32) - (w - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    # counter-clockwise on screen (y down): the source of output (x, y) is R(θ)·(x, y) with
    # R = [[cos, -sin], [sin, cos]] applied in (x, −y) coordinates
    src_x = cos[:, None, None] * gx - sin[:, None, None] * gy
    src_y = sin[:, None, None] * gx + cos[:, None, None] * gy
    grid = torch.stack([(src_x + (w - 1) / 2 + 0.5) * 2 / w - 1, (src_y + (h - 1) / 2 + 0.5) * 2 / h - 1], dim=-1)
    out = torch.nn.functional.grid_sample(x.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out.round_().to(torch.uint8) if x.dtype == torch.uint8 else out


def random_rotation(x: Tensor, degrees: float, generator: torch.Generator | None = None) -> Tensor:
    """``RandomRotation(degrees)`` per sample: angle ~ U(−degrees, degrees) drawn on the CPU generator."""
    angles = (_rand(len(x), generator) * 2 - 1) * degrees
    return rotate(x, angles)


def random_hflip(x: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    flip = (_rand(len(x), generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def rrc_params(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
    tries: int = RRC_TRIES,
) -> Tensor:
    """Crop boxes ``[n, 4]`` (top, left, height, width; int64, CPU) by torchvision's RandomResizedCrop rule.

    Per sample and try: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); w = round(√(area·r)),
    h = round(√(area/r)); the first try with 0 < w ≤ W and 0 < h ≤ H is kept, its offset uniform over the
    valid positions. No valid try: the centre crop of the whole image clamped to ``ratio``. A fixed number
    of numbers is drawn from ``generator`` (4 per try), so the stream does not depend on the image.
    """
    area = height * width
    u = torch.rand(n, tries, 4, generator=generator, dtype=torch.float64)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * r)).long()
    h = torch.round(torch.sqrt(target / r)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[..., 2] * (height - h + 1).clamp(min=1)).long()
    left = torch.floor(u[..., 3] * (width - w + 1).clamp(min=1)).long()
    first = torch.argmax(ok.int(), dim=1)  # first valid try (0 when none; masked below)
    rows = torch.arange(n)
    any_ok = ok.any(dim=1)
    # fallback: centre crop, aspect ratio clamped to `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = height, int(round(height * max(ratio)))
    else:
        fw, fh = width, height
    fb = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.long)
    picked = torch.stack([top[rows, first], left[rows, first], h[rows, first], w[rows, first]], dim=1)
    return torch.where(any_ok[:, None], picked, fb[None, :])


def _resample_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """``[B, out, in]`` weights resizing the window ``[start, start + length)`` of an axis to ``out_size``.

    The weights are PyTorch's antialiased bilinear ones (``interpolate(..., mode="bilinear",
    align_corners=False, antialias=True)``, which is also plain bilinear with edge clamping when
    enlarging): triangle filter of support max(scale, 1), centre scale·(i + 0.5), rows normalised.
    """
    dev = start.device
    scale = length.double() / out_size  # [B]
    support = torch.clamp(scale, min=1.0)
    inv = 1.0 / support
    centre = scale[:, None] * (torch.arange(out_size, device=dev, dtype=torch.float64) + 0.5)[None, :]  # [B, out]
    k = torch.arange(in_size, device=dev, dtype=torch.float64)[None, None, :] - start.double()[:, None, None]
    w = torch.clamp(1.0 - ((k - centre[:, :, None] + 0.5) * inv[:, None, None]).abs(), min=0.0)
    w = torch.where((k >= 0) & (k < length.double()[:, None, None]), w, torch.zeros((), dtype=w.dtype, device=dev))
    return (w / w.sum(dim=-1, keepdim=True)).float()


def resized_crop(x: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Per-sample crop ``boxes`` ([B, 4]: top, left, height, width) of a float batch, each resized to
    ``size × size`` as ``interpolate(crop, size, mode="bilinear", antialias=True)`` does (vectorised: two
    batched matrix products, no per-sample loop)."""
    b, _, h, w = x.shape
    boxes = boxes.to(x.device)
    wy = _resample_weights(boxes[:, 0], boxes[:, 2], h, size)  # [B, S, H]
    wx = _resample_weights(boxes[:, 1], boxes[:, 3], w, size)  # [B, S, W]
    rows = torch.matmul(wy[:, None], x.float())  # [B, C, S, W]
    return torch.matmul(rows, wx.transpose(1, 2)[:, None])  # [B, C, S, S]


def random_resized_crop(x: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """RandomResizedCrop(size) of a float batch in [0, 1]: boxes from :func:`rrc_params` (CPU generator),
    then :func:`resized_crop`, clamped to [0, 1] (float rounding of the normalised weights)."""
    boxes = rrc_params(len(x), int(x.shape[-2]), int(x.shape[-1]), generator)
    return resized_crop(x, boxes, size).clamp_(0.0, 1.0)


def cutout(x: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """One square hole of side ``size`` per image, centred uniformly, clipped at the border; set to 0."""
    b, _, h, w = x.shape
    cy = _randint(h, b, generator).to(x.device)
    cx = _randint(w, b, generator).to(x.device)
    half = size // 2
    ys = torch.arange(h, device=x.device)[None, :]
    xs = torch.arange(w, device=x.device)[None, :]
    in_y = (ys >= (cy[:, None] - half)) & (ys < (cy[:, None] + size - half))  # [B, H]
    in_x = (xs >= (cx[:, None] - half)) & (xs < (cx[:, None] + size - half))  # [B, W]
    hole = in_y[:, :, None] & in_x[:, None, :]
    return x.masked_fill(hole[:, None], 0)


def _autoaugment_tables(policy: str) -> tuple[list, dict]:
    """Sub-policies and magnitude space of torchvision's AutoAugment (the card's named substitute)."""
    from torchvision.transforms import v2

    aa = v2.AutoAugment(getattr(v2.AutoAugmentPolicy, policy))
    policies = getattr(aa, "_policies", None)
    space = getattr(aa, "_AUGMENTATION_SPACE", None)
    if not policies or not isinstance(space, dict):  # pragma: no cover - torchvision internals changed
        raise RuntimeError("this torchvision version does not expose AutoAugment's policy tables")
    return list(policies), space


def _apply_op(img: Tensor, op: str, magnitude: float, fill: Sequence[float]) -> Tensor:
    """One AutoAugment operation with a fixed magnitude on a uint8 batch (same semantics as torchvision)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    nearest = InterpolationMode.NEAREST
    fill = list(fill)
    if op == "ShearX":
        shear = [math.degrees(math.atan(magnitude)), 0.0]
        return F.affine(
            img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest, fill=fill, center=[0, 0]
        )
    if op == "ShearY":
        shear = [0.0, math.degrees(math.atan(magnitude))]
        return F.affine(
            img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest, fill=fill, center=[0, 0]
        )
    if op == "TranslateX":
        return F.affine(
            img, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0], interpolation=nearest, fill=fill
        )
    if op == "TranslateY":
        return F.affine(
            img, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0], interpolation=nearest, fill=fill
        )
    if op == "Rotate":
        return F.rotate(img, angle=magnitude, interpolation=nearest, fill=fill)
    if op == "Brightness":
        return F.adjust_brightness(img, 1.0 + magnitude)
    if op == "Color":
        return F.adjust_saturation(img, 1.0 + magnitude)
    if op == "Contrast":
        return F.adjust_contrast(img, 1.0 + magnitude)
    if op == "Sharpness":
        return F.adjust_sharpness(img, 1.0 + magnitude)
    if op == "Posterize":
        return F.posterize(img, int(magnitude))
    if op == "Solarize":
        return F.solarize(img, 255.0 * magnitude)
    if op == "AutoContrast":
        return F.autocontrast(img)
    if op == "Equalize":
        return F.equalize(img)
    if op == "Invert":
        return F.invert(img)
    raise ValueError(f"unknown AutoAugment operation {op!r}")


class BatchedAutoAugment:
    """AutoAugment over a uint8 batch, vectorised by grouping samples.

    Per sample (as torchvision): a sub-policy is drawn uniformly; each of its two operations is applied
    with its probability, and a signed magnitude is negated with probability 1/2. Samples sharing
    (sub-policy, op applied?, sign) are transformed together, so a batch costs at most
    ``len(policies) × 2 × 2`` operation calls whatever its size.
    """

    def __init__(self, policy: str = "CIFAR10", fill: int = AUTOAUGMENT_FILL, num_policies: int | None = None):
        policies, space = _autoaugment_tables(policy)
        self.policy = policy
        self.policies = policies[:num_policies] if num_policies else policies
        self.space = space
        self.fill = fill

    def _magnitude(self, op: str, index: int | None, h: int, w: int) -> tuple[float, bool]:
        fn, signed = self.space[op]
        mags = fn(10, h, w)
        if mags is None or index is None:
            return 0.0, False
        return float(mags[index]), bool(signed)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dtype != torch.uint8:
            raise TypeError("BatchedAutoAugment expects a uint8 batch")
        b, c, h, w = x.shape
        n_ops = max(len(p) for p in self.policies)
        choice = _randint(len(self.policies), b, generator)
        apply_u = torch.rand(b, n_ops, generator=generator)
        sign_u = torch.rand(b, n_ops, generator=generator)
        fill = [float(self.fill)] * c
        out = x.clone()
        for k in torch.unique(choice).tolist():
            members = torch.nonzero(choice == k).flatten()
            for j, (op, prob, mag_idx) in enumerate(self.policies[k]):
                magnitude, signed = self._magnitude(op, mag_idx, h, w)
                applied = members[apply_u[members, j] < prob]
                if applied.numel() == 0:
                    continue
                if signed:
                    neg = sign_u[applied, j] < 0.5
                    parts = [(applied[~neg], magnitude), (applied[neg], -magnitude)]
                else:
                    parts = [(applied, magnitude)]
                for idx, mag in parts:
                    if idx.numel() == 0:
                        continue
                    idx_dev = idx.to(x.device)
                    out[idx_dev] = _apply_op(out[idx_dev], op, mag, fill)
        return out


class BatchTransform:
    """Augment (optional) → float in [0, 1] → cutout (optional) → resize (optional) → normalise.

    ``rrc=True``: after the conversion to float, a RandomResizedCrop to ``size`` (then the flip, if
    ``flip``) replaces the resize. ``antialias``: of the resize (None: only when shrinking).
    Call as ``t(x)`` or ``t(x, generator=g)``. ``train=False`` instances never draw random numbers.
    """

    def __init__(
        self,
        *,
        name: str,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pad: int = 0,
        flip: bool = False,
        autoaugment: BatchedAutoAugment | None = None,
        cutout: int = 0,
        size: int | None = None,
        image: bool = True,
        rrc: bool = False,
        antialias: bool | None = None,
        rotation: float = 0.0,
    ):
        if rrc and size is None:
            raise ValueError(f"{name}: a RandomResizedCrop needs an output size")
        self.name = name
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32)
        self.pad = pad
        self.flip = flip
        self.autoaugment = autoaugment
        self.cutout = cutout
        self.size = size
        self.image = image
        self.rrc = rrc
        self.antialias = antialias
        self.rotation = rotation

    def __repr__(self) -> str:
        return f"BatchTransform({self.name})"

    def __call__(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        if not self.image:
            return x.float() if x.dtype != torch.float32 else x
        if x.dim() == 3:  # [B, H, W] -> [B, 1, H, W]
            x = x[:, None]
        if x.dim() != 4:
            raise ValueError(f"{self.name}: expected a batch [B, C, H, W], got shape {tuple(x.shape)}")
        if self.pad:
            x = random_crop(x, self.pad, generator)
        if self.flip and not self.rrc:
            x = random_hflip(x, generator)
        if self.rotation:
            x = random_rotation(x, self.rotation, generator)
        if self.autoaugment is not None:
            x = self.autoaugment(_to_uint8(x), generator)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.rrc:
            x = random_resized_crop(x, self.size, generator)
            if self.flip:
                x = random_hflip(x, generator)
        if self.cutout:
            x = cutout(x, self.cutout, generator)
        if not self.rrc and self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            aa = self.size < min(x.shape[-2:]) if self.antialias is None else self.antialias
            x = torch.nn.functional.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=aa
            )
        if self.mean is not None:
            mean = self.mean.to(x.device)[None, :, None, None]
            std = self.std.to(x.device)[None, :, None, None]
            if x.shape[1] != mean.shape[1]:
                raise ValueError(f"{self.name}: {x.shape[1]} channels, normalisation has {mean.shape[1]}")
            x = (x - mean) / std
        return x


# ----------------------------------------------------------------------------------------------
# Per-sample (PIL) transforms for image-file datasets
# ----------------------------------------------------------------------------------------------
def _imagenet_pair(augment: str, image_size: int | None) -> tuple[Any, Any]:
    from torchvision.transforms import v2

    def finish(ops: list) -> Any:
        return v2.Compose(
            [*ops, v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

    if augment in ("mini", "mini_autoaugment"):
        size = image_size or 84
        train = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
        if augment == "mini_autoaugment":
            aa = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, fill=AUTOAUGMENT_FILL)
            if hasattr(aa, "_policies"):
                aa._policies = aa._policies[:24]  # the released FSCIL code's 24 sub-policies
            train.append(aa)
        test = [v2.Resize((round(size * 92 / 84), round(size * 92 / 84))), v2.CenterCrop(size)]
        return finish(train), finish(test)
    if augment == "ovor":  # card cil-ovor §1: [0, 1] inputs (mean 0, std 1)
        size = image_size or OVOR_SIZE
        ident = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        train = [v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *ident]
        test = [v2.Resize(round(size * 256 / 224)), v2.CenterCrop(size), *ident]
        return v2.Compose(train), v2.Compose(test)
    if augment == "cub":
        size = image_size or 224
        resize = round(size * 256 / 224)
        train = [v2.Resize(resize), v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]
        test = [v2.Resize(resize), v2.CenterCrop(size)]
        return finish(train), finish(test)
    size = image_size or 224
    test = [v2.Resize(round(size / 0.875)), v2.CenterCrop(size)]
    if augment == "none":
        return finish(test), finish(test)
    return finish([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()]), finish(test)


# ----------------------------------------------------------------------------------------------
def get_transforms(family: str, augment: str = "default", image_size: int | None = None) -> TransformPair:
    """The train/test transform pair of a data family (see the module docstring for the table).

    ``image_size``: output side length (batched families resize only when the input differs; the
    ``imagenet`` family crops to it: default 84 for ``mini*``, 224 otherwise).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown transform family {family!r}; allowed: {', '.join(FAMILIES)}")
    allowed = FAMILIES[family]
    aug = DEFAULT_AUGMENT[family] if augment in (None, "default") else augment
    if aug not in allowed:
        raise ValueError(
            f"unknown augment {augment!r} for transform family {family!r}; allowed: default, {', '.join(allowed)}"
        )
    name = f"{family}/{aug}" + (f"@{image_size}" if image_size else "")
    if aug == "ovor" and not image_size:
        name = f"{family}/{aug}@{OVOR_SIZE}"
    if family == "imagenet":
        train, test = _imagenet_pair(aug, image_size)
        return TransformPair(train=train, test=test, batched=False, name=name)
    if family == "vector":
        return TransformPair(
            BatchTransform(name=name, image=False), BatchTransform(name=name, image=False), batched=True, name=name
        )
    if family == "digits":
        test = BatchTransform(name=name + ":test", size=image_size)
        return TransformPair(test, test, batched=True, name=name)
    if family == "gray28":
        norm = {"mean": MNIST_MEAN, "std": MNIST_STD, "size": image_size}
        test = BatchTransform(name=name + ":test", **norm)
        train = BatchTransform(name=name + ":train", pad=2 if aug == "crop" else 0, **norm)
        return TransformPair(train, test, batched=True, name=name)
    # cifar
    if aug == "ovor":  # card cil-ovor §1: [0, 1] inputs, RandomResizedCrop + flip / Resize without a crop
        size = image_size or OVOR_SIZE
        train = BatchTransform(name=name + ":train", size=size, rrc=True, flip=True)
        test = BatchTransform(name=name + ":test", size=size, antialias=True)
        return TransformPair(train, test, batched=True, name=name)
    if aug == "sade":  # long-tail card §2.1: crop + flip + RandomRotation(15), SADE's normalisation
        norm = {"mean": SADE_CIFAR_MEAN, "std": SADE_CIFAR_STD, "size": image_size}
        train = BatchTransform(name=name + ":train", pad=4, flip=True, rotation=15.0, **norm)
        return TransformPair(train, BatchTransform(name=name + ":test", **norm), batched=True, name=name)
    norm = {"mean": CIFAR100_MEAN, "std": CIFAR100_STD, "size": image_size}
    test = BatchTransform(name=name + ":test", **norm)
    if aug == "none":
        train = BatchTransform(name=name + ":train", **norm)
    elif aug == "crop_flip":
        train = BatchTransform(name=name + ":train", pad=4, flip=True, **norm)
    else:
        train = BatchTransform(
            name=name + ":train", pad=4, flip=True, autoaugment=BatchedAutoAugment("CIFAR10"), cutout=16, **norm
        )
    return TransformPair(train, test, batched=True, name=name)


__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DEFAULT_AUGMENT",
    "FAMILIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "OVOR_SIZE",
    "BatchTransform",
    "BatchedAutoAugment",
    "cutout",
    "get_transforms",
    "random_crop",
    "random_hflip",
    "random_resized_crop",
    "random_rotation",
    "rotate",
    "resized_crop",
    "rrc_params",
]
