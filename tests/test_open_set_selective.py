"""Selective classification in the open-set engine (issue 16): AURC, E-AURC and accuracy at a coverage, from
the curves' one sort, equal to the pure functions of ``openworld.metrics.selective`` (exact vectors below)."""

from __future__ import annotations

import math

import pytest
import torch

from openworld.metrics import create_engine
from openworld.metrics import open_set as osm
from openworld.metrics import selective as sel

# ascending v = descending confidence; a tie group at v = 0.2. correct: [yes, unknown, yes, wrong known]
V = torch.tensor([0.1, 0.2, 0.2, 0.5])
YM = torch.tensor([0, 2, 1, 0])  # 2 known classes, u = 2
PC = torch.tensor([0, 1, 1, 1])
# risk(k) = E_k/k with the tie-averaged E = 0, 1/2, 1, 2 → 0, 1/4, 1/3, 1/2
EXPECTED = {"aurc": 13 / 48, "e_aurc": 13 / 48 - 5 / 24, "acc@cov0.5": 0.75, "acc@cov0.8": 0.5,
            "acc@cov0.9": 0.5, "acc@cov0.95": 0.5}


def test_hand_vector():
    m = osm.open_set_metrics(V, YM, PC, 2)
    for key, val in EXPECTED.items():
        assert m[key] == pytest.approx(val, abs=1e-15), key


def test_hand_vector_order_free():
    """Tie-averaging makes every value independent of the input order of tied samples."""
    perm = torch.tensor([3, 2, 0, 1])
    m = osm.open_set_metrics(V[perm], YM[perm], PC[perm], 2)
    for key, val in EXPECTED.items():
        assert m[key] == pytest.approx(val, abs=1e-15), key


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_equals_pure_functions(seed, n):
    g = torch.Generator().manual_seed(seed)
    v = torch.round(torch.randn(n, generator=g) * 2) / 2  # many ties
    ym = torch.randint(0, 4, (n,), generator=g)
    pc = torch.randint(0, 3, (n,), generator=g)
    m = osm.open_set_metrics(v, ym, pc, 3)
    ref = sel.selective_metrics(-v.double(), (ym < 3) & (pc == ym))
    assert set(ref) <= set(m)
    for key, val in ref.items():
        assert m[key] == pytest.approx(val, abs=1e-12), key


def test_engine_ignores_masked_rows_and_streams():
    """Rows with an ignored label (−1) do not count; the batched engine equals the pure functions on the rest."""
    g = torch.Generator().manual_seed(3)
    n = 500
    z = torch.randn(n, 6, generator=g)
    y = torch.randint(-1, 6, (n,), generator=g)
    s = torch.round(torch.randn(n, generator=g) * 3) / 3
    eng = create_engine("open_set", num_classes=6, device="cpu", known_classes=[0, 1, 2, 3])
    for a in range(0, n, 64):
        eng.observe(z[a:a + 64], y[a:a + 64], s[a:a + 64])
    m = eng.compute()
    keep = y >= 0
    pc = z[:, :4].argmax(1)
    correct = (y < 4) & (y >= 0) & (pc == y)
    ref = sel.selective_metrics(-s[keep].double(), correct[keep])
    for key, val in ref.items():
        assert m[key] == pytest.approx(val, abs=1e-12), key


def test_oracle_ordering_has_zero_excess():
    """Every correct sample ranked first: E-AURC = 0 and the accuracy at coverage = the oracle's."""
    v = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])
    ym = torch.tensor([0, 1, 0, 2, 2])  # three correct knowns, then two unknowns
    pc = torch.tensor([0, 1, 0, 0, 1])
    m = osm.open_set_metrics(v, ym, pc, 2)
    assert m["e_aurc"] == pytest.approx(0.0, abs=1e-15)
    assert m["aurc"] == pytest.approx((1 / 4 + 2 / 5) / 5, abs=1e-15)
    assert m["acc@cov0.5"] == 1.0  # ⌈2.5⌉ = 3 accepted, all right
    assert m["acc@cov0.8"] == pytest.approx(0.75)


def test_empty_engine_is_nan():
    eng = create_engine("open_set", num_classes=3, device="cpu", known_classes=[0, 1])
    eng.observe(torch.zeros(2, 3), torch.tensor([-1, -1]), torch.zeros(2))
    m = eng.compute()
    assert all(math.isnan(m[k]) for k in osm.SELECTIVE_NAMES)
