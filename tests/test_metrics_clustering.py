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
    "A": (
        _d("0000 1111 2222 3333"),
        _d("0001 1111 0022 3332"),
        [0, 1],
        (0.75, 0.875, 0.625),
        (0.75, 0.875, 0.625),
        (0.75, 0.875, 0.625),
        0.656880,
        0.444444,
    ),
    "C": (
        _d("00 11 2222"),
        _d("22 00 1110"),
        [0, 1],
        (0.875, 1, 0.75),
        (0.916667, 1, 0.75),
        (0.875, 1, 0.75),
        0.755004,
        0.545455,
    ),
    "D": (
        _d("0000 1111 2222"),
        _d("0000 0001 2222"),
        [0],
        (0.75, 1, 0.625),
        (0.75, 1, 0.625),
        (0.916667, 1, 0.875),
        0.705077,
        0.504505,
    ),
    "E": (
        _d("000 111 222222"),
        _d("551 111 777715"),
        [0],
        (0.75, 0.666667, 0.777778),
        (0.777778, 0.666667, 0.833333),
        (0.75, 0.666667, 0.777778),
        0.457801,
        0.283388,
    ),
    # card gcd-ncd §7 T1 E2 (K̂ > K)
    "E2": (
        [0, 0, 1, 1, 2, 2],
        [0, 0, 1, 1, 3, 4],
        [0],
        (0.833333, 1, 0.75),
        (0.833333, 1, 0.75),
        (0.833333, 1, 0.75),
        0.9049,
        0.7619,
    ),
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
    eng = create_engine("clustering", num_classes=max(y) + 1, device="cpu", old_classes=old, variants=["v2b", "v1"])
    yt, pt = torch.tensor(y), torch.tensor(p)
    logits = torch.nn.functional.one_hot(pt, kp).float()
    for i in range(0, len(y), 3):  # several batches, plus a hidden-label row that must be ignored
        eng.observe(logits[i : i + 3], yt[i : i + 3])
    eng.observe(logits[:1], torch.tensor([-1]))
    m = eng.compute()
    for variant, ref in (("v2", v2), ("v2b", v2b), ("v1", v1)):
        assert (m[f"all_{variant}"], m[f"old_{variant}"], m[f"new_{variant}"]) == pytest.approx(ref, abs=1e-6)
        assert (m[f"all_{variant}"], m[f"old_{variant}"], m[f"new_{variant}"]) == pytest.approx(
            _triple(cluster_accuracy(y, p, old, variant)), abs=1e-12
        )
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


# -- inductive_mapping: from_transductive (card §1.5) -------------------------------------------------
def test_fixed_assignment_exact_values():
    from openworld.metrics.clustering import assignment_from_counts, cluster_accuracy_with_assignment

    # transductive set: toy D (K_old = 1), where the v1 assignment differs from the v2 one
    w_u = count_matrix(_d("0000 1111 2222"), _d("0000 0001 2222"))
    assert assignment_from_counts(w_u, [0], "v2").tolist() == [0, 1, 2]
    assert assignment_from_counts(w_u, [0], "v1").tolist() == [0, 0, 2]  # old and new matched apart
    # inductive set scored with those assignments
    y_t, p_t = [0, 1, 1, 2], [0, 0, 0, 2]
    w_t = count_matrix(y_t, p_t)
    exp = {"v2": (0.5, 1.0, 1 / 3), "v2b": (2 / 3, 1.0, 0.5), "v1": (1.0, 1.0, 1.0)}
    for v, ref in exp.items():
        a = assignment_from_counts(w_u, [0], v)
        assert _triple(cluster_accuracy_with_assignment(w_t, [0], a, v)) == pytest.approx(ref, abs=1e-12), v
    # its own (fresh) Hungarian gives other numbers: class 1 takes cluster 0
    assert _triple(cluster_accuracy(y_t, p_t, [0], "v2")) == pytest.approx((0.75, 0.0, 1.0))
    # a permuted transductive clustering: the test set's identity clustering scores only the unpermuted class
    w_perm = count_matrix([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 2, 2])
    a = assignment_from_counts(w_perm, [0, 1], "v2")
    r = cluster_accuracy_with_assignment(count_matrix([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]), [0, 1], a, "v2")
    assert _triple(r) == pytest.approx((1 / 3, 0.0, 1.0))
    # classes or clusters the assignment does not cover score nothing; an empty subset is NaN
    r = cluster_accuracy_with_assignment(count_matrix([0, 3, 3], [0, 4, 4]), [0], [0], "v2")
    assert _triple(r) == pytest.approx((1 / 3, 1.0, 0.0))
    r = cluster_accuracy_with_assignment(count_matrix([3, 3], [1, 1]), [0], [0, 2, 2, 1], "v2")
    assert math.isnan(r["old"]) and r["all"] == r["new"] == 1.0


def test_fixed_assignment_on_itself_equals_fresh_hungarian():
    from openworld.metrics.clustering import assignment_from_counts, cluster_accuracy_with_assignment

    rng = np.random.default_rng(5)
    for _ in range(30):
        n = int(rng.integers(1, 50))
        y, p = rng.integers(0, 6, n), rng.integers(0, 9, n)
        w = count_matrix(y, p)
        for v in ("v2", "v2b", "v1"):
            ref = _triple(cluster_accuracy(y, p, [0, 1, 2], v))
            got = _triple(cluster_accuracy_with_assignment(w, [0, 1, 2], assignment_from_counts(w, [0, 1, 2], v), v))
            assert got == pytest.approx(ref, nan_ok=True), v


def _one_hot(p, width):
    return torch.nn.functional.one_hot(torch.tensor(p), width).float()


def test_engines_share_the_transductive_assignment():
    from openworld.metrics.clustering import SharedAssignment

    shared = SharedAssignment()
    unl = create_engine("clustering", num_classes=3, old_classes=[0], variants=["v2b", "v1"], publish_assignment=shared)
    test = create_engine("clustering", num_classes=3, old_classes=[0], variants=["v2b", "v1"], use_assignment=shared)
    with pytest.raises(RuntimeError, match="scored before"):
        test.observe(_one_hot([0, 0, 0, 2], 3), torch.tensor([0, 1, 1, 2]))
        test.compute()
    test.reset()
    unl.observe(_one_hot(_d("0000 0001 2222"), 3), torch.tensor(_d("0000 1111 2222")))
    mu = unl.compute()
    assert (mu["all_v2"], mu["all_v1"]) == pytest.approx((0.75, 11 / 12))  # its own numbers are unchanged
    test.observe(_one_hot([0, 0, 0, 2], 3), torch.tensor([0, 1, 1, 2]))
    m = test.compute()
    assert (m["all_v2"], m["old_v2"], m["new_v2"]) == pytest.approx((0.5, 1.0, 1 / 3))
    assert (m["all_v2b"], m["old_v2b"], m["new_v2b"]) == pytest.approx((2 / 3, 1.0, 0.5))
    assert (m["all_v1"], m["old_v1"], m["new_v1"]) == pytest.approx((1.0, 1.0, 1.0))
    assert m["acc"] == m["all_v2"]
    assert (m["nmi"], m["ari"]) == pytest.approx((nmi([0, 1, 1, 2], [0, 0, 0, 2]), ari([0, 1, 1, 2], [0, 0, 0, 2])))


def test_ncd_head_offset_with_more_novel_clusters_and_shared_assignment():
    from openworld.metrics.clustering import SharedAssignment

    # K = 5 (K_old = 2), a novel head of K̂_u = 4 columns: logits have 2 + 4 = 6 > K columns
    shared = SharedAssignment()
    unl = ClusteringEngine(num_classes=5, mode="ncd", head_offset=2, publish_assignment=shared)
    logits = _one_hot([0, 0, 3, 3, 4, 5], 6) + _one_hot([2, 2, 2, 2, 2, 2], 6) * 0.5
    logits[:2, 0] = 9.0  # a known-head column wins the plain argmax, but is outside the novel head
    unl.observe(logits, torch.tensor([2, 2, 3, 3, 4, 4]))
    m = unl.compute()
    # rows 0-1 → column 2 (best novel column), 2-3 → 3, 4 → 4, 5 → 5: Hungarian 2→2, 3→3, 4→4 hits 5 of 6
    assert set(m) == {"acc", "nmi", "ari"} and m["acc"] == pytest.approx(5 / 6)
    assert m["nmi"] == pytest.approx(nmi([2, 2, 3, 3, 4, 4], [2, 2, 3, 3, 4, 5]))
    test = ClusteringEngine(num_classes=5, mode="ncd", head_offset=2, use_assignment=shared)
    test.observe(_one_hot([5, 5, 3, 4], 6), torch.tensor([2, 2, 3, 4]))
    assert test.compute()["acc"] == pytest.approx(0.5)  # classes 3, 4 keep their clusters; 2 → cluster 2, not 5
    own = ClusteringEngine(num_classes=5, mode="ncd", head_offset=2)
    own.observe(_one_hot([5, 5, 3, 4], 6), torch.tensor([2, 2, 3, 4]))
    assert own.compute()["acc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="head_offset"):
        ClusteringEngine(num_classes=5, mode="ncd", head_offset=2).observe(torch.zeros(1, 2), torch.tensor([2]))


def test_head_classification_engine():
    eng = create_engine("head_classification", num_classes=5, head=[0, 2])
    logits = torch.tensor([[1.0, 0, 9, 9, 9, 9, 9], [0, 1.0, 9, 9, 9, 9, 9], [1.0, 0, 0, 0, 0, 0, 0]])
    eng.observe(logits, torch.tensor([0, 1, 1]))  # the novel columns (9) are ignored
    m = eng.compute()
    assert m["acc"] == pytest.approx(2 / 3) and m["acc_balanced"] == pytest.approx(0.75)
    assert eng.confusion().tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="head"):
        create_engine("head_classification", num_classes=5, head=[0, 6])


def test_selection_diagnostics_count_against_ground_truth():
    from openworld.metrics.clustering import ClusteringEngine

    eng = ClusteringEngine(num_classes=4, old_classes=[0, 1])
    logits = torch.eye(4)[torch.tensor([0, 1, 1, 2, 0, 3])]  # predictions 0, 1, 1, 2, 0, 3
    y = torch.tensor([0, 0, 1, 2, 3, -1])  # the last row has no label: not counted
    sel = torch.tensor([True, True, True, False, True, True])
    eng.observe(logits[:3], y[:3], selected=sel[:3])
    eng.observe(logits[3:], y[3:], selected=sel[3:])
    m = eng.compute()
    # 5 labelled rows; selected among them: rows 0, 1, 2, 4 -> 4/5; truly old: rows 0, 1, 2 -> 3/4;
    # predicted == true: rows 0 and 2 -> 2/4
    assert (m["sel_rate"], m["sel_old"], m["sel_correct"]) == (0.8, 0.75, 0.5)
    plain = ClusteringEngine(num_classes=4, old_classes=[0, 1])
    plain.observe(logits, y)
    assert "sel_rate" not in plain.compute()
