"""Long-tail scenario (card long-tail-sade-rcal §1, test vectors T1/T2): counts, test sets, noise, groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import openworld.metrics.long_tail  # noqa: F401  (registers the "long_tail" engine)
from openworld.scenarios.long_tail import (
    LongTailScenario,
    apply_label_noise,
    class_counts,
    lt_subsample,
    noise_transition_matrix,
    shot_groups,
)

# --- T1: counts ----------------------------------------------------------------------------------
CIFAR10 = {
    10: [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500],
    50: [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100],
    100: [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50],
}


@pytest.mark.parametrize("imb", [10, 50, 100])
def test_cifar10_counts(imb):
    counts = class_counts(5000, imb, 10)
    assert counts == CIFAR10[imb]
    assert sum(counts) == {10: 20431, 50: 13996, 100: 12406}[imb]


@pytest.mark.parametrize("imb,total,groups", [(10, 19573, (69, 31, 0)), (50, 12608, (41, 41, 18)),
                                              (100, 10847, (35, 35, 30))])
def test_cifar100_counts_and_groups(imb, total, groups):
    counts = class_counts(500, imb, 100)
    assert sum(counts) == total and counts[0] == 500 and counts[-1] == 500 // imb
    g = shot_groups(counts)
    assert (len(g["many"]), len(g["medium"]), len(g["few"])) == groups


def test_truncation_not_rounding():
    assert int(500 * 0.01 ** (99 / 99)) == 5 and class_counts(500, 100, 100)[-1] == 5
    rounded = sum(round(500 * 0.01 ** (i / 99)) for i in range(100))
    assert rounded == 10899 != sum(class_counts(500, 100, 100))


def test_fashion_step_and_cifar10_groups():
    assert class_counts(6000, 100, 10) == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert [sum(class_counts(6000, r, 10)) for r in (10, 50, 100)] == [24516, 16796, 14886]
    assert sum(class_counts(5000, 10, 10, "step")) == 27500 and sum(class_counts(5000, 100, 10, "step")) == 25250
    for imb, g in ((10, (10, 0, 0)), (50, (9, 1, 0)), (100, (8, 2, 0))):
        s = shot_groups(class_counts(5000, imb, 10))
        assert (len(s["many"]), len(s["medium"]), len(s["few"])) == g
    r = shot_groups(class_counts(5000, 100, 10), mode="rank")
    assert r == {"many": (0, 1, 2), "medium": (3, 4, 5, 6), "few": (7, 8, 9)}
    with pytest.raises(ValueError, match="even"):
        class_counts(10, 10, 3, "step")


def test_test_agnostic_sizes():
    sizes100 = [sum(class_counts(100, r, 100)) for r in (50, 25, 10, 5, 2)]
    sizes10 = [sum(class_counts(1000, r, 10)) for r in (50, 25, 10, 5, 2)]
    assert sizes100 == [2486, 2956, 3876, 4932, 7166]
    assert sizes10 == [2795, 3229, 4084, 5081, 7241]
    back = class_counts(1000, 50, 10, reverse=True)
    assert back[0] == 20 and back[-1] == 1000 and sum(back) == 2795


def test_subsample_matches_legacy_numpy_procedure():
    labels = np.repeat(np.arange(3), 10)[np.random.default_rng(0).permutation(30)]
    sel, unused = lt_subsample(labels, [5, 3, 1], 0)
    np.random.seed(0)  # the official procedure, on the global legacy generator
    ref = []
    for c, n in enumerate([5, 3, 1]):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        ref.append(idx[:n])
    assert sel.tolist() == np.concatenate(ref).tolist()
    assert sorted(np.concatenate([sel, *unused.values()]).tolist()) == list(range(30))


# --- T2: noise -------------------------------------------------------------------------------------
def test_imb_transition_matrix_vector():
    t = noise_transition_matrix([6, 3, 1], 0.3)
    np.testing.assert_allclose(t, [[0.7, 0.225, 0.075], [0.257143, 0.7, 0.042857], [0.2, 0.1, 0.7]], atol=1e-6)
    np.testing.assert_allclose(t.sum(1), 1.0, atol=1e-12)
    t2 = noise_transition_matrix(class_counts(5000, 100, 10), 0.4)
    np.testing.assert_allclose(t2.sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("kind", ["sym", "imb", "pair"])
def test_fixed_count_flips_never_keep_label(kind):
    counts = class_counts(5000, 100, 10)
    y = np.repeat(np.arange(10), counts)
    noisy, picked = apply_label_noise(y, 0.4, kind, np.random.default_rng(0), 10, counts)
    assert len(picked) == int(0.4 * 12406) == 4962
    assert (noisy[picked] != y[picked]).all()
    untouched = np.setdiff1d(np.arange(len(y)), picked)
    assert (noisy[untouched] == y[untouched]).all()
    if kind == "pair":
        assert ((y[picked] + 1) % 10 == noisy[picked]).all()


def test_imb_noise_follows_the_matrix():
    counts = [600, 300, 100]
    y = np.repeat(np.arange(3), counts)
    rng = np.random.default_rng(1)
    noisy, picked = apply_label_noise(np.tile(y, 20), 1.0, "imb", rng, 3, counts)
    src = np.tile(y, 20)
    freq = np.array([[np.mean(noisy[src == i] == j) for j in range(3)] for i in range(3)])
    expect = noise_transition_matrix(counts, 1.0)
    np.testing.assert_allclose(freq, expect, atol=0.02)


# --- the scenario on synthetic features ------------------------------------------------------------
def _scenario(**kw):
    base = dict(data={"source": "synth_gauss", "train_per_class": 500, "test_per_class": 100}, imbalance=100,
                val_per_class=20)
    base.update(kw)
    return LongTailScenario(**base)


def test_scenario_counts_sets_and_groups():
    sc = _scenario()
    s = sc.session(0)
    assert list(s.classes.train_counts) == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert list(s.eval_sets) == ["forward50", "forward25", "forward10", "forward5", "forward2", "uniform",
                                 "backward2", "backward5", "backward10", "backward25", "backward50"]
    assert len(s.eval_sets["uniform"].data) == 1000
    assert len(s.eval_sets["forward50"].data) == sum(class_counts(100, 50, 10))
    fw = np.bincount(s.eval_sets["forward50"].data.targets.numpy(), minlength=10)
    assert fw.tolist() == class_counts(100, 50, 10)
    es = s.eval_sets["backward10"]
    assert es.task == "long_tail" and es.options["train_counts"] == list(s.classes.train_counts)
    assert es.options["thresholds"] == [20.0, 100.0]
    # validation from the unused pool: class 0 (n = n_max) has none
    vy = s.validation.targets.numpy()
    assert (vy != 0).all() and np.bincount(vy, minlength=10)[1:].tolist() == [20] * 9
    d = sc.describe()
    assert d["train_size"] == 1236 and d["test_sizes"]["backward50"] == sum(class_counts(100, 50, 10))


def test_holdout_validation_caps_counts():
    sc = _scenario(val_source="holdout", val_per_class=20)
    s = sc.session(0)
    assert s.classes.train_counts[0] == 480 and np.bincount(s.validation.targets.numpy()).tolist() == [20] * 10


def test_noisy_labels_visible_clean_kept_for_evaluation():
    sc = _scenario(noise="imb", noise_rate=0.4)
    s = sc.session(0)
    clean = sc.clean_train_labels()
    noisy = s.visible().labeled.targets.numpy()
    assert (noisy != clean).sum() == int(0.4 * len(clean))
    # observed counts (what strategies see) are the noisy ones; groups come from the clean counts
    assert list(s.classes.train_counts) == np.bincount(noisy, minlength=10).tolist()
    assert s.eval_sets["uniform"].options["train_counts"] == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    # the test sets stay clean: the same labels as the source's test split
    src_test = sc.source.test.targets
    assert torch.equal(s.eval_sets["uniform"].data.targets, src_test)
    # validation labels get the same kind of noise by default (val_label_noise)
    assert (s.validation.targets.numpy() != sc.clean_val_labels()).sum() == int(0.4 * len(sc.clean_val_labels()))
    assert "noisy_labels" in sc.describe() and sc.describe()["num_flipped"] == int(0.4 * len(clean))
    assert (_scenario(noise="imb", noise_rate=0.4, val_label_noise=False).session(0).validation.targets.numpy()
            == sc.clean_val_labels()).all()


def test_same_parameters_same_splits():
    a, b = _scenario(noise="sym", noise_rate=0.2).describe(), _scenario(noise="sym", noise_rate=0.2).describe()
    assert a == b


@pytest.mark.parametrize("kw,msg", [({"profile": "linear"}, "scenario.profile"), ({"noise": "flip"}, "scenario.noise"),
                                    ({"test_distributions": ["sideways3"]}, "forward<rho>"),
                                    ({"imbalance": 0.5}, "scenario.imbalance"),
                                    ({"noise": "sym", "noise_rate": 0.0}, "needs a rate")])
def test_bad_parameters_are_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _scenario(**kw).session(0)
