"""Unknown detectors: ``msp``, ``energy``, ``mahalanobis``, ``mahalanobis_ens``, ``ncm_threshold``
(``specs/open-set.md`` §§4–5). ``osbp_head`` needs a strategy with a (|K|+1)-way head; none exists.

Each strategy wraps a source-trained classifier and adds a known-ness score s (higher = known):

* with ``base: null`` (default) the classifier is the recipe's shared base model
  (``ctx.base_model(session)``: encoder + cosine head trained with the ``base:`` block on the
  session's labelled data — the source domain);
* with ``base: <registered strategy>`` (e.g. ``teen``, parameters in ``base_params``) that strategy
  learns as usual and the detector scores its logits (msp, energy) or its features (``encode``; ncm,
  mahalanobis). This is how a detector becomes the unknown scorer of another strategy (TEEN + energy).

The threshold τ on s is chosen without target labels (card §5, ``threshold``): ``source_quantile``
(default; q = 0.05 on the source validation split, so 95% of source knowns are accepted), ``fixed``
(``tau``), or a rule on the unlabelled target scores (``target_otsu``, ``target_gmm``, ``ros_mean``,
``reject_count`` with ``n_r``). ``predict`` returns ``unknown_score = τ − s`` in float64: the order and
ties of s are kept exactly (so every curve metric is that of s) and 0 is the strategy's decision,
which the ``open_set`` engine applies by default (``threshold: auto``). The value of τ is in
:attr:`tau_` and in the state dict.

``alignment`` (label-free, on the whole unlabelled target set ``session.unlabeled`` before scoring):
``adabn`` re-estimates every BatchNorm layer's statistics on the target (cumulative average, batch
256, fixed order, no augmentation); ``recenter`` (``ncm_threshold`` only) subtracts each domain's mean
feature before normalising (source mean for the prototypes, target mean at prediction — the runner
does not say which domain a batch comes from, so ``source_val`` is scored with the target mean too).
Source statistics (prototypes, Σ, the source-validation scores for τ) are computed **before** AdaBN.

``head`` (with ``base: null``): ``cosine`` (default) scores the shared base model (bounded logits
T·cos); ``linear`` trains, once per seed and shared by every detector asking for it, the recipe's
backbone with an ordinary linear head (bias, unbounded logits — the card §7 reference networks and
OpenOOD's setting for ``energy``/``ebo``) on the same data with the same ``base:`` block.

DA-FSOS meta-test episodes (``session.info["protocol"] == "dafsos"``, one session per episode, card
§3.2): the encoder is the source model trained once on ``info["source"]`` (the meta-train classes;
cosine or linear head as above) and the classifier is the episode's support: logits = T_base·cos(f,
μ_c) with μ_c the mean of the L2-normalised support features of episode class c (a prototype
classifier; ``ncm_threshold`` scores max cos, msp/energy score these logits, ``mahalanobis`` uses the
support means with the tied Σ of the source features). AdaBN runs on the episode's queries before the
support prototypes are computed (support and queries are both target); Σ is computed before it.
``recenter`` subtracts the queries' mean feature from support and queries. τ must come from a target
rule (``target_otsu``, ``target_gmm``, …): the source validation split holds other classes.

Backbone ``osda_cnn`` (the card §7 reference CNN): conv3×3 (no bias) + BN + ReLU + 2×2 max-pool per
width, then flatten → FC(→``fc``) + BN1d + ReLU (the feature f). ``widths: [32, 64]`` on 28×28 is
the MNIST network of card §7.1 (FC 3136→128), ``widths: [32, 64, 128]`` on 32×32 the CIFAR one
(FC 2048→128, §7.2).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openworld.data.views import batches, concat
from openworld.metrics.open_set import (
    energy_score,
    msp_score,
    threshold_gmm,
    threshold_otsu,
    threshold_reject_count,
    threshold_ros_mean,
    threshold_source_quantile,
)
from openworld.models.pooling import MaxPool2x2
from openworld.registry import STRATEGIES, register_backbone, register_strategy
from openworld.strategies.base import Prediction, Strategy, class_means

THRESHOLD_RULES = ("source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count")
ALIGNMENTS = ("none", "adabn", "recenter")
HEADS = ("cosine", "linear")


def _full(t: Tensor) -> Tensor:
    """Half-precision outputs (AMP) up to float32; float32/float64 kept (metrics.md §1: float64 logits
    stay float64, so MSP does not saturate to ties)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# --------------------------------------------------------------------------------------------------
# the card §7 reference CNN and the linear-head source model
# --------------------------------------------------------------------------------------------------
class OSDACNN(nn.Module):
    """conv3×3(no bias)+BN+ReLU+maxpool2 per width, flatten, FC(→fc)+BN1d+ReLU; ``out_features = fc``.
    ``stages`` lists the blocks (and ``fc``) for per-layer features (``mahalanobis_ens``)."""

    def __init__(self, in_channels: int, input_size, widths=(32, 64), fc: int = 128):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1 or int(fc) < 1:
            raise ValueError(f"osda_cnn: positive widths and fc required, got widths={widths}, fc={fc}")
        blocks, c = [], int(in_channels)
        for w in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True), MaxPool2x2()
                )
            )
            c = w
        self.blocks = nn.ModuleList(blocks)
        h, w_ = int(input_size[-2]), int(input_size[-1])
        for _ in widths:
            h, w_ = h // 2, w_ // 2
        if h < 1 or w_ < 1:
            raise ValueError(f"osda_cnn: input {tuple(input_size)} is too small for {len(widths)} pooling stages")
        self.fc = nn.Sequential(nn.Linear(c * h * w_, int(fc)), nn.BatchNorm1d(int(fc)), nn.ReLU(inplace=True))
        self.out_features = int(fc)

    def stages(self, x: Tensor) -> list[Tensor]:
        """Outputs of every conv block and of the FC layer (the penultimate feature, last)."""
        out = []
        for b in self.blocks:
            x = b(x)
            out.append(x)
        out.append(self.fc(torch.flatten(x, 1)))
        return out

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = b(x)
        return self.fc(torch.flatten(x, 1))


@register_backbone("osda_cnn")
def osda_cnn(in_channels: int = 1, input_size=(1, 28, 28), widths=(32, 64), fc: int = 128, **_: Any) -> OSDACNN:
    """The card §7 reference CNN (see the module docstring); defaults: the MNIST network of §7.1."""
    return OSDACNN(in_channels, input_size, widths, fc)


def linear_net(ctx, num_classes: int | None = None) -> nn.Module:
    """The recipe's backbone with an ordinary linear head (bias) over all scenario classes."""
    return ctx.create_classifier_net(num_classes, head="linear")


def linear_base_model(ctx, data, validation, num_active: int, tag: str = "base_linear") -> nn.Module:
    """:meth:`RunContext.base_model` with a linear head: trained once per (splits, backbone, base block,
    seed, data) with the recipe's ``base:`` block, shared in memory and on disk."""
    return ctx.base_model(data=data, validation=validation, num_active=num_active, tag=tag, head="linear")


# --------------------------------------------------------------------------------------------------
# Mahalanobis, faithful minimal version (Lee et al. 2018; OpenOOD ``mds``)
# --------------------------------------------------------------------------------------------------
@dataclass
class MahalanobisModel:
    """Class means and one tied covariance Σ = (1/N)·Σ_i (f_i − μ_{y_i})(f_i − μ_{y_i})ᵀ (float64).

    Σ is ``sklearn.covariance.EmpiricalCovariance(assume_centered=False)`` fitted on the class-centred
    features; Σ⁻¹ in float64, with a ridge λ·I (λ = 1e-6·tr(Σ)/d) only when Σ is singular (``ridge``).
    """

    means: Tensor  # [C, d] float64
    precision: Tensor  # [d, d] float64
    ridge: float = 0.0

    @classmethod
    def fit(cls, feats: Tensor, labels: Tensor, classes) -> MahalanobisModel:
        from sklearn.covariance import EmpiricalCovariance

        f = feats.detach().to(torch.float64)
        y = labels.to(f.device)
        means = class_means(f, y, list(classes))
        lookup = torch.full((int(y.max()) + 1,), -1, dtype=torch.long, device=f.device)
        lookup[torch.as_tensor(list(classes), device=f.device)] = torch.arange(len(classes), device=f.device)
        slot = lookup[y]
        keep = slot >= 0
        centred = (f[keep] - means[slot[keep]]).cpu().numpy()
        cov = EmpiricalCovariance(assume_centered=False).fit(centred).covariance_
        d = cov.shape[0]
        ridge = 0.0
        if np.linalg.matrix_rank(cov) < d:
            ridge = 1e-6 * float(np.trace(cov)) / d
            if ridge == 0.0:
                raise ValueError("mahalanobis: the feature covariance is zero (constant features)")
            cov = cov + ridge * np.eye(d)
        precision = torch.from_numpy(np.linalg.inv(cov)).to(f.device)
        return cls(means=means, precision=precision, ridge=ridge)

    def distances(self, feats: Tensor) -> Tensor:
        """d²[n, c] = (f_n − μ_c)ᵀ Σ⁻¹ (f_n − μ_c), float64."""
        f = feats.to(device=self.means.device, dtype=torch.float64)
        diff = f[:, None, :] - self.means[None]
        return torch.einsum("ncd,de,nce->nc", diff, self.precision, diff)

    def score(self, feats: Tensor) -> Tensor:
        """Known-ness s = −min_c d² (the factor ½ of the original code does not change ranks)."""
        return -self.distances(feats).min(dim=1).values

    def state_dict(self) -> dict:
        return {"means": self.means, "precision": self.precision, "ridge": self.ridge}

    @classmethod
    def from_state(cls, state: dict, device) -> MahalanobisModel:
        return cls(state["means"].to(device), state["precision"].to(device), float(state["ridge"]))


def adabn_(module: nn.Module, data, device, batch_size: int = 256, num_workers: int = 0) -> int:
    """AdaBN in place: BatchNorm statistics re-estimated on ``data`` (cumulative average, fixed order,
    test transform, no gradients). Returns the number of BN layers."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("alignment 'adabn': the model has no BatchNorm layer")
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    module.eval()
    for m in bns:
        m.train()
    with torch.no_grad():
        for xb, _ in batches(data, max(32, batch_size), device=device, num_workers=num_workers):
            module(xb)
    module.eval()
    return len(bns)


# --------------------------------------------------------------------------------------------------
# the shared detector strategy
# --------------------------------------------------------------------------------------------------
class DetectorStrategy(Strategy):
    """A classifier plus a known-ness score and a label-free threshold (see the module docstring)."""

    supports = frozenset({"open_set", "fscil", "cil"})
    uses_features: ClassVar[bool] = False

    def __init__(
        self,
        base: str | None = None,
        base_params: dict | None = None,
        temperature: float = 1.0,
        threshold: Literal[
            "source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count"
        ] = "source_quantile",
        quantile: float = 0.05,
        tau: float | None = None,
        n_r: int | None = None,
        alignment: Literal["none", "adabn", "recenter"] = "none",
        head: Literal["cosine", "linear"] = "cosine",
    ):
        self.base = base
        self.base_params = dict(base_params) if base_params else {}
        self.temperature = temperature
        self.threshold = threshold
        self.quantile = quantile
        self.tau = tau
        self.n_r = n_r
        self.alignment = alignment
        self.head = head
        self._check_params()

    def _check_params(self) -> None:
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(
                f"{type(self).__name__}: threshold must be one of {', '.join(THRESHOLD_RULES)}; got {self.threshold!r}"
            )
        if self.alignment not in ALIGNMENTS:
            raise ValueError(
                f"{type(self).__name__}: alignment must be one of {', '.join(ALIGNMENTS)}; got {self.alignment!r}"
            )
        if self.head not in HEADS:
            raise ValueError(f"{type(self).__name__}: head must be one of {', '.join(HEADS)}; got {self.head!r}")
        if self.head != "cosine" and self.base is not None:
            raise ValueError(
                f"{type(self).__name__}: head {self.head!r} applies to the shared source model "
                f"(base: null); base {self.base!r} brings its own classifier"
            )
        if self.threshold == "fixed" and self.tau is None:
            raise ValueError(f"{type(self).__name__}: threshold 'fixed' needs tau")
        if self.threshold == "reject_count" and not self.n_r:
            raise ValueError(f"{type(self).__name__}: threshold 'reject_count' needs n_r")
        if not 0 <= float(self.quantile) <= 1:
            raise ValueError(f"{type(self).__name__}: quantile must be in [0, 1], got {self.quantile}")
        if float(self.temperature) <= 0:
            raise ValueError(f"{type(self).__name__}: temperature must be positive, got {self.temperature}")
        if self.alignment == "recenter" and not isinstance(self, NCMThreshold):
            raise ValueError(
                f"{type(self).__name__}: alignment 'recenter' is defined for ncm_threshold only "
                "(card §4: re-centred prototypes, max cosine)"
            )
        if self.base is not None and self.base in DETECTORS:
            raise ValueError(
                f"{type(self).__name__}: base {self.base!r} is itself a detector; name the classifier "
                "strategy to wrap (e.g. teen)"
            )

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._param_names()}

    @classmethod
    def _param_names(cls) -> list[str]:
        import inspect

        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    # -- set-up ---------------------------------------------------------------------------------------
    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.net = None
        self.inner: Strategy | None = None
        self.num_known = 0
        self.tau_: float | None = None
        self.center: Tensor | None = None  # recenter: the target mean feature
        self._inner_source_state: dict | None = None
        self._validation = None
        self._seen_data: list = []
        self.info_: dict[str, Any] = {}
        self.ep_protos: Tensor | None = None  # DA-FSOS: the episode's support prototypes

    def begin_eval_set(self, name: str) -> None:
        # the wrapped network may depend on the set's name too (LADE's known test prior)
        if self.inner is not None:
            self.inner.begin_eval_set(name)

    def _make_inner(self) -> Strategy:
        cls = STRATEGIES.get(self.base)
        inner = cls(**self.base_params)
        inner.setup(self.ctx)
        return inner

    def _align_module(self) -> nn.Module:
        if self.inner is None:
            return self.net.encoder
        for attr in ("encoder", "net"):
            mod = getattr(self.inner, attr, None)
            if isinstance(mod, nn.Module):
                return mod
        raise ValueError(
            f"{self.name}: alignment 'adabn' needs the base strategy {self.base!r} to expose its model "
            "as `.encoder` or `.net`"
        )

    # -- model access ---------------------------------------------------------------------------------
    def _logits(self, x: Tensor) -> Tensor:
        if self.ep_protos is not None:  # DA-FSOS episode: the support prototypes are the classifier
            f = self._features(x)
            if self.alignment == "recenter":
                f = f - self.center
            return self.ctx.base.temperature * (F.normalize(f, dim=1) @ F.normalize(self.ep_protos, dim=1).T)
        with self.ctx.autocast():
            if self.inner is None:
                return _full(self.net(x, num_active=self.num_known))
            return _full(self.inner.predict(x).logits[:, : self.num_known])

    def _features(self, x: Tensor) -> Tensor:
        with self.ctx.autocast():
            if self.inner is None:
                return _full(self.net.encoder(x))
            try:
                return _full(self.inner.encode(x))
            except NotImplementedError:
                raise ValueError(
                    f"{self.name}: needs features, but base strategy {self.base!r} has no encode(x)"
                ) from None

    @torch.no_grad()
    def _scores_of(self, data) -> Tensor:
        out = [
            self._score(xb)
            for xb, _ in batches(
                data, self.ctx.eval_batch_size, device=self.ctx.device, num_workers=self.ctx.num_workers
            )
        ]
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def _feature_set(self, data) -> tuple[Tensor, Tensor]:
        feats, ys = [], []
        for xb, yb in batches(data, self.ctx.eval_batch_size, device=self.ctx.device, num_workers=self.ctx.num_workers):
            feats.append(self._features(xb))
            ys.append(yb)
        return torch.cat(feats), torch.cat(ys)

    # -- detector hooks (subclasses) ------------------------------------------------------------------
    def _fit(self, data, classes) -> None:
        """Source statistics (prototypes, Σ); called before alignment."""

    def _score(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _score(x) (higher = more known)")

    def _fit_episode_source(self, source, num_source: int) -> None:
        """DA-FSOS: source statistics (before alignment); Mahalanobis takes its tied Σ here."""

    def _fit_episode_support(self, feats: Tensor, labels: Tensor, n_way: int) -> None:
        """DA-FSOS: support statistics (after alignment); ``ep_protos`` are set already."""

    def _detector_state(self) -> dict:
        return {}

    def _load_detector_state(self, state: dict) -> None:
        pass

    # -- learning -------------------------------------------------------------------------------------
    def _learn_episode(self, session) -> None:
        """One DA-FSOS meta-test episode (module docstring): source encoder, support prototypes, τ."""
        if self.base is not None:
            raise ValueError(
                f"{self.name}: DA-FSOS episodes use the shared source encoder (base: null); "
                f"base {self.base!r} is not supported there"
            )
        if self.threshold == "source_quantile":
            raise ValueError(
                f"{self.name}: threshold 'source_quantile' is undefined in a DA-FSOS episode (the source "
                "validation split holds other classes); use target_otsu, target_gmm, ros_mean, "
                "reject_count or fixed"
            )
        info = session.info
        source, source_val, n_src = info["source"], info.get("source_validation"), int(info["num_source_classes"])
        n_way = len(session.classes.seen)
        if list(session.classes.seen) != list(range(n_way)):
            raise ValueError(f"{self.name}: episode classes must be 0..N-1, got {list(session.classes.seen)[:10]}")
        self.num_known = n_way
        self.ep_protos = None
        if self.head == "linear":
            self.net = linear_base_model(self.ctx, source, source_val, n_src)
        else:  # a fresh copy each episode (cached training), so the last episode's AdaBN is undone
            self.net = self.ctx.base_model(session, data=source, validation=source_val, num_active=n_src).eval()
        self.net_classes = n_src
        self._fit_episode_source(source, n_src)
        if self.alignment == "adabn":
            self.info_["adabn_layers"] = adabn_(
                self._align_module(), session.unlabeled, self.ctx.device, 256, self.ctx.num_workers
            )
        elif self.alignment == "recenter":
            self.center = self._feature_set(session.unlabeled)[0].mean(0)
        feats, labels = self._feature_set(session.labeled)
        centred = feats - self.center if self.alignment == "recenter" else feats
        self.ep_protos = class_means(F.normalize(centred, dim=1), labels, list(range(n_way)))
        self._fit_episode_support(feats, labels, n_way)
        if self.threshold == "fixed":
            self.tau_ = float(self.tau)
        else:
            s_t = self._scores_of(session.unlabeled)
            rule = {"target_otsu": threshold_otsu, "target_gmm": threshold_gmm, "ros_mean": threshold_ros_mean}
            self.tau_ = (
                threshold_reject_count(s_t, self.n_r) if self.threshold == "reject_count" else rule[self.threshold](s_t)
            )

    def learn(self, session) -> None:
        if session.info.get("protocol") == "dafsos":
            return self._learn_episode(session)
        seen = list(session.classes.seen)
        if seen != list(range(len(seen))):
            raise ValueError(f"{self.name}: needs seen classes 0..n-1 in order, got {seen[:10]}…")
        needs_target = (
            self.alignment != "none"
            or self.threshold.startswith("target")
            or self.threshold in ("ros_mean", "reject_count")
        )
        if needs_target and (session.unlabeled is None or len(session.unlabeled) == 0):
            raise ValueError(
                f"{self.name}: alignment {self.alignment!r} / threshold {self.threshold!r} need the "
                "unlabelled target set (session.unlabeled), which this scenario does not provide"
            )
        if self._validation is None and session.validation is not None and len(session.validation):
            self._validation = session.validation
        if session.classes.new or not self._seen_data:
            self._seen_data.append(session.labeled)
        self.num_known = len(seen)
        if self.base is None:
            if self.net is not None and self.num_known != self.net_classes:
                raise ValueError(
                    f"{self.name}: with base: null the classifier is trained once on the first "
                    "session; incremental scenarios need a base strategy (e.g. base: teen)"
                )
            # the cached source model (a fresh copy each session, so an earlier AdaBN is undone)
            if self.head == "linear":
                self.net = linear_base_model(self.ctx, self._seen_data[0], self._validation, self.num_known)
            else:
                self.net = self.ctx.base_model(
                    session, data=self._seen_data[0], validation=self._validation, num_active=self.num_known
                ).eval()
            self.net_classes = self.num_known
        else:
            if self.inner is None:
                self.inner = self._make_inner()
            elif self._inner_source_state is not None:
                self._align_module().load_state_dict(self._inner_source_state)  # undo the last AdaBN
            self.inner.learn(session)
            if self.alignment == "adabn":
                self._inner_source_state = copy.deepcopy(self._align_module().state_dict())
        data = self._seen_data[0] if len(self._seen_data) == 1 else concat(self._seen_data)
        self._fit(data, seen)
        s_val = None
        if self.threshold == "source_quantile":
            if self._validation is None:
                raise ValueError(
                    f"{self.name}: threshold 'source_quantile' needs a source validation split (session.validation)"
                )
            s_val = self._scores_of(self._validation)
        if self.alignment == "adabn":
            self.info_["adabn_layers"] = adabn_(
                self._align_module(), session.unlabeled, self.ctx.device, 256, self.ctx.num_workers
            )
        elif self.alignment == "recenter":
            feats, _ = self._feature_set(session.unlabeled)
            self.center = feats.mean(0)
        if self.threshold == "source_quantile":
            self.tau_ = threshold_source_quantile(s_val, self.quantile)
        elif self.threshold == "fixed":
            self.tau_ = float(self.tau)
        else:
            s_t = self._scores_of(session.unlabeled)
            rule = {"target_otsu": threshold_otsu, "target_gmm": threshold_gmm, "ros_mean": threshold_ros_mean}
            self.tau_ = (
                threshold_reject_count(s_t, self.n_r) if self.threshold == "reject_count" else rule[self.threshold](s_t)
            )

    # -- prediction -----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        logits = self._logits(x)
        s = self._score(x)
        return Prediction(logits=logits, unknown_score=float(self.tau_) - s.to(torch.float64))

    # -- run facts ------------------------------------------------------------------------------------
    def tau_rule(self) -> str:
        """How :attr:`tau_` was chosen, in words (recorded with its value in results.json and hparams)."""
        if self.threshold == "source_quantile":
            return f"source_quantile(q={self.quantile}) of the source-validation scores"
        if self.threshold == "fixed":
            return "fixed (the recipe's tau)"
        if self.threshold == "reject_count":
            return f"reject_count(n_r={self.n_r}) on the unlabelled target scores"
        return f"{self.threshold} on the unlabelled target scores"

    def _base_strategy(self) -> Strategy | None:
        """The base strategy (the live one once built; before that an unbuilt instance, whose protocol
        flags depend on its parameters only)."""
        if self.base is None:
            return None
        inner = getattr(self, "inner", None)  # set in setup()
        return inner if inner is not None else STRATEGIES.get(self.base)(**self.base_params)

    def uses_oracle_data(self) -> bool:
        """The base strategy's flag: an oracle base (e.g. ``joint`` with ``data: full``) needs the withheld
        data, and the run is then marked not comparable."""
        inner = self._base_strategy()
        return bool(inner is not None and inner.uses_oracle_data())

    def selects_on_test(self) -> bool:
        """The base strategy's flag (its epoch selection on the test set makes this run not clean too)."""
        inner = self._base_strategy()
        return bool(inner is not None and inner.selects_on_test())

    def run_info(self) -> dict[str, Any]:
        """τ on the known-ness score s (accept iff s ≥ τ) and the rule that chose it, plus alignment facts."""
        info: dict[str, Any] = {}
        if self.tau_ is not None:
            info.update(tau=float(self.tau_), tau_rule=self.tau_rule())
        info.update(self.info_)
        if self.inner is not None:
            info.update({f"base.{k}": v for k, v in self.inner.run_info().items()})
        return info

    # -- persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "net": None if self.net is None else self.net.state_dict(),
            "inner": None if self.inner is None else self.inner.state_dict(),
            "num_known": self.num_known,
            "tau": self.tau_,
            "center": self.center,
            "ep_protos": self.ep_protos,
            "detector": self._detector_state(),
            "info": dict(self.info_),
        }

    def load_state_dict(self, state: dict) -> None:
        self.num_known = int(state["num_known"])
        self.tau_ = state["tau"]
        self.center = None if state["center"] is None else state["center"].to(self.ctx.device)
        protos = state.get("ep_protos")
        self.ep_protos = None if protos is None else protos.to(self.ctx.device)
        if state["net"] is not None:
            self.net = linear_net(self.ctx) if self.head == "linear" else self.ctx.create_classifier_net()
            self.net.load_state_dict(state["net"])
            self.net.eval()
            self.net_classes = self.num_known
        if state["inner"] is not None:
            self.inner = self._make_inner()
            self.inner.load_state_dict(state["inner"])
        self._load_detector_state(state["detector"])

    def restore_session(self, session) -> None:
        if self._validation is None and session.validation is not None and len(session.validation):
            self._validation = session.validation
        if session.classes.new or not self._seen_data:
            self._seen_data.append(session.labeled)


DETECTORS: dict[str, type] = {}


def _detector(name: str):
    def deco(cls):
        DETECTORS[name] = cls
        return register_strategy(name)(cls)

    return deco


@_detector("msp")
class MSP(DetectorStrategy):
    """Maximum softmax probability, s = max_c softmax(z/T)_c (Hendrycks & Gimpel; OpenOOD ``msp``)."""

    def _score(self, x: Tensor) -> Tensor:
        return msp_score(self._logits(x), self.temperature)


@_detector("energy")
class Energy(DetectorStrategy):
    """Negative free energy, s = T·logsumexp(z/T) (Liu et al.; OpenOOD ``ebo``)."""

    def _score(self, x: Tensor) -> Tensor:
        return energy_score(self._logits(x), self.temperature)


@_detector("mahalanobis")
class Mahalanobis(DetectorStrategy):
    """s = −min_c (f−μ_c)ᵀ Σ⁻¹ (f−μ_c) on penultimate features with one tied covariance (minimal
    version: penultimate layer, ε = 0, no regression). ``maha_pred``: predict argmin_c d² instead of
    the classifier's argmax. The full Lee et al. ensemble is ``mahalanobis_ens``."""

    uses_features = True

    def __init__(
        self,
        base: str | None = None,
        base_params: dict | None = None,
        temperature: float = 1.0,
        threshold: Literal[
            "source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count"
        ] = "source_quantile",
        quantile: float = 0.05,
        tau: float | None = None,
        n_r: int | None = None,
        alignment: Literal["none", "adabn", "recenter"] = "none",
        head: Literal["cosine", "linear"] = "cosine",
        maha_pred: bool = False,
    ):
        self.maha_pred = maha_pred
        super().__init__(base, base_params, temperature, threshold, quantile, tau, n_r, alignment, head)

    def _fit(self, data, classes) -> None:
        feats, labels = self._feature_set(data)
        self.model = MahalanobisModel.fit(feats, labels, classes)
        self.info_["ridge"] = self.model.ridge

    def _score(self, x: Tensor) -> Tensor:
        return self.model.score(self._features(x))

    def _fit_episode_source(self, source, num_source: int) -> None:
        # the tied Σ of the source classes: the same source model every episode, so computed once
        key = (source.fingerprint(), num_source)
        cached = getattr(self, "_episode_source", None)
        if cached is None or cached[0] != key:
            feats, labels = self._feature_set(source)
            cached = self._episode_source = (key, MahalanobisModel.fit(feats, labels, range(num_source)))
        self.model = MahalanobisModel(cached[1].means.clone(), cached[1].precision, cached[1].ridge)
        self.info_["ridge"] = self.model.ridge

    def _fit_episode_support(self, feats: Tensor, labels: Tensor, n_way: int) -> None:
        self.model.means = class_means(feats.to(torch.float64), labels, list(range(n_way)))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        if not self.maha_pred:
            return super().predict(x)
        d2 = self.model.distances(self._features(x))
        s = -d2.min(dim=1).values
        return Prediction(logits=_full(-d2), unknown_score=float(self.tau_) - s)

    def _detector_state(self) -> dict:
        return self.model.state_dict()

    def _load_detector_state(self, state: dict) -> None:
        self.model = MahalanobisModel.from_state(state, self.ctx.device)


@_detector("ncm_threshold")
class NCMThreshold(DetectorStrategy):
    """Prototype distance: μ_c = mean of L2-normalised source features of class c; s = max_c
    cos(f, μ_c) (``ncm_distance: cosine``) or −min_c ‖f̂ − μ_c‖ (``euclidean``, f̂ = f/‖f‖).
    ``alignment: recenter`` subtracts the domain mean before normalising (card §4). ``ncm_pred``:
    predict the nearest prototype (logits = T_base·cos) instead of the classifier's argmax — the
    card's ``recenter`` baseline classifies this way."""

    uses_features = True

    def __init__(
        self,
        base: str | None = None,
        base_params: dict | None = None,
        temperature: float = 1.0,
        threshold: Literal[
            "source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count"
        ] = "source_quantile",
        quantile: float = 0.05,
        tau: float | None = None,
        n_r: int | None = None,
        alignment: Literal["none", "adabn", "recenter"] = "none",
        head: Literal["cosine", "linear"] = "cosine",
        ncm_distance: Literal["cosine", "euclidean"] = "cosine",
        ncm_pred: bool = False,
    ):
        if ncm_distance not in ("cosine", "euclidean"):
            raise ValueError(f"ncm_threshold: ncm_distance must be 'cosine' or 'euclidean', got {ncm_distance!r}")
        self.ncm_distance = ncm_distance
        self.ncm_pred = ncm_pred
        super().__init__(base, base_params, temperature, threshold, quantile, tau, n_r, alignment, head)

    def _fit(self, data, classes) -> None:
        feats, labels = self._feature_set(data)
        self.source_mean = feats.mean(0)
        if self.alignment == "recenter":
            feats = feats - self.source_mean
            self.center = None
        self.prototypes = class_means(F.normalize(feats, dim=1), labels, list(classes))

    def _normed(self, x: Tensor) -> Tensor:
        f = self._features(x)
        if self.alignment == "recenter":
            f = f - (self.center if self.center is not None else self.source_mean)
        return F.normalize(f, dim=1)

    def _score_of(self, f: Tensor) -> Tensor:
        if self.ncm_distance == "cosine":
            return (f @ F.normalize(self.prototypes, dim=1).T).max(dim=1).values
        return -torch.cdist(f, self.prototypes).min(dim=1).values

    def _score(self, x: Tensor) -> Tensor:
        return self._score_of(self._normed(x))

    def _fit_episode_support(self, feats: Tensor, labels: Tensor, n_way: int) -> None:
        self.prototypes = self.ep_protos
        self.source_mean = torch.zeros_like(feats[0])

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        if not self.ncm_pred:
            return super().predict(x)
        f = self._normed(x)
        logits = self.ctx.base.temperature * (f @ F.normalize(self.prototypes, dim=1).T)
        return Prediction(logits=_full(logits), unknown_score=float(self.tau_) - self._score_of(f).to(torch.float64))

    def _detector_state(self) -> dict:
        return {"prototypes": self.prototypes, "source_mean": self.source_mean}

    def _load_detector_state(self, state: dict) -> None:
        self.prototypes = state["prototypes"].to(self.ctx.device)
        self.source_mean = state["source_mean"].to(self.ctx.device)


# --------------------------------------------------------------------------------------------------
# Mahalanobis, full Lee et al. ensemble (card §4 "Full ensemble")
# --------------------------------------------------------------------------------------------------
EPSILONS = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)


def layer_modules(encoder: nn.Module, names=None) -> list[tuple[str, nn.Module]]:
    """The layers of the ensemble: ``names`` (module paths inside the encoder), else the encoder's
    top-level children without pooling / flatten / identity modules (``osda_cnn``: every conv block, then
    the FC layer; ``cnn28``: block1…block3). A ModuleList child contributes each of its entries; a lone
    Sequential child (``mlp``) the output of each of its ReLUs."""
    mods = dict(encoder.named_modules())
    if names:
        missing = [n for n in names if n not in mods]
        if missing:
            raise ValueError(
                f"mahalanobis_ens: layers {missing} are not modules of the encoder "
                f"(it has {[n for n in mods if n][:20]}…)"
            )
        return [(n, mods[n]) for n in names]
    skip = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)
    out = []
    for name, child in encoder.named_children():
        if isinstance(child, nn.ModuleList):
            out += [(f"{name}.{i}", m) for i, m in enumerate(child)]
        elif not isinstance(child, skip):
            out.append((name, child))
    if len(out) == 1 and isinstance(out[0][1], nn.Sequential):  # e.g. the mlp encoder: every ReLU output
        relus = [(f"{out[0][0]}.{n}", m) for n, m in out[0][1].named_children() if isinstance(m, nn.ReLU)]
        out = relus or out
    if not out:
        raise ValueError("mahalanobis_ens: no layers found in the encoder; name them with `layers`")
    return out


def tnr_at_tpr95(s_in: np.ndarray, s_out: np.ndarray) -> float:
    """TNR on ``s_out`` at the threshold keeping ≥ 95% of ``s_in`` (higher = in), as Lee et al.'s
    ``lib_regression`` selection criterion."""
    tau = np.quantile(np.asarray(s_in, dtype=np.float64), 0.05, method="linear")
    return float((np.asarray(s_out) < tau).mean())


@_detector("mahalanobis_ens")
class MahalanobisEnsemble(DetectorStrategy):
    """s(x) = Σ_l α_l · M_l(x̃_l): per-layer Mahalanobis scores (spatial mean of each layer's output,
    class means and a tied Σ per layer from the source) on inputs pre-processed per layer,
    x̃ = x − ε·sign(∇_x d²_l(x, μ_ĉ)) / σ_ch (ĉ = argmin_c d²_l; a zero gradient counts as +1), and α
    the coefficients of ``sklearn.linear_model.LogisticRegressionCV`` (defaults) on the L scores with
    ID = 1 / OOD = 0 (Lee et al. 2018; OpenOOD ``mds_ensemble``).

    No labelled unknowns exist in OSDA, so α is fitted on the held-out source validation split (ID)
    against its **FGSM-perturbed** copy (OOD): x + ``fgsm_eps``·sign(∇_x CE(z(x), y)) / σ_ch — the
    paper's "validation on adversarial samples" variant. Both halves of a seeded split play the
    paper's roles: α fitted on the first half, ε chosen from ``epsilons`` by TNR at TPR 95% on the
    second. ``input_std`` is σ_ch, the per-channel std of the input normalisation (MNIST: 0.3081; CIFAR-10:
    0.2470, 0.2435, 0.2616). ``layers``: module paths inside the encoder (default: :func:`layer_modules`).
    The choices (ε, α, layers) are in :attr:`info_`. Needs gradients at prediction (one backward pass
    per layer per batch, skipped when ε = 0). Not for DA-FSOS episodes."""

    uses_features = True

    def __init__(
        self,
        base: str | None = None,
        base_params: dict | None = None,
        temperature: float = 1.0,
        threshold: Literal[
            "source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count"
        ] = "source_quantile",
        quantile: float = 0.05,
        tau: float | None = None,
        n_r: int | None = None,
        alignment: Literal["none", "adabn", "recenter"] = "none",
        head: Literal["cosine", "linear"] = "cosine",
        layers: list[str] | None = None,
        epsilons: list[float] | None = None,
        fgsm_eps: float = 0.05,
        input_std: float | list[float] = 1.0,
    ):
        self.layers = list(layers) if layers else None
        self.epsilons = [float(e) for e in (epsilons if epsilons is not None else EPSILONS)]
        self.fgsm_eps = float(fgsm_eps)
        self.input_std = input_std
        if not self.epsilons or min(self.epsilons) < 0:
            raise ValueError(f"mahalanobis_ens: epsilons must be a non-empty list of values ≥ 0, got {epsilons}")
        super().__init__(base, base_params, temperature, threshold, quantile, tau, n_r, alignment, head)
        if self.base is not None:
            raise ValueError("mahalanobis_ens: needs the encoder's layers (base: null)")

    # -- per-layer features ------------------------------------------------------------------------------
    def _encoder(self) -> nn.Module:
        return self.net.encoder

    def _layer_feats(self, x: Tensor) -> list[Tensor]:
        """Spatial means of every ensemble layer's output, float32, with gradients if enabled."""
        outs: list[Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for _, m in self._mods]
        try:
            self._encoder()(x)
        finally:
            for h in hooks:
                h.remove()
        return [_full(o.mean(dim=(2, 3)) if o.dim() == 4 else o.flatten(1)) for o in outs]

    def _std(self, x: Tensor) -> Tensor:
        std = torch.as_tensor(self.input_std, dtype=x.dtype, device=x.device).reshape(-1)
        if std.numel() not in (1, x.shape[1]):
            raise ValueError(f"mahalanobis_ens: input_std has {std.numel()} values for {x.shape[1]} channels")
        return std.reshape(1, -1, *([1] * (x.dim() - 2)))

    def _layer_scores(self, x: Tensor, eps: float) -> Tensor:
        """M_l(x̃_l) for every layer l: [B, L] float64."""
        cols = []
        for i, model in enumerate(self.models):
            if eps > 0:
                with torch.enable_grad():
                    xi = x.detach().clone().requires_grad_(True)
                    f = self._layer_feats(xi)[i]
                    d2 = model.distances(f)  # float64, differentiable
                    nearest = d2.argmin(1)
                    (grad,) = torch.autograd.grad(d2.gather(1, nearest[:, None]).sum(), xi)
                    sign = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype)
                x_t = x - eps * sign / self._std(x)
            else:
                x_t = x
            with torch.no_grad():
                cols.append(model.score(self._layer_feats(x_t)[i]))
        return torch.stack(cols, 1)

    def _fgsm(self, x: Tensor, y: Tensor) -> Tensor:
        with torch.enable_grad():
            xi = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(self.net(xi, num_active=self.num_known).float(), y)
            (grad,) = torch.autograd.grad(loss, xi)
        return (x + self.fgsm_eps * torch.where(grad >= 0, 1.0, -1.0).to(x.dtype) / self._std(x)).detach()

    # -- detector hooks -----------------------------------------------------------------------------------
    def _fit(self, data, classes) -> None:
        from sklearn.linear_model import LogisticRegressionCV

        if self._validation is None or len(self._validation) < 4:
            raise ValueError("mahalanobis_ens: needs a source validation split (session.validation) to fit α")
        self._mods = layer_modules(self._encoder(), self.layers)
        dev = self.ctx.device
        per_layer: list[list[Tensor]] = [[] for _ in self._mods]
        labels = []
        with torch.no_grad():
            for xb, yb in batches(data, self.ctx.eval_batch_size, device=dev, num_workers=self.ctx.num_workers):
                for i, f in enumerate(self._layer_feats(xb)):
                    per_layer[i].append(f)
                labels.append(yb)
        y = torch.cat(labels)
        self.models = [MahalanobisModel.fit(torch.cat(fs), y, classes) for fs in per_layer]
        # ID = held-out source validation, OOD = its FGSM copy; half A fits α, half B picks ε
        x_in, y_in = [], []
        for xb, yb in batches(self._validation, self.ctx.eval_batch_size, device=dev, num_workers=self.ctx.num_workers):
            x_in.append(xb)
            y_in.append(yb)
        x_in, y_in = torch.cat(x_in), torch.cat(y_in)
        bs = self.ctx.eval_batch_size
        x_out = torch.cat([self._fgsm(x_in[i : i + bs], y_in[i : i + bs]) for i in range(0, len(x_in), bs)])
        perm = torch.randperm(len(x_in), generator=torch.Generator().manual_seed(self.ctx.derive_seed("maha_ens")))
        half_a, half_b = perm[: len(perm) // 2], perm[len(perm) // 2 :]
        best = None
        for eps in self.epsilons:
            s_in = torch.cat([self._layer_scores(x_in[i : i + bs], eps) for i in range(0, len(x_in), bs)]).cpu().numpy()
            s_out = (
                torch.cat([self._layer_scores(x_out[i : i + bs], eps) for i in range(0, len(x_out), bs)]).cpu().numpy()
            )
            a, b = half_a.numpy(), half_b.numpy()
            feats = np.concatenate([s_in[a], s_out[a]])
            target = np.r_[np.ones(len(a)), np.zeros(len(a))]
            with warnings.catch_warnings():  # the defaults (card §4); sklearn ≥ 1.8 warns about future defaults
                warnings.simplefilter("ignore", FutureWarning)
                lr = LogisticRegressionCV().fit(feats, target)
            alpha = lr.coef_[0]
            tnr = tnr_at_tpr95(s_in[b] @ alpha, s_out[b] @ alpha)
            if best is None or tnr > best[0]:
                best = (tnr, eps, alpha)
        self.eps_, self.alpha_ = best[1], torch.as_tensor(best[2], dtype=torch.float64, device=dev)
        self.info_.update(
            epsilon=self.eps_,
            alpha=[float(a) for a in best[2]],
            tnr_at_tpr95_val=best[0],
            layers=[n for n, _ in self._mods],
            ood_fit="fgsm_source_val",
            fgsm_eps=self.fgsm_eps,
            ridges=[m.ridge for m in self.models],
        )

    def _score(self, x: Tensor) -> Tensor:
        return self._layer_scores(x, self.eps_) @ self.alpha_

    def _learn_episode(self, session) -> None:
        raise ValueError("mahalanobis_ens: DA-FSOS episodes are not supported (use mahalanobis)")

    def _detector_state(self) -> dict:
        return {
            "models": [m.state_dict() for m in self.models],
            "eps": self.eps_,
            "alpha": self.alpha_,
            "layers": [n for n, _ in self._mods],
        }

    def _load_detector_state(self, state: dict) -> None:
        self.models = [MahalanobisModel.from_state(m, self.ctx.device) for m in state["models"]]
        self.eps_ = float(state["eps"])
        self.alpha_ = state["alpha"].to(self.ctx.device)
        self._mods = layer_modules(self._encoder(), state["layers"])


@register_strategy("osbp_head")
class OSBPHead(Strategy):
    """Card §4 ``osbp_head`` (s = 1 − p(u|x), decision ``head_argmax``) scores an explicit (|K|+1)-way head
    such as OSBP's. No openworld strategy has one, so this name exists only to say so clearly."""

    supports = frozenset({"open_set"})

    def __init__(self, **_: Any):
        raise ValueError(
            "osbp_head: needs a strategy with an explicit (|K|+1)-way head (OSBP, card §1/§4); none is implemented "
            "in openworld. Use msp, energy, mahalanobis, mahalanobis_ens or ncm_threshold"
        )
