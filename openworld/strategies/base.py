"""The Strategy base class, the run context a strategy receives, and a small fast train loop.

A strategy sees only what :meth:`Session.visible` leaves: labelled data, unlabelled data whose
targets are -1, the class layout. It never receives evaluation sets or metric objects; the runner
calls :meth:`Strategy.predict` on evaluation inputs and scores the predictions itself.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import batches

SCENARIO_KINDS = frozenset({"cil", "fscil", "gcd", "ncd", "long_tail", "open_set"})


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or infinite; the runner marks that run failed and goes on."""


@dataclass
class Prediction:
    """``logits[:, c]`` scores class c (columns past ``logits.shape[1]`` are absent classes).

    ``unknown_score``: higher = more likely unknown; ``None`` when the strategy has no detector.
    ``alternatives``: other heads' logits, only for released-code protocols that report the best of
    several heads on the test set (e.g. TEEN's ``session0_report: max``); the runner then reports
    the head with the highest accuracy and records which one it was.
    ``selected``: a per-sample bool mask of the inputs the strategy's own pseudo-label rule would
    select (e.g. LegoGCD's LER mask); the evaluator, which holds the labels, counts how many of them
    are right (diagnostics only).
    """

    logits: Tensor
    unknown_score: Tensor | None = None
    alternatives: dict[str, Tensor] | None = None
    selected: Tensor | None = None


# ------------------------------------------------------------------------------------------------
# Training recipe shared by strategies that train a classifier (the recipe's `base:` block)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5.0e-4


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    temperature: float = 16.0
    selection: Literal["val", "last", "test"] = "val"

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        opt = d.pop("optimizer", {}) or {}
        if "milestones" in d:
            d["milestones"] = tuple(d["milestones"])
        return cls(optimizer=OptimizerConfig(**opt), **d)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        out = asdict(self)
        out["milestones"] = list(self.milestones)
        return out

    def lr_at(self, epoch: int) -> float:
        """LR of 0-based epoch ``epoch`` (stepped once per epoch; card §2 Step 1)."""
        lr0 = self.optimizer.lr
        if self.schedule == "cosine":
            return 0.5 * lr0 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        if self.schedule == "multistep":
            return lr0 * self.gamma ** sum(1 for m in self.milestones if m <= epoch)
        return lr0


def make_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def stable_hash(obj: Any) -> str:
    """SHA-256 of a JSON-able object with sorted keys (cache keys, config fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Run context
# ------------------------------------------------------------------------------------------------
class RunContext:
    """What the runner gives a strategy in :meth:`Strategy.setup`.

    Device, seed, a per-session random generator, the scenario's description, the recipe's backbone
    and base-training blocks, a content-addressed cache, AMP, progress bars and a train-scalar logger.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        seed: int,
        scenario: dict,
        backbone: dict,
        base: TrainConfig,
        cache: Any = None,
        amp: bool = False,
        log_every: int = 50,
        progress: bool = True,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        log_scalar: Callable[[str, float, int], None] | None = None,
        memo: dict | None = None,
    ):
        self.device = torch.device(device)
        self.seed = seed
        self.scenario = scenario
        self.backbone_cfg = dict(backbone)
        self.base = base
        self.cache = cache
        self.amp = amp and self.device.type == "cuda"
        self.log_every = max(1, int(log_every))
        self.progress = progress
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self._log_scalar = log_scalar
        self._memo = memo if memo is not None else {}
        self.global_step = 0
        self.session_index = 0
        self.generator = torch.Generator().manual_seed(seed)
        # Only under `base.selection: test` (protocol: paper): the runner puts the session-0 test set
        # here for epoch selection; results flag it. Never set otherwise.
        self.selection_override = None

    # -- randomness ------------------------------------------------------------------------------
    def derive_seed(self, *parts: Any) -> int:
        h = hashlib.sha256("|".join(str(p) for p in (self.seed, *parts)).encode()).digest()
        return int.from_bytes(h[:4], "big")

    def start_session(self, index: int) -> None:
        """Called by the runner before ``learn``: reseeds so a resumed run matches an uninterrupted one."""
        self.session_index = index
        s = self.derive_seed("session", index)
        torch.manual_seed(s)
        self.generator = torch.Generator().manual_seed(s)

    # -- models ----------------------------------------------------------------------------------
    def create_backbone(self) -> nn.Module:
        """The recipe's backbone: freshly initialised, or (with a ``pretrain:`` section) a copy of the
        pre-trained one (:meth:`pretrained_backbone`)."""
        if self.backbone_cfg.get("pretrain"):
            return self.pretrained_backbone()
        return self._new_backbone()

    def _new_backbone(self) -> nn.Module:
        from openworld.models import create_backbone

        cfg = dict(self.backbone_cfg)
        cfg.pop("pretrain", None)
        name = cfg.pop("name")
        shape = tuple(self.scenario["input_shape"])
        return create_backbone(name, in_channels=shape[0] if len(shape) == 3 else 1, input_size=shape, **cfg)

    def pretrained_backbone(self) -> nn.Module:
        """The backbone trained by the recipe's ``pretrain:`` section (linear head + cross-entropy on
        data disjoint from the scenario), its head dropped.

        Trained once per content hash (backbone, pre-training section, input shape, training data)
        and shared by every strategy and seed: in memory for this process, on disk in the cache.
        """
        cfg = dict(self.backbone_cfg)
        pre = cfg.pop("pretrain", None)
        if not pre:
            raise ValueError("pretrained_backbone: the recipe has no `pretrain:` section")
        shape = tuple(self.scenario["input_shape"])
        memo_key = stable_hash({"what": "pretrained_backbone", "backbone": cfg, "pretrain": pre, "shape": shape})
        if memo_key not in self._memo:
            with torch.random.fork_rng(devices=[]):  # the run's global random stream is left untouched
                self._memo[memo_key] = self._pretrain(pre, shape)
        with torch.random.fork_rng(devices=[]):
            encoder = self._new_backbone()
        encoder.load_state_dict(self._memo[memo_key])
        return encoder.to(self.device)

    def _pretrain(self, pre: dict, shape: tuple) -> dict:
        simclr = pre.get("objective", "supervised") == "simclr"
        data, num_classes = _pretrain_data(pre, labels=not simclr)
        sample = data.x[:1] if hasattr(data, "x") else None
        if sample is not None:
            if data.transforms is not None:
                sample = data.transforms.test(sample)
            if tuple(sample.shape[1:]) != shape:
                raise ValueError(
                    f"pretrain.data {pre['data']['source']!r} gives inputs of shape {tuple(sample.shape[1:])}, "
                    f"the scenario {shape}; pick a source of the same shape (or its image_size option)"
                )
        key = stable_hash(
            {
                "what": "pretrained_backbone",
                "backbone": {k: v for k, v in self.backbone_cfg.items() if k != "pretrain"},
                "pretrain": pre,
                "shape": shape,
                "data": data.fingerprint(),
            }
        )
        seed = int(pre.get("seed", 0))
        torch.manual_seed(seed)
        encoder = self._new_backbone()
        cached = self.cache.load(key) if self.cache is not None else None
        if cached is not None:
            encoder.load_state_dict(cached["state_dict"])
        elif simclr:  # self-supervised stage 0 (gcd-ncd card §9): labels hidden, never read
            from openworld.strategies.simclr import simclr_pretrain

            info = simclr_pretrain(
                encoder,
                data,
                epochs=int(pre["epochs"]),
                batch_size=int(pre["batch_size"]),
                temperature=float(pre.get("temperature", 0.5)),
                optimizer=dict(pre.get("optimizer") or {}),
                schedule=pre.get("schedule", "cosine"),
                proj_dim=int(pre.get("proj_dim", 128)),
                device=self.device,
                generator=torch.Generator().manual_seed(seed),
                num_workers=self.num_workers,
                progress=self.progress_bar if self.progress else None,
            )
            if self.cache is not None:
                self.cache.save(
                    key,
                    {"state_dict": encoder.state_dict()},
                    meta={"tag": "pretrain_simclr", "num_samples": len(data), **info},
                )
        else:
            from openworld.models.heads import ClassifierNet, LinearClassifier

            model = ClassifierNet(encoder, LinearClassifier(encoder.out_features, num_classes)).to(self.device)
            opt = dict(pre.get("optimizer") or {})
            train_cfg = TrainConfig(
                epochs=int(pre["epochs"]),
                batch_size=int(pre["batch_size"]),
                optimizer=OptimizerConfig(**opt),
                schedule=pre.get("schedule", "cosine"),
                selection="last",
            )
            info = train_classifier(
                model,
                data,
                cfg=train_cfg,
                ctx=self,
                num_active=num_classes,
                generator=torch.Generator().manual_seed(seed),
                desc="pre-training",
            )
            encoder = model.encoder
            if self.cache is not None:
                self.cache.save(
                    key,
                    {"state_dict": encoder.state_dict()},
                    meta={"tag": "pretrain", "num_classes": num_classes, "num_samples": len(data), **info},
                )
        return copy.deepcopy(encoder.state_dict())

    def create_classifier_net(
        self, num_classes: int | None = None, head: Literal["cosine", "linear"] = "cosine"
    ) -> nn.Module:
        """The recipe's backbone with a cosine classifier (T·cos, the ``base:`` temperature) or an
        ordinary linear one (bias, unbounded logits)."""
        from openworld.models.heads import ClassifierNet, CosineClassifier, LinearClassifier

        encoder = self.create_backbone()
        k = num_classes or self.scenario["num_classes"]
        if head == "linear":
            classifier = LinearClassifier(encoder.out_features, k)
        elif head == "cosine":
            classifier = CosineClassifier(encoder.out_features, k, self.base.temperature)
        else:
            raise ValueError(f"head must be 'cosine' or 'linear', got {head!r}")
        return ClassifierNet(encoder, classifier).to(self.device)

    def base_model(
        self,
        session=None,
        *,
        data=None,
        validation=None,
        num_active: int | None = None,
        tag: str = "base",
        head: Literal["cosine", "linear"] = "cosine",
    ) -> nn.Module:
        """Encoder + classifier (``head``) trained with the recipe's ``base:`` block on ``session``
        (or on ``data``/``validation``/``num_active`` given explicitly).

        Trained once per (scenario splits, backbone, base block, seed, data, head) and shared: every
        strategy asking for the same model gets a copy of one cached training (in memory for this
        process, on disk in the content-addressed cache across processes).
        """
        if session is None and (data is None or num_active is None):
            raise ValueError("base_model: give a session, or data and num_active")
        data = session.labeled if data is None else data
        if validation is None and session is not None:
            validation = session.validation
        if self.base.selection == "test":
            validation = self.selection_override  # protocol: paper — set by the runner, flagged in results
        num_active = num_active or len(session.classes.seen)
        spec = {
            "what": "classifier_net",
            "tag": tag,
            "scenario": self.scenario.get("fingerprint"),
            "backbone": self.backbone_cfg,
            "base": self.base.to_dict(),
            "seed": self.seed,
            "data": data.fingerprint(),
            "val": validation.fingerprint() if validation is not None else None,
            "num_active": num_active,
        }
        if head != "cosine":  # cosine keys stay as they were (existing caches remain valid)
            spec["head"] = head
        key = stable_hash(spec)
        if key in self._memo:
            model = self.create_classifier_net(head=head)
            model.load_state_dict(self._memo[key])
            return model.eval()
        torch.manual_seed(self.derive_seed("model", tag))
        model = self.create_classifier_net(head=head)
        cached = self.cache.load(key) if self.cache is not None else None
        if cached is not None:
            model.load_state_dict(cached["state_dict"])
        else:
            gen = torch.Generator().manual_seed(self.derive_seed("train", tag))
            info = train_classifier(
                model,
                data,
                cfg=self.base,
                ctx=self,
                num_active=num_active,
                selection_data=None if self.base.selection == "last" else validation,
                generator=gen,
                desc=f"{tag} training",
            )
            if self.cache is not None:
                self.cache.save(key, {"state_dict": model.state_dict()}, meta={"tag": tag, **info})
        self._memo[key] = copy.deepcopy(model.state_dict())
        return model.eval()

    # -- features --------------------------------------------------------------------------------
    @torch.no_grad()
    def extract_features(self, encoder: nn.Module, data, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """Features (test transform, inference mode) and targets of ``data``, on the run's device."""
        was_training = encoder.training
        encoder.eval()
        feats, ys = [], []
        for xb, yb in batches(
            data, batch_size or self.eval_batch_size, device=self.device, num_workers=self.num_workers
        ):
            with self.autocast():
                feats.append(encoder(xb).float())
            ys.append(yb)
        encoder.train(was_training)
        return torch.cat(feats), torch.cat(ys)

    # -- training utilities ----------------------------------------------------------------------
    def autocast(self):
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def log_train(self, values: dict[str, Tensor | float]) -> None:
        """Count one optimiser step; every ``log_every`` steps write ``train/<name>`` (one sync)."""
        self.global_step += 1
        if self._log_scalar is None or self.global_step % self.log_every:
            return
        for name, value in values.items():
            v = float(value.detach()) if isinstance(value, Tensor) else float(value)
            self._log_scalar(f"train/{name}", v, self.global_step)

    def log_scalars(self, values: dict[str, Tensor | float]) -> None:
        """Write ``train/<name>`` now, at the current step, without counting a step: for per-epoch or
        per-task diagnostics that :meth:`log_train`'s every-``log_every``-steps sampling would drop."""
        if self._log_scalar is None:
            return
        for name, value in values.items():
            v = float(value.detach()) if isinstance(value, Tensor) else float(value)
            self._log_scalar(f"train/{name}", v, self.global_step)

    def progress_bar(self, iterable=None, **kwargs):
        from tqdm.auto import tqdm

        kwargs.setdefault("leave", False)
        return tqdm(iterable, disable=not self.progress, dynamic_ncols=True, **kwargs)


def _pretrain_data(pre: dict, labels: bool = True):
    """The pre-training set of a ``pretrain:`` section: its source's training split, restricted to
    ``classes`` (relabelled 0…n−1 in the order given) and ``per_class`` hashed picks per class.
    ``labels=False`` (self-supervised objectives, without ``classes``/``per_class``): the whole split
    with its targets hidden, so no label is read."""
    import numpy as np

    from openworld.data.splits import pick
    from openworld.registry import DATASETS

    d = dict(pre["data"])
    source, root, download = d.pop("source"), d.pop("root", None), bool(d.pop("download", False))
    train = DATASETS.get(source)(root=root, download=download, **d).train
    if not labels and pre.get("classes") is None and pre.get("per_class") is None:
        return train.detach_origin().hide_labels(), 0
    labels = train.targets.numpy()
    available = sorted(int(c) for c in np.unique(labels))
    classes = [int(c) for c in pre["classes"]] if pre.get("classes") is not None else available
    missing = [c for c in classes if c not in available]
    if missing:
        raise ValueError(f"pretrain.classes: {missing} are not classes of {source!r} (it has {available[:20]}…)")
    rows: list[int] = []
    for c in classes:
        c_rows = np.flatnonzero(labels == c)
        n = pre.get("per_class")
        rows.extend(pick(c_rows, min(int(n), len(c_rows)), "pretrain", 0, c) if n else c_rows.tolist())
    mapping = torch.full((max(available) + 1,), -1, dtype=torch.long)
    mapping[torch.as_tensor(classes)] = torch.arange(len(classes))
    return train.subset(sorted(rows)).relabel(mapping).detach_origin(), len(classes)


# ------------------------------------------------------------------------------------------------
# Train loop
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_accuracy(model: nn.Module, data, ctx: RunContext, num_active: int) -> float:
    """Top-1 accuracy of ``model(x, num_active)`` on labelled ``data`` (model selection only)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=ctx.device)
    total = 0
    for xb, yb in batches(data, ctx.eval_batch_size, device=ctx.device, num_workers=ctx.num_workers):
        with ctx.autocast():
            logits = model(xb, num_active=num_active)
        correct += (logits.argmax(1) == yb).sum()
        total += len(yb)
    model.train(was_training)
    return float(correct) / max(total, 1)


def train_classifier(
    model: nn.Module,
    data,
    *,
    cfg: TrainConfig,
    ctx: RunContext,
    num_active: int,
    selection_data=None,
    generator: torch.Generator | None = None,
    params=None,
    desc: str = "training",
    batch_size: int | None = None,
) -> dict:
    """Cross-entropy over logits ``0..num_active-1``; SGD/Adam with a per-epoch LR schedule.

    With ``selection_data`` the state with the best accuracy on it is kept (ties keep the later
    epoch, card §2 Step 1); otherwise the last epoch's. One host sync per epoch: the loss of the
    epoch and the finiteness flag are read together.
    """
    from openworld import distributed

    model.train()
    world = distributed.world_size()
    shard = (distributed.rank(), world) if world > 1 else None
    train_model = distributed.wrap(model)  # DistributedDataParallel under torchrun, else the model itself
    opt = make_optimizer(model.parameters() if params is None else params, cfg.optimizer)
    bs = batch_size or cfg.batch_size
    best_acc, best_state, best_epoch = -1.0, None, cfg.epochs - 1
    history = []
    bar = ctx.progress_bar(range(cfg.epochs), desc=desc, unit="ep")
    for epoch in bar:
        lr = cfg.lr_at(epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=ctx.device)
        finite = torch.ones((), dtype=torch.bool, device=ctx.device)
        steps = 0
        for xb, yb in batches(
            data,
            bs,
            train=True,
            shuffle=True,
            device=ctx.device,
            generator=generator,
            num_workers=ctx.num_workers,
            shard=shard,
        ):
            with ctx.autocast():
                logits = train_model(xb, num_active=num_active)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_d = loss.detach()
            finite &= torch.isfinite(loss_d)
            loss_sum += loss_d
            steps += 1
            ctx.log_train({"loss": loss_d, "lr": lr, "epoch": epoch, "session": ctx.session_index})
        if not bool(finite):
            raise NonFiniteLossError(f"{desc}: non-finite loss in epoch {epoch} (lr {lr:g})")
        mean_loss = float(loss_sum) / max(steps, 1)
        record = {"epoch": epoch, "loss": mean_loss, "lr": lr}
        if selection_data is not None and len(selection_data) > 0:
            acc = evaluate_accuracy(model, selection_data, ctx, num_active)
            record["val_acc"] = acc
            if acc >= best_acc:
                best_acc, best_epoch = acc, epoch
                best_state = copy.deepcopy(model.state_dict())
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{mean_loss:.3f}", val=f"{acc:.3f}")
        elif hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{mean_loss:.3f}")
        history.append(record)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {
        "best_epoch": best_epoch,
        "best_selection_acc": best_acc if best_state is not None else None,
        "epochs": cfg.epochs,
    }


@torch.no_grad()
def class_means(feats: Tensor, labels: Tensor, classes) -> Tensor:
    """Mean feature per class in ``classes`` (order kept), accumulated over all samples at once."""
    classes_t = torch.as_tensor(list(classes), dtype=torch.long, device=feats.device)
    lookup = torch.full((int(labels.max()) + 1 if len(labels) else 1,), -1, dtype=torch.long, device=feats.device)
    lookup[classes_t[classes_t < len(lookup)]] = torch.arange(len(classes_t), device=feats.device)[
        classes_t < len(lookup)
    ]
    slot = lookup[labels.clamp(min=0)]
    slot = torch.where((labels >= 0) & (slot >= 0), slot, len(classes_t))
    sums = torch.zeros(len(classes_t) + 1, feats.shape[1], dtype=feats.dtype, device=feats.device)
    sums.index_add_(0, slot, feats)
    counts = torch.zeros(len(classes_t) + 1, dtype=feats.dtype, device=feats.device)
    counts.index_add_(0, slot, torch.ones_like(slot, dtype=feats.dtype))
    if bool((counts[:-1] == 0).any()):
        missing = [c for c, n in zip(list(classes), counts[:-1].tolist()) if n == 0]
        raise ValueError(f"class_means: no sample of classes {missing}")
    return sums[:-1] / counts[:-1, None]


# ------------------------------------------------------------------------------------------------
# Strategy
# ------------------------------------------------------------------------------------------------
class Strategy:
    """Base class of every strategy (built-in or plugin).

    Constructor parameters are hyperparameters only, each with a default (scikit-learn style);
    state is created in :meth:`setup`. The runner validates recipe values against the signature.
    """

    name: ClassVar[str] = ""
    supports: ClassVar[frozenset[str]] = frozenset()
    transductive: ClassVar[bool] = False

    ctx: RunContext

    def get_params(self) -> dict[str, Any]:
        sig = inspect.signature(type(self).__init__)
        return {p: getattr(self, p) for p in sig.parameters if p != "self" and hasattr(self, p)}

    def setup(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def learn(self, session) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement learn(session)")

    def predict(self, x: Tensor) -> Prediction:
        raise NotImplementedError(f"{type(self).__name__} must implement predict(x)")

    # Optional fast path: a strategy whose encoder is frozen returns a key that changes whenever the
    # encoder does; the runner then encodes each evaluation input once and reuses the features.
    def feature_cache_key(self) -> str | None:
        return None

    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__}: feature_cache_key() is set but encode(x) is not implemented")

    def predict_features(self, z: Tensor) -> Prediction:
        raise NotImplementedError(
            f"{type(self).__name__}: feature_cache_key() is set but predict_features(z) is not implemented"
        )

    def restore_session(self, session) -> None:
        """On ``--resume``: called with each already-learned session (visible part) after
        :meth:`load_state_dict`, for strategies that keep references to past data. No training here."""

    def adapt(self, inputs) -> None:
        """Transductive strategies (``transductive = True``) adapt to evaluation inputs here."""

    def adapt_fraction(self) -> float | None:
        """For a transductive strategy: ``None`` (adapt on the whole evaluation set and be scored on it),
        or a fraction f in (0, 1): the runner adapts on a seeded f-part of each evaluation set and scores
        only the rest, so the cost of transduction can be measured (e.g. SADE's ``tta="split"``)."""
        return None

    def selects_on_test(self) -> bool:
        """True when the strategy opted in to selecting epochs on the test set (a protocol of some
        official code, e.g. SADE's ``checkpoint="test"``). The runner then puts the labelled test set in
        ``ctx.selection_override`` during ``learn`` and marks the run's results as not clean."""
        return False

    def uses_oracle_data(self) -> bool:
        """True when the strategy is an oracle that trains on data the protocol withholds (e.g. ``joint``
        with ``data: full``: every training image of the seen FSCIL classes). The runner then hands it
        ``session.visible(oracle=True)`` (``Session.oracle`` filled) and marks the run as not comparable."""
        return False

    def run_info(self) -> dict[str, Any]:
        """JSON-able facts the strategy decided while learning the session just learned (e.g. an
        estimated number of clusters K̂); stored as ``sessions[i].strategy_info`` in ``results.json``."""
        return {}

    def begin_eval_set(self, name: str) -> None:
        """Called by the runner before it scores the evaluation set ``name`` (its name only — never its
        data or labels). Default: nothing. LADE's test-prior protocol uses it to pick the known prior."""

    def eval_diagnostics(self) -> dict[str, float]:
        """Scalars describing the strategy's state for the evaluation set just scored (e.g. SADE's
        aggregation weights after adapting to it); logged next to that set's metrics. Default: none."""
        return {}

    def state_dict(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement state_dict()")

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement load_state_dict(state)")
