"""Prefix tuning of a frozen timm Vision Transformer: the OnePrompt layout (``specs/cil-ovor.md`` §2.2).

* :class:`OnePrompt` — one prompt matrix P_l ∈ R^{L×D} per prompted block, shared by all tasks, init
  U[0, 1): blocks 0–1 ("g") with L = 10 and blocks 2–4 ("e") with L = 40, i.e. 140·D parameters.
* :class:`PromptedViT` — the frozen ViT's forward pass in which block l's attention uses the first
  L/2 rows of P_l as extra **keys** and the last L/2 rows as extra **values**, split per head and
  placed before the tokens' own keys/values (no projection, no LayerNorm); queries are not extended,
  so every block keeps N tokens. The feature is the CLS token after the final LayerNorm.
* ``vit`` backbone factory — a timm ViT whose size can be set from a recipe (``img_size``,
  ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``), so small ViTs can be
  trained offline (the pre-training stage) and prompted.

The backbone's parameters are frozen (``requires_grad=False``), but gradients flow through its
activations to the prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.registry import register_backbone

G_LAYERS = (0, 1)
E_LAYERS = (2, 3, 4)


@register_backbone("vit")
def vit_backbone(
    model_name: str = "vit_base_patch16_224",
    pretrained: bool = False,
    weights_path: str | None = None,
    img_size: int | None = None,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float | None = None,
    in_channels: int = 3,
    input_size: Sequence[int] | None = None,
):
    """A timm Vision Transformer as encoder (CLS token after the final norm; no dropout).

    ``model_name`` is any timm ViT (``vit_base_patch16_224.augreg_in21k_ft_in1k`` for the card's
    checkpoint); the size options override its architecture (e.g. a small ViT on 28×28 inputs:
    ``img_size: 28, patch_size: 4, embed_dim: 64, depth: 6, num_heads: 4``). ``img_size`` defaults to
    the data's spatial size when the model's own differs and ``pretrained`` is false.
    """
    from openworld.models.backbones import timm_backbone

    kwargs: dict[str, Any] = {}
    for key, value in (("img_size", img_size), ("patch_size", patch_size), ("embed_dim", embed_dim),
                       ("depth", depth), ("num_heads", num_heads), ("mlp_ratio", mlp_ratio)):
        if value is not None:
            kwargs[key] = value
    if img_size is None and input_size is not None and len(input_size) == 3 and not pretrained:
        kwargs["img_size"] = int(input_size[-1])
    kwargs.setdefault("global_pool", "token")
    kwargs.setdefault("drop_rate", 0.0)
    kwargs.setdefault("drop_path_rate", 0.0)
    return timm_backbone(model_name, pretrained=pretrained, in_channels=in_channels, weights_path=weights_path,
                         **kwargs)


def unwrap_vit(encoder: nn.Module) -> nn.Module:
    """The timm ``VisionTransformer`` inside an openworld encoder, or ``TypeError`` saying what was found."""
    from timm.models.vision_transformer import VisionTransformer

    model = getattr(encoder, "model", encoder)
    if not isinstance(model, VisionTransformer):
        raise TypeError(
            "prompt tuning needs a timm VisionTransformer backbone (backbone name 'vit', or 'timm' with a "
            f"ViT model_name); got {type(model).__name__}"
        )
    if getattr(model, "cls_token", None) is None or getattr(model, "global_pool", "token") != "token":
        raise TypeError("prompt tuning uses the CLS token as feature: the ViT needs a class token and "
                        f"global_pool='token' (got global_pool={getattr(model, 'global_pool', None)!r})")
    return model


class OnePrompt(nn.Module):
    """Prompt matrices ``P_l`` (``self.prompts[str(l)]``, shape [L_l, D]), initialised U[0, 1)."""

    def __init__(self, dim: int, g_layers: Sequence[int] = G_LAYERS, g_length: int = 10,
                 e_layers: Sequence[int] = E_LAYERS, e_length: int = 40):
        super().__init__()
        lengths: dict[int, int] = {}
        for layers, length, what in ((g_layers, g_length, "g"), (e_layers, e_length, "e")):
            if int(length) < 2 or int(length) % 2:
                raise ValueError(f"prompt length of the {what} prompts must be even and >= 2 (half keys, "
                                 f"half values); got {length}")
            for layer in layers:
                if int(layer) in lengths:
                    raise ValueError(f"block {layer} is listed in both the g and the e prompt layers")
                lengths[int(layer)] = int(length)
        self.dim = int(dim)
        self.lengths = dict(sorted(lengths.items()))
        self.prompts = nn.ParameterDict(
            {str(layer): nn.Parameter(torch.rand(length, self.dim)) for layer, length in self.lengths.items()}
        )

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.prompts.values())

    def get(self, layer: int) -> Tensor | None:
        key = str(layer)
        return self.prompts[key] if key in self.prompts else None


def prefix_attention(attn: nn.Module, x: Tensor, prompt: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    """timm ``Attention`` on ``x`` [B, N, D] with a prefix of extra keys and values, per head, placed before
    the tokens' own; output [B, N, D]. Queries are not extended.

    ``prompt`` is either one matrix [L, D] shared by the batch (rows 0…L/2−1 keys, L/2…L−1 values: the
    OnePrompt layout) or a pair ``(keys, values)`` of per-sample prefixes [B, L_k, D] / [B, L_v, D] (the
    prompt-pool methods, whose prefix depends on the input's query).
    """
    if getattr(attn, "gate", None) is not None:
        raise TypeError("prefix attention: gated attention (timm 'gate') is not supported")
    B, N, _ = x.shape
    H = attn.num_heads
    hd = attn.head_dim
    qkv = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if isinstance(prompt, Tensor):
        half = prompt.shape[0] // 2
        pk = prompt[:half].reshape(half, H, hd).permute(1, 0, 2).unsqueeze(0).expand(B, -1, -1, -1)
        pv = prompt[half:].reshape(half, H, hd).permute(1, 0, 2).unsqueeze(0).expand(B, -1, -1, -1)
    else:
        keys, values = prompt
        if keys.dim() != 3 or values.dim() != 3 or len(keys) != B or len(values) != B:
            raise ValueError(f"prefix attention: per-sample keys/values must be [B={B}, L, D], got "
                             f"{tuple(keys.shape)} and {tuple(values.shape)}")
        pk = keys.reshape(B, -1, H, hd).permute(0, 2, 1, 3)
        pv = values.reshape(B, -1, H, hd).permute(0, 2, 1, 3)
    k = torch.cat([pk.to(k.dtype), k], dim=2)
    v = torch.cat([pv.to(v.dtype), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, scale=float(attn.scale))
    out = out.transpose(1, 2).reshape(B, N, H * hd)
    out = attn.norm(out)
    return attn.proj_drop(attn.proj(out))


def prefixed_vit_forward(vit: nn.Module, x: Tensor, prefix_for: Callable[[int], Any] | None = None) -> Tensor:
    """The timm ViT's forward pass, block l attending with ``prefix_for(l)`` as prefix (see
    :func:`prefix_attention`; ``None`` → the block unchanged); returns the CLS feature after the final norm.

    ``prefix_for=None`` is the plain frozen ViT (the prompt-pool methods' query function).
    """
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    for i, blk in enumerate(vit.blocks):
        p = prefix_for(i) if prefix_for is not None else None
        if p is None:
            x = blk(x)
        else:
            x = x + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, blk.norm1(x), p)))
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    x = vit.norm(x)
    return vit.fc_norm(x[:, 0])


class PromptedViT(nn.Module):
    """A frozen timm ViT with OnePrompt prefix tuning; ``forward(x)`` gives the CLS feature [B, D]."""

    def __init__(self, encoder: nn.Module, g_layers: Sequence[int] = G_LAYERS, g_length: int = 10,
                 e_layers: Sequence[int] = E_LAYERS, e_length: int = 40):
        super().__init__()
        self.vit = unwrap_vit(encoder)
        depth = len(self.vit.blocks)
        layers = list(g_layers) + list(e_layers)
        if layers and max(layers) >= depth:
            raise ValueError(f"prompts occupy blocks up to {max(layers)}, but the ViT has only {depth} blocks "
                             f"(depth >= {max(layers) + 1} is required)")
        dim = int(self.vit.embed_dim)
        heads = self.vit.blocks[0].attn.num_heads
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {heads}")
        self.prompt = OnePrompt(dim, g_layers, g_length, e_layers, e_length)
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.out_features = dim

    def prompt_parameters(self) -> list[nn.Parameter]:
        return list(self.prompt.parameters())

    def forward(self, x: Tensor, use_prompts: bool = True) -> Tensor:
        return prefixed_vit_forward(self.vit, x, self.prompt.get if use_prompts else None)
