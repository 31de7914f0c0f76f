"""Long-tailed recognition: LT training profiles, label noise, test-agnostic test sets (card
``specs/long-tail-sade-rcal.md`` §1).

One session. The training set is the LDAM/SADE/RoLT long-tailed subsample of a balanced source:

* **Profiles** (§1.1): ``exp`` — ``n_i = int(n_max · r^{i/(C−1)})`` with ``r = 1/IF`` computed in
  float64 and truncated; ``step`` — the first ``C/2`` classes get ``int(n_max)``, the rest
  ``int(n_max·r)``. Class 0 is the head; no class permutation.
* **Subsampling** (§1.1): a private legacy NumPy ``RandomState(0)`` (identical to the official
  ``np.random.seed(0)`` stream); for each class in ascending order its rows, in dataset order, are
  shuffled in place and the first ``n_i`` kept. The generator state carries over between classes.
* **Validation** (§1.1): ``val_source="unused_pool"`` draws up to ``val_per_class`` images per class
  from the training images that were *not* selected (``RandomState(val_seed)``); the head class(es)
  have an empty pool and are absent. ``"holdout"`` removes them before subsampling instead.
* **Label noise** (§1.3): applied **after** subsampling to the training labels (and, with
  ``val_label_noise``, to the validation labels with the same transition matrix). ``sym``: uniform
  over the other classes; ``imb`` (RoLT/RCAL): ``j ≠ i`` with probability ``n_j/(N − n_i)``;
  ``pair``: ``i → (i+1) mod C`` (the asymmetric "pair-flip" noise of Co-teaching, our addition).
  ``noise_sampling="fixed_count"`` flips exactly ``int(η·N)`` samples chosen uniformly;
  ``"bernoulli"`` flips each sample with probability η. Draws come from
  ``numpy.random.default_rng(noise_seed)``. The strategy sees only the noisy labels; the clean ones
  are kept by the scenario (:meth:`LongTailScenario.clean_train_labels`) and never enter a session.
* **Test sets** (§1.2): ``uniform`` = the whole balanced test split; ``forward<ρ>`` = the exp
  profile with ``n_max = m`` and IF ρ; ``backward<ρ>`` the same reversed. Each is subsampled with
  the §1.1 procedure on a fresh ``RandomState(0)``. Keys: ``forward50 … forward2, uniform,
  backward2 … backward50``.
* **Shot groups** (§1.4, metrics §7): from the **clean** training counts: many ``n > 100``, medium
  ``20 ≤ n ≤ 100``, few ``n < 20`` (``shot_thresholds=(20, 100)``, configurable), or ``rank``
  (top / bottom 30 % by count). Passed to the ``long_tail`` metrics engine and recorded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from openworld.data.views import FileData, TensorData
from openworld.params import Bool, NonNegInt, Number, Seed32, param_error
from openworld.registry import DATASETS, register_dataset, register_scenario
from openworld.scenarios.base import ClassInfo, EvalSet, Scenario, Session, hash_indices

PROFILES = ("exp", "step")
NOISE_KINDS = ("none", "sym", "imb", "pair")
NOISE_SAMPLING = ("fixed_count", "bernoulli")
VAL_SOURCES = ("unused_pool", "holdout")
SHOT_GROUPS = ("thresholds", "rank")
DEFAULT_RHOS = (50, 25, 10, 5, 2)
DEFAULT_TEST_DISTRIBUTIONS = tuple(
    [f"forward{r}" for r in DEFAULT_RHOS] + ["uniform"] + [f"backward{r}" for r in reversed(DEFAULT_RHOS)]
)

# Constrained parameter types (``openworld validate`` checks recipe values against them).
Imbalance = Annotated[float, Field(strict=True, ge=1)]
PositiveNumber = Annotated[float, Field(strict=True, gt=0)]
Rate = Annotated[float, Field(strict=True, ge=0, le=1)]
RankFraction = Annotated[float, Field(strict=True, gt=0, le=0.5)]


# --------------------------------------------------------------------------------------------------
# §1.1 — counts and subsampling
# --------------------------------------------------------------------------------------------------
def class_counts(
    n_max: float, imbalance: float, num_classes: int, profile: str = "exp", reverse: bool = False
) -> list[int]:
    """Per-class counts of a long-tailed profile (card §1.1), class 0 the head.

    ``imbalance`` is the imbalance factor IF = n_max / n_min (``r = 1/IF``, LDAM's ``imb_factor``).
    ``exp``: ``int(n_max · r^{i/(C−1)})`` in float64, truncated toward zero (never rounded).
    ``step``: ``int(n_max)`` for the first ``C/2`` classes, ``int(n_max · r)`` after (C even).
    ``reverse`` (test sets only): exponent ``(C−1−i)/(C−1)``.
    """
    c = int(num_classes)
    if c < 1:
        raise ValueError(f"class_counts: num_classes must be >= 1, got {num_classes}")
    if not (isinstance(imbalance, (int, float)) and imbalance >= 1):
        raise ValueError(f"class_counts: the imbalance factor must be a number >= 1, got {imbalance!r}")
    if not n_max > 0:
        raise ValueError(f"class_counts: n_max must be positive, got {n_max!r}")
    r = 1.0 / float(imbalance)
    n_max = float(n_max)
    if profile == "exp":
        if c == 1:
            return [int(n_max)]
        out = []
        for i in range(c):
            e = (c - 1 - i) if reverse else i
            out.append(int(n_max * r ** (e / (c - 1.0))))
        return out
    if profile == "step":
        if c % 2:
            raise ValueError(f"class_counts: the step profile needs an even number of classes, got {c}")
        head, tail = [int(n_max)] * (c // 2), [int(n_max * r)] * (c // 2)
        return tail + head if reverse else head + tail
    raise ValueError(f"class_counts: profile must be one of {', '.join(PROFILES)}; got {profile!r}")


def lt_subsample(labels: Sequence[int] | np.ndarray, counts: Sequence[int], seed: int = 0,
                 rows: np.ndarray | None = None) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """§1.1 subsampling with a fresh legacy ``RandomState(seed)``.

    For each class c = 0, 1, … (ascending) its rows in dataset order (restricted to ``rows`` when
    given) are shuffled in place with the shared generator and the first ``counts[c]`` kept.
    Returns ``(selected rows in selection order, {c: the unselected rows in shuffled order})``.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    cand = np.arange(len(labels)) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
    rs = np.random.RandomState(seed)
    selected, unused = [], {}
    for c, n in enumerate(counts):
        idx = cand[labels[cand] == c]
        if int(n) > len(idx):
            raise ValueError(f"long-tail subsampling: class {c} has {len(idx)} images, the profile asks for {n}")
        rs.shuffle(idx)
        selected.append(idx[: int(n)])
        unused[c] = idx[int(n):]
    sel = np.concatenate(selected) if selected else np.zeros(0, dtype=np.int64)
    return sel.astype(np.int64), unused


# --------------------------------------------------------------------------------------------------
# §1.3 — label noise
# --------------------------------------------------------------------------------------------------
def noise_transition_matrix(counts: Sequence[int], eta: float) -> np.ndarray:
    """The RoLT/RCAL class-dependent (``imb``) matrix: ``T_ii = 1−η``, ``T_ij = η·n_j/(N−n_i)``.

    Rows sum to 1. A class holding every sample (``N = n_i``) keeps its labels (row = e_i).
    """
    n = np.asarray(counts, dtype=np.float64).reshape(-1)
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"noise rate eta must be in [0, 1], got {eta!r}")
    if (n < 0).any():
        raise ValueError("noise_transition_matrix: counts must be non-negative")
    total = n.sum()
    others = total - n  # N − n_i
    off = np.where(others[:, None] > 0, n[None, :] / np.where(others > 0, others, 1.0)[:, None], 0.0)
    np.fill_diagonal(off, 0.0)
    t = float(eta) * off
    diag = np.where(others > 0, 1.0 - float(eta), 1.0)
    t[np.arange(len(n)), np.arange(len(n))] = diag
    return t


def symmetric_transition_matrix(num_classes: int, eta: float, excludes_true: bool = True) -> np.ndarray:
    """``sym`` noise: ``1−η`` on the diagonal and ``η/(C−1)`` elsewhere (``excludes_true``), or
    ``1−η+η/C`` / ``η/C`` when the uniform draw may return the true class."""
    c = int(num_classes)
    if excludes_true:
        t = np.full((c, c), float(eta) / max(c - 1, 1))
        np.fill_diagonal(t, 1.0 - float(eta))
    else:
        t = np.full((c, c), float(eta) / c)
        np.fill_diagonal(t, 1.0 - float(eta) + float(eta) / c)
    return t


def pair_transition_matrix(num_classes: int, eta: float) -> np.ndarray:
    """``pair`` (asymmetric pair-flip) noise: ``i → (i+1) mod C`` with probability η."""
    c = int(num_classes)
    t = np.eye(c) * (1.0 - float(eta))
    t[np.arange(c), (np.arange(c) + 1) % c] += float(eta)
    return t


def apply_label_noise(
    labels: Sequence[int] | np.ndarray,
    eta: float,
    kind: str,
    rng: np.random.Generator,
    num_classes: int,
    counts: Sequence[int] | None = None,
    sampling: str = "fixed_count",
    sym_excludes_true: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy copy of ``labels`` (§1.3) and the positions that were picked for relabelling.

    ``fixed_count``: shuffle the positions with ``rng`` and pick the first ``int(η·N)``;
    ``bernoulli``: each position independently with probability η. Each picked sample of true
    class i is relabelled by ``kind`` (``sym``, ``imb`` with the class ``counts``, ``pair``).
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1).copy()
    c = int(num_classes)
    if kind not in NOISE_KINDS:
        raise ValueError(f"label noise kind must be one of {', '.join(NOISE_KINDS)}; got {kind!r}")
    if sampling not in NOISE_SAMPLING:
        raise ValueError(f"noise_sampling must be one of {', '.join(NOISE_SAMPLING)}; got {sampling!r}")
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"noise rate eta must be in [0, 1], got {eta!r}")
    if kind == "none" or float(eta) == 0.0 or len(y) == 0:
        return y, np.zeros(0, dtype=np.int64)
    n = len(y)
    if sampling == "fixed_count":
        picked = rng.permutation(n)[: int(float(eta) * n)]
    else:
        picked = np.flatnonzero(rng.random(n) < float(eta))
    true = y[picked]
    if kind == "sym":
        if sym_excludes_true:
            new = (true + rng.integers(1, c, size=len(picked))) % c
        else:
            new = rng.integers(0, c, size=len(picked))
    elif kind == "pair":
        new = (true + 1) % c
    else:  # imb: j != i with probability n_j / (N − n_i)
        if counts is None:
            raise ValueError("imb label noise needs the class counts")
        off = noise_transition_matrix(counts, 1.0)  # the off-diagonal distribution, zero diagonal
        np.fill_diagonal(off, 0.0)
        rows = off[true]
        cum = np.cumsum(rows, axis=1)
        cum[:, -1] = np.where(rows.sum(1) > 0, 1.0, cum[:, -1])
        u = rng.random(len(picked))
        new = (u[:, None] >= cum).sum(1).clip(max=c - 1)
        new = np.where(rows.sum(1) > 0, new, true)
    y[picked] = new
    return y, np.sort(picked)


# --------------------------------------------------------------------------------------------------
# §1.4 — shot groups
# --------------------------------------------------------------------------------------------------
def shot_groups(counts: Sequence[int], mode: str = "thresholds", thresholds: Sequence[float] = (20, 100),
                rank_fraction: float = 0.3) -> dict[str, tuple[int, ...]]:
    """``many`` / ``medium`` / ``few`` class ids from the (clean) training counts.

    ``thresholds=(lo, hi)``: many ``n > hi``, medium ``lo ≤ n ≤ hi``, few ``n < lo`` (SADE code).
    ``rank``: sort by count descending (stable by class id); many = the top ``round(f·C)``, few =
    the bottom ``round(f·C)``, medium = the rest (C=10, f=0.3: 3/4/3).
    """
    n = np.asarray(counts, dtype=np.int64).reshape(-1)
    if mode == "thresholds":
        lo, hi = (float(v) for v in thresholds)
        if lo > hi:
            raise ValueError(f"shot thresholds must be (low, high) with low <= high, got {tuple(thresholds)}")
        many = tuple(int(c) for c in np.flatnonzero(n > hi))
        medium = tuple(int(c) for c in np.flatnonzero((n >= lo) & (n <= hi)))
        few = tuple(int(c) for c in np.flatnonzero(n < lo))
        return {"many": many, "medium": medium, "few": few}
    if mode == "rank":
        order = np.argsort(-n, kind="stable")
        k = int(round(rank_fraction * len(n)))
        return {"many": tuple(sorted(int(c) for c in order[:k])),
                "medium": tuple(sorted(int(c) for c in order[k: len(n) - k])),
                "few": tuple(sorted(int(c) for c in order[len(n) - k:]))}
    raise ValueError(f"shot_groups must be one of {', '.join(SHOT_GROUPS)}; got {mode!r}")


# --------------------------------------------------------------------------------------------------
# Synthetic Gaussian features (card §9 R1)
# --------------------------------------------------------------------------------------------------
@register_dataset("synth_gauss")
def load_synth_gauss(root=None, download: bool = False, *, num_classes: int = 10, dim: int = 64,
                     train_per_class: int = 500, test_per_class: int = 100, mean_std: float = 2.0,
                     seed_data: int = 0):
    """Card §9 R1: class means ~ N(0, mean_std²·I) in ``dim`` dimensions, unit within-class noise;
    ``train_per_class`` training and ``test_per_class`` test samples per class, sorted by class.
    ``root``/``download`` are unused. Drawn with ``numpy.random.default_rng(seed_data)``."""
    from openworld.data.sources import SourceData, sha256_array
    from openworld.data.transforms import get_transforms

    rng = np.random.default_rng(seed_data)
    means = rng.normal(0.0, mean_std, size=(num_classes, dim))
    y_tr = np.repeat(np.arange(num_classes), train_per_class)
    y_te = np.repeat(np.arange(num_classes), test_per_class)
    x_tr = (means[y_tr] + rng.normal(size=(len(y_tr), dim))).astype(np.float32)
    x_te = (means[y_te] + rng.normal(size=(len(y_te), dim))).astype(np.float32)
    pair = get_transforms("vector")
    info = {"root": None, "format": "synthetic (numpy default_rng)", "seed_data": seed_data,
            "array_sha256": {"x_train": sha256_array(x_tr), "x_test": sha256_array(x_te)}}
    return SourceData(
        name="synth_gauss",
        train=TensorData(torch.from_numpy(x_tr), y_tr, pair, "synth_gauss/train"),
        test=TensorData(torch.from_numpy(x_te), y_te, pair, "synth_gauss/test"),
        classes=tuple(f"class_{c}" for c in range(num_classes)),
        info=info,
        family="vector",
    )


def _synth_gauss_num_classes(num_classes: int = 10, **_: Any) -> int:
    return num_classes


load_synth_gauss.num_classes = _synth_gauss_num_classes  # read by ``openworld validate`` (no data drawn)


# --------------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    num_classes: int
    names: tuple[str, ...]
    n_max: float
    profile_counts: list[int]
    clean_counts: list[int]
    train_rows: np.ndarray
    clean_train: np.ndarray
    noisy_train: np.ndarray
    flipped: np.ndarray
    val_rows: np.ndarray
    clean_val: np.ndarray
    noisy_val: np.ndarray
    test_sets: dict[str, np.ndarray]
    groups: dict[str, tuple[int, ...]]
    transition: np.ndarray | None


def _with_targets(data, rows: np.ndarray, y: np.ndarray):
    """``data.subset(rows)`` with targets replaced by ``y`` (noisy labels), no link to the source."""
    sub = data.subset(rows)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if isinstance(sub, TensorData):
        return TensorData(sub.x, y_t, sub.transforms, sub.name)
    if isinstance(sub, FileData):
        return FileData(sub.paths, y_t, sub.transforms, sub.name, sub.loader, sub.train)
    raise TypeError(f"long_tail: unsupported dataset type {type(data).__name__}")


def _labels(data) -> np.ndarray:
    y = data.targets
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    return np.asarray(y, dtype=np.int64).reshape(-1)


@register_scenario("long_tail")
class LongTailScenario(Scenario):
    """Long-tailed recognition with test-agnostic test sets and optional label noise (one session).

    Parameters (keyword-only; the recipe's ``scenario:`` block):

    data: ``{"source": name, "root": …, **source options}``.
    imbalance: the imbalance factor IF (``n_max / n_min``; 1 = balanced).
    profile: ``exp`` or ``step``.
    n_max: the head count; default ``N_train / C`` (CIFAR-10 5000, CIFAR-100 500, Fashion-MNIST 6000).
    subsample_seed: the legacy ``RandomState`` seed of the LT subsampling (0 as in LDAM/SADE/RoLT).
    val_per_class / val_seed / val_source: the validation split (§1.1; ``unused_pool`` or ``holdout``).
    noise / noise_rate / noise_seed / noise_sampling / sym_noise_excludes_true / val_label_noise: §1.3.
    test_distributions: eval-set keys, any of ``uniform``, ``forward<ρ>``, ``backward<ρ>`` (ρ ≥ 1).
    shot_groups / shot_thresholds / rank_fraction: §1.4 groups (from clean training counts).
    seed: the run seed (unused: every split is fixed by the seeds above, as in the papers).
    """

    kind = "long_tail"

    def __init__(
        self,
        *,
        data: dict | None = None,
        imbalance: Imbalance = 100.0,
        profile: Literal["exp", "step"] = "exp",
        n_max: PositiveNumber | None = None,
        subsample_seed: Seed32 = 0,
        val_per_class: NonNegInt = 100,
        val_seed: Seed32 = 1,
        val_source: Literal["unused_pool", "holdout"] = "unused_pool",
        noise: Literal["none", "sym", "imb", "pair"] = "none",
        noise_rate: Rate = 0.0,
        noise_seed: NonNegInt = 0,
        noise_sampling: Literal["fixed_count", "bernoulli"] = "fixed_count",
        sym_noise_excludes_true: Bool = True,
        val_label_noise: Bool = True,
        test_distributions: Sequence[str] = DEFAULT_TEST_DISTRIBUTIONS,
        shot_groups: Literal["thresholds", "rank"] = "thresholds",
        shot_thresholds: Sequence[Number] = (20, 100),
        rank_fraction: RankFraction = 0.3,
        seed: int = 0,
    ):
        self.data = dict(data) if data is not None else {"source": "synth_gauss"}
        self.imbalance = imbalance
        self.profile = profile
        self.n_max = n_max
        self.subsample_seed = subsample_seed
        self.val_per_class = val_per_class
        self.val_seed = val_seed
        self.val_source = val_source
        self.noise = noise
        self.noise_rate = noise_rate
        self.noise_seed = noise_seed
        self.noise_sampling = noise_sampling
        self.sym_noise_excludes_true = sym_noise_excludes_true
        self.val_label_noise = val_label_noise
        self.test_distributions = tuple(test_distributions)
        self.shot_groups = shot_groups
        self.shot_thresholds = tuple(shot_thresholds)
        self.rank_fraction = rank_fraction
        self.seed = seed
        self._source = None
        self._plan: _Plan | None = None

    # -- parameters ---------------------------------------------------------------------------------
    @classmethod
    def check_config(cls, params: dict, *, num_classes: int | None = None, seeds: Sequence[int] = ()) -> None:
        """Cross-field rules (``openworld validate``, and again when the data is read). Raises
        :class:`~openworld.config.ConfigError` naming the key."""
        if params.get("noise") not in (None, "none") and params.get("noise_rate") == 0:
            raise param_error(
                "noise_rate", params["noise_rate"], f"noise {params['noise']!r} needs a rate > 0 (or noise: none)"
            )
        dists = params.get("test_distributions")
        if dists is not None:
            dists = list(dists)
            if not dists:
                raise param_error("test_distributions", dists, "at least one test distribution is required")
            for name in dists:
                try:
                    _parse_distribution(name)
                except ValueError as exc:
                    raise param_error("test_distributions", dists, str(exc).split(": ", 1)[-1]) from None
            if len(set(dists)) != len(dists):
                raise param_error("test_distributions", dists, "each distribution at most once")
        thresholds = params.get("shot_thresholds")
        if thresholds is not None:
            t = list(thresholds)
            if len(t) != 2 or t[0] > t[1]:
                raise param_error("shot_thresholds", t, "[low, high] with low <= high is required")
        if num_classes is not None and params.get("profile") == "step" and num_classes % 2:
            raise param_error("profile", "step", f"needs an even number of classes; the data has {num_classes}")

    def _validate(self) -> None:
        if not isinstance(self.data, dict) or not self.data.get("source"):
            raise ValueError("scenario.data.source: a dataset name is required, e.g. {source: cifar10}")
        if not (isinstance(self.imbalance, (int, float)) and self.imbalance >= 1):
            raise ValueError(f"scenario.imbalance: a number >= 1 is required, got {self.imbalance!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"scenario.profile: allowed values are {', '.join(PROFILES)}; got {self.profile!r}")
        if self.n_max is not None and not (isinstance(self.n_max, (int, float)) and self.n_max > 0):
            raise ValueError(f"scenario.n_max: a positive number or null is required, got {self.n_max!r}")
        if not isinstance(self.val_per_class, int) or self.val_per_class < 0:
            raise ValueError(f"scenario.val_per_class: a non-negative integer is required, got {self.val_per_class!r}")
        if self.val_source not in VAL_SOURCES:
            raise ValueError(
                f"scenario.val_source: allowed values are {', '.join(VAL_SOURCES)}; got {self.val_source!r}"
            )
        if self.noise not in NOISE_KINDS:
            raise ValueError(f"scenario.noise: allowed values are {', '.join(NOISE_KINDS)}; got {self.noise!r}")
        if not (isinstance(self.noise_rate, (int, float)) and 0 <= self.noise_rate <= 1):
            raise ValueError(f"scenario.noise_rate: a number in [0, 1] is required, got {self.noise_rate!r}")
        if self.noise_sampling not in NOISE_SAMPLING:
            raise ValueError(
                f"scenario.noise_sampling: allowed values are {', '.join(NOISE_SAMPLING)}; got {self.noise_sampling!r}"
            )
        if self.shot_groups not in SHOT_GROUPS:
            raise ValueError(
                f"scenario.shot_groups: allowed values are {', '.join(SHOT_GROUPS)}; got {self.shot_groups!r}"
            )
        self.check_config(self.get_params())

    # -- lazy loading --------------------------------------------------------------------------------
    @property
    def source(self):
        if self._source is None:
            self._validate()
            options = {k: v for k, v in self.data.items() if k not in ("source", "root", "download")}
            loader = DATASETS.get(self.data["source"])
            self._source = loader(root=self.data.get("root"), download=bool(self.data.get("download", False)),
                                  **options)
        return self._source

    def _build(self) -> _Plan:
        if self._plan is not None:
            return self._plan
        src = self.source
        y_tr, y_te = _labels(src.train), _labels(src.test)
        names = tuple(str(n) for n in (getattr(src, "classes", None) or []))
        c = len(names) if names else int(max(y_tr.max(), y_te.max())) + 1
        names = names or tuple(str(i) for i in range(c))
        self.check_config(self.get_params(), num_classes=c)
        n_max = float(self.n_max) if self.n_max is not None else len(y_tr) / c
        profile = class_counts(n_max, float(self.imbalance), c, self.profile)
        per_class = np.bincount(y_tr, minlength=c)

        holdout_val = np.zeros(0, dtype=np.int64)
        pool_rows = None
        counts = list(profile)
        if self.val_source == "holdout":
            rs = np.random.RandomState(self.val_seed)
            held, keep = [], []
            for k in range(c):
                idx = np.flatnonzero(y_tr == k)
                rs.shuffle(idx)
                held.append(idx[: self.val_per_class])
                keep.append(idx[self.val_per_class:])
            holdout_val = np.concatenate(held)
            pool_rows = np.concatenate(keep)
            remaining = np.bincount(y_tr[pool_rows], minlength=c)
            counts = [int(min(n, r)) for n, r in zip(profile, remaining)]
        else:
            short = [k for k in range(c) if profile[k] > per_class[k]]
            if short:
                raise param_error(
                    "n_max", self.n_max, f"the profile asks for more images than the source has for classes "
                    f"{short} (n_max {n_max:g}, at most {int(per_class.min())} per class); lower n_max"
                )
        train_rows, unused = lt_subsample(y_tr, counts, self.subsample_seed, pool_rows)
        if self.val_source == "holdout":
            val_rows = np.sort(holdout_val)
        else:
            rs = np.random.RandomState(self.val_seed)
            chosen = []
            for k in range(c):
                pool = np.sort(unused[k])
                rs.shuffle(pool)
                chosen.append(pool[: self.val_per_class])
            val_rows = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)

        clean_train = y_tr[train_rows]
        clean_val = y_tr[val_rows]
        clean_counts = [int(v) for v in np.bincount(clean_train, minlength=c)]
        rng = np.random.default_rng(self.noise_seed)
        kw = {"num_classes": c, "counts": clean_counts, "sampling": self.noise_sampling,
              "sym_excludes_true": self.sym_noise_excludes_true}
        noisy_train, flipped = apply_label_noise(clean_train, float(self.noise_rate), self.noise, rng, **kw)
        if self.val_label_noise:
            noisy_val, _ = apply_label_noise(clean_val, float(self.noise_rate), self.noise, rng, **kw)
        else:
            noisy_val = clean_val.copy()
        transition = None
        if self.noise == "imb":
            transition = noise_transition_matrix(clean_counts, float(self.noise_rate))
        elif self.noise == "sym":
            transition = symmetric_transition_matrix(c, float(self.noise_rate), self.sym_noise_excludes_true)
        elif self.noise == "pair":
            transition = pair_transition_matrix(c, float(self.noise_rate))

        per_test = np.bincount(y_te, minlength=c)
        m = int(per_test.min())
        test_sets = {}
        for name in self.test_distributions:
            direction, rho = _parse_distribution(name)
            if direction == "uniform":
                test_sets[name] = np.arange(len(y_te), dtype=np.int64)
                continue
            if (per_test != m).any():
                raise param_error(
                    "test_distributions", list(self.test_distributions), f"test set {name!r} needs a balanced "
                    f"test split (per-class counts {per_test.tolist()})"
                )
            tc = class_counts(m, rho, c, "exp", reverse=direction == "backward")
            test_sets[name], _ = lt_subsample(y_te, tc, 0)
        groups = shot_groups(clean_counts, self.shot_groups, self.shot_thresholds, self.rank_fraction)
        self._plan = _Plan(
            num_classes=c, names=names, n_max=n_max, profile_counts=list(profile), clean_counts=clean_counts,
            train_rows=train_rows, clean_train=clean_train, noisy_train=noisy_train, flipped=flipped,
            val_rows=val_rows, clean_val=clean_val, noisy_val=noisy_val, test_sets=test_sets, groups=groups,
            transition=transition,
        )
        return self._plan

    # -- public --------------------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        return 1

    @property
    def num_classes(self) -> int:
        return self._build().num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        test = self.source.test
        if hasattr(test, "x"):
            x = test.x[:1]
            if test.transforms is not None:
                x = test.transforms.test(x)
            return tuple(int(s) for s in x.shape[1:])
        return tuple(int(s) for s in np.asarray(test[0][0]).shape)

    def clean_train_labels(self) -> np.ndarray:
        """The clean labels of the (subsampled) training set, in session order — evaluation only."""
        return self._build().clean_train.copy()

    def clean_val_labels(self) -> np.ndarray:
        return self._build().clean_val.copy()

    def train_counts(self) -> list[int]:
        """Clean per-class training counts (the profile; groups are built from these)."""
        return list(self._build().clean_counts)

    def sessions(self) -> Iterator[Session]:
        yield self.session(0)

    def session(self, index: int) -> Session:
        if index != 0:
            raise IndexError(f"scenario has 1 session, asked for {index}")
        plan = self._build()
        src = self.source
        c = plan.num_classes
        labeled = _with_targets(src.train, plan.train_rows, plan.noisy_train)
        validation = _with_targets(src.train, plan.val_rows, plan.noisy_val) if len(plan.val_rows) else None
        observed = np.bincount(plan.noisy_train, minlength=c)
        options = {
            "train_counts": list(plan.clean_counts),
            "thresholds": [float(v) for v in self.shot_thresholds],
            "shot_groups": self.shot_groups,
            "rank_fraction": float(self.rank_fraction),
        }
        eval_sets = {
            name: EvalSet(data=src.test.subset(rows), classes=tuple(range(c)), groups=dict(plan.groups),
                          task="long_tail", options=dict(options))
            for name, rows in plan.test_sets.items()
        }
        info = {
            "num_labeled": len(plan.train_rows),
            "num_validation": len(plan.val_rows),
            "noise": self.noise,
            "noise_rate": float(self.noise_rate),
            "num_flipped": int(len(plan.flipped)),
            "shot_groups": {k: list(v) for k, v in plan.groups.items()},
            "shot_group_rule": self.shot_groups,
            "shot_thresholds": list(self.shot_thresholds),
            "test_sizes": {k: int(len(v)) for k, v in plan.test_sets.items()},
        }
        classes = ClassInfo(
            num_classes=c, seen=tuple(range(c)), new=tuple(range(c)), base=tuple(range(c)), known=tuple(range(c)),
            train_counts=tuple(int(v) for v in observed), names=plan.names,
        )
        return Session(index=0, name="session_0", classes=classes, labeled=labeled, unlabeled=None,
                       validation=validation, eval_sets=eval_sets, info=info)

    def describe(self) -> dict[str, Any]:
        plan = self._build()
        src = self.source
        noisy = [int(v) for v in plan.noisy_train] if self.noise != "none" else None
        return {
            "kind": self.kind,
            "params": self.get_params(),
            "source": {"name": getattr(src, "name", self.data["source"]), "num_train": len(src.train),
                       "num_test": len(src.test), "family": getattr(src, "family", None)},
            "num_classes": plan.num_classes,
            "n_max": plan.n_max,
            "profile_counts": plan.profile_counts,
            "train_counts_clean": plan.clean_counts,
            "train_counts_observed": [int(v) for v in np.bincount(plan.noisy_train, minlength=plan.num_classes)],
            "train_size": int(len(plan.train_rows)),
            "train_hash": hash_indices(plan.train_rows),
            "val_size": int(len(plan.val_rows)),
            "val_hash": hash_indices(plan.val_rows),
            "val_source": self.val_source,
            "num_flipped": int(len(plan.flipped)),
            "noisy_labels_hash": hash_indices(plan.noisy_train),
            "noisy_labels": noisy,
            "transition_matrix": None if plan.transition is None else plan.transition.tolist(),
            "test_sizes": {k: int(len(v)) for k, v in plan.test_sets.items()},
            "test_hashes": {k: hash_indices(v) for k, v in plan.test_sets.items()},
            "shot_groups": {k: list(v) for k, v in plan.groups.items()},
            "shot_group_rule": self.shot_groups,
            "shot_thresholds": list(self.shot_thresholds),
        }


def _parse_distribution(name: str) -> tuple[str, float]:
    """``uniform`` → ("uniform", 1); ``forward50`` → ("forward", 50.0); ``backward2`` → ("backward", 2.0)."""
    if name == "uniform":
        return "uniform", 1.0
    for prefix in ("forward", "backward"):
        if name.startswith(prefix):
            tail = name[len(prefix):]
            try:
                rho = float(tail)
            except ValueError:
                rho = math.nan
            if tail and math.isfinite(rho) and rho >= 1:
                return prefix, rho
    raise ValueError(
        f"scenario.test_distributions: {name!r} is not uniform, forward<rho> or backward<rho> (rho >= 1), "
        "e.g. forward50, backward10"
    )
