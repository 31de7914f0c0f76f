"""Label metrics: class distances and the expected squared label distance (Loki, ``docs/methods/loki.md``).

A label metric d is a [K, K] matrix of distances between class ids (d(i, i) = 0, symmetric). Two builders:

* :func:`hierarchy_distances`: the shortest-path length in a rooted tree whose leaves are the classes, each
  class given by its path from the root (e.g. ``("Greek", "character03")``, or CIFAR-100's
  ``(superclass, class)``): d(i, j) = |p_i| + |p_j| − 2·|lcp(p_i, p_j)| (lcp = longest common prefix), which is
  what ``networkx.shortest_path_length`` gives on the tree ``root → p[0] → p[0]/p[1] → …``;
  (:func:`class_paths` splits class names such as ``"Greek/character03"`` into such paths);
* :func:`euclidean_distances`: ‖e_i − e_j‖₂ between class embeddings (class prototypes, text embeddings).

The evaluation measure (Roberts et al., NeurIPS 2023, §5) is the expected squared distance between the
prediction and the true label, ESD = (1/N) Σ_n d(ŷ_n, y_n)²: from predictions
(:func:`expected_squared_distance`) or from a confusion matrix (:func:`expected_squared_distance_from_confusion`,
rows = true class, as the metrics engine stores it), which gives the same number without the samples.
The classification engine reports it as ``esd`` when its eval set has a label metric
(``MetricsEngine(label_metric=…)``; recipes: ``metrics.label_metric``).
Pure torch functions, float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def hierarchy_distances(paths: Sequence[Sequence[str]]) -> Tensor:
    """Tree path lengths [K, K] (float64) between the leaves given by their root-to-leaf ``paths``.

    Paths may have different depths; two classes must not share a path (they would be one leaf), and no
    path may be a prefix of another (a class would be an inner node).
    """
    paths = [tuple(str(p) for p in path) for path in paths]
    if not paths:
        return torch.zeros(0, 0, dtype=torch.float64)
    if any(len(p) == 0 for p in paths):
        raise ValueError("hierarchy_distances: every class needs a non-empty path from the root")
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"hierarchy_distances: two classes share the path {dup!r}")
    prefixes = {p[:k] for p in paths for k in range(1, len(p))}
    inner = [p for p in paths if p in prefixes]
    if inner:
        raise ValueError(f"hierarchy_distances: class path {inner[0]!r} is an inner node of another class's path")
    depth = max(len(p) for p in paths)
    # node[l, i] = id of the ancestor of class i at depth l + 1 (−1 below a short path): ids are shared exactly
    # when the prefixes are equal, so the common-prefix length is a cumulative product over levels
    ids: dict[tuple[str, ...], int] = {}
    node = torch.full((depth, len(paths)), -1, dtype=torch.long)
    for i, p in enumerate(paths):
        for k in range(len(p)):
            node[k, i] = ids.setdefault(p[: k + 1], len(ids))
    same = (node[:, :, None] == node[:, None, :]) & (node[:, :, None] >= 0)
    lcp = torch.cumprod(same.to(torch.long), dim=0).sum(0)
    lengths = torch.tensor([len(p) for p in paths], dtype=torch.long)
    return (lengths[:, None] + lengths[None, :] - 2 * lcp).to(torch.float64)


def class_paths(names, sep: str = "/", where: str = "label metric 'hierarchy'") -> list[tuple[str, ...]]:
    """Root-to-leaf paths of the class names: ``"Greek/character03"`` → ``("Greek", "character03")``."""
    paths = [tuple(str(n).split(sep)) for n in names]
    if not paths or all(len(p) == 1 for p in paths):
        raise ValueError(
            f"{where}: needs class names with the separator {sep!r} (e.g. Omniglot's "
            f"'<alphabet>/<character>'); got {[str(n) for n in list(names)[:3]]}"
        )
    return paths


def euclidean_distances(embeddings: Tensor) -> Tensor:
    """‖e_i − e_j‖₂ [K, K] (float64) between the rows of ``embeddings`` [K, d]; exactly 0 on the diagonal."""
    e = embeddings.detach().to(torch.float64)
    if e.ndim != 2:
        raise ValueError(f"euclidean_distances: embeddings must be [K, d], got shape {tuple(e.shape)}")
    sq = (e[:, None, :] - e[None, :, :]).pow(2).sum(-1)  # direct differences: no cancellation, exact zeros
    return sq.sqrt()


def _check_metric(dist: Tensor, where: str) -> Tensor:
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"{where}: the label metric must be a square [K, K] matrix, got {tuple(dist.shape)}")
    return dist.to(torch.float64)


def reported_value(name: str, value: float) -> float:
    """A metric as results.json, TensorBoard and tables store it: fractions ×100 (metrics.md "Units"); the
    expected squared distances (``esd``, ``esd_<group>``) are in squared label-metric units and stay as they are."""
    return value if name == "esd" or name.startswith("esd_") else value * 100


def check_label_metric(dist, num_classes: int, where: str = "label_metric") -> Tensor:
    """``dist`` as a float64 [K, K] tensor (CPU), checked: finite, ≥ 0, symmetric, zero diagonal."""
    d = torch.as_tensor(dist, dtype=torch.float64).cpu()
    k = int(num_classes)
    if d.shape != (k, k):
        raise ValueError(f"{where}: must be a [{k}, {k}] matrix of class distances, got shape {tuple(d.shape)}")
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError(f"{where}: distances must be finite and ≥ 0")
    if bool((torch.diagonal(d) != 0).any()) or not torch.equal(d, d.T):
        raise ValueError(f"{where}: must be symmetric with a zero diagonal (d(i, i) = 0, d(i, j) = d(j, i))")
    return d


def expected_squared_distance(pred: Tensor, target: Tensor, dist: Tensor) -> Tensor:
    """ESD = mean_n d(ŷ_n, y_n)² (float64 scalar); ``pred``/``target`` are class ids indexing ``dist``."""
    d = _check_metric(dist, "expected_squared_distance")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long().to(pred.device)
    if pred.shape != target.shape:
        raise ValueError(f"expected_squared_distance: {pred.numel()} predictions for {target.numel()} targets")
    if pred.numel() == 0:
        raise ValueError("expected_squared_distance: no samples")
    k = d.shape[0]
    if bool(((pred < 0) | (pred >= k) | (target < 0) | (target >= k)).any()):
        raise ValueError(f"expected_squared_distance: class ids outside 0..{k - 1}")
    return d.to(pred.device)[pred, target].pow(2).mean()


def expected_squared_distance_from_confusion(confusion: Tensor, dist: Tensor) -> Tensor:
    """ESD from counts: Σ_{y,ŷ} C[y, ŷ]·d(y, ŷ)² / Σ C (rows of ``confusion`` = true class; float64 scalar)."""
    d = _check_metric(dist, "expected_squared_distance_from_confusion")
    c = torch.as_tensor(confusion).to(torch.float64)
    if c.shape != d.shape:
        raise ValueError(
            f"expected_squared_distance_from_confusion: confusion {tuple(c.shape)} and metric {tuple(d.shape)} differ"
        )
    total = c.sum()
    if total <= 0:
        raise ValueError("expected_squared_distance_from_confusion: the confusion matrix is empty")
    return (c * d.to(c.device).pow(2)).sum() / total
