"""Generative vs discriminative linear probes on frozen features (Zheng et al., ICML 2023):
``naive_bayes_probe`` and ``logreg_probe``.

Card: ``docs/methods/naive_bayes_probe.md``. Official code read: github.com/ML-GSAI/Revisiting-Dis-vs-Gen-Classifiers
(commit 86a0bcc9): ``models/gaussnb.py`` (the paper's ``nb_diag``) and ``main_train_offline.py`` (``lr_bgfs``).

Both probes sit on the frozen encoder of the shared base-session model (:meth:`RunContext.base_model`) and are
fitted on the features of each session's labelled data (test transform, inference mode). Both apply the
official protocol's min-max scaling (``--minmax``: a scaler fitted on the probe's training features, applied to
train and test features alike) before the classifier.

* ``naive_bayes_probe`` — Gaussian naive Bayes with a **shared diagonal** variance (a linear classifier):
  per class c the count n_c, mean μ_c and population variance v_c (+ ε) of the scaled features; the shared
  variance σ² = Σ_c π_c v_c with π_c = n_c / N; logits ``log π_c + log N(x; μ_c, diag σ²)``. Only sufficient
  statistics are kept (raw-feature count / mean / sum of squared deviations per class, merged exactly across
  sessions, and the running min / max), so the scaled model equals a refit on the union of all sessions.
* ``logreg_probe`` — multinomial logistic regression with an unpenalised intercept and the L2 penalty of
  scikit-learn's ``LogisticRegression(C)``: minimise ``Σ_i CE_i + ‖W‖²/(2C)`` (full batch, L-BFGS, float64).
  It keeps the features of every class seen (its training set) and is refitted on all of them each session,
  warm-started from the previous solution (the objective is convex, so the start changes only the cost).

``shots`` (both): the number of labelled samples per class a session's probe is fitted on, drawn at random
(seeded by the run seed and the session index only, so both probes at the same ``shots`` see the same samples,
and a smaller ``shots`` draws a subset of a larger one); ``None`` uses every labelled sample.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from openworld.registry import register_strategy
from openworld.strategies.base import Prediction, Strategy
from openworld.strategies.teen import _module_fingerprint

PRIORS = ("empirical", "uniform")
_LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------------------
# Pure pieces
# ------------------------------------------------------------------------------------------------
def pick_shots(labels: Tensor, shots: int, generator: torch.Generator) -> Tensor:
    """Ascending indices of ``shots`` random samples of every class present in ``labels``.

    One random key per sample; within each class the ``shots`` smallest keys are kept, so for a fixed
    generator state the picks for k shots are a subset of those for k + 1. Raises when a present class has
    fewer than ``shots`` samples."""
    labels = torch.as_tensor(labels).long().cpu()
    n = len(labels)
    keys = torch.rand(n, generator=generator, dtype=torch.float64)
    shuffled = torch.argsort(keys)
    order = shuffled[torch.argsort(labels[shuffled], stable=True)]  # grouped by class, random within
    grouped = labels[order]
    counts = torch.bincount(grouped, minlength=1)
    short = torch.nonzero((counts > 0) & (counts < shots)).flatten()
    if len(short):
        c = int(short[0])
        raise ValueError(f"shots={shots}: class {c} has only {int(counts[c])} labelled samples in this session "
                         f"({len(short)} class(es) short); lower shots or use shots: null")
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[grouped]
    return torch.sort(order[rank < shots]).values


def class_stats(feats: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per class: count [K], mean [K, d] and sum of squared deviations from that mean [K, d] (two passes,
    float64; absent classes get zeros)."""
    z = feats.double()
    y = labels.long().to(z.device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=z.device).index_add_(
        0, y, torch.ones(len(y), dtype=torch.float64, device=z.device))
    sums = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, device=z.device).index_add_(0, y, z)
    means = sums / counts.clamp(min=1.0)[:, None]
    m2 = torch.zeros_like(sums).index_add_(0, y, (z - means[y]).square())
    return counts, means, m2


def merge_stats(a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Exact union of two sets of per-class statistics (Chan et al.'s pairwise update), row by row."""
    na, ma, sa = a
    nb, mb, sb = b
    n = na + nb
    safe = n.clamp(min=1.0)[:, None]
    delta = mb - ma
    mean = ma + delta * (nb[:, None] / safe)
    m2 = sa + sb + delta.square() * (na * nb)[:, None] / safe
    return n, mean, m2


def minmax_scale(lo: Tensor, hi: Tensor) -> Tensor:
    """scikit-learn's ``MinMaxScaler`` factor ``1 / (max − min)``, with 1 where a feature is constant."""
    rng = hi - lo
    return 1.0 / torch.where(rng == 0, torch.ones_like(rng), rng)


def nb_parameters(counts: Tensor, means: Tensor, m2: Tensor, lo: Tensor, scale: Tensor, epsilon: float,
                  prior: str = "empirical") -> tuple[Tensor, Tensor, Tensor]:
    """(log prior [K], means [K, d], shared variance [d]) of the shared-diagonal Gaussian NB in the scaled
    space x' = (x − lo)·scale, from raw-space statistics of the classes with ``counts > 0`` (rows kept)."""
    present = counts > 0
    total = counts.sum()
    mu = (means - lo) * scale
    var_c = m2 / counts.clamp(min=1.0)[:, None] * scale.square() + epsilon  # official: np.var(ddof=0) + ε
    pi = counts / total
    shared = (pi[:, None] * var_c).sum(0)  # official: Σ_c prior_c · var_c (absent classes weigh 0)
    if prior == "empirical":
        log_prior = torch.where(present, torch.log(pi.clamp(min=1e-300)), torch.full_like(pi, -math.inf))
    else:
        log_prior = torch.where(present, -torch.log(present.sum().double()).expand_as(pi),
                                torch.full_like(pi, -math.inf))
    return log_prior, mu, shared


def nb_log_joint(x: Tensor, log_prior: Tensor, mu: Tensor, var: Tensor) -> Tensor:
    """``log π_c + log N(x; μ_c, diag var)`` for scaled x [B, d] (float64, via one matrix product)."""
    x = x.double()
    inv = 1.0 / var
    quad = (x.square() * inv).sum(1, keepdim=True) - 2.0 * (x * inv) @ mu.T + (mu.square() * inv).sum(1)
    return log_prior - 0.5 * (quad + (torch.log(var) + _LOG_2PI).sum())


def fit_logreg(x: Tensor, y: Tensor, num_classes: int, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-6,
               init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, dict]:
    """Minimise ``Σ_i CE(W x_i + b, y_i) + ‖W‖²/(2C)`` (b unpenalised) by full-batch L-BFGS in float64.

    The objective is divided by n for the optimiser (same minimiser; ``tol`` is on the max-abs gradient of
    that mean objective). Returns W [K, d], b [K] and {iterations, grad_max, converged}."""
    x = x.double()
    y = y.long().to(x.device)
    n, d = x.shape
    w = torch.zeros(num_classes, d, dtype=torch.float64, device=x.device)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    if init is not None:
        w.copy_(init[0])
        b.copy_(init[1])
    w.requires_grad_(True)
    b.requires_grad_(True)
    reg = 0.5 / (C * n)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25) + 1,
                            tolerance_grad=tol, tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="mean") + reg * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        closure()
    grad_max = float(torch.cat([w.grad.abs().flatten(), b.grad.abs()]).max())
    iters = int(opt.state[opt._params[0]].get("n_iter", 0))
    return w.detach(), b.detach(), {"iterations": iters, "grad_max": grad_max, "converged": grad_max <= tol}


# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------
def _check_shots(name: str, shots) -> int | None:
    if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots < 1):
        raise ValueError(f"{name}: shots must be a positive integer or null (every labelled sample); got {shots!r}")
    return shots


def _check_bool(name: str, param: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: {param} must be true or false; got {value!r}")
    return value


class _FrozenProbe(Strategy):
    """Shared part: frozen base-session encoder, seeded per-class subsampling, feature fast path."""

    supports = frozenset({"fscil", "cil"})

    def __init__(self, shots: int | None = None, minmax: bool = True):
        self.shots = _check_shots(self.name or type(self).__name__, shots)
        self.minmax = _check_bool(self.name or type(self).__name__, "minmax", minmax)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.encoder = None
        self.num_active = 0
        self._fingerprint: str | None = None
        self.lo: Tensor | None = None
        self.hi: Tensor | None = None
        self.fit_info: dict = {}

    def _session_features(self, session) -> tuple[Tensor, Tensor]:
        seen = list(session.classes.seen)
        if seen != list(range(len(seen))):
            raise ValueError(f"{self.name}: needs seen classes 0..n-1 in order, got {seen[:10]}…")
        if self.encoder is None:
            net = self.ctx.base_model(session)
            self.encoder = net.encoder.eval()
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            self._fingerprint = _module_fingerprint(self.encoder)
        data = session.labeled
        if self.shots is not None:
            gen = torch.Generator().manual_seed(self.ctx.derive_seed("probe_shots", session.index))
            data = data.subset(pick_shots(data.targets, self.shots, gen))
        self.num_active = len(seen)
        z, y = self.ctx.extract_features(self.encoder, data)
        z = z.double()
        lo, hi = z.min(0).values, z.max(0).values
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        self.fit_info = {"num_fit_samples": len(y), "shots": self.shots}
        return z, y

    def _scaling(self) -> tuple[Tensor, Tensor]:
        if not self.minmax:
            return torch.zeros_like(self.lo), torch.ones_like(self.lo)
        return self.lo, minmax_scale(self.lo, self.hi)

    def feature_cache_key(self) -> str | None:
        return None if self._fingerprint is None else f"encoder:{self._fingerprint}"

    def encode(self, x: Tensor) -> Tensor:
        with self.ctx.autocast():
            return self.encoder(x).float()

    def predict(self, x: Tensor) -> Prediction:
        return self.predict_features(self.encode(x))

    def run_info(self) -> dict:
        return dict(self.fit_info)

    def _base_state(self) -> dict:
        return {"encoder": self.encoder.state_dict(), "num_active": self.num_active, "lo": self.lo, "hi": self.hi,
                "fit_info": dict(self.fit_info)}

    def _load_base_state(self, state: dict) -> None:
        self.encoder = self.ctx.create_backbone().to(self.ctx.device)
        self.encoder.load_state_dict(state["encoder"])
        self.encoder.eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self._fingerprint = _module_fingerprint(self.encoder)
        self.num_active = int(state["num_active"])
        self.lo, self.hi = state["lo"].to(self.ctx.device), state["hi"].to(self.ctx.device)
        self.fit_info = dict(state.get("fit_info", {}))


@register_strategy("naive_bayes_probe")
class NaiveBayesProbe(_FrozenProbe):
    """The paper's ``nb_diag``: shared-diagonal Gaussian naive Bayes on min-max-scaled frozen features.

    ``epsilon``: added to every class's per-feature variance (official ``--epsilon``, absolute, 1e-9);
    ``prior``: ``empirical`` (n_c / N, official) or ``uniform``; ``shots`` / ``minmax``: see the module.
    """

    def __init__(self, shots: int | None = None, minmax: bool = True, epsilon: float = 1e-9,
                 prior: Literal["empirical", "uniform"] = "empirical"):
        super().__init__(shots, minmax)
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) or epsilon <= 0:
            raise ValueError(f"naive_bayes_probe: epsilon must be a positive number; got {epsilon!r}")
        if prior not in PRIORS:
            raise ValueError(f"naive_bayes_probe: prior must be one of {', '.join(PRIORS)}; got {prior!r}")
        self.epsilon = float(epsilon)
        self.prior = prior

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.stats: tuple[Tensor, Tensor, Tensor] | None = None
        self._params: tuple[Tensor, Tensor, Tensor] | None = None

    def learn(self, session) -> None:
        z, y = self._session_features(session)
        k = session.classes.num_classes
        new = class_stats(z, y, k)
        self.stats = new if self.stats is None else merge_stats(self.stats, new)
        self._refresh()

    def _refresh(self) -> None:
        lo, scale = self._scaling()
        counts, means, m2 = (t[: self.num_active] for t in self.stats)
        if bool((counts == 0).any()):
            missing = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"naive_bayes_probe: no labelled sample of seen classes {missing[:10]}")
        self._params = nb_parameters(counts, means, m2, lo, scale, self.epsilon, self.prior)

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Prediction:
        lo, scale = self._scaling()
        return Prediction(logits=nb_log_joint((z.double() - lo) * scale, *self._params))

    def run_info(self) -> dict:
        shared = self._params[2]
        return {**super().run_info(), "shared_var_mean": float(shared.mean()), "shared_var_min": float(shared.min())}

    def state_dict(self) -> dict:
        return {**self._base_state(), "stats": list(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
        self.stats = tuple(t.to(self.ctx.device) for t in state["stats"])
        self._refresh()


@register_strategy("logreg_probe")
class LogRegProbe(_FrozenProbe):
    """The paper's ``lr_bgfs``: L2 multinomial logistic regression on min-max-scaled frozen features.

    ``C``: inverse penalty (official 1.0); ``max_iter``: L-BFGS iterations per session (official 1000);
    ``tol``: max-abs gradient of the mean objective at which L-BFGS stops (ours 1e-6, near the minimiser;
    scikit-learn's default 1e-4 stops earlier); ``shots`` / ``minmax``: see the module.
    """

    def __init__(self, shots: int | None = None, minmax: bool = True, C: float = 1.0, max_iter: int = 1000,
                 tol: float = 1e-6):
        super().__init__(shots, minmax)
        if not isinstance(C, (int, float)) or isinstance(C, bool) or C <= 0:
            raise ValueError(f"logreg_probe: C must be a positive number; got {C!r}")
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"logreg_probe: max_iter must be a positive integer; got {max_iter!r}")
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol <= 0:
            raise ValueError(f"logreg_probe: tol must be a positive number; got {tol!r}")
        self.C, self.max_iter, self.tol = float(C), max_iter, float(tol)

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.feats: Tensor | None = None
        self.labels: Tensor | None = None
        self.w: Tensor | None = None
        self.b: Tensor | None = None

    def learn(self, session) -> None:
        z, y = self._session_features(session)
        self.feats = z if self.feats is None else torch.cat([self.feats, z])
        self.labels = y if self.labels is None else torch.cat([self.labels, y])
        self._fit()

    def _fit(self) -> None:
        lo, scale = self._scaling()
        k = self.num_active
        init = None
        if self.w is not None:  # warm start: previous rows, zeros for the new classes
            w0 = torch.zeros(k, self.w.shape[1], dtype=torch.float64, device=self.w.device)
            b0 = torch.zeros(k, dtype=torch.float64, device=self.w.device)
            w0[: len(self.w)], b0[: len(self.b)] = self.w, self.b
            init = (w0, b0)
        self.w, self.b, info = fit_logreg((self.feats - lo) * scale, self.labels, k, self.C, self.max_iter,
                                          self.tol, init)
        self.fit_info.update(info)

    @torch.no_grad()
    def predict_features(self, z: Tensor) -> Prediction:
        lo, scale = self._scaling()
        return Prediction(logits=((z.double() - lo) * scale) @ self.w.T + self.b)

    def state_dict(self) -> dict:
        return {**self._base_state(), "feats": self.feats, "labels": self.labels, "w": self.w, "b": self.b}

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
        dev = self.ctx.device
        self.feats, self.labels = state["feats"].to(dev), state["labels"].to(dev)
        self.w, self.b = state["w"].to(dev), state["b"].to(dev)


__all__ = ["LogRegProbe", "NaiveBayesProbe", "class_stats", "fit_logreg", "merge_stats", "minmax_scale",
           "nb_log_joint", "nb_parameters", "pick_shots"]
