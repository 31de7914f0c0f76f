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
* checkpoints: :meth:`state_dict` holds, as plain tensors, numbers, lists and dicts (openworld loads
  checkpoints with ``weights_only=True``; Avalanche's own checkpointing is not used), everything the
  next experience reads: the network's weights, the optimizer's state (Avalanche keeps SGD momentum /
  Adam moments across experiences), Avalanche's clock (its experience counter drives EWC, SI and
  iCaRL), and each strategy's plugin memory — LwF's previous model and seen classes, EWC's saved
  parameters and importances, SI's ω and running accumulators, A-GEM's per-experience buffers,
  Replay's per-experience reservoir buffers, iCaRL's exemplars, herding order, class means and old
  model. :meth:`load_state_dict` rebuilds them inside a freshly built Avalanche strategy (buffers as
  tensor datasets, built as the experiences are), so a run resumed mid-stream gives the same results
  as an uninterrupted one. Python's and NumPy's global generators, which Avalanche draws from (e.g.
  A-GEM's buffer selection), are reseeded per session inside :meth:`learn` for the same reason.
"""

from __future__ import annotations

import copy
import random
import types
import warnings
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from openworld.data.views import batches
from openworld.registry import register_strategy
from openworld.strategies.base import Prediction, Strategy


def _require_avalanche():
    try:
        import avalanche  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the avalanche.* strategies need avalanche-lib: pip install 'openworld[avalanche]'") from exc


class AvalancheStrategy(Strategy):
    """Common adapter. Subclasses name the Avalanche class and its own keyword arguments."""

    supports = frozenset({"cil"})
    avalanche_class: ClassVar[str] = ""
    resumable: ClassVar[bool] = True  # a subclass whose memory is not checkpointed sets False

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
        if seen != list(range(len(seen))) or new != seen[len(seen) - len(new) :]:
            raise ValueError(f"{self.name}: needs contiguous task labels, got new classes {new[:10]}…")
        self._task_sizes.append(len(new))
        # Avalanche draws from Python's and NumPy's global generators too (A-GEM picks its buffer with
        # random.shuffle); the runner reseeds only torch per session, so seed them here for resumability.
        seed = self.ctx.derive_seed("avalanche", "global-rng", len(self._task_sizes))
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Avalanche's deprecation notices for its benchmark generators
                self._strategy.train(self._experience(session))
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        self.num_seen = len(seen)
        self.model.eval()

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        self.model.eval()
        logits = self.model(x.float())
        return Prediction(logits=logits[:, : self.num_seen].float())

    # -- state ------------------------------------------------------------------------------------
    has_memory: ClassVar[bool] = True  # plugin state beyond weights, optimizer and clock

    def state_dict(self) -> dict:
        st = self._strategy
        state = {
            "model": _cpu(self.model.state_dict()),
            "num_seen": self.num_seen,
            "task_sizes": list(self._task_sizes),
            # Avalanche's experience counter (EWC, SI and iCaRL index their memories with it) and the rest.
            "clock": {k: int(v) for k, v in vars(st.clock).items() if type(v) is int},
        }
        if st.optimized_param_id is not None:
            # Avalanche resets the optimizer's state only before the first experience: momentum (SGD) or
            # moments (Adam) carry over from one experience to the next.
            state["optimizer"] = _cpu(st.optimizer.state_dict())
        if self._task_sizes and self.has_memory:
            state["memory"] = self._memory_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        if not self.resumable and state.get("task_sizes"):
            raise NotImplementedError(
                f"{self.name}: resuming mid-stream is not supported: its memory (Avalanche plugin state) is not in "
                "openworld's checkpoint; rerun this strategy without --resume"
            )
        if state.get("task_sizes") and self.has_memory and "memory" not in state:
            raise NotImplementedError(
                f"{self.name}: this checkpoint holds no Avalanche plugin memory (written by an older openworld); "
                "rerun this strategy without --resume"
            )
        self._load_model(state["model"])
        self.num_seen = int(state["num_seen"])
        self._task_sizes = [int(n) for n in state["task_sizes"]]
        st = self._strategy
        for k, v in state.get("clock", {}).items():
            setattr(st.clock, k, int(v))
        if "optimizer" in state:
            # What Avalanche's first make_optimizer does (parameters in the model's order), without its
            # state reset; then the saved momentum/moments.
            st.optimizer.param_groups[0]["params"] = list(st.model.parameters())
            st.optimized_param_id = dict(st.model.named_parameters())
            st.optimizer.load_state_dict(state["optimizer"])
        if self._task_sizes and self.has_memory:
            self._load_memory(state["memory"])
        self.model.eval()

    def _load_model(self, weights: dict) -> None:
        self.model.load_state_dict(weights)

    def _memory_state(self) -> dict:
        raise NotImplementedError(f"{type(self).__name__} has plugin memory (has_memory) but no _memory_state()")

    def _load_memory(self, memory: dict) -> None:
        raise NotImplementedError(f"{type(self).__name__} has plugin memory (has_memory) but no _load_memory()")

    # -- helpers for the plugin memories ------------------------------------------------------------
    def _plugin(self, cls):
        for plugin in self._strategy.plugins:
            if isinstance(plugin, cls):
                return plugin
        raise LookupError(f"{self.name}: no {cls.__name__} among the Avalanche strategy's plugins")

    def _dataset_tensors(self, dataset) -> dict:
        """The inputs and labels of an Avalanche classification dataset (a buffer), as plain tensors."""
        xs, ys = [], []
        for i in range(len(dataset)):
            item = dataset[i]
            xs.append(torch.as_tensor(item[0]).detach().cpu())
            ys.append(int(item[1]))
        shape = tuple(int(d) for d in self.ctx.scenario["input_shape"])
        x = torch.stack(xs).clone() if xs else torch.zeros((0, *shape))
        return {"x": x, "y": torch.tensor(ys, dtype=torch.long)}

    def _model_copy(self, weights: dict, modes: list) -> nn.Module:
        """A stored copy of the network (LwF's previous model, iCaRL's old model): the same modules with
        the saved weights and the same train/eval flags as when Avalanche deep-copied it."""
        model = copy.deepcopy(self._strategy.model)
        model.load_state_dict({k: v.to(self.ctx.device) for k, v in weights.items()})
        for module, training in zip(model.modules(), modes):
            module.training = bool(training)
        return model


def _cpu(obj):
    """A detached CPU copy of the tensors in a nest of dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _tensor_dataset(x: Tensor, y: Tensor):
    """An Avalanche classification dataset built like the adapter's experiences (task label 0)."""
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    return tensor_dataset(x, y, task_labels=0, targets=y)


def _params(data: dict, device, prefix: str = "{}") -> dict:
    """``{name: tensor}`` back into Avalanche's ``{name: ParamData}``."""
    from avalanche.training.utils import ParamData

    return {k: ParamData(prefix.format(k), init_tensor=v.to(device), device=device) for k, v in data.items()}


@register_strategy("avalanche.naive")
class AvalancheNaive(AvalancheStrategy):
    """Avalanche ``Naive``: fine-tuning on each experience (the lower bound)."""

    avalanche_class = "Naive"
    has_memory = False


@register_strategy("avalanche.lwf")
class AvalancheLwF(AvalancheStrategy):
    """Avalanche ``LwF``: distillation from the previous model's outputs (Li & Hoiem 2016)."""

    avalanche_class = "LwF"
    _own = ("alpha", "temperature")

    def __init__(
        self,
        epochs: int = 5,
        batch_size: int = 64,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        alpha: float = 1.0,
        temperature: float = 2.0,
    ):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.alpha = alpha
        self.temperature = temperature

    def _strategy_kwargs(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "temperature": self.temperature}

    def _lwf(self):
        from avalanche.training.plugins import LwFPlugin

        return self._plugin(LwFPlugin).lwf

    def _memory_state(self) -> dict:
        lwf = self._lwf()
        return {
            "expcount": int(lwf.expcount),
            "prev_model": _cpu(lwf.prev_model.state_dict()),
            "prev_model_modes": _modes(lwf.prev_model),
            # set iteration order kept (it orders the distilled units)
            "prev_classes_by_task": {int(t): [int(c) for c in cs] for t, cs in lwf.prev_classes_by_task.items()},
        }

    def _load_memory(self, memory: dict) -> None:
        from collections import defaultdict

        lwf = self._lwf()
        lwf.expcount = int(memory["expcount"])
        lwf.prev_model = self._model_copy(memory["prev_model"], memory["prev_model_modes"])
        lwf.prev_classes_by_task = defaultdict(
            set, {int(t): set(int(c) for c in cs) for t, cs in memory["prev_classes_by_task"].items()}
        )


@register_strategy("avalanche.ewc")
class AvalancheEWC(AvalancheStrategy):
    """Avalanche ``EWC``: a Fisher-weighted quadratic penalty on parameter changes (Kirkpatrick et al. 2017)."""

    avalanche_class = "EWC"
    _own = ("ewc_lambda", "mode", "decay_factor")

    def __init__(
        self,
        epochs: int = 5,
        batch_size: int = 64,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        ewc_lambda: float = 100.0,
        mode: Literal["separate", "online"] = "separate",
        decay_factor: float | None = None,
    ):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.ewc_lambda = ewc_lambda
        self.mode = mode
        self.decay_factor = decay_factor

    def _strategy_kwargs(self) -> dict[str, Any]:
        if self.mode == "online" and self.decay_factor is None:
            raise ValueError(f"{self.name}: mode 'online' needs decay_factor")
        return {"ewc_lambda": self.ewc_lambda, "mode": self.mode, "decay_factor": self.decay_factor}

    def _ewc(self):
        from avalanche.training.plugins import EWCPlugin

        return self._plugin(EWCPlugin)

    def _memory_state(self) -> dict:
        ewc = self._ewc()
        return {
            "saved_params": {int(e): {k: _cpu(p.data) for k, p in d.items()} for e, d in ewc.saved_params.items()},
            "importances": {int(e): {k: _cpu(p.data) for k, p in d.items()} for e, d in ewc.importances.items()},
        }

    def _load_memory(self, memory: dict) -> None:
        from collections import defaultdict

        ewc, dev = self._ewc(), self.ctx.device
        ewc.saved_params = defaultdict(dict, {int(e): _params(d, dev) for e, d in memory["saved_params"].items()})
        ewc.importances = defaultdict(
            dict, {int(e): _params(d, dev, "imp_{}") for e, d in memory["importances"].items()}
        )


@register_strategy("avalanche.si")
class AvalancheSI(AvalancheStrategy):
    """Avalanche ``SynapticIntelligence`` (Zenke et al. 2017)."""

    avalanche_class = "SynapticIntelligence"
    _own = ("si_lambda", "eps")

    def __init__(
        self,
        epochs: int = 5,
        batch_size: int = 64,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        si_lambda: float = 1.0,
        eps: float = 1e-7,
    ):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.si_lambda = si_lambda
        self.eps = eps

    def _strategy_kwargs(self) -> dict[str, Any]:
        _fix_si_weight_snapshots()  # before Avalanche's SI is built and used (see the function)
        return {"si_lambda": self.si_lambda, "eps": self.eps}

    # Avalanche's names for the ParamData of each parameter n
    _syn_names: ClassVar[dict[str, str]] = {
        "old_theta": "old_theta_{}",
        "new_theta": "new_theta_{}",
        "grad": "grad{}",
        "trajectory": "trajectory_{}",
        "cum_trajectory": "cum_trajectory_{}",
    }

    def _si(self):
        from avalanche.training.plugins import SynapticIntelligencePlugin

        return self._plugin(SynapticIntelligencePlugin)

    def _memory_state(self) -> dict:
        si = self._si()
        return {
            "ewc_data": [{k: _cpu(p.data) for k, p in d.items()} for d in si.ewc_data],  # θ* and ω
            "syn_data": {key: {k: _cpu(p.data) for k, p in d.items()} for key, d in si.syn_data.items()},
        }

    def _load_memory(self, memory: dict) -> None:
        si = self._si()
        cpu = torch.device("cpu")  # where Avalanche keeps them
        theta, omega = memory["ewc_data"]
        si.ewc_data = (_params(theta, cpu), _params(omega, cpu, "imp_{}"))
        names = self._syn_names
        si.syn_data = {key: _params(d, cpu, names.get(key, key + "_{}")) for key, d in memory["syn_data"].items()}


@register_strategy("avalanche.agem")
class AvalancheAGEM(AvalancheStrategy):
    """Avalanche ``AGEM``: gradient projection on a small episodic memory (Chaudhry et al. 2019)."""

    avalanche_class = "AGEM"
    _own = ("patterns_per_exp", "sample_size")

    def __init__(
        self,
        epochs: int = 5,
        batch_size: int = 64,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        patterns_per_exp: int = 100,
        sample_size: int = 64,
    ):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.patterns_per_exp = patterns_per_exp
        self.sample_size = sample_size

    def _strategy_kwargs(self) -> dict[str, Any]:
        return {"patterns_per_exp": self.patterns_per_exp, "sample_size": self.sample_size}

    def _agem(self):
        from avalanche.training.plugins import AGEMPlugin

        return self._plugin(AGEMPlugin)

    def _memory_state(self) -> dict:
        return {"buffers": [self._dataset_tensors(b) for b in self._agem().buffers]}

    def _load_memory(self, memory: dict) -> None:
        from avalanche.benchmarks.utils.data_loader import GroupBalancedInfiniteDataLoader

        agem = self._agem()
        agem.buffers = [_tensor_dataset(b["x"], b["y"]) for b in memory["buffers"]]
        if agem.buffers:  # as AGEMPlugin.update_memory leaves it (its iterator draws nothing until used)
            agem.buffer_dataloader = GroupBalancedInfiniteDataLoader(
                agem.buffers,
                batch_size=agem.sample_size // len(agem.buffers),
                num_workers=0,
                pin_memory=False,
                persistent_workers=False,
            )
            agem.buffer_dliter = iter(agem.buffer_dataloader)


@register_strategy("avalanche.replay")
class AvalancheReplay(AvalancheStrategy):
    """Avalanche ``Replay``: experience replay from a class-balanced buffer of ``mem_size`` samples."""

    avalanche_class = "Replay"
    _own = ("mem_size",)

    def __init__(
        self,
        epochs: int = 5,
        batch_size: int = 64,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        mem_size: int = 200,
    ):
        super().__init__(epochs, batch_size, optimizer, lr, momentum, weight_decay)
        self.mem_size = mem_size

    def _strategy_kwargs(self) -> dict[str, Any]:
        return {"mem_size": self.mem_size}

    def _policy(self):
        from avalanche.training.plugins import ReplayPlugin

        return self._plugin(ReplayPlugin).storage_policy

    def _memory_state(self) -> dict:
        policy = self._policy()  # ExperienceBalancedBuffer: one reservoir buffer per experience
        return {
            "num_exps": int(policy._num_exps),
            "groups": [
                {
                    "key": int(k),
                    "max_size": int(b.max_size),
                    "weights": _cpu(b._buffer_weights),
                    **self._dataset_tensors(b.buffer),
                }
                for k, b in policy.buffer_groups.items()
            ],
        }

    def _load_memory(self, memory: dict) -> None:
        from avalanche.training.storage_policy import ReservoirSamplingBuffer

        policy = self._policy()
        policy._num_exps = int(memory["num_exps"])
        policy.buffer_groups = {}
        for g in memory["groups"]:
            buf = ReservoirSamplingBuffer(int(g["max_size"]))
            buf.buffer = _tensor_dataset(g["x"], g["y"])
            buf._buffer_weights = g["weights"].clone()
            policy.buffer_groups[int(g["key"])] = buf


@register_strategy("avalanche.icarl")
class AvalancheICaRL(AvalancheStrategy):
    """Avalanche ``ICaRL``: herding exemplars, distillation, nearest-exemplar-mean inference (Rebuffi et al. 2017)."""

    avalanche_class = "ICaRL"
    _own = ("memory_size", "fixed_memory")

    def __init__(
        self,
        epochs: int = 5,
        batch_size: int = 64,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        memory_size: int = 200,
        fixed_memory: bool = True,
    ):
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

    def _plugins(self):
        from avalanche.training.losses import ICaRLLossPlugin
        from avalanche.training.supervised.icarl import _ICaRLPlugin

        return self._plugin(_ICaRLPlugin), self._plugin(ICaRLLossPlugin)

    def _load_model(self, weights: dict) -> None:
        # the nearest-mean classifier's ``class_means`` buffer is None until its first update
        means = weights.get("eval_classifier.class_means")
        if means is not None:
            self.model.eval_classifier.class_means = means.clone().to(self.ctx.device)
        self.model.load_state_dict(weights)

    def _memory_state(self) -> dict:
        icarl, loss = self._plugins()
        return {
            "x_memory": _cpu(icarl.x_memory),  # exemplars, one tensor per class
            "y_memory": [[int(c) for c in ys] for ys in icarl.y_memory],
            "order": _cpu(icarl.order),  # herding ranks
            "observed_classes": [int(c) for c in icarl.observed_classes],
            "class_means": {int(c): _cpu(m) for c, m in icarl.class_means.items()},
            "embedding_size": icarl.embedding_size,  # int, or None before the first forward
            "output_size": icarl.output_size,
            "input_size": None if icarl.input_size is None else [int(d) for d in icarl.input_size],
            "old_classes": [int(c) for c in loss.old_classes],
            "old_model": _cpu(loss.old_model.state_dict()),
            "old_model_modes": _modes(loss.old_model),
        }

    def _load_memory(self, memory: dict) -> None:
        icarl, loss = self._plugins()
        dev = self.ctx.device
        icarl.x_memory = [x.to(dev) for x in memory["x_memory"]]
        icarl.y_memory = [[int(c) for c in ys] for ys in memory["y_memory"]]
        icarl.order = [o.clone() for o in memory["order"]]
        icarl.observed_classes = [int(c) for c in memory["observed_classes"]]
        icarl.class_means = {int(c): m.to(dev) for c, m in memory["class_means"].items()}
        icarl.embedding_size = memory["embedding_size"]
        icarl.output_size = memory["output_size"]
        icarl.input_size = None if memory["input_size"] is None else torch.Size(memory["input_size"])
        if icarl.class_means:
            self.model.eval_classifier.replace_class_means_dict(icarl.class_means)
        loss.old_classes = [int(c) for c in memory["old_classes"]]
        loss.old_model = self._model_copy(memory["old_model"], memory["old_model_modes"])


def _fix_si_weight_snapshots() -> None:
    """Avalanche 0.6 bug workaround: ``SynapticIntelligencePlugin.extract_weights`` stores
    ``param.detach().cpu().flatten()``, which on CPU is a *view* of the live parameter, not a copy, so the
    trajectories and importances ω stay zero and SI does nothing on CPU (on GPU ``.cpu()`` copies). The
    snapshot is made a copy, as it is on GPU; the values on GPU are unchanged. Applied once, to the class
    (Avalanche calls it as a static method of the class)."""
    import torch as _torch
    from avalanche.training.plugins import SynapticIntelligencePlugin

    if getattr(SynapticIntelligencePlugin, "_openworld_copies_snapshots", False):
        return

    @_torch.no_grad()
    def extract_weights(model, target, excluded_parameters):
        for name, param in SynapticIntelligencePlugin.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().cpu().flatten().clone()

    SynapticIntelligencePlugin.extract_weights = staticmethod(extract_weights)
    SynapticIntelligencePlugin._openworld_copies_snapshots = True


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
