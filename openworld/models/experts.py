"""Multi-expert backbones (SADE, card ``long-tail-sade-rcal`` §2.1) and their single-branch twins.

Every multi-expert backbone here is an ``nn.Module`` whose ``forward(x)`` returns per-expert pooled
features ``[B, E, d]``, with ``num_experts = E`` and ``out_features = d`` (the per-expert width), so
the generic :func:`openworld.models.create_backbone` builds it from a recipe's ``backbone:`` block.
Heads (SADE's per-expert cosine classifiers) live in the strategy.

* ``resnet32_experts`` — the LDAM ResNet-32 of SADE's CIFAR code: shared ``conv3×3(→16)–BN–ReLU`` +
  ``layer1`` (5 BasicBlocks at 16 channels), then **per expert** ``layer2`` and ``layer3`` (5 blocks
  each, stride 2) with widths 24/48 (``reduce_dimension=True``, SADE's CIFAR-100 configs) or 32/64,
  option-A shortcuts (``::2`` subsampling, then zero-padding ``(out−in)//2`` channels on each side).
  ``num_experts=1`` and ``reduce_dimension=False`` is the plain ResNet-32 of the baselines.
* ``cnn_experts`` — card §9 R2 (Fashion-MNIST-LT): shared conv blocks 1–2, per-expert block 3 and
  global average pooling (the ``cnn28`` layout, 16/32/64).
* ``mlp_experts`` — card §9 R1 (synthetic features): shared ``Linear(in→128)–BN–ReLU``, per-expert
  ``Linear(128→64)–BN–ReLU``.
* ``experts`` — a generic wrapper: ``num_experts`` independent copies of any registered backbone
  (an openworld one or ``timm/<model>``); nothing is shared, because a generic network offers no
  reliable split point. Use the specific layouts above for SADE's shared trunk.

Entry points (``openworld.backbones``): ``resnet32``, ``resnet32_experts``, ``cnn_experts``,
``mlp_experts``, ``experts``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from openworld.registry import register_backbone

from .pooling import MaxPool2x2

__all__ = [
    "CNNExperts",
    "IndependentExperts",
    "LDAMBlock",
    "MLPExperts",
    "NormedLinear",
    "ResNet32Experts",
    "SingleBranch",
    "cnn_experts",
    "experts",
    "mlp_experts",
    "resnet32",
    "resnet32_experts",
]


def _kaiming(module: nn.Module) -> None:
    """Kaiming-normal init for conv and plain linear weights (SADE ``_weights_init``); BN 1/0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class NormedLinear(nn.Module):
    """SADE's cosine classifier: ``s · normalize(x) @ normalize(W, dim=0)``; ``W`` [d, C] starts as
    uniform[−1, 1] columns rescaled to unit norm."""

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, num_classes))
        self.scale = float(scale)
        with torch.no_grad():
            self.weight.uniform_(-1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=0, keepdim=True).clamp(min=1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)


class LDAMBlock(nn.Module):
    """The LDAM/SADE CIFAR BasicBlock with the option-A (parameter-free) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = 0
        self.downsample = stride != 1 or in_planes != planes
        if self.downsample:
            if planes < in_planes:
                raise ValueError(f"option-A shortcut cannot shrink channels ({in_planes} -> {planes})")
            self.pad_lo = (planes - in_planes) // 2
            self.pad_hi = planes - in_planes - self.pad_lo

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _ldam_stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    layers = [LDAMBlock(in_planes, planes, stride)] + [LDAMBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class _ExpertsBase(nn.Module):
    num_experts: int
    out_features: int

    def forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward_shared(x)")

    def forward_expert(self, k: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward_expert(k, h)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of every expert, ``[B, E, d]``."""
        h = self.forward_shared(x)
        return torch.stack([self.forward_expert(k, h) for k in range(self.num_experts)], dim=1)


class ResNet32Experts(_ExpertsBase):
    """SADE's CIFAR ResNet-32 with a shared stem + ``layer1`` and per-expert ``layer2``/``layer3``."""

    def __init__(self, num_experts: int = 3, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64),
                 blocks: int = 5):
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.num_experts = int(num_experts)
        self.conv1 = nn.Conv2d(in_channels, w1, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.layer1 = _ldam_stage(w1, w1, blocks, 1)
        self.layer2s = nn.ModuleList([_ldam_stage(w1, w2, blocks, 2) for _ in range(self.num_experts)])
        self.layer3s = nn.ModuleList([_ldam_stage(w2, w3, blocks, 2) for _ in range(self.num_experts)])
        self.out_features = w3
        self.widths = (w1, w2, w3)
        _kaiming(self)

    def forward_shared(self, x):
        return self.layer1(F.relu(self.bn1(self.conv1(x))))

    def forward_expert(self, k, h):
        h = self.layer3s[k](self.layer2s[k](h))
        return F.adaptive_avg_pool2d(h, 1).flatten(1)


def _conv_block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                               nn.ReLU(inplace=True)]
    if pool:
        layers.append(MaxPool2x2())
    return nn.Sequential(*layers)


class CNNExperts(_ExpertsBase):
    """Card §9 R2: shared conv blocks 1–2 (max-pool after each), per-expert block 3 + global pooling."""

    def __init__(self, num_experts: int = 3, in_channels: int = 1, widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.num_experts = int(num_experts)
        self.shared = nn.Sequential(_conv_block(in_channels, w1, True), _conv_block(w1, w2, True))
        self.blocks = nn.ModuleList([_conv_block(w2, w3, False) for _ in range(self.num_experts)])
        self.out_features = w3
        _kaiming(self)

    def forward_shared(self, x):
        return self.shared(x)

    def forward_expert(self, k, h):
        return F.adaptive_avg_pool2d(self.blocks[k](h), 1).flatten(1)


class MLPExperts(_ExpertsBase):
    """Card §9 R1: shared ``Linear(in→trunk)–BN–ReLU``, per-expert ``Linear(trunk→d)–BN–ReLU``."""

    def __init__(self, in_features: int, num_experts: int = 3, trunk: int = 128, out_features: int = 64):
        super().__init__()
        self.num_experts = int(num_experts)
        self.in_features = int(in_features)
        self.shared = nn.Sequential(nn.Linear(self.in_features, trunk), nn.BatchNorm1d(trunk), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList([
            nn.Sequential(nn.Linear(trunk, out_features), nn.BatchNorm1d(out_features), nn.ReLU(inplace=True))
            for _ in range(self.num_experts)
        ])
        self.out_features = int(out_features)
        _kaiming(self)

    def forward_shared(self, x):
        x = torch.flatten(x, 1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"mlp_experts expects {self.in_features} input features per sample, got {x.shape[1]}")
        return self.shared(x)

    def forward_expert(self, k, h):
        return self.heads[k](h)


class IndependentExperts(_ExpertsBase):
    """``num_experts`` independent copies of one backbone (nothing shared)."""

    def __init__(self, make, num_experts: int = 3):
        super().__init__()
        self.num_experts = int(num_experts)
        self.members = nn.ModuleList([make() for _ in range(self.num_experts)])
        self.out_features = int(self.members[0].out_features)

    def forward_shared(self, x):
        return x

    def forward_expert(self, k, h):
        return self.members[k](h)


class SingleBranch(nn.Module):
    """A one-expert backbone seen as an ordinary encoder: ``[B, 1, d] → [B, d]``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if getattr(net, "num_experts", 1) != 1:
            raise ValueError(f"SingleBranch needs a one-expert backbone, got {net.num_experts} experts")
        self.net = net
        self.out_features = int(net.out_features)

    def forward(self, x):
        z = self.net(x)
        return z[:, 0] if z.dim() == 3 else z


@register_backbone("resnet32_experts")
def resnet32_experts(in_channels: int = 3, num_experts: int = 3, reduce_dimension: bool = False,
                     widths: Sequence[int] | None = None, **_: Any) -> ResNet32Experts:
    """SADE's multi-expert ResNet-32 (CIFAR): widths 16 / 24 / 48 with ``reduce_dimension`` (the
    CIFAR-100 configs), else 16 / 32 / 64 (CIFAR-10); ``widths`` overrides both. Output [B, E, d]."""
    if widths is None:
        widths = (16, 24, 48) if reduce_dimension else (16, 32, 64)
    return ResNet32Experts(num_experts, in_channels, widths)


@register_backbone("resnet32")
def resnet32(in_channels: int = 3, widths: Sequence[int] = (16, 32, 64), **_: Any) -> SingleBranch:
    """The LDAM ResNet-32 (option-A shortcuts, 5 blocks per stage), one branch at full widths; d = 64."""
    return SingleBranch(ResNet32Experts(1, in_channels, widths))


@register_backbone("cnn_experts")
def cnn_experts(in_channels: int = 1, num_experts: int = 3, widths: Sequence[int] = (16, 32, 64),
                **_: Any) -> CNNExperts:
    """Card §9 R2 multi-expert CNN (28×28 or 32×32 inputs): shared blocks 1–2, per-expert block 3."""
    return CNNExperts(num_experts, in_channels, widths)


@register_backbone("mlp_experts")
def mlp_experts(in_features: int | None = None, num_experts: int = 3, trunk: int = 128, out_features: int = 64,
                input_size: Sequence[int] | None = None, **_: Any) -> MLPExperts:
    """Card §9 R1 multi-expert MLP: shared ``in→trunk``, per-expert ``trunk→out_features``."""
    if in_features is None:
        if input_size is None:
            raise TypeError("mlp_experts needs `in_features` (or the runner-supplied `input_size`)")
        in_features = math.prod(int(s) for s in input_size)
    return MLPExperts(in_features, num_experts, trunk, out_features)


@register_backbone("experts")
def experts(backbone: dict | str = "resnet20", num_experts: int = 3, in_channels: int = 3,
            input_size: Sequence[int] | None = None) -> IndependentExperts:
    """Generic multi-expert wrapper: ``num_experts`` independent copies of ``backbone`` (a registered
    name such as ``resnet18`` or ``timm/resnet18``, or a ``{name: …, **options}`` block)."""
    from openworld.models import create_backbone

    cfg = {"name": backbone} if isinstance(backbone, str) else dict(backbone)
    if "name" not in cfg:
        raise TypeError("experts backbone: `backbone` needs a `name`")
    name = cfg.pop("name")
    if name in ("experts", "resnet32_experts", "cnn_experts", "mlp_experts"):
        raise TypeError(f"experts backbone: {name!r} is already multi-expert; wrap a single-branch backbone")
    shape = tuple(input_size) if input_size is not None else (in_channels, 32, 32)
    return IndependentExperts(lambda: create_backbone(name, in_channels=in_channels, input_size=shape, **cfg),
                              num_experts)


def single_branch_backbone(backbone_cfg: dict, input_shape: Sequence[int]) -> nn.Module:
    """An ordinary ``[B, d]`` encoder from a recipe's backbone block: a multi-expert layout becomes
    its one-expert, full-width branch (card §2.6: "same backbone with a single expert branch")."""
    from openworld.models import create_backbone

    cfg = dict(backbone_cfg)
    name = cfg.pop("name")
    shape = tuple(input_shape)
    in_ch = shape[0] if len(shape) == 3 else 1
    if name in ("resnet32_experts", "cnn_experts", "mlp_experts", "experts"):
        cfg["num_experts"] = 1
        if name == "resnet32_experts":
            cfg.pop("reduce_dimension", None)
            cfg.setdefault("widths", (16, 32, 64))
        return SingleBranch(create_backbone(name, in_channels=in_ch, input_size=shape, **cfg))
    return create_backbone(name, in_channels=in_ch, input_size=shape, **cfg)
