"""FACT: forward-compatible training for few-shot class-incremental learning (Zhou et al., CVPR 2022).

Card: ``docs/methods/fact.md``. The base session trains an encoder and a bias-free cosine classifier
whose rows cover the whole label space: rows ``0…B-1`` are the base classes, rows ``B…K-1`` are
*virtual* prototypes reserved for classes that have not arrived yet. Besides cross-entropy on the base
logits, two losses push instances towards virtual classes (pseudo-labels drawn through a random
class-to-virtual mask) and two more do the same for *virtual instances* made by manifold mixup of
two base samples of different classes at the middle of the backbone (:func:`backbone_halves`).
Afterwards the base rows are replaced by class means, each new session adds its class means, and
inference (from session 1 on) mixes the cosine classifier with a term routed through the virtual
prototypes (:func:`integrated_logits`).

FACT trains its **own** base model: it never uses the shared :meth:`RunContext.base_model`. That model
is cached under its own content key (``"what": "fact_base"``: scenario splits, backbone, FACT's
training settings and loss switches, seed, data), in this process and in the run's cache folder, so a
second strategy entry, a resumed run or a later process with the same settings loads it instead of
training again (a log line and ``results.json``'s ``strategy_info.fact_base`` say which happened).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import batches
from openworld.registry import register_strategy
from openworld.strategies.base import (
    NonFiniteLossError,
    Prediction,
    Strategy,
    TrainConfig,
    class_means,
    evaluate_accuracy,
    make_optimizer,
    stable_hash,
)

logger = logging.getLogger(__name__)

_EPS = 1e-12
_MASK_FILL = -1e9  # the released code's "minus infinity" for masked logits


# ------------------------------------------------------------------------------------------------
# Pure pieces (pinned by tests/fixtures/fact)
# ------------------------------------------------------------------------------------------------
def cosine_logits(z: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """``T · <n̂(z_i), n̂(w_c)>`` for every sample i and row c (bias-free cosine classifier)."""
    return temperature * F.normalize(z, dim=-1, eps=_EPS) @ F.normalize(rows, dim=-1, eps=_EPS).T


def virtual_logits(z: Tensor, weight: Tensor, num_base: int, temperature: float, detach_virtual: bool = True) -> Tensor:
    """Logits over base **and** virtual classes, ``[n, K]`` (the released ``forward_metric``).

    ``weight`` is ``[K, d]``: rows ``< num_base`` are base classes, the rest virtual prototypes. With
    ``detach_virtual`` the virtual rows get no gradient through these logits (the released code reads
    them through a frozen alias of the classifier); they still learn through the mixup logits.
    """
    rows = torch.cat([weight[:num_base], weight[num_base:].detach()]) if detach_virtual else weight
    return cosine_logits(z, rows, temperature)


def virtual_mask(num_base: int, num_classes: int, picked) -> Tensor:
    """The ``[num_base, num_classes]`` 0/1 mask: ``mask[b, B+v] = 1`` for the base classes ``picked[v]``
    drawn for virtual class v; the base columns are all 0."""
    if len(picked) != num_classes - num_base:
        raise ValueError(f"virtual_mask: need one pick per virtual class ({num_classes - num_base}), got {len(picked)}")
    mask = torch.zeros(num_base, num_classes, dtype=torch.float64)
    for v, rows in enumerate(picked):
        mask[torch.as_tensor(list(rows), dtype=torch.long), num_base + v] = 1.0
    return mask


def draw_virtual_mask(num_base: int, num_classes: int, seed: int, picks: int = 3) -> Tensor:
    """:func:`virtual_mask` with ``picks`` distinct base classes per virtual class drawn, virtual class by
    virtual class, by ``numpy.random.RandomState(seed).choice(num_base, picks, replace=False)``: the
    released draws when numpy's global seed is ``seed``."""
    if not 1 <= picks <= num_base:
        raise ValueError(f"mask_picks must be between 1 and the number of base classes ({num_base}), got {picks}")
    rng = np.random.RandomState(seed)
    return virtual_mask(num_base, num_classes, [rng.choice(num_base, picks, replace=False) for _ in
                                                range(num_classes - num_base)])


def mix_features(pre: Tensor, beta: float, index: Tensor) -> Tensor:
    """Manifold mixup of the mid-backbone activations: ``β·h + (1-β)·h[index]``."""
    return beta * pre + (1.0 - beta) * pre[index]


def _masked_mean_ce(logits: Tensor, target: Tensor, keep: Tensor) -> Tensor:
    per = F.cross_entropy(logits, target, reduction="none")
    keep = keep.to(per.dtype)
    return (per * keep).sum() / keep.sum().clamp(min=1.0)


def fact_losses(
    logits: Tensor,
    mixed_logits: Tensor | None,
    labels: Tensor,
    index: Tensor | None,
    mask: Tensor | None,
    num_base: int,
    *,
    pseudo_label_rule: Literal["masked", "argmax"] = "masked",
    ce_columns: Literal["base", "all"] = "base",
) -> dict[str, Tensor]:
    """FACT's base-session loss terms (card §2.2); the total is ``ce + balance·(virtual + mix_virtual + mix_base)``.

    - ``ce``: cross-entropy of ``logits[:, :B]`` (``ce_columns="base"``) or of all K logits against y.
    - ``virtual``: the true class's logit set to -1e9, cross-entropy against a virtual pseudo-label
      ``ŷ``: ``argmax_v`` of the masked logits multiplied by ``mask[y]`` (``"masked"``, released; the
      un-picked columns become 0, not -inf) or of the plain virtual logits (``"argmax"``).
    - on the mixed instances ``mixed_logits`` (``index`` the mixup permutation; pairs of the same class
      are left out): ``mix_virtual`` = CE against the top virtual class ``ŷ₁``, ``mix_base`` = CE of the
      logits with ``ŷ₁`` set to -1e9 against the top base class ``ŷ₂``. Means over the kept pairs (0
      when none is kept, where the released code would give NaN).

    ``mixed_logits=None`` gives only ``ce`` (epochs before ``loss_iter``). Targets are returned too
    (``*_target``, for every row; ``mix_selected`` marks the kept pairs).
    """
    logits = logits.float()
    out: dict[str, Tensor] = {}
    out["ce"] = F.cross_entropy(logits[:, :num_base] if ce_columns == "base" else logits, labels)
    if mixed_logits is None:
        return out
    K = logits.shape[1]
    onehot = F.one_hot(labels, num_classes=K).bool()
    masked = logits.masked_fill(onehot, _MASK_FILL)
    if pseudo_label_rule == "masked":
        scores = (masked * mask.to(masked.device, masked.dtype)[labels])[:, num_base:]
    else:
        scores = masked[:, num_base:]
    pseudo = scores.argmax(dim=-1) + num_base
    out["virtual"] = F.cross_entropy(masked, pseudo)
    out["virtual_target"] = pseudo
    mixed_logits = mixed_logits.float()
    keep = labels[index] != labels
    pl1 = mixed_logits[:, num_base:].argmax(dim=-1) + num_base
    pl2 = mixed_logits[:, :num_base].argmax(dim=-1)
    out["mix_virtual"] = _masked_mean_ce(mixed_logits, pl1, keep)
    novel_masked = mixed_logits.masked_fill(F.one_hot(pl1, num_classes=K).bool(), _MASK_FILL)
    out["mix_base"] = _masked_mean_ce(novel_masked, pl2, keep)
    out["mix_virtual_target"], out["mix_base_target"], out["mix_selected"] = pl1, pl2, keep
    return out


def integrated_logits(
    z: Tensor,
    class_rows: Tensor,
    virtual_rows: Tensor,
    temperature: float,
    eta: float,
    topk: int = 40,
    proj_normalize: Literal["feature", "class"] = "feature",
) -> Tensor:
    """The released forward-compatible inference (``test_intergrate``); returns the mixture, rows sum to 1.

    ``D = n̂(virtual_rows)`` [V, d] (the virtual prototypes as they were after the base session),
    ``W = class_rows`` [C, d] (class-mean prototypes of the seen classes), ``u = n̂(z)``.

    - ``P = D · N(Wᵀ)`` [V, C], where ``N`` normalises each row of ``Wᵀ`` — one feature dimension
      across the C classes (``"feature"``, released) — or ``P = D · n̂(W)ᵀ`` (``"class"``, cosines).
    - ``s = u·Dᵀ`` [n, V], keeping only each sample's ``topk`` largest entries (others 0).
    - result ``η·softmax(s·P) + (1-η)·softmax(T·u·n̂(W)ᵀ)``.
    """
    D = F.normalize(virtual_rows, dim=-1, eps=_EPS)
    if proj_normalize == "feature":
        proj_matrix = D @ F.normalize(class_rows.T, dim=-1, eps=_EPS)
    elif proj_normalize == "class":
        proj_matrix = D @ F.normalize(class_rows, dim=-1, eps=_EPS).T
    else:
        raise ValueError(f"proj_normalize must be 'feature' or 'class', got {proj_normalize!r}")
    sims = F.normalize(z, dim=-1, eps=_EPS) @ D.T
    k = min(int(topk), sims.shape[1])
    top, idx = sims.topk(k, dim=1)
    kept = torch.zeros_like(sims).scatter(1, idx, top)
    via_virtual = kept @ proj_matrix
    direct = cosine_logits(z, class_rows, temperature)
    return eta * F.softmax(via_virtual, dim=1) + (1.0 - eta) * F.softmax(direct, dim=1)


# ------------------------------------------------------------------------------------------------
# Backbone halves (manifold mixup point)
# ------------------------------------------------------------------------------------------------
def backbone_halves(encoder: nn.Module) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(pre, post)`` with ``post(pre(x)) == encoder(x)``, split where the released code mixes.

    - ResNet-20 (``CifarResNet``): stem, stage 1, stage 2 | stage 3, pooling (the released split).
    - ResNet-18 (torchvision): stem, max-pool, layer1, layer2 | layer3, layer4, pooling (released).
    - ``SmallCNN`` (cnn28/cnn8): blocks 1–2 | block 3, pooling (two of three stages, as for ResNet-20).
    - MLP: the first hidden layer | the rest.
    - any module with ``forward_pre`` / ``forward_post`` methods: those.
    """
    from openworld.models.backbones import CifarResNet, MLPEncoder, SmallCNN

    if hasattr(encoder, "forward_pre") and hasattr(encoder, "forward_post"):
        return encoder.forward_pre, encoder.forward_post
    if isinstance(encoder, CifarResNet):
        e = encoder

        def pre(x):
            return e.layer2(e.layer1(e.relu(e.bn1(e.conv1(x)))))

        def post(h):
            return torch.flatten(e.pool(e.layer3(h)), 1)

        return pre, post
    if isinstance(encoder, SmallCNN):
        e = encoder
        return (lambda x: e.block2(e.block1(x))), (lambda h: torch.flatten(e.pool(e.block3(h)), 1))
    if isinstance(encoder, MLPEncoder):
        e = encoder
        linears = [i for i, m in enumerate(e.net) if isinstance(m, nn.Linear)]
        if len(linears) < 2:
            raise ValueError("fact: the mlp backbone needs at least one hidden layer to split for manifold mixup")
        cut = linears[1]
        return (lambda x: e.net[:cut](torch.flatten(x, 1))), (lambda h: e.net[cut:](h))
    if all(hasattr(encoder, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")):
        e = encoder

        def pre(x):
            return e.layer2(e.layer1(e.maxpool(e.relu(e.bn1(e.conv1(x))))))

        def post(h):
            return e.fc(torch.flatten(e.avgpool(e.layer4(e.layer3(h))), 1))

        return pre, post
    raise ValueError(
        f"fact: cannot split backbone {type(encoder).__name__} for manifold mixup; supported: resnet20, resnet18 "
        "(torchvision), cnn28/cnn8, mlp, or a module with forward_pre(x) and forward_post(h) methods"
    )


class _FactNet(nn.Module):
    """Encoder + the K-row cosine classifier (base rows, then virtual prototypes)."""

    def __init__(self, encoder: nn.Module, num_classes: int, temperature: float):
        super().__init__()
        self.encoder = encoder
        self.weight = nn.Parameter(torch.empty(num_classes, encoder.out_features))
        nn.init.orthogonal_(self.weight)
        self.temperature = temperature

    def forward(self, x: Tensor, num_active: int | None = None) -> Tensor:  # selection: base rows only
        rows = self.weight if num_active is None else self.weight[:num_active]
        return cosine_logits(self.encoder(x), rows, self.temperature)


def _module_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"fact: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


# ------------------------------------------------------------------------------------------------
# Strategy
# ------------------------------------------------------------------------------------------------
@register_strategy("fact")
class FACT(Strategy):
    """Forward-compatible training (virtual prototypes + manifold mixup), prototype sessions,
    virtual-prototype-integrated inference. Trains and caches its own base model (module docstring).

    Parameters (training: ``None`` takes the recipe's ``base:`` block value)
    ----------
    epochs, batch_size, lr, schedule, milestones, gamma, weight_decay, temperature, selection :
        FACT's base training (SGD with the ``base:`` block's momentum/Nesterov; LR stepped per epoch;
        ``selection`` ``val``/``last``/``test``, ``test`` only for reproducing the released code).
    balance : weight of the three virtual-class losses.
    loss_iter : first epoch (0-based) with the virtual-class losses; before it only cross-entropy.
    alpha : Beta(α, α) of the mixup coefficient, one draw per batch.
    eta : weight of the virtual-prototype term at inference.
    topk : projections onto virtual prototypes kept per sample at inference (released: 40).
    mask_picks : base classes picked per virtual class in the pseudo-label mask (released: 3).
    Fidelity switches (default = released code; card §4): ``pseudo_label_rule``, ``ce_columns``,
    ``virtual_grad``, ``bn_passes``, ``proj_normalize``, ``inference``, ``session0_inference``,
    ``session0_report`` (default ``prototype``, ours, as TEEN; ``max`` under ``protocol: paper``).
    """

    supports = frozenset({"fscil"})
    paper_protocol = {"session0_report": "max"}

    def __init__(
        self,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        schedule: Literal["cosine", "multistep", "constant"] | None = None,
        milestones: tuple[int, ...] | None = None,
        gamma: float | None = None,
        weight_decay: float | None = None,
        temperature: float | None = None,
        selection: Literal["val", "last", "test"] | None = None,
        balance: float = 0.001,
        loss_iter: int = 0,
        alpha: float = 0.5,
        eta: float = 0.1,
        topk: int = 40,
        mask_picks: int = 3,
        pseudo_label_rule: Literal["masked", "argmax"] = "masked",
        ce_columns: Literal["base", "all"] = "base",
        virtual_grad: Literal["mixup_only", "all"] = "mixup_only",
        bn_passes: Literal["released", "single"] = "released",
        proj_normalize: Literal["feature", "class"] = "feature",
        inference: Literal["integrated", "cosine"] = "integrated",
        session0_inference: Literal["cosine", "integrated"] = "cosine",
        session0_report: Literal["prototype", "max"] = "prototype",
    ):
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.schedule = schedule
        self.milestones = milestones
        self.gamma = gamma
        self.weight_decay = weight_decay
        self.temperature = temperature
        self.selection = selection
        self.balance = balance
        self.loss_iter = loss_iter
        self.alpha = alpha
        self.eta = eta
        self.topk = topk
        self.mask_picks = mask_picks
        self.pseudo_label_rule = pseudo_label_rule
        self.ce_columns = ce_columns
        self.virtual_grad = virtual_grad
        self.bn_passes = bn_passes
        self.proj_normalize = proj_normalize
        self.inference = inference
        self.session0_inference = session0_inference
        self.session0_report = session0_report

    # -- setup -----------------------------------------------------------------------------------
    def train_config(self, base: TrainConfig) -> TrainConfig:
        """The recipe's ``base:`` block with FACT's own values put in."""
        over = {k: getattr(self, k) for k in ("epochs", "batch_size", "schedule", "gamma", "temperature", "selection")
                if getattr(self, k) is not None}
        if self.milestones is not None:
            over["milestones"] = tuple(int(m) for m in self.milestones)
        opt = base.optimizer
        if self.lr is not None:
            opt = dataclasses.replace(opt, lr=float(self.lr))
        if self.weight_decay is not None:
            opt = dataclasses.replace(opt, weight_decay=float(self.weight_decay))
        return dataclasses.replace(base, optimizer=opt, **over)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        for name, allowed in (
            ("pseudo_label_rule", ("masked", "argmax")),
            ("ce_columns", ("base", "all")),
            ("virtual_grad", ("mixup_only", "all")),
            ("bn_passes", ("released", "single")),
            ("proj_normalize", ("feature", "class")),
            ("inference", ("integrated", "cosine")),
            ("session0_inference", ("cosine", "integrated")),
            ("session0_report", ("prototype", "max")),
        ):
            _check_choice(name, getattr(self, name), allowed)
        self.cfg = self.train_config(ctx.base)
        _check_choice("selection", self.cfg.selection, ("val", "last", "test"))
        _check_choice("schedule", self.cfg.schedule, ("cosine", "multistep", "constant"))
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"fact: eta must be in [0, 1], got {self.eta}")
        if self.alpha <= 0:
            raise ValueError(f"fact: alpha must be positive, got {self.alpha}")
        if self.topk < 1:
            raise ValueError(f"fact: topk must be a positive integer, got {self.topk}")
        self.encoder: nn.Module | None = None
        self.weights: Tensor | None = None  # [K, d]: base prototypes, then new-class prototypes
        self.virtual: Tensor | None = None  # [K-B, d] normalised virtual prototypes after the base session
        self.learned_rows: Tensor | None = None
        self.base_classes: list[int] = []
        self.num_active = 0
        self._fingerprint: str | None = None
        self._info: dict = {}

    def selects_on_test(self) -> bool:
        return self.cfg.selection == "test" and self.ctx.base.selection != "test"

    # -- learning --------------------------------------------------------------------------------
    def learn(self, session) -> None:
        seen = list(session.classes.seen)
        if seen != list(range(len(seen))):
            raise ValueError(f"{self.name}: needs seen classes 0..n-1 in order, got {seen[:10]}…")
        self._info = {}
        if self.encoder is None:
            self._learn_base(session)
        else:
            new = list(session.classes.new)
            if new:
                feats, labels = self.ctx.extract_features(self.encoder, session.labeled)
                self.weights[new] = class_means(feats, labels, new).to(self.weights.dtype)
        self.num_active = len(seen)

    def base_cache_key(self, session) -> str:
        """The content key of FACT's own base model (never the shared base model's key)."""
        data, val = session.labeled, self._selection_data(session)
        spec = {
            "what": "fact_base",
            "scenario": self.ctx.scenario.get("fingerprint"),
            "backbone": self.ctx.backbone_cfg,
            "train": self.cfg.to_dict(),
            "fact": {k: getattr(self, k) for k in (
                "balance", "loss_iter", "alpha", "mask_picks", "pseudo_label_rule", "ce_columns", "virtual_grad",
                "bn_passes")},
            "seed": self.ctx.seed,
            "data": data.fingerprint(),
            "val": val.fingerprint() if val is not None else None,
            "num_base": len(session.classes.base or session.classes.new),
            "num_classes": session.classes.num_classes,
        }
        return stable_hash(spec)

    def _selection_data(self, session):
        if self.cfg.selection == "test":
            return self.ctx.selection_override
        if self.cfg.selection == "val":
            return session.validation
        return None

    def _new_net(self, num_classes: int) -> _FactNet:
        torch.manual_seed(self.ctx.derive_seed("model", "fact"))
        return _FactNet(self.ctx.create_backbone(), num_classes, self.cfg.temperature).to(self.ctx.device)

    def _learn_base(self, session) -> None:
        ctx = self.ctx
        base = list(session.classes.base or session.classes.new)
        B, K = len(base), session.classes.num_classes
        if base != list(range(B)):
            raise ValueError(f"{self.name}: base classes must be 0..B-1, got {base[:10]}…")
        if K <= B:
            raise ValueError(f"{self.name}: needs virtual classes (num_classes {K} > base classes {B})")
        key = self.base_cache_key(session)
        memo = getattr(ctx, "_memo", None)
        net = self._new_net(K)
        state, source = None, "trained"
        if memo is not None and key in memo:
            state, source = memo[key], "memo"
        elif ctx.cache is not None and (cached := ctx.cache.load(key)) is not None:
            state, source = cached["state_dict"], "cache"
        if state is not None:
            net.load_state_dict(state)
            info = {}
            logger.info("fact: own base model loaded from the %s (key %s); not retrained", source, key[:16])
        else:
            logger.info("fact: training its own base model (key %s; not the shared base model)", key[:16])
            info = self._train_base(net, session, B, K)
            if ctx.cache is not None:
                ctx.cache.save(key, {"state_dict": net.state_dict()}, meta={"tag": "fact_base", **info})
        if memo is not None:
            memo[key] = copy.deepcopy(net.state_dict())
        self._info = {"fact_base": {"source": source, "key": key[:16], **info}}
        net.eval()
        self.encoder = net.encoder
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        weight = net.weight.detach()
        self.base_classes = base
        self.learned_rows = weight[:B].clone()
        self.virtual = F.normalize(weight[B:], dim=-1, eps=_EPS).clone()
        proto_data = session.info.get("prototype_data", session.labeled)  # all base images, test transform
        feats, labels = ctx.extract_features(self.encoder, proto_data)
        self.weights = torch.zeros(K, feats.shape[1], dtype=feats.dtype, device=feats.device)
        self.weights[:B] = class_means(feats, labels, base)
        self._fingerprint = _module_fingerprint(self.encoder)

    def _train_base(self, net: _FactNet, session, B: int, K: int) -> dict:
        ctx, cfg = self.ctx, self.cfg
        pre_fn, post_fn = backbone_halves(net.encoder)
        mask = draw_virtual_mask(B, K, ctx.derive_seed("fact", "mask"), self.mask_picks).to(ctx.device)
        gen = torch.Generator().manual_seed(ctx.derive_seed("train", "fact"))
        beta_rng = np.random.default_rng(ctx.derive_seed("fact", "beta"))
        selection_data = self._selection_data(session)
        detach_virtual = self.virtual_grad == "mixup_only"
        net.train()
        opt = make_optimizer(net.parameters(), cfg.optimizer)
        best_acc, best_state, best_epoch = -1.0, None, cfg.epochs - 1
        bar = ctx.progress_bar(range(cfg.epochs), desc="fact base training", unit="ep")
        for epoch in bar:
            lr = cfg.lr_at(epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            virtual_phase = epoch >= self.loss_iter
            loss_sum = torch.zeros((), device=ctx.device)
            finite = torch.ones((), dtype=torch.bool, device=ctx.device)
            steps = 0
            for xb, yb in batches(session.labeled, cfg.batch_size, train=True, shuffle=True, device=ctx.device,
                                  generator=gen, num_workers=ctx.num_workers):
                beta = float(beta_rng.beta(self.alpha, self.alpha))  # host-side draw: no device sync
                with ctx.autocast():
                    if self.bn_passes == "released":
                        with torch.no_grad():  # the released loop's unused encode(): BN statistics only
                            net.encoder(xb)
                    if virtual_phase and self.bn_passes == "single":
                        pre = pre_fn(xb)
                        z = post_fn(pre)
                    else:
                        z = net.encoder(xb)
                        pre = pre_fn(xb) if virtual_phase else None
                    logits = virtual_logits(z.float(), net.weight, B, cfg.temperature, detach_virtual)
                    mixed_logits = index = None
                    if virtual_phase:
                        index = torch.randperm(len(yb), generator=gen).to(ctx.device)
                        h = post_fn(mix_features(pre, beta, index))
                        mixed_logits = cosine_logits(h.float(), net.weight, cfg.temperature)
                terms = fact_losses(logits, mixed_logits, yb, index, mask, B,
                                    pseudo_label_rule=self.pseudo_label_rule, ce_columns=self.ce_columns)
                loss = terms["ce"]
                if virtual_phase:
                    loss = loss + self.balance * (terms["virtual"] + terms["mix_virtual"] + terms["mix_base"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_d = loss.detach()
                finite &= torch.isfinite(loss_d)
                loss_sum += loss_d
                steps += 1
                log = {"loss": loss_d, "ce": terms["ce"].detach(), "lr": lr, "epoch": epoch, "session": 0}
                if virtual_phase:
                    log.update({k: terms[k].detach() for k in ("virtual", "mix_virtual", "mix_base")})
                ctx.log_train(log)
            if not bool(finite):
                raise NonFiniteLossError(f"fact base training: non-finite loss in epoch {epoch} (lr {lr:g})")
            mean_loss = float(loss_sum) / max(steps, 1)
            if selection_data is not None and len(selection_data) > 0:
                acc = evaluate_accuracy(net, selection_data, ctx, B)
                if acc >= best_acc:
                    best_acc, best_epoch = acc, epoch
                    best_state = copy.deepcopy(net.state_dict())
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{mean_loss:.3f}", val=f"{acc:.3f}")
            elif hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{mean_loss:.3f}")
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        return {"best_epoch": best_epoch, "best_selection_acc": best_acc if best_state is not None else None,
                "epochs": cfg.epochs}

    def run_info(self) -> dict:
        return dict(self._info)

    # -- inference -------------------------------------------------------------------------------
    def feature_cache_key(self) -> str | None:
        return None if self._fingerprint is None else f"encoder:{self._fingerprint}"

    def encode(self, x: Tensor) -> Tensor:
        with self.ctx.autocast():
            return self.encoder(x).float()

    def predict_features(self, z: Tensor) -> Prediction:
        rows = self.weights[: self.num_active]
        T = self.cfg.temperature
        base_session = self.num_active == len(self.base_classes)
        plain = self.inference == "cosine" or (base_session and self.session0_inference == "cosine")
        if plain:
            logits = cosine_logits(z, rows, T)
        else:  # log of the released mixture (same argmax; softmax of it gives the mixture back)
            mix = integrated_logits(z, rows, self.virtual, T, self.eta, self.topk, self.proj_normalize)
            logits = torch.log(mix.clamp_min(1e-38))
        alternatives = None
        if self.session0_report == "max" and base_session:
            alternatives = {"learned": cosine_logits(z, self.learned_rows, T)}
        return Prediction(logits=logits, alternatives=alternatives)

    def predict(self, x: Tensor) -> Prediction:
        return self.predict_features(self.encode(x))

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "encoder": self.encoder.state_dict(),
            "weights": self.weights,
            "virtual": self.virtual,
            "learned_rows": self.learned_rows,
            "base_classes": list(self.base_classes),
            "num_active": self.num_active,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.random.fork_rng(devices=[]):
            self.encoder = self.ctx.create_backbone().to(self.ctx.device)
        self.encoder.load_state_dict(state["encoder"])
        self.encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        dev = self.ctx.device
        self.weights = state["weights"].to(dev)
        self.virtual = state["virtual"].to(dev)
        self.learned_rows = state["learned_rows"].to(dev)
        self.base_classes = list(state["base_classes"])
        self.num_active = int(state["num_active"])
        self._fingerprint = _module_fingerprint(self.encoder)
