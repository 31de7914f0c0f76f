"""Unknown detectors: ``msp``, ``energy``, ``mahalanobis``, ``ncm_threshold`` (``specs/open-set.md`` §§4–5).

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
"""

from __future__ import annotations

import copy
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
from openworld.registry import STRATEGIES, register_strategy
from openworld.strategies.base import Prediction, Strategy, class_means

THRESHOLD_RULES = ("source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count")
ALIGNMENTS = ("none", "adabn", "recenter")


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
        threshold: Literal["source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean",
                           "reject_count"] = "source_quantile",
        quantile: float = 0.05,
        tau: float | None = None,
        n_r: int | None = None,
        alignment: Literal["none", "adabn", "recenter"] = "none",
    ):
        self.base = base
        self.base_params = dict(base_params) if base_params else {}
        self.temperature = temperature
        self.threshold = threshold
        self.quantile = quantile
        self.tau = tau
        self.n_r = n_r
        self.alignment = alignment
        self._check_params()

    def _check_params(self) -> None:
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(f"{type(self).__name__}: threshold must be one of {', '.join(THRESHOLD_RULES)}; "
                             f"got {self.threshold!r}")
        if self.alignment not in ALIGNMENTS:
            raise ValueError(f"{type(self).__name__}: alignment must be one of {', '.join(ALIGNMENTS)}; "
                             f"got {self.alignment!r}")
        if self.threshold == "fixed" and self.tau is None:
            raise ValueError(f"{type(self).__name__}: threshold 'fixed' needs tau")
        if self.threshold == "reject_count" and not self.n_r:
            raise ValueError(f"{type(self).__name__}: threshold 'reject_count' needs n_r")
        if not 0 <= float(self.quantile) <= 1:
            raise ValueError(f"{type(self).__name__}: quantile must be in [0, 1], got {self.quantile}")
        if float(self.temperature) <= 0:
            raise ValueError(f"{type(self).__name__}: temperature must be positive, got {self.temperature}")
        if self.alignment == "recenter" and not isinstance(self, NCMThreshold):
            raise ValueError(f"{type(self).__name__}: alignment 'recenter' is defined for ncm_threshold only "
                             "(card §4: re-centred prototypes, max cosine)")
        if self.base is not None and self.base in DETECTORS:
            raise ValueError(f"{type(self).__name__}: base {self.base!r} is itself a detector; name the classifier "
                             "strategy to wrap (e.g. teen)")

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
        raise ValueError(f"{self.name}: alignment 'adabn' needs the base strategy {self.base!r} to expose its model "
                         "as `.encoder` or `.net`")

    # -- model access ---------------------------------------------------------------------------------
    def _logits(self, x: Tensor) -> Tensor:
        with self.ctx.autocast():
            if self.inner is None:
                return self.net(x, num_active=self.num_known).float()
            return self.inner.predict(x).logits[:, : self.num_known].float()

    def _features(self, x: Tensor) -> Tensor:
        with self.ctx.autocast():
            if self.inner is None:
                return self.net.encoder(x).float()
            try:
                return self.inner.encode(x).float()
            except NotImplementedError:
                raise ValueError(f"{self.name}: needs features, but base strategy {self.base!r} has no encode(x)") \
                    from None

    @torch.no_grad()
    def _scores_of(self, data) -> Tensor:
        out = [self._score(xb) for xb, _ in batches(data, self.ctx.eval_batch_size, device=self.ctx.device,
                                                    num_workers=self.ctx.num_workers)]
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

    def _detector_state(self) -> dict:
        return {}

    def _load_detector_state(self, state: dict) -> None:
        pass

    # -- learning -------------------------------------------------------------------------------------
    def learn(self, session) -> None:
        seen = list(session.classes.seen)
        if seen != list(range(len(seen))):
            raise ValueError(f"{self.name}: needs seen classes 0..n-1 in order, got {seen[:10]}…")
        needs_target = self.alignment != "none" or self.threshold.startswith("target") or \
            self.threshold in ("ros_mean", "reject_count")
        if needs_target and (session.unlabeled is None or len(session.unlabeled) == 0):
            raise ValueError(f"{self.name}: alignment {self.alignment!r} / threshold {self.threshold!r} need the "
                             "unlabelled target set (session.unlabeled), which this scenario does not provide")
        if self._validation is None and session.validation is not None and len(session.validation):
            self._validation = session.validation
        if session.classes.new or not self._seen_data:
            self._seen_data.append(session.labeled)
        self.num_known = len(seen)
        if self.base is None:
            if self.net is not None and self.num_known != self.net_classes:
                raise ValueError(f"{self.name}: with base: null the classifier is trained once on the first "
                                 "session; incremental scenarios need a base strategy (e.g. base: teen)")
            # the cached source model (a fresh copy each session, so an earlier AdaBN is undone)
            self.net = self.ctx.base_model(session, data=self._seen_data[0], validation=self._validation,
                                           num_active=self.num_known).eval()
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
                raise ValueError(f"{self.name}: threshold 'source_quantile' needs a source validation split "
                                 "(session.validation)")
            s_val = self._scores_of(self._validation)
        if self.alignment == "adabn":
            self.info_["adabn_layers"] = adabn_(self._align_module(), session.unlabeled, self.ctx.device, 256,
                                                self.ctx.num_workers)
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
            self.tau_ = threshold_reject_count(s_t, self.n_r) if self.threshold == "reject_count" else \
                rule[self.threshold](s_t)

    # -- prediction -----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        logits = self._logits(x)
        s = self._score(x)
        return Prediction(logits=logits, unknown_score=float(self.tau_) - s.to(torch.float64))

    # -- persistence ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "net": None if self.net is None else self.net.state_dict(),
            "inner": None if self.inner is None else self.inner.state_dict(),
            "num_known": self.num_known,
            "tau": self.tau_,
            "center": self.center,
            "detector": self._detector_state(),
            "info": dict(self.info_),
        }

    def load_state_dict(self, state: dict) -> None:
        self.num_known = int(state["num_known"])
        self.tau_ = state["tau"]
        self.center = None if state["center"] is None else state["center"].to(self.ctx.device)
        if state["net"] is not None:
            self.net = self.ctx.create_classifier_net()
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
    the classifier's argmax. The full Lee et al. ensemble (``mahalanobis_ens``) is not implemented."""

    uses_features = True

    def __init__(self, base: str | None = None, base_params: dict | None = None, temperature: float = 1.0,
                 threshold: Literal["source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean",
                                    "reject_count"] = "source_quantile",
                 quantile: float = 0.05, tau: float | None = None, n_r: int | None = None,
                 alignment: Literal["none", "adabn", "recenter"] = "none", maha_pred: bool = False):
        self.maha_pred = maha_pred
        super().__init__(base, base_params, temperature, threshold, quantile, tau, n_r, alignment)

    def _fit(self, data, classes) -> None:
        feats, labels = self._feature_set(data)
        self.model = MahalanobisModel.fit(feats, labels, classes)
        self.info_["ridge"] = self.model.ridge

    def _score(self, x: Tensor) -> Tensor:
        return self.model.score(self._features(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        if not self.maha_pred:
            return super().predict(x)
        d2 = self.model.distances(self._features(x))
        s = -d2.min(dim=1).values
        return Prediction(logits=(-d2).float(), unknown_score=float(self.tau_) - s)

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

    def __init__(self, base: str | None = None, base_params: dict | None = None, temperature: float = 1.0,
                 threshold: Literal["source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean",
                                    "reject_count"] = "source_quantile",
                 quantile: float = 0.05, tau: float | None = None, n_r: int | None = None,
                 alignment: Literal["none", "adabn", "recenter"] = "none",
                 ncm_distance: Literal["cosine", "euclidean"] = "cosine", ncm_pred: bool = False):
        if ncm_distance not in ("cosine", "euclidean"):
            raise ValueError(f"ncm_threshold: ncm_distance must be 'cosine' or 'euclidean', got {ncm_distance!r}")
        self.ncm_distance = ncm_distance
        self.ncm_pred = ncm_pred
        super().__init__(base, base_params, temperature, threshold, quantile, tau, n_r, alignment)

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

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        if not self.ncm_pred:
            return super().predict(x)
        f = self._normed(x)
        logits = self.ctx.base.temperature * (f @ F.normalize(self.prototypes, dim=1).T)
        return Prediction(logits=logits.float(), unknown_score=float(self.tau_) - self._score_of(f).to(torch.float64))

    def _detector_state(self) -> dict:
        return {"prototypes": self.prototypes, "source_mean": self.source_mean}

    def _load_detector_state(self, state: dict) -> None:
        self.prototypes = state["prototypes"].to(self.ctx.device)
        self.source_mean = state["source_mean"].to(self.ctx.device)
