"""Avalanche's classic continual-learning strategies run as openworld strategies.

``avalanche.naive``, ``avalanche.lwf``, ``avalanche.ewc``, ``avalanche.si``, ``avalanche.agem``,
``avalanche.replay`` and ``avalanche.icarl`` wrap Avalanche's own implementations (``avalanche-lib``,
imported only when such a strategy is set up). openworld keeps everything around them:

* the data: each session's labelled set becomes one Avalanche experience (a tensor classification
  dataset built from ``session.labeled``, inputs passed through openworld's *test* transform once,
  so no training augmentation; class ids are the scenario's);
* the model: the recipe's backbone (pre-trained when the recipe has a ``pretrain:`` section) and a
  linear head over all of the scenario's classes (iCaRL: the backbone as feature extractor, and
  Avalanche's nearest-exemplar-mean classifier at inference);
* evaluation: the runner scores :meth:`predict` with openworld's metrics engine (Avalanche's own
  evaluation and loggers are switched off);
* checkpoints: :meth:`state_dict` holds the network's weights (and iCaRL's exemplar means); the
  strategies' internal memories (LwF's previous model, EWC/SI importances, A-GEM/replay/iCaRL
  buffers) live inside Avalanche's plugins, so resuming those strategies mid-stream raises a clear
  error instead of silently dropping them. ``avalanche.naive`` resumes exactly.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from openworld.data.views import batches
from openworld.registry import register_strategy
from openworld.strategies.base import Prediction, Strategy


def _require_avalanche():
    try:
        import avalanche  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the avalanche.* strategies need avalanche-lib: pip install 'openworld[avalanche]'"
        ) from exc


class AvalancheStrategy(Strategy):
    """Common adapter. Subclasses name the Avalanche class and its own keyword arguments."""

    supports = frozenset({"cil"})
    avalanche_class: ClassVar[str] = ""
    resumable: ClassVar[bool] = False

    def __init__(
        self,
        epochs: int = 5,
        batch_size: int = 64,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ):
        self.epochs = epochs
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay

    # -- parameters ------------------------------------------------------------------------------
    _common = ("epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay")
    _own: ClassVar[tuple[str, ...]] = ()

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._common + self._own}

    def _strategy_kwargs(self) -> dict[str, Any]:
        return {}

    # -- model and Avalanche strategy -------------------------------------------------------------
    def setup(self, ctx) -> None:
        super().setup(ctx)
        _require_avalanche()
        torch.manual_seed(ctx.derive_seed("avalanche", "init"))
        self.encoder = ctx.create_backbone().to(ctx.device)
        self.head = nn.Linear(self.encoder.out_features, int(ctx.scenario["num_classes"])).to(ctx.device)
        self.num_seen = 0
        self._task_sizes: list[int] = []
        self._strategy = self._make_strategy()

    def _network(self) -> nn.Module:
        return nn.Sequential(self.encoder, self.head)

    def _make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"{self.name}.optimizer: 'sgd' or 'adam', got {self.optimizer!r}")

    def _make_strategy(self):
        import avalanche.training as at
        from avalanche.training.plugins import EvaluationPlugin

        cls = getattr(at, self.avalanche_class)
        self.model = self._network()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No loggers specified": Avalanche's evaluation is not used
            return cls(
                model=self.model,
                optimizer=self._make_optimizer(self.model.parameters()),
                criterion=nn.CrossEntropyLoss(),
                train_mb_size=self.batch_size,
                train_epochs=self.epochs,
                eval_mb_size=self.ctx.eval_batch_size,
                device=self.ctx.device,
                evaluator=EvaluationPlugin(loggers=[]),
                **self._strategy_kwargs(),
            )

    # -- data -------------------------------------------------------------------------------------
    def _experience(self, session):
        """One Avalanche experience holding ``session.labeled`` (test-transformed tensors)."""
        from avalanche.benchmarks import dataset_benchmark
        from avalanche.benchmarks.utils.classification_dataset import (
            _make_taskaware_tensor_classification_dataset as tensor_dataset,  # what Avalanche's iCaRL uses too
        )

        xs, ys = [], []
        for xb, yb in batches(session.labeled, self.ctx.eval_batch_size, device="cpu"):
            xs.append(xb.float())
            ys.append(yb)
        x, y = torch.cat(xs), torch.cat(ys)
        ds = tensor_dataset(x, y, task_labels=0, targets=y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exp = dataset_benchmark([ds], [ds]).train_stream[0]
        # iCaRL reads the class layout from the experience's benchmark and its index.
        exp.current_experience = len(self._task_sizes) - 1
        exp.benchmark = types.SimpleNamespace(
            n_classes_per_exp=list(self._task_sizes),
            classes_order=list(range(int(self.ctx.scenario["num_classes"]))),
            n_classes=int(self.ctx.scenario["num_classes"]),
        )
        return exp

    # -- learning and inference -------------------------------------------------------------------
    def learn(self, session) -> None:
        new = list(session.classes.new)
        seen = list(session.classes.seen)
        if seen != list(range(len(seen))) or new != seen[len(seen) - len(new):]:
            raise ValueError(f"{self.name}: needs contiguous task labels, got new classes {new[:10]}…")
        self._task_sizes.append(len(new))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Avalanche's deprecation notices for its benchmark generators
            self._strategy.train(self._experience(session))
        self.num_seen = len(seen)
        self.model.eval()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.model.eval()
        logits = self.model(x.float())
        return Prediction(logits=logits[:, : self.num_seen].float())

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "num_seen": self.num_seen,
            "task_sizes": list(self._task_sizes),
        }

    def load_state_dict(self, state: dict) -> None:
        if not self.resumable and state.get("task_sizes"):
            raise NotImplementedError(
                f"{self.name}: resuming mid-stream is not supported: its memory (Avalanche plugin state) is not in "
                "openworld's checkpoint; rerun this strategy without --resume"
            )
        self.model.load_state_dict(state["model"])
        self.num_seen = int(state["num_seen"])
        self._task_sizes = list(state["task_sizes"])
        self.model.eval()


@register_strategy("avalanche.naive")
class AvalancheNaive(AvalancheStrategy):
    """Avalanche ``Naive``: fine-tuning on each experience (the lower bound)."""

    avalanche_class = "Naive"
    resumable = True


@register_strategy("avalanche.lwf")
class AvalancheLwF(AvalancheStrategy):
    """Avalanche ``LwF``: distillation from the previous model's outputs (Li & Hoiem 2016)."""

    avalanche_class = "LwF"
    _own = ("alpha", "temperature")

    def __init__(self, epochs: int = 5, batch_size: int = 64, optimizer: Literal["sgd", "adam"] = "sgd",
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0, alpha: float = 1.0,
                 temperature: float = 2.0):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.alpha = alpha
        self.temperature = temperature

    def _strategy_kwargs(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "temperature": self.temperature}


@register_strategy("avalanche.ewc")
class AvalancheEWC(AvalancheStrategy):
    """Avalanche ``EWC``: a Fisher-weighted quadratic penalty on parameter changes (Kirkpatrick et al. 2017)."""

    avalanche_class = "EWC"
    _own = ("ewc_lambda", "mode", "decay_factor")

    def __init__(self, epochs: int = 5, batch_size: int = 64, optimizer: Literal["sgd", "adam"] = "sgd",
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0, ewc_lambda: float = 100.0,
                 mode: Literal["separate", "online"] = "separate", decay_factor: float | None = None):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.ewc_lambda = ewc_lambda
        self.mode = mode
        self.decay_factor = decay_factor

    def _strategy_kwargs(self) -> dict[str, Any]:
        if self.mode == "online" and self.decay_factor is None:
            raise ValueError(f"{self.name}: mode 'online' needs decay_factor")
        return {"ewc_lambda": self.ewc_lambda, "mode": self.mode, "decay_factor": self.decay_factor}


@register_strategy("avalanche.si")
class AvalancheSI(AvalancheStrategy):
    """Avalanche ``SynapticIntelligence`` (Zenke et al. 2017)."""

    avalanche_class = "SynapticIntelligence"
    _own = ("si_lambda", "eps")

    def __init__(self, epochs: int = 5, batch_size: int = 64, optimizer: Literal["sgd", "adam"] = "sgd",
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0, si_lambda: float = 1.0,
                 eps: float = 1e-7):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.si_lambda = si_lambda
        self.eps = eps

    def _strategy_kwargs(self) -> dict[str, Any]:
        return {"si_lambda": self.si_lambda, "eps": self.eps}


@register_strategy("avalanche.agem")
class AvalancheAGEM(AvalancheStrategy):
    """Avalanche ``AGEM``: gradient projection on a small episodic memory (Chaudhry et al. 2019)."""

    avalanche_class = "AGEM"
    _own = ("patterns_per_exp", "sample_size")

    def __init__(self, epochs: int = 5, batch_size: int = 64, optimizer: Literal["sgd", "adam"] = "sgd",
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0, patterns_per_exp: int = 100,
                 sample_size: int = 64):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.patterns_per_exp = patterns_per_exp
        self.sample_size = sample_size

    def _strategy_kwargs(self) -> dict[str, Any]:
        return {"patterns_per_exp": self.patterns_per_exp, "sample_size": self.sample_size}


@register_strategy("avalanche.replay")
class AvalancheReplay(AvalancheStrategy):
    """Avalanche ``Replay``: experience replay from a class-balanced buffer of ``mem_size`` samples."""

    avalanche_class = "Replay"
    _own = ("mem_size",)

    def __init__(self, epochs: int = 5, batch_size: int = 64, optimizer: Literal["sgd", "adam"] = "sgd",
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0, mem_size: int = 200):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.mem_size = mem_size

    def _strategy_kwargs(self) -> dict[str, Any]:
        return {"mem_size": self.mem_size}


@register_strategy("avalanche.icarl")
class AvalancheICaRL(AvalancheStrategy):
    """Avalanche ``ICaRL``: herding exemplars, distillation, nearest-exemplar-mean inference (Rebuffi et al. 2017)."""

    avalanche_class = "ICaRL"
    _own = ("memory_size", "fixed_memory")

    def __init__(self, epochs: int = 5, batch_size: int = 64, optimizer: Literal["sgd", "adam"] = "sgd",
                 lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 0.0, memory_size: int = 200,
                 fixed_memory: bool = True):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.memory_size = memory_size
        self.fixed_memory = fixed_memory

    def _make_strategy(self):
        from avalanche.training import ICaRL
        from avalanche.training.plugins import EvaluationPlugin

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy = ICaRL(
                feature_extractor=self.encoder,
                classifier=self.head,
                optimizer=self._make_optimizer(list(self.encoder.parameters()) + list(self.head.parameters())),
                memory_size=self.memory_size,
                buffer_transform=None,
                fixed_memory=self.fixed_memory,
                train_mb_size=self.batch_size,
                train_epochs=self.epochs,
                eval_mb_size=self.ctx.eval_batch_size,
                device=self.ctx.device,
                evaluator=EvaluationPlugin(loggers=[]),
            )
        self.model = strategy.model
        _fix_icarl_old_model(strategy)
        return strategy


def _fix_icarl_old_model(strategy) -> None:
    """Avalanche 0.6 bug workaround: ``ICaRLLossPlugin.after_training_exp`` loads the model's state
    into its stored copy, but the nearest-mean classifier's ``class_means`` buffer grows with every
    task, so from the second task on the load fails with a size mismatch. Dropping the stored copy
    first makes the plugin take a fresh deep copy of the same state, which is what the load meant."""
    from avalanche.training.losses import ICaRLLossPlugin

    for plugin in strategy.plugins:
        if isinstance(plugin, ICaRLLossPlugin):
            original = plugin.after_training_exp

            def after_training_exp(strat, _plugin=plugin, _original=original, **kwargs):
                _plugin.old_model = None
                return _original(strat, **kwargs)

            plugin.after_training_exp = after_training_exp
