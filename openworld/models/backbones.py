"""Feature encoders ("backbones").

Every factory here returns an ``nn.Module`` whose ``forward(x)`` gives pooled, **un-normalised**
features of shape ``[B, d]`` and which carries ``out_features = d`` as an int attribute. Strategies
read the feature dimension from ``out_features``; nothing hard-codes it.

Factories take keyword arguments only, each with a default. The runner passes ``in_channels`` and
``input_size`` (one sample's shape, ``x.shape[1:]``) to every backbone; factories that do not need
them swallow them with ``**_``. User options are checked against the factory's signature by
:func:`openworld.models.create_backbone`, so a misspelt option is an error, not a silent no-op.

torchvision and timm are imported only when a model that needs them is built.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from openworld.models.pooling import MaxPool2x2
from openworld.registry import register_backbone

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ConvBlock",
    "MLPEncoder",
    "SmallCNN",
    "TimmBackbone",
    "cnn8",
    "cnn28",
    "load_weights_file",
    "mlp",
    "resnet18",
    "resnet20",
    "timm_backbone",
]


def _init_conv_bn(module: nn.Module) -> None:
    """He (fan-out) init for convolutions, BN scale 1 / shift 0 — the usual ResNet initialisation."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------------
# CIFAR ResNet-20
# ---------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection; a 1×1 conv-BN projection when the shape
    changes (the shortcut used by the CEC/TEEN ResNet-20); ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32×32 inputs: 3×3 stem (no max-pool), three stages of ``depth`` basic blocks with
    widths ``widths`` (strides 1, 2, 2), global average pooling. ``out_features = widths[-1]``."""

    def __init__(self, blocks_per_stage: int = 3, widths: Sequence[int] = (16, 32, 64), in_channels: int = 3):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages = []
        in_planes = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_planes, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = width
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


@register_backbone("resnet20")
def resnet20(in_channels: int = 3, **_: Any) -> CifarResNet:
    """CIFAR ResNet-20 (widths 16/32/64, 3 blocks per stage, 3×3 stem, no max-pool); d = 64."""
    return CifarResNet(blocks_per_stage=3, widths=(16, 32, 64), in_channels=in_channels)


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------
def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save`` (loaded with ``weights_only=True``).

    A checkpoint that wraps the weights as ``{"state_dict": …}`` or ``{"model": …}`` is unwrapped, and
    a ``module.`` prefix (DataParallel) is stripped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights_path {path!r} does not exist or is not a file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights_path {path!r} does not hold a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_encoder_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    ignore_prefixes: Iterable[str] = (),
    reinit: Iterable[str] = (),
    source: str,
) -> None:
    """Load ``state`` into ``model`` strictly, except for the classifier keys (``ignore_prefixes``,
    dropped because the encoder has no classifier) and the keys in ``reinit`` (kept at their fresh
    initialisation, with a warning). Shape mismatches and missing/unexpected keys raise, naming them."""
    prefixes = tuple(ignore_prefixes)
    reinit = set(reinit)
    state = {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}
    skipped = sorted(k for k in reinit if k in state)
    if skipped:
        warnings.warn(
            f"weights from {source}: {', '.join(skipped)} not loaded (the layer's shape differs); "
            "it keeps its random initialisation",
            stacklevel=3,
        )
        state = {k: v for k, v in state.items() if k not in reinit}
    own = model.state_dict()
    mismatched = [
        f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = sorted(set(own) - set(state) - reinit)
    unexpected = sorted(set(state) - set(own))
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + ", ".join(mismatched))
    if missing:
        problems.append("missing keys: " + ", ".join(missing[:10]) + (" …" if len(missing) > 10 else ""))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected[:10]) + (" …" if len(unexpected) > 10 else ""))
    if problems:
        raise ValueError(f"weights from {source} do not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------------------------------------
# ImageNet ResNet-18
# ---------------------------------------------------------------------------------------------
_OFFLINE_HINT = (
    "download the file on a machine with internet access and pass it as `weights_path: <file>` in the "
    "backbone options (a state dict saved with torch.save; the classifier keys are ignored)"
)


def _torchvision_imagenet_state() -> dict[str, torch.Tensor]:
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, OSError, hash mismatch, …: all mean "not available here"
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise RuntimeError(
            f"could not load the pretrained ResNet-18 weights (torchvision ResNet18_Weights.IMAGENET1K_V1, "
            f"{weights.url}; looked in the cache {cache} and tried to download): {type(exc).__name__}: {exc}. "
            f"Offline? Either place {os.path.basename(weights.url)} in {cache}, or {_OFFLINE_HINT}."
        ) from exc


def _swap_resnet_stem(model: nn.Module, in_channels: int, small_input: bool) -> None:
    """Replace the stem for a channel count other than 3 and/or 32-pixel inputs (3×3/1, no max-pool)."""
    if small_input:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    else:
        return
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")


@register_backbone("resnet18")
def resnet18(
    in_channels: int = 3,
    pretrained: bool = False,
    weights_path: str | None = None,
    source: str = "torchvision",
    small_input: bool = False,
    **_: Any,
) -> nn.Module:
    """ImageNet ResNet-18 (7×7/2 stem + max-pool, widths 64…512) without its classifier; d = 512.

    - ``pretrained=True``: torchvision's ``IMAGENET1K_V1`` weights through torchvision's weights API
      (cached under ``torch.hub.get_dir()``), or timm's default weights with ``source="timm"``.
    - ``weights_path``: load a local state dict instead (``torch.load(..., weights_only=True)``); it
      takes precedence over downloading. Keys of the classifier (``fc.*``) are ignored.
    - ``small_input=True``: a 3×3/1 stem without max-pool, for 32-pixel inputs. Pretrained stem
      weights do not fit it and are left at random init (with a warning); likewise for
      ``in_channels != 3``.

    With ``source="torchvision"`` the module is torchvision's ``ResNet`` with ``fc = Identity``, so its
    state-dict keys are torchvision's (minus ``fc``).
    """
    if source not in ("torchvision", "timm"):
        raise ValueError(f"resnet18: source must be 'torchvision' or 'timm', got {source!r}")
    stem_changed = small_input or in_channels != 3
    reinit = ("conv1.weight",) if stem_changed else ()

    if source == "timm":
        wrapper = timm_backbone(
            "resnet18",
            pretrained=pretrained and weights_path is None,
            in_channels=3,
            weights_path=weights_path,
        )
        _swap_resnet_stem(wrapper.model, in_channels, small_input)
        if stem_changed and (pretrained or weights_path):
            warnings.warn(
                "resnet18: the pretrained 7×7 stem does not fit the replaced stem; conv1 is random", stacklevel=2
            )
        return wrapper

    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None)
    model.fc = nn.Identity()
    _swap_resnet_stem(model, in_channels, small_input)
    if weights_path is not None:
        state, what = load_weights_file(weights_path), f"weights_path {os.fspath(weights_path)!r}"
    elif pretrained:
        state, what = _torchvision_imagenet_state(), "torchvision IMAGENET1K_V1"
    else:
        state = None
    if state is not None:
        _load_encoder_state(model, state, ignore_prefixes=("fc.",), reinit=reinit, source=what)
    model.out_features = 512
    return model


# ---------------------------------------------------------------------------------------------
# Small conv nets (28×28 and 8×8 inputs)
# ---------------------------------------------------------------------------------------------
class ConvBlock(nn.Sequential):
    """conv3×3 → BN → ReLU, optionally followed by 2×2 max-pooling."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool = False):
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        if pool:
            layers.append(MaxPool2x2())
        super().__init__(*layers)


class SmallCNN(nn.Module):
    """Three conv blocks (``block1``…``block3``, separately addressable for freezing or per-expert
    copies) and global average pooling; ``out_features = widths[-1]``."""

    def __init__(self, in_channels: int, widths: Sequence[int], pools: Sequence[bool]):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or len(pools) != 3:
            raise ValueError(f"SmallCNN needs three widths, got {widths}")
        if min(widths) < 1:
            raise ValueError(f"SmallCNN widths must be positive, got {widths}")
        chans = (in_channels,) + widths
        self.block1 = ConvBlock(chans[0], chans[1], pools[0])
        self.block2 = ConvBlock(chans[1], chans[2], pools[1])
        self.block3 = ConvBlock(chans[2], chans[3], pools[2])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = widths[-1]
        _init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return torch.flatten(self.pool(x), 1)


@register_backbone("cnn28")
def cnn28(in_channels: int = 1, width: int = 64, widths: Sequence[int] | None = None, **_: Any) -> SmallCNN:
    """Small CNN for 28×28 images (also runs on 32×32): conv blocks of widths
    ``(width/4, width/2, width)`` — 16-32-64 by default — with 2×2 max-pool after the first two
    (28→14→7), then global average pooling; d = ``width`` (64). ``widths`` sets all three explicitly."""
    if widths is None:
        widths = (max(1, width // 4), max(1, width // 2), width)
    return SmallCNN(in_channels, widths, pools=(True, True, False))


@register_backbone("cnn8")
def cnn8(in_channels: int = 1, width: int = 32, **_: Any) -> SmallCNN:
    """Small CNN for 8×8 digits: conv blocks of widths ``(width, 2·width, 2·width)`` with one 2×2
    max-pool after the second (8→4), then global average pooling; d = 2·``width`` (64)."""
    return SmallCNN(in_channels, (width, 2 * width, 2 * width), pools=(False, True, False))


# ---------------------------------------------------------------------------------------------
# MLP (vectors, or anything flattened)
# ---------------------------------------------------------------------------------------------
class MLPEncoder(nn.Module):
    """Flatten, then Linear → BN → ReLU for each hidden width and for the output layer (the output's
    BN+ReLU can be switched off with ``out_activation=False``); ``out_features`` = output width."""

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, out_activation: bool = True):
        super().__init__()
        dims = [int(in_features), *(int(h) for h in hidden), int(out_features)]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2 or out_activation:
                layers += [nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)
        self.in_features = dims[0]
        self.out_features = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"mlp backbone expects {self.in_features} input features per sample, got {x.shape[1]}")
        return self.net(x)


@register_backbone("mlp")
def mlp(
    in_features: int | None = None,
    hidden: Sequence[int] = (256,),
    out_features: int = 128,
    out_activation: bool = True,
    input_size: Sequence[int] | None = None,
    **_: Any,
) -> MLPEncoder:
    """MLP encoder on the flattened input: ``in_features`` → hidden… → ``out_features``, BN+ReLU after
    every layer; d = ``out_features``. ``in_features`` defaults to the product of ``input_size`` (one
    sample's shape). The defaults on 256-d input give the FSCIL smoke encoder 256→256→128."""
    if in_features is None:
        if input_size is None:
            raise TypeError("mlp backbone needs `in_features` (or the runner-supplied `input_size`)")
        in_features = math.prod(int(s) for s in input_size)
    if isinstance(hidden, int):
        hidden = (hidden,)
    return MLPEncoder(in_features, tuple(hidden), out_features, out_activation)


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------
class TimmBackbone(nn.Module):
    """A timm model created with ``num_classes=0`` (pooled features); ``out_features = num_features``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.out_features = int(model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@register_backbone("timm")
def timm_backbone(
    model_name: str,
    pretrained: bool = False,
    in_channels: int = 3,
    weights_path: str | None = None,
    input_size: Sequence[int] | None = None,
    **kwargs: Any,
) -> TimmBackbone:
    """Any timm model as a feature encoder: ``timm.create_model(model_name, pretrained=…,
    num_classes=0, in_chans=in_channels, **kwargs)``. ``weights_path`` loads a local state dict
    (the classifier's keys are ignored) instead of downloading. ``input_size`` (runner-supplied) is
    not forwarded; pass e.g. ``img_size`` explicitly where a model needs it."""
    del input_size
    import timm

    use_hub = pretrained and weights_path is None
    try:
        model = timm.create_model(model_name, pretrained=use_hub, num_classes=0, in_chans=in_channels, **kwargs)
    except TypeError:
        raise
    except Exception as exc:
        if not use_hub:
            raise
        raise RuntimeError(
            f"could not load pretrained timm weights for {model_name!r} ({type(exc).__name__}: {exc}). "
            f"Offline? {_OFFLINE_HINT[0].upper()}{_OFFLINE_HINT[1:]}."
        ) from exc
    if weights_path is not None:
        classifier = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
        names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
        _load_encoder_state(
            model,
            load_weights_file(weights_path),
            ignore_prefixes=tuple(f"{n}." for n in names),
            source=f"weights_path {os.fspath(weights_path)!r}",
        )
    return TimmBackbone(model)
