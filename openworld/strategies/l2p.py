"""L2P as released in the CODA-Prompt / OVOR code ("L2P++"), card ``docs/methods/l2p.md``.

A pool of ``pool_size`` prompts with one key each, in block 0 (``e_layers: [0]``, the released
"shallow" setting) or in blocks 0–4 ("deep"). The query's top-``top_k`` keys by cosine select the
prompts, in training and at inference. Their prefixes are concatenated (prefix tuning). The
key-matching loss (:func:`openworld.models.prompt_pools.key_match_loss`) is added to the CE with
``key_loss_weight``. Training loop: :class:`openworld.strategies.prompt_pool_base.PromptPoolStrategy`.
"""

from __future__ import annotations

from typing import Literal

from openworld.models.prompt_pools import KEY_LOSSES, L2PPool
from openworld.registry import register_strategy
from openworld.strategies.prompt_pool_base import PromptPoolStrategy


@register_strategy("l2p")
class L2P(PromptPoolStrategy):
    """L2P(++) on a frozen ViT. Defaults: the OVOR release's CIFAR-100 values (``--prompt_param 30 20 -1``).

    Fidelity switches (default = released code):

    * ``key_loss``: ``released`` (mean over the [B, B, k] tensor ``cos[:, idx]``: each sample is
      pulled to every sample's keys) or ``per_sample`` (each sample to its own keys, as in the paper).
    * ``key_loss_weight``: 1.0 (released ``loss + prompt_loss.sum()`` on one device). The paper's
      λ·Σ over the k keys is ``key_loss_weight = λ·k`` with ``per_sample``.
    * ``replicas``: 1. The released scripts ran ``nn.DataParallel`` on 4 GPUs. ``replicas: 4``
      computes the loss per quarter-batch and sums the four, which is what those runs computed.
    """

    def __init__(
        self,
        epochs: int = 20,
        lr: float = 1.0e-3,
        batch_size: int = 128,
        lr_offset: Literal["released", "nominal"] = "released",
        pool_size: int = 30,
        length: int = 20,
        top_k: int = 5,
        e_layers: tuple[int, ...] = (0,),
        key_loss: Literal["released", "per_sample"] = "released",
        key_loss_weight: float = 1.0,
        replicas: int = 1,
    ):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.lr_offset = lr_offset
        self.pool_size = pool_size
        self.length = length
        self.top_k = top_k
        self.e_layers = tuple(e_layers)
        self.key_loss = key_loss
        self.key_loss_weight = key_loss_weight
        self.replicas = replicas

    def _validate(self) -> None:
        super()._validate()
        if self.key_loss not in KEY_LOSSES:
            raise ValueError(f"{self.name}.key_loss: must be one of {', '.join(KEY_LOSSES)}, got {self.key_loss!r}")
        if not self.e_layers:
            raise ValueError(f"{self.name}.e_layers: needs at least one block (released: [0], deep: [0, 1, 2, 3, 4])")

    def _make_pool(self, dim: int, num_tasks: int) -> L2PPool:
        return L2PPool(dim, dim, pool_size=self.pool_size, length=self.length, top_k=self.top_k,
                       layers=self.e_layers, key_loss=self.key_loss, replicas=self.replicas)
