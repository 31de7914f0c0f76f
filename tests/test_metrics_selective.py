"""Selective-classification metrics (openworld/metrics/selective.py): exact vectors computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from openworld.metrics import selective as sel

CONF = [0.9, 0.8, 0.7, 0.6]
OK = [True, False, True, True]


def test_no_ties_by_hand():
    # risk(k) = 0, 1/2, 1/3, 1/4 → AURC = (0 + 1/2 + 1/3 + 1/4)/4 = 13/48
    assert sel.aurc(CONF, OK) == pytest.approx(13 / 48, abs=1e-15)
    # oracle: 1 error, n = 4 → only k = 4 has risk 1/4 → AURC* = 1/16; E-AURC = 13/48 − 3/48 = 5/24
    assert sel.e_aurc(CONF, OK) == pytest.approx(5 / 24, abs=1e-15)
    cov, risk, thr = sel.risk_coverage_curve(CONF, OK)
    assert cov.tolist() == [0.25, 0.5, 0.75, 1.0]
    assert risk.tolist() == pytest.approx([0.0, 0.5, 1 / 3, 0.25], abs=1e-15)
    assert thr.tolist() == CONF
    assert sel.accuracy_at_coverage(CONF, OK, 0.25) == 1.0
    assert sel.accuracy_at_coverage(CONF, OK, 0.5) == 0.5
    assert sel.accuracy_at_coverage(CONF, OK, 0.6) == pytest.approx(2 / 3, abs=1e-15)  # m = ⌈2.4⌉ = 3
    assert sel.risk_at_coverage(CONF, OK, 1.0) == 0.25


def test_ties_are_averaged_and_order_free():
    conf, ok = [1.0, 1.0, 0.5], [True, False, True]
    # tie group of 2 with 1 error: E_1 = 1/2, E_2 = 1, E_3 = 1 → risk = 1/2, 1/2, 1/3; AURC = 4/9
    assert sel.aurc(conf, ok) == pytest.approx(4 / 9, abs=1e-15)
    assert sel.aurc([1.0, 0.5, 1.0], [False, True, True]) == pytest.approx(4 / 9, abs=1e-15)
    cov, risk, thr = sel.risk_coverage_curve(conf, ok)
    assert cov.tolist() == pytest.approx([2 / 3, 1.0], abs=1e-15)
    assert risk.tolist() == pytest.approx([0.5, 1 / 3], abs=1e-15)
    assert thr.tolist() == [1.0, 0.5]
    assert sel.accuracy_at_coverage(conf, ok, 1 / 3) == 0.5  # the first of a tied pair: expected accuracy
    # all tied: AURC = error rate (risk(k) = r/n for every k)
    assert sel.aurc([0.0] * 4, [True, False, False, True]) == 0.5


def test_oracle_order_has_zero_excess_and_worst_order():
    ok = [True, True, False, False]
    assert sel.e_aurc([4, 3, 2, 1], ok) == 0.0
    # reversed: risk = 1, 1, 2/3, 1/2 → AURC = (1 + 1 + 2/3 + 1/2)/4 = 19/24
    assert sel.aurc([1, 2, 3, 4], ok) == pytest.approx(19 / 24, abs=1e-15)
    # AURC* = (0 + 0 + 1/3 + 1/2)/4 = 5/24
    assert sel.e_aurc([1, 2, 3, 4], ok) == pytest.approx(14 / 24, abs=1e-15)


def test_coverage_is_exact_rational():
    conf = torch.arange(10, 0, -1).double()
    ok = torch.tensor([True] * 3 + [False] * 7)
    # 0.3·10 is 3.0000000000000004 in floating point; the rational ⌈3⌉ = 3 keeps the first three only
    assert sel.accuracy_at_coverage(conf, ok, 0.3) == 1.0
    assert sel.accuracy_at_coverage(conf, ok, 0.31) == 0.75


def test_selective_metrics_dict_and_edge_cases():
    out = sel.selective_metrics(CONF, OK, coverages=(0.5, 1.0))
    assert out == pytest.approx({"aurc": 13 / 48, "e_aurc": 5 / 24, "acc@cov0.5": 0.5, "acc@cov1": 0.75})
    assert math.isnan(sel.aurc([], []))
    assert math.isnan(sel.accuracy_at_coverage([], [], 0.5))
    with pytest.raises(ValueError, match="coverage must be in"):
        sel.accuracy_at_coverage(CONF, OK, 0.0)
    with pytest.raises(ValueError, match="4 values, correct has 3"):
        sel.aurc(CONF, OK[:3])
    with pytest.raises(ValueError, match="finite"):
        sel.aurc([0.1, float("nan")], [True, False])
    with pytest.raises(ValueError, match="boolean"):
        sel.aurc([0.1, 0.2], [0, 2])
