"""FSCIL and CIL metric functions: metrics.md §11 B, C, J and fscil-teen card T4–T6."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openworld import metrics as M
from openworld.metrics import (
    acc_a_triangle,
    aia,
    aia_tasks,
    average_accuracy,
    average_session_accuracy,
    batch_mean_accuracy,
    bwt,
    cil_running_metrics,
    confusion_counts,
    forgetting,
    fscil_run_metrics,
    fscil_session_metrics,
    fwt,
    harmonic_mean,
    performance_drop,
    pooled_accuracy,
    task_accuracies,
)

TOL = 1e-6

# §11 B, session 2
Y_B = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4]
P_B = [0, 0, 0, 3, 1, 1, 1, 1, 2, 2, 0, 4, 3, 3, 0, 4, 2]

# §11 C (percent)
R_C = [[90], [80, 85], [70, 87, 88], [92, 60, 80, 86]]
N_C = [100, 100, 50, 50]

# fscil card §6: TEEN miniImageNet session accuracies (%)
TEEN_MINI = [73.53, 70.55, 66.37, 63.23, 60.53, 57.95, 55.24, 53.44, 52.08]


def test_vector_b_session_metrics():
    m = fscil_session_metrics(confusion_counts(Y_B, P_B, 5), 3, [3, 4])
    assert m["acc"] == pytest.approx(0.705882, abs=TOL)
    assert m["acc_base"] == pytest.approx(0.75, abs=TOL)
    assert m["acc_novel"] == pytest.approx(0.583333, abs=TOL)
    assert m["hm"] == pytest.approx(0.65625, abs=TOL)
    assert m["acc_balanced"] == pytest.approx(np.mean([0.75, 1, 0.5, 2 / 3, 0.5]), abs=TOL)
    # base classes as an explicit list give the same
    assert fscil_session_metrics(confusion_counts(Y_B, P_B, 5), [0, 1, 2], (3, 4)) == m


def test_session_zero_has_nan_novel_and_hm():
    y, p = [0, 0, 1, 2], [0, 1, 1, 2]
    m = fscil_session_metrics(confusion_counts(y, p, 3), 3)
    assert m["acc"] == pytest.approx(0.75) and m["acc_base"] == pytest.approx(5 / 6)
    assert math.isnan(m["acc_novel"]) and math.isnan(m["hm"])


def test_vector_b_batch_mean_chunk5():
    correct = np.asarray(Y_B) == np.asarray(P_B)
    chunks = [correct[i : i + 5] for i in range(0, len(correct), 5)]
    assert batch_mean_accuracy([c.sum() for c in chunks], [len(c) for c in chunks]) == pytest.approx(0.675, abs=TOL)


def test_vector_b_pd_avg():
    accs = [0.80, 0.75, 0.705882]
    assert performance_drop(accs) == pytest.approx(0.094118, abs=TOL)
    assert average_session_accuracy(accs) == pytest.approx(0.751961, abs=TOL)
    run = fscil_run_metrics(accs)
    assert run["pd"] == pytest.approx(0.094118, abs=TOL)
    assert run["avg"] == pytest.approx(0.751961, abs=TOL)
    assert run["last"] == pytest.approx(0.705882, abs=TOL)
    assert fscil_run_metrics([0.8]) == {"pd": 0.0, "avg": 0.8, "last": 0.8}
    assert all(math.isnan(v) for v in fscil_run_metrics([]).values())


def test_t4_hm():
    assert harmonic_mean(0.80, 0.50) == pytest.approx(0.61538462, abs=TOL)
    assert 100 * harmonic_mean(0.80, 0.50) == pytest.approx(61.538462, abs=TOL)


def test_t5_teen_mini_avg_pd():
    assert average_session_accuracy(TEEN_MINI) == pytest.approx(61.4356, abs=1e-4)
    assert performance_drop(TEEN_MINI) == pytest.approx(21.45, abs=TOL)
    fr = [a / 100 for a in TEEN_MINI]  # the functions are linear: fractions in, fractions out
    assert 100 * average_session_accuracy(fr) == pytest.approx(61.4356, abs=1e-4)
    assert 100 * performance_drop(fr) == pytest.approx(21.45, abs=TOL)


def test_t6_batch_mean_vs_sample():
    assert 100 * batch_mean_accuracy([90, 80, 10], [100, 100, 50]) == pytest.approx(63.3333, abs=1e-4)
    assert 100 * (90 + 80 + 10) / 250 == pytest.approx(72.0)
    assert batch_mean_accuracy([3, 0], [4, 0]) == 0.75  # empty chunks carry no weight
    assert math.isnan(batch_mean_accuracy([], []))


def test_vector_c_per_session():
    a_t = [90, 82.5, 81.6667, 79.5]
    pooled = [90, 82.5, 80.4, 78.3333]
    f_t = [None, 10.0, 9.0, 11.0]
    for t in range(4):
        r = R_C[: t + 1]
        assert average_accuracy(r) == pytest.approx(a_t[t], abs=1e-4)
        assert pooled_accuracy(r, N_C) == pytest.approx(pooled[t], abs=1e-4)
        if f_t[t] is None:
            assert math.isnan(forgetting(r)) and math.isnan(bwt(r))
        else:
            assert forgetting(r) == pytest.approx(f_t[t], abs=TOL)
            assert M.forgetting(r, variant="max") == pytest.approx(f_t[t], abs=TOL)
    assert aia([pooled_accuracy(R_C[: t + 1], N_C) for t in range(4)]) == pytest.approx(82.8083, abs=1e-4)


def test_vector_c_final():
    assert M.average_accuracy(R_C) == pytest.approx(79.5, abs=TOL)
    assert aia_tasks(R_C) == pytest.approx(83.4167, abs=1e-4)
    assert acc_a_triangle(R_C) == pytest.approx(81.8, abs=TOL)
    assert forgetting(R_C, "max") == pytest.approx(11.0, abs=TOL)
    assert forgetting(R_C, variant="mammoth") == pytest.approx(11.6667, abs=1e-4)
    assert forgetting(R_C, variant="first_last") == pytest.approx(10.3333, abs=1e-4)
    assert bwt(R_C) == pytest.approx(-10.3333, abs=1e-4)
    assert bwt(R_C, variant="all_pairs") == pytest.approx(-9.8333, abs=1e-4)
    run = cil_running_metrics(R_C, pooled_accs=[90, 82.5, 80.4, 78.333333])
    assert run["avg_acc_tasks"] == pytest.approx(79.5) and run["forgetting_mammoth"] == pytest.approx(35 / 3)
    assert run["aia"] == pytest.approx(82.8083, abs=1e-4)
    assert "forgetting" not in cil_running_metrics(R_C[:1])


def test_vector_c_matrix_forms_agree():
    """Ragged rows, a square array with NaN above the diagonal and one with junk there agree."""
    sq = np.full((4, 4), np.nan)
    for i, row in enumerate(R_C):
        sq[i, : i + 1] = row
    junk = np.where(np.isnan(sq), 1234.0, sq)
    for f in (average_accuracy, aia_tasks, acc_a_triangle, forgetting, bwt):
        vals = [f(R_C), f(sq), f(junk), f(sq.tolist())]
        assert np.allclose(vals, vals[0])


def test_vector_c_fwt():
    assert fwt([12, 15, 11], 10) == pytest.approx(2.6667, abs=1e-4)
    full = np.full((4, 4), np.nan)
    for i, row in enumerate(R_C):
        full[i, : i + 1] = row
    full[0, 1], full[1, 2], full[2, 3] = 12, 15, 11
    assert fwt(full, [10, 10, 10, 10]) == pytest.approx(2.6667, abs=1e-4)  # per-task b_0…b_3
    assert fwt(full, [10, 10, 10]) == pytest.approx(2.6667, abs=1e-4)  # aligned b_1…b_3
    assert fwt([[90, 12], [80, 85, 15], [70, 87, 88, 11]], 10) == pytest.approx(2.6667, abs=1e-4)
    assert math.isnan(fwt([], 10))


def test_bad_variants_and_rows():
    with pytest.raises(ValueError):
        forgetting(R_C, variant="avalanche")
    with pytest.raises(ValueError):
        bwt(R_C, variant="x")
    with pytest.raises(ValueError):
        average_accuracy([[90], [80]])  # row 1 needs two entries


def test_task_accuracies_from_cm():
    # tasks {0,1} and {2,3}; R[t][j] is sample-weighted within the task
    y = [0, 0, 1, 2, 2, 2, 3]
    p = [0, 1, 1, 2, 0, 2, 3]
    cmx = confusion_counts(y, p, 4)
    assert task_accuracies(cmx, [[0, 1], [2, 3]]) == pytest.approx([2 / 3, 3 / 4])


@st.composite
def lower_matrices(draw):
    t = draw(st.integers(1, 7))
    vals = st.floats(0.0, 1.0, allow_nan=False)
    return [[draw(vals) for _ in range(i + 1)] for i in range(t)]


@settings(max_examples=80, deadline=None)
@given(lower_matrices())
def test_property_forgetting_variants(r):
    if len(r) < 2:
        assert math.isnan(forgetting(r, "mammoth"))
        return
    fm = forgetting(r, "mammoth")
    assert fm >= 0.0  # §11 J
    assert fm >= forgetting(r, "max") - 1e-12  # the max runs over a superset
    assert bwt(r) == pytest.approx(-forgetting(r, "first_last"), abs=1e-12)
