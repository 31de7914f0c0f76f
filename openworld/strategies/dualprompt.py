"""DualPrompt as released in the CODA-Prompt / OVOR code, card ``docs/methods/dualprompt.md``.

G-prompts (shared by all tasks) in blocks ``g_layers`` and a pool of task e-prompts with keys in
blocks ``e_layers``, all prefix-tuned. Training on task t uses e-prompt t (task-id bootstrap) and
the key loss mean_b (1 − cos(q_b, k_t)). Inference uses the top-1 key by cosine. Training loop:
:class:`openworld.strategies.prompt_pool_base.PromptPoolStrategy`.
"""

from __future__ import annotations

from typing import Literal

from openworld.models.prompt_pools import KEY_LOSSES, DualPromptPool
from openworld.registry import register_strategy
from openworld.strategies.prompt_pool_base import PromptPoolStrategy


@register_strategy("dualprompt")
class DualPrompt(PromptPoolStrategy):
    """DualPrompt on a frozen ViT. Defaults: the OVOR release's CIFAR-100 values (``--prompt_param 10 40 10``;
    the CODA-Prompt release uses ``10 20 6``).

    Fidelity switches (default = released code):

    * ``shared_keys``: False. The released code gives every e-block its own keys, its own top-1
      selection and its own key loss, averaged over the e-blocks. True: one key set, one selection
      for all e-blocks (the paper).
    * ``task_id_bootstrap``: True (the released configuration). False: top-``top_k`` selection in
      training too, with ``key_loss``.
    * ``key_loss``: used only with ``task_id_bootstrap: false`` (see :class:`openworld.strategies.l2p.L2P`).
    * ``key_loss_weight``: 1.0. ``replicas``: 1 (4 = the released 4-GPU ``nn.DataParallel`` sum).
    """

    def __init__(
        self,
        epochs: int = 20,
        lr: float = 1.0e-3,
        batch_size: int = 128,
        lr_offset: Literal["released", "nominal"] = "released",
        pool_size: int = 10,
        e_length: int = 40,
        g_length: int = 10,
        g_layers: tuple[int, ...] = (0, 1),
        e_layers: tuple[int, ...] = (2, 3, 4),
        top_k: int = 1,
        task_id_bootstrap: bool = True,
        shared_keys: bool = False,
        key_loss: Literal["released", "per_sample"] = "released",
        key_loss_weight: float = 1.0,
        replicas: int = 1,
    ):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.lr_offset = lr_offset
        self.pool_size = pool_size
        self.e_length = e_length
        self.g_length = g_length
        self.g_layers = tuple(g_layers)
        self.e_layers = tuple(e_layers)
        self.top_k = top_k
        self.task_id_bootstrap = task_id_bootstrap
        self.shared_keys = shared_keys
        self.key_loss = key_loss
        self.key_loss_weight = key_loss_weight
        self.replicas = replicas

    def _validate(self) -> None:
        super()._validate()
        if self.key_loss not in KEY_LOSSES:
            raise ValueError(f"{self.name}.key_loss: must be one of {', '.join(KEY_LOSSES)}, got {self.key_loss!r}")
        n_tasks = int(self.ctx.scenario.get("num_sessions", 1))
        if self.task_id_bootstrap and int(self.pool_size) < n_tasks:
            raise ValueError(f"{self.name}.pool_size: the task-id bootstrap needs one e-prompt per task, "
                             f"got pool_size {self.pool_size} for {n_tasks} tasks")

    def _make_pool(self, dim: int, num_tasks: int) -> DualPromptPool:
        return DualPromptPool(dim, dim, pool_size=self.pool_size, e_length=self.e_length, g_length=self.g_length,
                              g_layers=self.g_layers, e_layers=self.e_layers, top_k=self.top_k,
                              task_id_bootstrap=self.task_id_bootstrap, key_loss=self.key_loss,
                              shared_keys=self.shared_keys, replicas=self.replicas)
