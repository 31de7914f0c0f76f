"""OOD scores from OpenOOD v1.5: ``maxlogit``, ``odin``, ``react``, ``knn``, ``vim`` (issue 14, item 1).

Each is a :class:`~openworld.strategies.detectors.DetectorStrategy`: it wraps a source-trained classifier
(the shared base model with ``head: cosine | linear``, or ``base: <strategy>``), adds a known-ness score s
(higher = known), picks τ without target labels (``threshold``) and works with ``alignment: none | adabn``
— source statistics (ReAct's clip value, the KNN bank, ViM's subspace and α, the source-validation scores
for τ) are computed before AdaBN, as for Mahalanobis. Cards: ``docs/methods/{maxlogit,odin,react,knn,vim}.md``.
Defaults are those of OpenOOD's ``configs/postprocessors/*.yml``; OpenOOD searches some of them on OOD
validation data (``APS_mode``); no OOD data exists here, so the defaults are used as they are.

* ``maxlogit``: s = max_c z_c (OpenOOD ``mls``).
* ``odin``: x̃ = x − ε·sign(∇ₓ CE(z(x)/T, ŷ)) / σ_ch (a zero gradient counts as +1; ŷ = argmax z), then
  s = max_c softmax(z(x̃)/T)_c; T = 1000, ε = 0.0014. σ_ch = ``input_std`` (OpenOOD divides by the
  dataset's normalisation std; default 1.0 = ε in the network's input units).
* ``react``: c = the ``percentile``-th percentile (90) of all penultimate activations of the source
  **validation** split (OpenOOD's setup reads ``id_loader_dict['val']``; ``react_source: train`` uses the
  source training data); s = T·logsumexp(head(min(f, c))/T), T = 1.
* ``knn``: s = −‖f̂ − b̂_(k)‖² with f̂ the L2-normalised feature and b̂_(k) its k-th nearest L2-normalised
  source **training** feature, k = 50 (exact search; OpenOOD's faiss ``IndexFlatL2`` returns squared
  distances; ``knn_distance: euclidean`` takes the square root — same ranks).
* ``vim``: u = −W⁺b; the principal subspace P of the source training features centred at u (the
  ``vim_dim`` leading eigenvectors of (1/N)·Σ(f−u)(f−u)ᵀ; default d/2, as OpenOOD's scripts choose for
  84-d and 512-d features); α = mean_i max_c z_ic / mean_i ‖(f_i−u)P⊥‖ on the source training set;
  s = logsumexp(z) − α·‖(f−u)P⊥‖. Needs W, b of a linear head: ``head: linear`` (its default here).

``odin`` needs gradients of the logits w.r.t. the input: with ``base: <strategy>`` that strategy's
``predict`` must be differentiable. ``react`` needs the head as a separate map (features → logits): the
shared model's ``net.head`` (linear or cosine), a base strategy's ``predict_features(z)`` (e.g. TEEN) or,
in a DA-FSOS episode, the support prototypes. DA-FSOS episodes: ``maxlogit``/``odin`` score the
prototype logits; ``knn``'s bank is the episode's support; ``react`` takes c from the episode's source
validation split; ``vim`` is not defined there (no linear head).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from openworld.metrics.open_set import energy_score
from openworld.models.heads import LinearClassifier
from openworld.strategies.detectors import DetectorStrategy, _detector, _full

_Threshold = Literal["source_quantile", "fixed", "target_otsu", "target_gmm", "ros_mean", "reject_count"]
KNN_DISTANCES = ("squared", "euclidean")
REACT_SOURCES = ("validation", "train")


# --------------------------------------------------------------------------------------------------
# pure scores (tensors in, tensors out; no host reads)
# --------------------------------------------------------------------------------------------------
def maxlogit_score(logits: Tensor) -> Tensor:
    """max_c z_c (OpenOOD ``mls``); keeps float32/float64."""
    z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    return z.max(dim=1).values


def react_clip_value(feats: Tensor, percentile: float) -> float:
    """The ``percentile``-th percentile of all entries of ``feats`` (NumPy's default 'linear' method, as
    ``np.percentile(activation_log.flatten(), p)`` in OpenOOD's ReAct setup), in float64."""
    flat = feats.detach().reshape(-1).to(torch.float64).sort().values
    n = flat.numel()
    if n == 0:
        raise ValueError("react: no source activations to take the percentile of")
    pos = float(percentile) / 100.0 * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    pair = flat[[lo, hi]].cpu()  # one transfer, once per fit
    return float(pair[0] + (pair[1] - pair[0]) * (pos - lo))


def knn_score(queries: Tensor, bank: Tensor, k: int, distance: str = "squared", chunk: int = 8192) -> Tensor:
    """−(distance of each query to its k-th nearest row of ``bank``): squared L2 (``squared``, what faiss
    ``IndexFlatL2`` returns) or L2 (``euclidean``). Exact; the bank is scanned in chunks of ``chunk`` rows
    keeping a running top-k, so memory stays O(B·(chunk + k)). Inputs are expected L2-normalised."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"knn: k must be in [1, {len(bank)}] (the bank size), got {k}")
    q = queries.to(bank.dtype)
    qq = (q * q).sum(1, keepdim=True)
    best = None
    for s in range(0, len(bank), chunk):
        b = bank[s : s + chunk]
        d2 = (qq + (b * b).sum(1)[None, :] - 2.0 * (q @ b.T)).clamp_min_(0.0)
        cand = d2 if best is None else torch.cat([best, d2], dim=1)
        best = cand.topk(min(k, cand.shape[1]), dim=1, largest=False, sorted=True).values
    kth = best[:, k - 1]
    return -(kth.sqrt() if distance == "euclidean" else kth)


def vim_fit(feats: Tensor, weight: Tensor, bias: Tensor, dim: int) -> dict[str, Tensor]:
    """ViM's source statistics in float64 (OpenOOD ``vim_postprocessor.setup``): the origin u = −W⁺b, the
    basis of the residual space P⊥ (eigenvectors of the d − ``dim`` smallest eigenvalues of the
    u-centred second-moment matrix, ``EmpiricalCovariance(assume_centered=True)`` of f − u) and
    α = mean max logit / mean residual norm over ``feats``."""
    f = feats.detach().to(torch.float64)
    w, b = weight.detach().to(f), bias.detach().to(f)
    d = f.shape[1]
    if not 1 <= dim < d:
        raise ValueError(f"vim: vim_dim must be in [1, {d - 1}] for {d}-d features, got {dim}")
    u = -torch.linalg.pinv(w) @ b
    x = f - u
    cov = x.T @ x / len(x)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    residual_basis = vecs[:, : d - dim].contiguous()
    res = (x @ residual_basis).norm(dim=1)
    mean_res = res.mean()
    alpha = (f @ w.T + b).max(dim=1).values.mean() / mean_res
    if not bool(torch.isfinite(alpha)) or float(mean_res) == 0.0:
        raise ValueError("vim: the source features have no residual outside the principal subspace; lower vim_dim")
    return {"u": u, "basis": residual_basis, "alpha": alpha}


def vim_score(feats: Tensor, weight: Tensor, bias: Tensor, stats: dict[str, Tensor]) -> Tensor:
    """s = logsumexp(z) − α·‖(f − u)P⊥‖ with z = fWᵀ + b, float64 (OpenOOD ``score_ood``)."""
    f = feats.to(torch.float64)
    z = f @ weight.to(f).T + bias.to(f)
    return torch.logsumexp(z, dim=1) - stats["alpha"] * ((f - stats["u"]) @ stats["basis"]).norm(dim=1)


def _input_std(std, x: Tensor, name: str) -> Tensor:
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(-1)
    if x.dim() < 2 or s.numel() not in (1, x.shape[1]):
        raise ValueError(
            f"{name}: input_std has {s.numel()} values for inputs of shape {tuple(x.shape)} "
            "(one value, or one per channel)"
        )
    return s.reshape(1, -1, *([1] * (x.dim() - 2)))


# --------------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------------
@_detector("maxlogit")
class MaxLogit(DetectorStrategy):
    """s = max_c z_c, the maximum logit (Hendrycks et al. 2022; OpenOOD ``mls``). ``temperature`` does not
    change it (kept for the shared signature)."""

    def _score(self, x: Tensor) -> Tensor:
        return maxlogit_score(self._logits(x))


@_detector("odin")
class ODIN(DetectorStrategy):
    """ODIN (Liang et al. 2018; OpenOOD ``odin``): temperature-scaled MSP on an input moved against the
    gradient of the predicted class's loss. x̃ = x − ε·sign(∇ₓ CE(z(x)/T, ŷ)) / σ_ch with ŷ = argmax z(x)
    and sign(0) = +1 (OpenOOD's ``torch.ge(grad, 0)``); s = max_c softmax(z(x̃)/T)_c in float64.
    ``temperature`` T = 1000 and ``epsilon`` ε = 0.0014 (OpenOOD ``odin.yml``: ``temperature``, ``noise``);
    ``input_std`` σ_ch (one value or one per channel) is what OpenOOD divides the sign by: the std of the
    input normalisation (MNIST 0.3081; CIFAR-10 0.2470, 0.2435, 0.2616). The default 1.0 leaves the sign
    undivided, i.e. ε in the network's input units. ``epsilon: 0`` is temperature scaling alone."""

    def __init__(
        self,
        base: str | None = None,
        base_params: dict | None = None,
        temperature: float = 1000.0,
        threshold: _Threshold = "source_quantile",
        quantile: float = 0.05,
        tau: float | None = None,
        n_r: int | None = None,
        alignment: Literal["none", "adabn", "recenter"] = "none",
        head: Literal["cosine", "linear"] = "cosine",
        epsilon: float = 0.0014,
        input_std: float | list[float] = 1.0,
    ):
        self.epsilon = epsilon
        self.input_std = input_std
        if not float(epsilon) >= 0:
            raise ValueError(f"odin: epsilon must be ≥ 0, got {epsilon}")
        stds = torch.as_tensor(input_std, dtype=torch.float64).reshape(-1)
        if stds.numel() == 0 or not bool((stds > 0).all()):
            raise ValueError(f"odin: input_std must be positive (one value or one per channel), got {input_std}")
        super().__init__(base, base_params, temperature, threshold, quantile, tau, n_r, alignment, head)

    def perturb(self, x: Tensor) -> Tensor:
        """x̃ (see the class docstring); gradients enabled locally, nothing else is changed."""
        if float(self.epsilon) == 0:
            return x
        with torch.enable_grad():
            xi = x.detach().clone().requires_grad_(True)
            z = self._logits(xi)
            if not z.requires_grad:
                raise ValueError(
                    f"odin: needs gradients of the logits w.r.t. the input, but the classifier "
                    f"({'base ' + repr(self.base) if self.base else 'the source model'}) returns detached logits; "
                    "use base: null or a base strategy whose predict is differentiable"
                )
            loss = F.cross_entropy(z / float(self.temperature), z.detach().argmax(dim=1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, xi)
        sign = torch.where(grad >= 0, 1.0, -1.0).to(x.dtype)
        return (x.detach() - float(self.epsilon) * sign / _input_std(self.input_std, x, "odin")).detach()

    def _score(self, x: Tensor) -> Tensor:
        x_t = self.perturb(x)
        with torch.no_grad():
            z = self._logits(x_t)
        return torch.softmax(z.to(torch.float64) / float(self.temperature), dim=1).max(dim=1).values

    def _fit(self, data, classes) -> None:
        self.info_.update(odin_temperature=float(self.temperature), odin_epsilon=float(self.epsilon))


class _HeadMixin:
    """The classifier as a map features → logits (ReAct)."""

    def _head_logits(self, f: Tensor) -> Tensor:
        if self.ep_protos is not None:  # DA-FSOS episode: the support prototypes
            return self.ctx.base.temperature * (F.normalize(f, dim=1) @ F.normalize(self.ep_protos, dim=1).T)
        with self.ctx.autocast():
            if self.inner is None:
                return _full(self.net.head(f, num_active=self.num_known))
            try:
                return _full(self.inner.predict_features(f).logits[:, : self.num_known])
            except NotImplementedError:
                raise ValueError(
                    f"{self.name}: needs the classifier head as a map features → logits, but base strategy "
                    f"{self.base!r} has no predict_features(z); use base: null (head: linear or cosine)"
                ) from None


@_detector("react")
class ReAct(_HeadMixin, DetectorStrategy):
    """ReAct (Sun et al. 2021; OpenOOD ``react``): s = T·logsumexp(head(min(f, c))/T) with T = 1 (energy)
    and c the ``percentile``-th percentile (90, OpenOOD ``react.yml``) of all penultimate activations of
    source data: ``react_source: validation`` (default, the held-out source validation split — what
    OpenOOD's setup reads, ``id_loader_dict['val']``) or ``train`` (the source training data). The clip
    value c is in :attr:`clip_` and ``info_['react_clip']``, computed before AdaBN."""

    uses_features = True

    def __init__(
        self,
        base: str | None = None,
        base_params: dict | None = None,
        temperature: float = 1.0,
        threshold: _Threshold = "source_quantile",
        quantile: float = 0.05,
        tau: float | None = None,
        n_r: int | None = None,
        alignment: Literal["none", "adabn", "recenter"] = "none",
        head: Literal["cosine", "linear"] = "cosine",
        percentile: float = 90.0,
        react_source: Literal["validation", "train"] = "validation",
    ):
        self.percentile = percentile
        self.react_source = react_source
        if not 0 <= float(percentile) <= 100:
            raise ValueError(f"react: percentile must be in [0, 100], got {percentile}")
        if react_source not in REACT_SOURCES:
            raise ValueError(f"react: react_source must be one of {', '.join(REACT_SOURCES)}; got {react_source!r}")
        super().__init__(base, base_params, temperature, threshold, quantile, tau, n_r, alignment, head)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.clip_: float | None = None
        self._episode_clip: tuple | None = None

    def _set_clip(self, data, source_name: str) -> None:
        feats, _ = self._feature_set(data)
        self.clip_ = react_clip_value(feats, self.percentile)
        self.info_.update(react_clip=self.clip_, react_source=source_name, react_n=len(data))

    def _fit(self, data, classes) -> None:
        if self.react_source == "validation":
            if self._validation is None or len(self._validation) == 0:
                raise ValueError(
                    "react: react_source 'validation' needs a source validation split (session.validation); "
                    "set react_source: train to use the source training data"
                )
            self._set_clip(self._validation, "source_validation")
        else:
            self._set_clip(data, "source_train")

    def _learn_episode(self, session) -> None:
        self._episode_info = session.info
        super()._learn_episode(session)

    def _fit_episode_source(self, source, num_source: int) -> None:
        # the source model is the same every episode: c computed once per (data, model)
        data = source if self.react_source == "train" else self._episode_info.get("source_validation")
        if data is None or len(data) == 0:
            raise ValueError(
                "react: react_source 'validation' needs the episode's source validation split; set react_source: train"
            )
        key = (data.fingerprint(), num_source, self.react_source)
        if self._episode_clip is None or self._episode_clip[0] != key:
            self._set_clip(data, f"source_{self.react_source}")
            self._episode_clip = (key, self.clip_, dict(self.info_))
        self.clip_ = self._episode_clip[1]

    def _score(self, x: Tensor) -> Tensor:
        f = self._features(x).clamp(max=self.clip_)
        return energy_score(self._head_logits(f), float(self.temperature))

    def _detector_state(self) -> dict:
        return {"clip": self.clip_}

    def _load_detector_state(self, state: dict) -> None:
        self.clip_ = None if state["clip"] is None else float(state["clip"])


@_detector("knn")
class KNN(DetectorStrategy):
    """Deep nearest neighbours (Sun et al. 2022; OpenOOD ``knn``): s = −dist(f̂, b̂_(k)) with f̂ = f/‖f‖ and
    b̂_(k) the k-th nearest of the L2-normalised source training features (the bank, fitted before AdaBN;
    in a DA-FSOS episode the support features). ``k`` = 50 (OpenOOD ``knn.yml`` ``K``). ``knn_distance``:
    ``squared`` (default; faiss ``IndexFlatL2``, which OpenOOD and the paper's code call, returns squared
    L2) or ``euclidean`` (the paper's wording; same ranks). Exact search in chunks (no faiss)."""

    uses_features = True

    def __init__(
        self,
        base: str | None = None,
        base_params: dict | None = None,
        temperature: float = 1.0,
        threshold: _Threshold = "source_quantile",
        quantile: float = 0.05,
        tau: float | None = None,
        n_r: int | None = None,
        alignment: Literal["none", "adabn", "recenter"] = "none",
        head: Literal["cosine", "linear"] = "cosine",
        k: int = 50,
        knn_distance: Literal["squared", "euclidean"] = "squared",
    ):
        self.k = k
        self.knn_distance = knn_distance
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"knn: k must be a positive integer, got {k!r}")
        if knn_distance not in KNN_DISTANCES:
            raise ValueError(f"knn: knn_distance must be one of {', '.join(KNN_DISTANCES)}; got {knn_distance!r}")
        super().__init__(base, base_params, temperature, threshold, quantile, tau, n_r, alignment, head)

    def _set_bank(self, feats: Tensor, what: str) -> None:
        if self.k > len(feats):
            raise ValueError(f"knn: k = {self.k} exceeds the {len(feats)} {what} features; lower k")
        self.bank = F.normalize(feats, dim=1)
        self.info_.update(knn_bank=what, knn_bank_size=len(feats))

    def _fit(self, data, classes) -> None:
        self._set_bank(self._feature_set(data)[0], "source_train")

    def _fit_episode_support(self, feats: Tensor, labels: Tensor, n_way: int) -> None:
        self._set_bank(feats, "episode_support")

    def _score(self, x: Tensor) -> Tensor:
        return knn_score(F.normalize(self._features(x), dim=1), self.bank, self.k, self.knn_distance)

    def _detector_state(self) -> dict:
        return {"bank": self.bank}

    def _load_detector_state(self, state: dict) -> None:
        self.bank = state["bank"].to(self.ctx.device)


@_detector("vim")
class ViM(DetectorStrategy):
    """Virtual-logit matching (Wang et al. 2022; OpenOOD ``vim``): s = logsumexp(z) − α·‖(f − u)P⊥‖ with
    u = −W⁺b, P the ``vim_dim`` leading eigenvectors of the u-centred source training features and
    α = mean max logit / mean residual norm on them (see :func:`vim_fit`; fitted before AdaBN). Needs the
    weight and bias of a linear head, so ``head`` is ``linear`` (the default here) on the shared source
    model (``base: null``). ``vim_dim`` = None takes d/2 (OpenOOD's scripts: 256 for 512-d features, 42
    for 84-d; ``vim.yml`` says 256)."""

    uses_features = True

    def __init__(
        self,
        base: str | None = None,
        base_params: dict | None = None,
        temperature: float = 1.0,
        threshold: _Threshold = "source_quantile",
        quantile: float = 0.05,
        tau: float | None = None,
        n_r: int | None = None,
        alignment: Literal["none", "adabn", "recenter"] = "none",
        head: Literal["cosine", "linear"] = "linear",
        vim_dim: int | None = None,
    ):
        self.vim_dim = vim_dim
        if head != "linear":
            raise ValueError(f"vim: needs the weight and bias of a linear head; head must be 'linear', got {head!r}")
        if base is not None:
            raise ValueError(f"vim: needs the linear head of the shared source model (base: null), got base {base!r}")
        if vim_dim is not None and (isinstance(vim_dim, bool) or not isinstance(vim_dim, int) or vim_dim < 1):
            raise ValueError(f"vim: vim_dim must be a positive integer or null (d/2), got {vim_dim!r}")
        super().__init__(base, base_params, temperature, threshold, quantile, tau, n_r, alignment, head)

    def _fc(self) -> tuple[Tensor, Tensor]:
        head = self.net.head
        if not isinstance(head, LinearClassifier) or head.fc.bias is None:
            raise ValueError(f"vim: needs a linear head with bias, the model has {type(head).__name__}")
        return head.fc.weight[: self.num_known].detach(), head.fc.bias[: self.num_known].detach()

    def _fit(self, data, classes) -> None:
        feats, _ = self._feature_set(data)
        dim = self.vim_dim if self.vim_dim is not None else feats.shape[1] // 2
        w, b = self._fc()
        self.stats = vim_fit(feats, w, b, dim)
        self.info_.update(vim_dim=dim, vim_alpha=float(self.stats["alpha"]))

    def _score(self, x: Tensor) -> Tensor:
        w, b = self._fc()
        return vim_score(self._features(x), w, b, self.stats)

    def _learn_episode(self, session) -> None:
        raise ValueError(
            "vim: DA-FSOS episodes are not supported (the classifier is the support prototypes, "
            "which have no linear weight and bias)"
        )

    def _detector_state(self) -> dict:
        return dict(self.stats)

    def _load_detector_state(self, state: dict) -> None:
        self.stats = {k: v.to(self.ctx.device) for k, v in state.items()}


__all__ = [
    "KNN",
    "ODIN",
    "MaxLogit",
    "ReAct",
    "ViM",
    "knn_score",
    "maxlogit_score",
    "react_clip_value",
    "vim_fit",
    "vim_score",
]
