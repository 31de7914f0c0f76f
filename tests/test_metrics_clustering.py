"""Hungarian clustering accuracy v2/v2b/v1, NMI, ARI (specs/metrics.md §6, §11 D; gcd-ncd card §7 T1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torchmetrics.functional.clustering import adjusted_rand_score as tm_ari
from torchmetrics.functional.clustering import normalized_mutual_info_score as tm_nmi

from openworld.metrics import create_engine
from openworld.metrics.clustering import ClusteringEngine, ari, cluster_accuracy, count_matrix, nmi


def _d(s: str) -> list[int]:
    return [int(c) for c in s.replace(" ", "")]


# toy: y, ŷ, old, v2, v2b, v1, NMI, ARI  (metrics.md §11 D, tolerance 1e-6)
TOYS = {
    "A": (_d("0000 1111 2222 3333"), _d("0001 1111 0022 3332"), [0, 1], (.75, .875, .625), (.75, .875, .625),
          (.75, .875, .625), 0.656880, 0.444444),
    "C": (_d("00 11 2222"), _d("22 00 1110"), [0, 1], (.875, 1, .75), (.916667, 1, .75), (.875, 1, .75),
          0.755004, 0.545455),
    "D": (_d("0000 1111 2222"), _d("0000 0001 2222"), [0], (.75, 1, .625), (.75, 1, .625), (.916667, 1, .875),
          0.705077, 0.504505),
    "E": (_d("000 111 222222"), _d("551 111 777715"), [0], (.75, .666667, .777778), (.777778, .666667, .833333),
          (.75, .666667, .777778), 0.457801, 0.283388),
    # card gcd-ncd §7 T1 E2 (K̂ > K)
    "E2": ([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 3, 4], [0], (.833333, 1, .75), (.833333, 1, .75), (.833333, 1, .75),
           0.9049, 0.7619),
}


def _triple(r: dict) -> tuple[float, float, float]:
    return r["all"], r["old"], r["new"]


@pytest.mark.parametrize("name", sorted(TOYS))
def test_toys_all_variants(name):
    y, p, old, v2, v2b, v1, nmi_ref, ari_ref = TOYS[name]
    tol = 1e-4 if name == "E2" else 1e-6
    for variant, ref in (("v2", v2), ("v2b", v2b), ("v1", v1)):
        got = _triple(cluster_accuracy(np.array(y), torch.tensor(p), old, variant=variant))
        assert got == pytest.approx(ref, abs=1e-6), (name, variant)
    assert nmi(y, p) == pytest.approx(nmi_ref, abs=tol)
    assert ari(y, p) == pytest.approx(ari_ref, abs=tol)
    assert nmi(y, p) == pytest.approx(normalized_mutual_info_score(y, p), abs=1e-12)
    assert ari(y, p) == pytest.approx(adjusted_rand_score(y, p), abs=1e-12)
    assert nmi(y, p) == pytest.approx(float(tm_nmi(torch.tensor(p), torch.tensor(y))), abs=1e-5)
    assert ari(y, p) == pytest.approx(float(tm_ari(torch.tensor(p), torch.tensor(y))), abs=1e-5)


def test_relabelling_gives_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 500)
    perm = rng.permutation(12)
    for variant in ("v2", "v2b", "v1"):
        assert _triple(cluster_accuracy(y, perm[y], [0, 1, 2], variant)) == (1.0, 1.0, 1.0)
    assert nmi(y, perm[y]) == pytest.approx(1.0) and ari(y, perm[y]) == pytest.approx(1.0)


def test_ncd_no_old_rows_gives_nan_old():
    r = cluster_accuracy([3, 3, 4, 4], [0, 0, 1, 0], old_classes=[0, 1, 2], variant="v2")
    assert math.isnan(r["old"]) and r["new"] == pytest.approx(0.75) and r["all"] == pytest.approx(0.75)
    r1 = cluster_accuracy([3, 3, 4, 4], [0, 0, 1, 0], old_classes=[0, 1, 2], variant="v1")
    assert math.isnan(r1["old"]) and r1["all"] == pytest.approx(0.75)


def test_random_against_sklearn_and_degenerate_cases():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = int(rng.integers(1, 60))
        y, p = rng.integers(0, 5, n), rng.integers(0, 8, n)
        assert nmi(y, p) == pytest.approx(normalized_mutual_info_score(y, p), abs=1e-10)
        assert ari(y, p) == pytest.approx(adjusted_rand_score(y, p), abs=1e-10)
    for y, p in (([0, 0, 0], [1, 1, 1]), ([0, 0, 0], [0, 1, 2]), ([2], [5])):
        assert nmi(y, p) == pytest.approx(normalized_mutual_info_score(y, p))
        assert ari(y, p) == pytest.approx(adjusted_rand_score(y, p))


def test_v2_matches_reference_loop():
    """The vectorised count matrix equals the per-sample loop of the official code."""
    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 6, 300), rng.integers(0, 9, 300)
    d = max(y.max(), p.max()) + 1
    w = np.zeros((d, d), dtype=np.int64)
    for i in range(len(y)):
        w[p[i], y[i]] += 1
    assert (count_matrix(y, p) == w).all()


def test_errors():
    with pytest.raises(ValueError, match="variant"):
        cluster_accuracy([0], [0], [0], variant="v3")
    with pytest.raises(TypeError, match="integer"):
        cluster_accuracy([0.5], [0], [0])
    with pytest.raises(ValueError, match="differ in length"):
        cluster_accuracy([0, 1], [0], [0])


@pytest.mark.parametrize("name", sorted(TOYS))
def test_streaming_equals_one_shot(name):
    y, p, old, v2, v2b, v1, *_ = TOYS[name]
    kp = max(p) + 1
    eng = create_engine("clustering", num_classes=max(y) + 1, device="cpu", old_classes=old,
                        variants=["v2b", "v1"])
    yt, pt = torch.tensor(y), torch.tensor(p)
    logits = torch.nn.functional.one_hot(pt, kp).float()
    for i in range(0, len(y), 3):  # several batches, plus a hidden-label row that must be ignored
        eng.observe(logits[i:i + 3], yt[i:i + 3])
    eng.observe(logits[:1], torch.tensor([-1]))
    m = eng.compute()
    for variant, ref in (("v2", v2), ("v2b", v2b), ("v1", v1)):
        assert (m[f"all_{variant}"], m[f"old_{variant}"], m[f"new_{variant}"]) == pytest.approx(ref, abs=1e-6)
        assert (m[f"all_{variant}"], m[f"old_{variant}"], m[f"new_{variant}"]) == pytest.approx(
            _triple(cluster_accuracy(y, p, old, variant)), abs=1e-12)
    assert m["nmi"] == pytest.approx(nmi(y, p)) and m["ari"] == pytest.approx(ari(y, p))


def test_engine_ncd_mode_and_out_of_range():
    eng = ClusteringEngine(num_classes=5, old_classes=[0, 1], mode="ncd")
    logits = torch.full((4, 5), -float("inf"))
    logits[:, 2:] = torch.tensor([[3.0, 0, 0], [3.0, 0, 0], [0, 3.0, 0], [3.0, 0, 0]])  # task-aware mask
    eng.observe(logits, torch.tensor([3, 3, 4, 4]))
    m = eng.compute()
    assert set(m) == {"acc", "nmi", "ari"} and m["acc"] == pytest.approx(0.75)
    eng2 = ClusteringEngine(num_classes=3, num_clusters=2)
    eng2.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        eng2.compute()
