"""The training loop shared by L2P, DualPrompt and CODA-Prompt (the OVOR release's ``learners/prompt.py``).

The backbone is a frozen timm ViT. A prompt pool (:mod:`openworld.models.prompt_pools`) maps the
query ``q`` (the ViT's CLS feature without prompts, no grad) to per-block prefixes for the
prompted pass. One ``Linear(D, C)`` head covers all classes. Per task t with classes [s, e):

* a new Adam (betas (0.9, 0.999), weight decay 0) over the pool's parameters and the head;
* ``epochs`` epochs at lr·:func:`openworld.strategies.ovor.lr_factor` (the released cosine with its
  one-epoch lag under ``lr_offset: released``);
* per batch of 128 (shuffled, last batch kept): CE over the logits [0, e) with [0, s) masked to
  −inf (the same as CE over [s, e) with targets y − s), plus the pool's prompt loss times
  ``key_loss_weight`` (released: weight 1, ``loss + prompt_loss.sum()``).

Inference: argmax over the seen classes [0, e), with the pool in inference mode (top-k keys /
all seen components). Nothing in the loop uses a task id except the pool, and only in training
(DualPrompt's task-id bootstrap, CODA-P's component slice).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import batches
from openworld.models.prompt_pools import PromptPool
from openworld.models.prompts import prefixed_vit_forward, unwrap_vit
from openworld.strategies.base import NonFiniteLossError, Prediction, Strategy
from openworld.strategies.ovor import lr_factor


class PromptPoolStrategy(Strategy):
    """Base class: subclasses set the constructor parameters and implement :meth:`_make_pool`."""

    supports = frozenset({"cil"})

    epochs: int
    lr: float
    batch_size: int
    lr_offset: Literal["released", "nominal"]
    key_loss_weight: float

    # -- model -----------------------------------------------------------------------------------
    def _make_pool(self, dim: int, num_tasks: int) -> PromptPool:
        raise NotImplementedError

    def _validate(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}.{name}: must be an integer >= 1, got {value!r}")
        if self.lr_offset not in ("released", "nominal"):
            raise ValueError(f"{self.name}.lr_offset: must be 'released' or 'nominal', got {self.lr_offset!r}")

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self._validate()
        torch.manual_seed(ctx.derive_seed(self.name, "init"))
        self.vit = unwrap_vit(ctx.create_backbone()).to(ctx.device)
        for p in self.vit.parameters():
            p.requires_grad_(False)
        self.vit.eval()
        dim = int(self.vit.embed_dim)
        depth = len(self.vit.blocks)
        self.pool = self._make_pool(dim, int(ctx.scenario.get("num_sessions", 1))).to(ctx.device)
        if self.pool.layers and max(self.pool.layers) >= depth:
            raise ValueError(f"{self.name}: prompts occupy blocks up to {max(self.pool.layers)}, but the ViT has "
                             f"only {depth} blocks")
        self.head = nn.Linear(dim, int(ctx.scenario["num_classes"])).to(ctx.device)
        self.num_seen = 0
        self.task = 0
        self._version = 0

    def query(self, x: Tensor) -> Tensor:
        """q(x): the frozen ViT's CLS feature without prompts (no grad)."""
        with torch.no_grad():
            return prefixed_vit_forward(self.vit, x, None)

    def features(self, x: Tensor, train: bool) -> tuple[Tensor, Tensor]:
        """(prompted CLS feature, prompt loss) of a batch."""
        prefixes, loss = self.pool(self.query(x), train=train, task=self.task)
        return prefixed_vit_forward(self.vit, x, prefixes.get), loss

    # -- training --------------------------------------------------------------------------------
    def _start_task(self, task: int) -> None:
        self.pool.start_task(task)

    def learn(self, session) -> None:
        ctx = self.ctx
        new = list(session.classes.new)
        s, e = new[0], new[-1] + 1
        if new != list(range(s, e)) or list(session.classes.seen) != list(range(e)):
            raise ValueError(f"{self.name}: needs contiguous task labels (task {session.index}: {new[:10]}…)")
        self.task = int(session.index)
        self._start_task(self.task)
        self.pool.train()
        params = list(self.pool.parameters()) + list(self.head.parameters())
        opt = torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        gen = torch.Generator().manual_seed(int(ctx.seed))
        weight = float(self.key_loss_weight)
        for epoch in ctx.progress_bar(range(self.epochs), desc=f"{self.name} task {session.index}", unit="ep"):
            lr = self.lr * lr_factor(epoch, self.epochs, self.lr_offset)
            for group in opt.param_groups:
                group["lr"] = lr
            finite = torch.ones((), dtype=torch.bool, device=ctx.device)
            for xb, yb in batches(session.labeled, self.batch_size, train=True, shuffle=True, device=ctx.device,
                                  generator=gen, num_workers=ctx.num_workers):
                feats, prompt_loss = self.features(xb, train=True)
                logits = F.linear(feats, self.head.weight[s:e], self.head.bias[s:e])
                ce = F.cross_entropy(logits, yb - s)
                loss = ce + weight * prompt_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                finite &= torch.isfinite(loss.detach())
                ctx.log_train({"loss": loss.detach(), "ce": ce.detach(), "prompt_loss": prompt_loss.detach(),
                               "lr": lr, "epoch": epoch, "session": ctx.session_index})
            if not bool(finite):
                raise NonFiniteLossError(f"{self.name}: non-finite loss in epoch {epoch} (lr {lr:g})")
        self.num_seen = e
        self._version += 1
        self.pool.eval()

    # -- inference -------------------------------------------------------------------------------
    def feature_cache_key(self) -> str | None:
        return f"{self.name}:{id(self)}:{self._version}"

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        self.pool.eval()
        return self.features(x, train=False)[0].float()

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Prediction:
        n = self.num_seen
        return Prediction(logits=F.linear(z, self.head.weight[:n], self.head.bias[:n]).float())

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        return self.predict_features(self.encode(x))

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "pool": {k: v.detach().cpu().clone() for k, v in self.pool.state_dict().items()},
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            "num_seen": self.num_seen,
            "task": self.task,
            "version": self._version,
        }

    def load_state_dict(self, state: dict) -> None:
        self.pool.load_state_dict(state["pool"])
        self.head.load_state_dict(state["head"])
        self.num_seen = int(state["num_seen"])
        self.task = int(state.get("task", 0))
        self._version = int(state.get("version", 0))
        self.pool.eval()
