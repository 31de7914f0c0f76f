"""Models: feature encoders (``backbones``), classifier heads (``heads``) and the factory
:func:`create_backbone` that builds an encoder from a recipe's ``backbone:`` block."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from openworld.models import backbones  # noqa: F401  (registers the built-in backbones)
from openworld.models.heads import ClassifierNet, CosineClassifier, LinearClassifier
from openworld.registry import BACKBONES

__all__ = ["ClassifierNet", "CosineClassifier", "LinearClassifier", "create_backbone"]

# What the runner passes to every backbone; not user options.
_RUNNER_ARGS = ("in_channels", "input_size")


def create_backbone(name: str, *, in_channels: int, input_size: Sequence[int], **user_kwargs: Any) -> nn.Module:
    """Build the backbone registered as ``name`` (or ``"package.module:function"``).

    ``in_channels`` and ``input_size`` come from the data: ``input_size`` is the shape of one sample
    without the batch dimension (``x.shape[1:]``, e.g. ``(3, 32, 32)`` or ``(256,)``). They are passed
    to the factory when its signature accepts them. ``user_kwargs`` are the recipe's options; each
    must be a parameter of the factory, otherwise ``TypeError`` names the bad key and the allowed
    ones. (Factories whose catch-all is named ``**kwargs`` forward extras on — e.g. ``timm`` to
    ``timm.create_model`` — and are left to validate them there.) ``"timm/<model>"`` is shorthand for
    ``name="timm", model_name="<model>"``.

    The result is an ``nn.Module`` with ``forward(x) -> [B, d]`` and an int ``out_features = d``.
    """
    if name.startswith("timm/"):
        if "model_name" in user_kwargs:
            raise TypeError(f"backbone {name!r} already names the timm model; drop `model_name`")
        name, user_kwargs = "timm", {**user_kwargs, "model_name": name[len("timm/") :]}
    factory = BACKBONES.get(name)
    params = inspect.signature(factory).parameters
    named = [p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_kw = next((p.name for p in params.values() if p.kind is p.VAR_KEYWORD), None)
    allowed = [n for n in named if n not in _RUNNER_ARGS]

    if var_kw is None or var_kw.startswith("_"):
        unknown = [k for k in user_kwargs if k not in allowed]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, allowed, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(
                f"backbone {name!r}: unknown option(s) {', '.join(hints)}; allowed: {', '.join(allowed) or '(none)'}"
            )
    missing = [
        p.name
        for p in params.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.default is p.empty
        and p.name not in user_kwargs
        and p.name not in _RUNNER_ARGS
    ]
    if missing:
        raise TypeError(f"backbone {name!r} needs option(s) {', '.join(map(repr, missing))}")

    kwargs = dict(user_kwargs)
    for key, value in (("in_channels", in_channels), ("input_size", tuple(input_size))):
        if key in named or var_kw is not None:
            kwargs[key] = value
    model = factory(**kwargs)
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "out_features", None), int):
        raise TypeError(
            f"backbone {name!r} must return an nn.Module with an int attribute `out_features`, "
            f"got {type(model).__name__}"
        )
    return model
