"""Long-tail metrics (metrics.md §7, vector §11 E) and the streaming "long_tail" engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openworld.metrics.classification import confusion_counts
from openworld.metrics.engine import create_engine
from openworld.metrics.long_tail import LongTailEngine, long_tail_metrics, shot_group_means

COUNTS = [500, 300, 120, 100, 30, 10]
Y = [c for c in range(6) for _ in range(4)]
P = [0, 0, 0, 0, 1, 1, 1, 0, 2, 2, 2, 1, 3, 3, 0, 0, 4, 4, 0, 1, 5, 0, 0, 0]


def _logits(p, k=6):
    return torch.nn.functional.one_hot(torch.tensor(p), k).float()


def test_vector_E_pure():
    m = long_tail_metrics(confusion_counts(torch.tensor(Y), torch.tensor(P), 6), COUNTS)
    assert m["many"] == pytest.approx(0.833333, abs=1e-6)
    assert m["medium"] == pytest.approx(0.5, abs=1e-6)
    assert m["few"] == pytest.approx(0.25, abs=1e-6)
    assert m["acc"] == pytest.approx(0.625, abs=1e-6)
    assert m["acc_balanced"] == pytest.approx(np.mean([1, .75, .75, .5, .5, .25]), abs=1e-12)


def test_vector_E_engine_streamed_with_padding():
    eng = create_engine("long_tail", num_classes=6, device="cpu", train_counts=COUNTS, thresholds=[20, 100])
    assert isinstance(eng, LongTailEngine)
    eng.observe(_logits(P[:7]), torch.tensor(Y[:7]))
    eng.observe(_logits([3, 3]), torch.tensor([-1, -1]))  # hidden labels are ignored
    eng.observe(_logits(P[7:]), torch.tensor(Y[7:]))
    m = eng.compute()
    assert list(m) == ["acc", "acc_balanced", "many", "medium", "few"]
    assert m["many"] == pytest.approx(0.833333, abs=1e-6) and m["few"] == pytest.approx(0.25, abs=1e-6)
    assert m["medium"] == pytest.approx(0.5, abs=1e-6) and m["acc"] == pytest.approx(0.625, abs=1e-6)
    np.testing.assert_allclose(eng.per_class().numpy(), [1, .75, .75, .5, .5, .25], atol=1e-12)


def test_empty_group_is_nan_and_missing_classes_skipped():
    counts = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10 IF100: 8/2/0
    eng = LongTailEngine(10, train_counts=counts)
    y = torch.arange(10).repeat(2)
    eng.observe(_logits(y.tolist(), 10), y)
    m = eng.compute()
    assert math.isnan(m["few"]) and m["many"] == 1.0 and m["medium"] == 1.0
    # classes absent from the evaluated set do not count in their group
    means = shot_group_means([1.0, float("nan"), 0.0], [500, 300, 10])
    assert means["many"] == 1.0 and means["few"] == 0.0 and math.isnan(means["medium"])


def test_rank_groups_and_errors():
    eng = LongTailEngine(10, train_counts=list(range(100, 0, -10)), shot_groups="rank")
    assert eng.groups == {"many": (0, 1, 2), "medium": (3, 4, 5, 6), "few": (7, 8, 9)}
    with pytest.raises(ValueError, match="train_counts"):
        LongTailEngine(3)
    with pytest.raises(ValueError, match="3 classes"):
        LongTailEngine(3, train_counts=[1, 2])


def test_engine_matches_pure_on_random_stream():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 8, (500,), generator=g)
    z = torch.randn(500, 8, generator=g)
    counts = [400, 200, 90, 50, 21, 19, 5, 2]
    eng = LongTailEngine(8, train_counts=counts)
    for i in range(0, 500, 37):
        eng.observe(z[i:i + 37], y[i:i + 37])
    ref = long_tail_metrics(confusion_counts(y, z.argmax(1), 8), counts)
    for k, v in eng.compute().items():
        assert v == pytest.approx(ref[k], abs=1e-12, nan_ok=True)
