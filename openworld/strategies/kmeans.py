"""Clustering baselines for category discovery and the class-number estimators (card §2.5, §2.7).

* ``kmeans`` (B1): scikit-learn ``KMeans(K, init="k-means++", n_init=10, max_iter=300,
  random_state=0)`` on L2-normalised features of ``D_L ∪ D_U``; no label is used.
* ``ss_kmeans`` on ``gcd`` (B2, GCD's semi-supervised k-means, :func:`ss_kmeans_gcd`): the first K_old
  centroids are the labelled class means, the others are seeded k-means++-style from ``D_U``;
  labelled points stay in their class cluster; the iteration (and restart) with the lowest inertia
  is kept. Written here (vectorised torch) because no library implements the constrained variant.
* ``ss_kmeans`` on ``ncd`` (B3, Troisemaine et al.'s NCD k-means, :func:`ncd_kmeans`): known class
  means only seed the novel centroids; plain k-means on ``D_U`` with the novel centroids.
* :func:`estimate_k_brent` (GCD, bounded Brent over K on labelled-row Hungarian accuracy) and
  :func:`estimate_k_silhouette` (NCD, silhouette on a latent space); :func:`estimate_num_clusters`
  picks one by scenario kind for ``k_mode: estimated`` (ncd: head = K_old + K̂_u novel clusters).

Features: ``features="backbone"`` uses the recipe's backbone (pretrained if the recipe says so) in
inference mode; ``"input"`` uses the flattened test-transformed input (pixels), for runs without a
pretrained encoder. Predictions are ``-distance`` to each centroid, so ``argmax`` = nearest centroid.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from openworld.metrics.clustering import cluster_accuracy
from openworld.registry import register_strategy
from openworld.strategies.base import Prediction, Strategy, class_means


def l2_features(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def _sqdist(x: Tensor, c: Tensor) -> Tensor:
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None]).clamp(min=0)


def _update(x: Tensor, assign: Tensor, centroids: Tensor) -> Tensor:
    """Mean of the members of each centroid; an empty cluster keeps its previous centroid."""
    k = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, assign, x)
    ones = torch.ones_like(assign, dtype=x.dtype)
    counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, assign, ones)
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)


def _seed(x_u: Tensor, fixed: Tensor, n_new: int, power: float, generator: torch.Generator) -> Tensor:
    """n_new seeds from ``x_u``, each drawn with probability ∝ (distance to the nearest of ``fixed`` and
    the seeds so far)^power (power 2 = k-means++)."""
    chosen: list[Tensor] = []
    d2 = _sqdist(x_u, fixed).min(1).values if len(fixed) else None
    for _ in range(n_new):
        if d2 is None:
            idx = torch.randint(len(x_u), (1,), generator=generator)
        else:
            w = d2.double().sqrt().pow(power) if power != 2 else d2.double()
            if float(w.sum()) <= 0:
                w = torch.ones_like(w)
            idx = torch.multinomial(w.cpu(), 1, generator=generator).to(x_u.device)
        c = x_u[idx]
        chosen.append(c)
        dc = _sqdist(x_u, c)[:, 0]
        d2 = dc if d2 is None else torch.minimum(d2, dc)
    return torch.cat(chosen) if chosen else x_u.new_zeros(0, x_u.shape[1])


def ss_kmeans_gcd(
    x_l: Tensor,
    y_l: Tensor,
    x_u: Tensor,
    num_clusters: int,
    num_old: int,
    *,
    n_init: int = 10,
    max_iter: int = 10,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, float]:
    """GCD semi-supervised k-means (card §2.5 B2). Returns ``(centroids [K, d], inertia)``.

    The returned centroids are those of the lowest-inertia iteration **before** its update, so the
    nearest-centroid assignment of ``x_u`` reproduces that iteration's labels.
    """
    gen = generator or torch.Generator().manual_seed(0)
    means = class_means(x_l, y_l, range(num_old))
    x_all = torch.cat([x_u, x_l])
    best_c, best_inertia = None, float("inf")
    for _ in range(n_init):
        c = torch.cat([means, _seed(x_u, means, num_clusters - num_old, 2.0, gen)])
        run_c, run_inertia = c, float("inf")
        for _ in range(max_iter):
            d_u = _sqdist(x_u, c)
            a_u = d_u.argmin(1)
            inertia = float(d_u.gather(1, a_u[:, None]).sum() + (x_l - c[y_l]).pow(2).sum())
            if inertia < run_inertia:
                run_c, run_inertia = c.clone(), inertia
            new_c = _update(x_all, torch.cat([a_u, y_l]), c)
            shift = float((new_c - c).norm(dim=1).sum()) ** 2
            c = new_c
            if shift < tol:
                break
        if run_inertia < best_inertia:
            best_c, best_inertia = run_c, run_inertia
    return best_c, best_inertia


def ncd_kmeans(
    x_l: Tensor,
    y_l: Tensor,
    x_u: Tensor,
    num_new: int,
    num_old: int,
    *,
    n_init: int = 10,
    max_iter: int = 1000,
    tol: float = 1e-10,
    seed_power: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, float]:
    """NCD k-means (card §2.5 B3). Returns ``(known means [K_old, d], novel centroids [K_new, d], inertia)``.

    Seeds ∝ distance^``seed_power`` (1 as released, 2 = k-means++) to the nearest known or chosen
    centroid; plain k-means on ``x_u`` with the novel centroids (stop when the total squared centroid
    shift Σ_k ||Δc_k||² < ``tol``); inertia = Σ Euclidean distances; lowest of ``n_init`` restarts.
    """
    gen = generator or torch.Generator().manual_seed(0)
    known = class_means(x_l, y_l, range(num_old))
    best_c, best_inertia = None, float("inf")
    for _ in range(n_init):
        c = _seed(x_u, known, num_new, float(seed_power), gen)
        for _ in range(max_iter):
            a = _sqdist(x_u, c).argmin(1)
            new_c = _update(x_u, a, c)
            shift = float((new_c - c).pow(2).sum())
            c = new_c
            if shift < tol:
                break
        inertia = float(_sqdist(x_u, c).min(1).values.sqrt().sum())
        if inertia < best_inertia:
            best_c, best_inertia = c, inertia
    return known, best_c, best_inertia


def estimate_k_brent(
    feats: Tensor | np.ndarray,
    y_labelled: Tensor | np.ndarray,
    k_min: int,
    k_max: int,
    random_state: int = 0,
    n_init: int = 10,
) -> int:
    """GCD's estimator (card §2.7): ``K̂ = int(argmin_K −ACC(y_L, KMeans(int(K)).fit(all)[L]))`` by bounded
    Brent over ``[k_min, k_max]``. The first ``len(y_labelled)`` rows of ``feats`` are the labelled ones."""
    from scipy.optimize import minimize_scalar
    from sklearn.cluster import KMeans

    x = np.asarray(feats.cpu() if isinstance(feats, Tensor) else feats, dtype=np.float64)
    y = np.asarray(y_labelled.cpu() if isinstance(y_labelled, Tensor) else y_labelled, dtype=np.int64)
    n_l = len(y)

    def g(k: float) -> float:
        km = KMeans(int(k), n_init=n_init, random_state=random_state).fit(x)
        return -cluster_accuracy(y, km.labels_[:n_l], old_classes=np.unique(y), variant="v2")["all"]

    res = minimize_scalar(g, bounds=(int(k_min), int(k_max)), method="bounded")
    return int(res.x)


def estimate_k_silhouette(feats: Tensor | np.ndarray, k_max: int, k_min: int = 2, random_state: int = 0) -> int:
    """NCD estimator (card §2.7): ``argmax_{K_u ∈ [k_min, k_max]}`` of the Euclidean silhouette of
    ``KMeans(K_u, n_init=10, random_state=0)`` on the unlabelled latent features."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = np.asarray(feats.cpu() if isinstance(feats, Tensor) else feats, dtype=np.float64)
    scores = {
        k: silhouette_score(x, KMeans(k, n_init=10, random_state=random_state).fit_predict(x))
        for k in range(int(k_min), int(k_max) + 1)
    }
    return max(scores, key=lambda k: (scores[k], -k))


def estimate_num_clusters(
    kind: str, feats_l: Tensor, y_l: Tensor, feats_u: Tensor, num_old: int, k_max: int | None = None, n_init: int = 10
) -> int:
    """The head size K̂ for ``k_mode: estimated`` (card §2.7), from D_L labels and features only.

    ``gcd``: :func:`estimate_k_brent` on ``D_L ∪ D_U`` (labelled rows first) over ``[K_old, k_max]``
    (``None`` → 4·K_old); returns K̂. ``ncd``: :func:`estimate_k_silhouette` on the D_U features over
    ``[2, k_max]`` (``None`` → 2·K_old); returns ``K_old + K̂_u`` (known head + novel clusters). No D_U
    label is an input. Features are used as given (normalise them beforehand if wanted).
    """
    if kind == "ncd":
        return int(num_old) + estimate_k_silhouette(feats_u, k_max=k_max or 2 * int(num_old))
    return estimate_k_brent(
        torch.cat([feats_l, feats_u]), y_l, k_min=int(num_old), k_max=k_max or 4 * int(num_old), n_init=n_init
    )


def record_k_hat(strategy: Strategy, num_clusters: int, num_old: int) -> None:
    """Keep K̂ on the strategy (``strategy.k_hat``; :meth:`run_info`) and write ``train/k_hat`` to
    TensorBoard at once (``ctx.log_train`` would drop a scalar logged only once between its
    ``log_every`` steps). ``k_hat`` is the total K̂ on gcd and the novel-cluster count K̂_u on ncd."""
    kind = strategy.ctx.scenario.get("kind")
    strategy.k_hat = int(num_clusters) - (int(num_old) if kind == "ncd" else 0)
    strategy.ctx.log_scalars({"k_hat": strategy.k_hat})


def run_info(strategy: Strategy) -> dict:
    """Run-level facts a discovery strategy exposes (``k_hat``: the estimated cluster count, or
    ``None`` when K was given); the runner stores it as ``sessions[i].strategy_info`` in results.json."""
    return {"k_hat": getattr(strategy, "k_hat", None), "num_clusters": getattr(strategy, "num_clusters", None)}


class _FeatureClustering(Strategy):
    """Shared feature extraction and prediction of the k-means baselines."""

    supports = frozenset({"gcd", "ncd"})

    def __init__(
        self,
        features: Literal["backbone", "input"] = "backbone",
        normalize: bool = True,
        n_init: int = 10,
        k_max: int | None = None,
    ):
        self.features = features
        self.normalize = normalize
        self.n_init = n_init
        self.k_max = k_max
        self.centroids: Tensor | None = None
        self.encoder = None
        self.k_hat: int | None = None

    def _validate(self) -> None:
        if self.features not in ("backbone", "input"):
            raise ValueError(f"{self.name}: features must be 'backbone' or 'input', got {self.features!r}")

    def _encode_batch(self, x: Tensor) -> Tensor:
        z = self.encoder(x).float() if self.features == "backbone" else x.flatten(1).float()
        return l2_features(z) if self.normalize else z

    @torch.no_grad()
    def _encode(self, data) -> tuple[Tensor, Tensor]:
        from openworld.data.views import batches

        if self.features == "backbone" and self.encoder is None:
            torch.manual_seed(self.ctx.derive_seed("kmeans-encoder"))
            self.encoder = self.ctx.create_backbone().to(self.ctx.device).eval()
        feats, ys = [], []
        for xb, yb in batches(data, self.ctx.eval_batch_size, device=self.ctx.device, num_workers=self.ctx.num_workers):
            feats.append(self._encode_batch(xb))
            ys.append(yb)
        return torch.cat(feats), torch.cat(ys)

    def _k(self, session, x_l: Tensor, y_l: Tensor, x_u: Tensor) -> int:
        """Head size: K given by the scenario, or K̂ (gcd) / K_old + K̂_u (ncd) estimated (card §2.7)."""
        k = session.info.get("num_clusters")
        if k is not None:
            self.num_clusters = int(k)
            return int(k)
        k_old = int(session.info["num_old"])
        k_hat = estimate_num_clusters(self.ctx.scenario.get("kind", "gcd"), x_l, y_l, x_u, k_old, self.k_max)
        self.num_clusters = k_hat
        record_k_hat(self, k_hat, k_old)
        return k_hat

    def run_info(self) -> dict:
        return run_info(self)

    def feature_cache_key(self) -> str | None:
        if self.centroids is None:
            return None
        h = hashlib.sha256(self.centroids.detach().cpu().numpy().tobytes()).hexdigest()[:16]
        return f"{self.name}:{self.features}:{h}"

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self._encode_batch(x)

    def predict_features(self, z: Tensor) -> Prediction:
        return Prediction(logits=-_sqdist(z, self.centroids))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        return self.predict_features(self._encode_batch(x))

    def state_dict(self) -> dict:
        return {
            "centroids": None if self.centroids is None else self.centroids.cpu(),
            "encoder": None if self.encoder is None else self.encoder.state_dict(),
            "k_hat": self.k_hat,
        }

    def load_state_dict(self, state: dict) -> None:
        self.centroids = None if state["centroids"] is None else state["centroids"].to(self.ctx.device)
        self.k_hat = state.get("k_hat")
        if state.get("encoder") is not None:
            self.encoder = self.ctx.create_backbone().to(self.ctx.device).eval()
            self.encoder.load_state_dict(state["encoder"])


@register_strategy("kmeans")
class KMeansBaseline(_FeatureClustering):
    """B1: scikit-learn k-means on L2-normalised features of D_L ∪ D_U (labels unused).

    Parameters: ``features`` (``backbone`` | ``input``), ``normalize``, ``n_init`` (10), ``max_iter``
    (300), ``k_max`` (upper bound when K is estimated; ``None`` → 4·K_old on gcd, 2·K_old novel on ncd).
    """

    name = "kmeans"

    def __init__(
        self,
        features: Literal["backbone", "input"] = "backbone",
        normalize: bool = True,
        n_init: int = 10,
        max_iter: int = 300,
        k_max: int | None = None,
    ):
        super().__init__(features, normalize, n_init, k_max)
        self.max_iter = max_iter

    def learn(self, session) -> None:
        from sklearn.cluster import KMeans

        self._validate()
        x_l, y_l = self._encode(session.labeled)
        x_u, _ = self._encode(session.unlabeled)
        if self.ctx.scenario.get("kind") == "ncd":
            # NCD: D_U holds only new classes; cluster it into K_new groups placed in the novel head,
            # after the labelled class means (used only by the known-class evaluation).
            k_old = int(session.info.get("num_old", len(session.classes.known)))
            k_new = self._k(session, x_l, y_l, x_u) - k_old
            km = KMeans(k_new, init="k-means++", n_init=self.n_init, max_iter=self.max_iter, random_state=0)
            km.fit(x_u.cpu().numpy().astype(np.float64))
            centers = torch.as_tensor(km.cluster_centers_, dtype=torch.float32, device=self.ctx.device)
            self.centroids = torch.cat([class_means(x_l, y_l, range(k_old)), centers])
            return
        k = self._k(session, x_l, y_l, x_u)
        km = KMeans(k, init="k-means++", n_init=self.n_init, max_iter=self.max_iter, random_state=0)
        km.fit(torch.cat([x_l, x_u]).cpu().numpy().astype(np.float64))
        self.centroids = torch.as_tensor(km.cluster_centers_, dtype=torch.float32, device=self.ctx.device)


@register_strategy("ss_kmeans")
class SSKMeans(_FeatureClustering):
    """Semi-supervised k-means: B2 (GCD) on ``gcd`` scenarios, B3 (NCD k-means) on ``ncd``.

    Parameters: ``features``, ``normalize``, ``n_init`` (10), ``max_iter`` (``None`` → 10 on gcd, the
    GCD argparse default; 1000 on ncd), ``tol`` (``None`` → 1e-4 gcd / 1e-10 ncd),
    ``ncd_kmeans_seed_power`` (1 as released, 2 = k-means++), ``k_max``.
    """

    name = "ss_kmeans"

    def __init__(
        self,
        features: Literal["backbone", "input"] = "backbone",
        normalize: bool = True,
        n_init: int = 10,
        max_iter: int | None = None,
        tol: float | None = None,
        ncd_kmeans_seed_power: int = 1,
        k_max: int | None = None,
    ):
        super().__init__(features, normalize, n_init, k_max)
        self.max_iter = max_iter
        self.tol = tol
        self.ncd_kmeans_seed_power = ncd_kmeans_seed_power

    def learn(self, session) -> None:
        self._validate()
        if self.ncd_kmeans_seed_power not in (1, 2):
            raise ValueError(f"ss_kmeans: ncd_kmeans_seed_power must be 1 or 2, got {self.ncd_kmeans_seed_power!r}")
        x_l, y_l = self._encode(session.labeled)
        x_u, _ = self._encode(session.unlabeled)
        k_old = int(session.info.get("num_old", len(session.classes.known)))
        gen = torch.Generator().manual_seed(self.ctx.derive_seed("ss_kmeans"))
        if self.ctx.scenario.get("kind") == "ncd":
            k = self._k(session, x_l, y_l, x_u)
            known, novel, _ = ncd_kmeans(
                x_l,
                y_l,
                x_u,
                k - k_old,
                k_old,
                n_init=self.n_init,
                max_iter=self.max_iter or 1000,
                tol=1e-10 if self.tol is None else self.tol,
                seed_power=self.ncd_kmeans_seed_power,
                generator=gen,
            )
            self.centroids = torch.cat([known, novel])
            return
        k = self._k(session, x_l, y_l, x_u)
        self.centroids, _ = ss_kmeans_gcd(
            x_l,
            y_l,
            x_u,
            k,
            k_old,
            n_init=self.n_init,
            max_iter=self.max_iter or 10,
            tol=1e-4 if self.tol is None else self.tol,
            generator=gen,
        )
