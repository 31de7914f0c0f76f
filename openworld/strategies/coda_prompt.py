"""CODA-Prompt as released (CODA-Prompt / OVOR code), card ``docs/methods/coda_prompt.md``.

In blocks 0–4, the prefix is a query-weighted sum of prompt components: α_k = cos(q ⊙ A_k, K_k)
and P = Σ_k α_k P_k. Keys = the first L/2 rows of P, values = the last L/2. Task t owns
pool_size / n_tasks components, Gram-Schmidt initialised when the task starts. Components of
past tasks are frozen (detached) while later tasks train, and all seen components are used at
inference. Optional orthogonality penalty ``ortho_mu`` (released: 0). Training loop:
:class:`openworld.strategies.prompt_pool_base.PromptPoolStrategy`.
"""

from __future__ import annotations

from typing import Literal

import torch

from openworld.models.prompt_pools import CodaPool
from openworld.registry import register_strategy
from openworld.strategies.prompt_pool_base import PromptPoolStrategy


@register_strategy("coda_prompt")
class CodaPrompt(PromptPoolStrategy):
    """CODA-P on a frozen ViT. Defaults: the released CIFAR-100 values (``--prompt_param 100 8 0.0``).

    The pool is split over the scenario's number of tasks (n_tasks = the number of sessions).
    Gram-Schmidt draws come from a generator seeded per task (``ctx.derive_seed``), so a resumed run
    re-draws the same components. ``replicas``: 1 (4 = the released 4-GPU ``nn.DataParallel`` sum of
    the penalty). ``key_loss_weight`` multiplies the ortho penalty (released 1).
    """

    def __init__(
        self,
        epochs: int = 20,
        lr: float = 1.0e-3,
        batch_size: int = 128,
        lr_offset: Literal["released", "nominal"] = "released",
        pool_size: int = 100,
        length: int = 8,
        ortho_mu: float = 0.0,
        e_layers: tuple[int, ...] = (0, 1, 2, 3, 4),
        key_loss_weight: float = 1.0,
        replicas: int = 1,
    ):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.lr_offset = lr_offset
        self.pool_size = pool_size
        self.length = length
        self.ortho_mu = ortho_mu
        self.e_layers = tuple(e_layers)
        self.key_loss_weight = key_loss_weight
        self.replicas = replicas

    def _validate(self) -> None:
        super()._validate()
        n_tasks = int(self.ctx.scenario.get("num_sessions", 1))
        if int(self.pool_size) // max(n_tasks, 1) < 1:
            raise ValueError(f"{self.name}.pool_size: must hold at least one component per task, got "
                             f"{self.pool_size} for {n_tasks} tasks")
        if float(self.ortho_mu) < 0:
            raise ValueError(f"{self.name}.ortho_mu: must be >= 0, got {self.ortho_mu}")

    def _make_pool(self, dim: int, num_tasks: int) -> CodaPool:
        return CodaPool(dim, num_tasks, dim, pool_size=self.pool_size, length=self.length, ortho_mu=self.ortho_mu,
                        layers=self.e_layers, replicas=self.replicas)

    def _start_task(self, task: int) -> None:
        gen = torch.Generator().manual_seed(self.ctx.derive_seed(self.name, "gram_schmidt", task))
        self.pool.start_task(task, gen)
