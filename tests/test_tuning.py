"""Hidden-class fold tuning (gcd-ncd card §2.6) on a tiny synthetic NCD case."""

from __future__ import annotations

import numpy as np
import pytest

from openworld.strategies.tuning import hidden_class_folds, tune_hidden_classes


def test_folds_are_the_seeded_permutation_split():
    y = np.repeat(np.arange(6), 3)
    folds = hidden_class_folds(y, n_folds=3, seed=0)  # RandomState(0).permutation(6) = [5 2 1 3 0 4]
    assert [f.hidden for f in folds] == [(2, 5), (1, 3), (0, 4)]
    assert folds[0].known == (0, 1, 3, 4)
    f = folds[0]
    assert f.hidden_rows.tolist() == [6, 7, 8, 15, 16, 17] and len(f.labelled) == 12
    assert (f.labels[f.hidden_rows] == -1).all() and (f.labels[f.labelled] == y[f.labelled]).all()
    all_hidden = sorted(c for fold in folds for c in fold.hidden)
    assert all_hidden == list(range(6))  # disjoint and covering
    assert [f.hidden for f in hidden_class_folds(np.repeat(np.arange(5), 2), n_folds=2, seed=0)] == [(0, 1, 2), (3, 4)]
    with pytest.raises(ValueError, match="n_folds"):
        hidden_class_folds(y, n_folds=7)
    with pytest.raises(ValueError, match="-1"):
        hidden_class_folds(np.array([0, -1]))


def test_tuning_picks_the_config_that_clusters_hidden_classes():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    centers = np.array([[10.0 * c, 0.0] for c in range(8)])
    y_l = np.repeat(np.arange(6), 20)  # D_L: known classes 0-5
    x_l = centers[y_l] + rng.normal(0, 0.3, (len(y_l), 2))
    x_u = centers[np.repeat([6, 7], 20)] + rng.normal(0, 0.3, (40, 2))  # D_U: novel 6, 7 (labels never given)
    calls = []

    def fit_predict(config, split):
        calls.append((config["name"], split.hidden))
        assert (split.labels[split.hidden_rows] == -1).all()  # hidden-class labels are not visible
        assert set(split.labels[split.labelled].tolist()) == set(split.known)
        if config["name"] == "constant":
            return np.zeros(len(split.hidden_rows), dtype=np.int64)
        pool = np.concatenate([x_l[split.hidden_rows], x_u])
        k = len(split.hidden) + config["num_novel"]
        km = KMeans(k, n_init=3, random_state=0).fit(pool)
        return km.labels_[: len(split.hidden_rows)]

    candidates = [{"name": "constant"}, {"name": "kmeans", "num_novel": 2}]
    res = tune_hidden_classes(y_l, candidates, fit_predict, n_folds=3, seed=0)
    assert res.folds == [(2, 5), (1, 3), (0, 4)]
    assert res.fold_scores == [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]]  # 2 equal hidden classes: constant → ½
    assert res.scores == [0.5, 1.0] and res.best_index == 1 and res.best is candidates[1]
    assert len(calls) == 6
    with pytest.raises(ValueError, match="hidden rows"):
        tune_hidden_classes(y_l, candidates[:1], lambda c, s: [0], n_folds=3)
