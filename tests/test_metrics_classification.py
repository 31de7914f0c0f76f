"""Classification metric functions: spec vectors (metrics.md §11 A), tie rule, library equivalences."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openworld.metrics import (
    accuracy,
    balanced_accuracy,
    confusion_counts,
    group_mean_accuracy,
    group_micro_accuracy,
    harmonic_mean,
    per_class_accuracy,
    target_rank,
    topk_accuracy,
)

TOL = 1e-6

# §11 A
Y_A = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
P_A = [0, 0, 0, 1, 2, 1, 1, 0, 2, 3, 3, 3]
CM_A = [[3, 1, 1, 0, 0], [1, 2, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 0, 0]]
S_A = [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.3, 0.5], [0.4, 0.35, 0.25], [0.3, 0.3, 0.4]]
YS_A = [1, 1, 0, 2, 2]


def test_vector_a_counts_and_metrics():
    cmx = confusion_counts(Y_A, P_A, 5)
    assert cmx.dtype == torch.int64 and cmx.shape == (5, 6)
    assert cmx[:, :5].tolist() == CM_A
    assert cmx[:, 5].tolist() == [0] * 5
    assert accuracy(cmx) == pytest.approx(0.666667, abs=TOL)
    pc = per_class_accuracy(cmx)
    assert pc.dtype == torch.float64
    np.testing.assert_allclose(pc[:4].numpy(), [0.6, 0.666667, 0.5, 1.0], atol=TOL)
    assert math.isnan(pc[4])
    assert balanced_accuracy(cmx) == pytest.approx(0.691667, abs=TOL)


def test_vector_a_input_types_agree():
    ref = confusion_counts(Y_A, P_A, 5)
    for conv in (np.asarray, lambda v: np.asarray(v, dtype=np.int32), torch.tensor,
                 lambda v: torch.tensor(v, dtype=torch.int32), lambda v: torch.tensor(v, dtype=torch.uint8)):
        assert torch.equal(confusion_counts(conv(Y_A), conv(P_A), 5), ref)


def test_vector_a_padding_and_rejection():
    ref = confusion_counts(Y_A, P_A, 5)
    padded = confusion_counts(Y_A + [-1, -1, 7], P_A + [0, 3, 1], 5)  # y=-1 and y out of range: ignored
    assert torch.equal(padded, ref)
    rej = confusion_counts(Y_A + [0], P_A + [-1], 5)  # (y=0, p=-1): an error, kept in the last column
    assert rej[0, 5] == 1
    assert accuracy(rej) == pytest.approx(8 / 13, abs=TOL)
    assert per_class_accuracy(rej)[0] == pytest.approx(0.5, abs=TOL)
    big = confusion_counts([1], [99], 5)  # a prediction beyond K also lands in the last column
    assert big[1, 5] == 1 and accuracy(big) == 0.0


def test_square_matrix_accepted():
    cm = np.asarray(CM_A)
    assert accuracy(cm) == pytest.approx(0.666667, abs=TOL)
    assert balanced_accuracy(cm) == pytest.approx(0.691667, abs=TOL)


def test_empty_is_nan():
    cmx = confusion_counts([], [], 3)
    assert cmx.sum() == 0
    assert math.isnan(accuracy(cmx)) and math.isnan(balanced_accuracy(cmx))
    assert math.isnan(topk_accuracy(torch.zeros(2, 3), [-1, -1], 1))


def test_bad_inputs():
    with pytest.raises(TypeError):
        confusion_counts([0.0, 1.0], [0, 1], 2)
    with pytest.raises(ValueError):
        confusion_counts([0, 1], [0], 2)
    with pytest.raises(ValueError):
        group_mean_accuracy(confusion_counts(Y_A, P_A, 5), [5])
    with pytest.raises(ValueError):
        accuracy(torch.zeros(3, 5))


def test_vector_a_topk():
    assert topk_accuracy(S_A, YS_A, 1) == pytest.approx(0.4, abs=TOL)
    assert topk_accuracy(torch.tensor(S_A), torch.tensor(YS_A), 2) == pytest.approx(0.6, abs=TOL)
    assert topk_accuracy(S_A, YS_A, 3) == pytest.approx(1.0, abs=TOL)


def test_topk_tie_rule():
    z = torch.tensor([[1.0, 1.0, 1.0], [2.0, 5.0, 5.0], [0.0, 3.0, 3.0]])
    # rank_y = #{z_c > z_y} + #{c < y: z_c == z_y}
    assert target_rank(z, torch.tensor([0, 2, 1])).tolist() == [0, 1, 0]
    assert target_rank(z, torch.tensor([2, 1, 2])).tolist() == [2, 0, 1]
    assert topk_accuracy(z, [2, 2, 2], 1) == 0.0
    assert topk_accuracy(z, [2, 2, 2], 2) == pytest.approx(2 / 3)
    # ignored labels do not count in N
    assert topk_accuracy(z, [0, -1, 1], 1) == 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_top1_equals_argmax_with_ties(c, n, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, 3, (n, c), generator=g).float()  # many exact ties
    y = torch.randint(0, c, (n,), generator=g)
    expected = (z.argmax(dim=1) == y).double().mean().item()
    assert topk_accuracy(z, y, 1) == pytest.approx(expected, abs=1e-12)


def test_topk_matches_sklearn_without_ties():
    from sklearn.metrics import top_k_accuracy_score

    rng = np.random.default_rng(0)
    for k_cls, n in ((7, 300), (30, 500)):
        z = rng.standard_normal((n, k_cls))
        y = rng.integers(0, k_cls, n)
        for k in (1, 2, 5):
            ref = top_k_accuracy_score(y, z, k=k, labels=np.arange(k_cls))
            assert topk_accuracy(torch.from_numpy(z), y, k) == pytest.approx(ref, abs=1e-12)
            assert topk_accuracy(torch.from_numpy(z).half(), y, k) == pytest.approx(
                top_k_accuracy_score(y, torch.from_numpy(z).half().float().numpy(), k=k, labels=np.arange(k_cls)),
                abs=0.02)  # fp16 rounding creates a few ties; sklearn breaks them the other way


def test_harmonic_mean_t4():
    assert harmonic_mean(0.8, 0.5) == pytest.approx(0.61538462, abs=TOL)  # fscil card T4 (61.538462 %)
    assert harmonic_mean(80, 50) == pytest.approx(61.538462, abs=TOL)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(0.7, 0.0) == 0.0
    assert math.isnan(harmonic_mean(math.nan, 0.5)) and math.isnan(harmonic_mean(0.0, math.nan))


def test_group_accuracies():
    y = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4]
    p = [0, 0, 0, 3, 1, 1, 1, 1, 2, 2, 0, 4, 3, 3, 0, 4, 2]
    cmx = confusion_counts(y, p, 6)  # class 5 has no sample
    assert group_mean_accuracy(cmx, [0, 1, 2]) == pytest.approx(0.75, abs=TOL)
    assert group_mean_accuracy(cmx, [3, 4]) == pytest.approx(0.583333, abs=TOL)
    assert group_mean_accuracy(cmx, [3, 4, 5]) == pytest.approx(0.583333, abs=TOL)  # support > 0 only
    assert math.isnan(group_mean_accuracy(cmx, [5])) and math.isnan(group_mean_accuracy(cmx, []))
    assert group_micro_accuracy(cmx, [3, 4]) == pytest.approx(3 / 5, abs=TOL)
    assert group_micro_accuracy(cmx, np.arange(6)) == pytest.approx(accuracy(cmx), abs=1e-12)
    assert math.isnan(group_micro_accuracy(cmx, [5]))


def _random_case(rng, k, n, pad=True):
    y = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    if pad:
        y = np.where(rng.random(n) < 0.1, -1, y)
    # leave some classes without support
    y = np.where(np.isin(y, [1]), -1, y)
    return y, p


def test_counts_match_torchmetrics_confusion_matrix():
    from torchmetrics.classification import MulticlassConfusionMatrix

    rng = np.random.default_rng(1)
    for k, n in ((2, 50), (10, 1000), (37, 3000)):
        y, p = _random_case(rng, k, n)
        tm = MulticlassConfusionMatrix(num_classes=k, ignore_index=-1)
        tm.update(torch.from_numpy(p), torch.from_numpy(y))
        ours = confusion_counts(y, p, k)
        assert torch.equal(ours[:, :k], tm.compute().long())
        assert ours[:, k].sum() == 0


def test_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

    rng = np.random.default_rng(2)
    for k, n in ((3, 40), (10, 1000), (50, 2000)):
        y, p = _random_case(rng, k, n)
        keep = y >= 0
        cmx = confusion_counts(y, p, k)
        assert np.array_equal(cmx[:, :k].numpy(), confusion_matrix(y[keep], p[keep], labels=np.arange(k)))
        assert accuracy(cmx) == pytest.approx(accuracy_score(y[keep], p[keep]), abs=1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
            ref = balanced_accuracy_score(y[keep], p[keep])
        assert balanced_accuracy(cmx) == pytest.approx(ref, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.lists(st.tuples(st.integers(-2, 9), st.integers(-2, 9)), max_size=60))
def test_counts_match_python_reference(k, pairs):
    y = [a for a, _ in pairs]
    p = [b for _, b in pairs]
    ref = np.zeros((k, k + 1), dtype=np.int64)
    for a, b in pairs:
        if 0 <= a < k:
            ref[a, b if 0 <= b < k else k] += 1
    assert np.array_equal(confusion_counts(y, p, k).numpy(), ref)
