"""GCD / NCD scenarios: class splits, the seed-0 labelled draw, eval sets, label hiding (card gcd-ncd §1, §7 T9)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openworld.scenarios.discovery import GCDScenario, NCDScenario, draw_labelled, read_class_split


def test_t9_first_drawn_positions():
    ref = {
        25000: [14149, 8946, 22378, 12162, 4879],
        40000: [12836, 10913, 4214, 8198, 31403],
        30000: [8225, 10794, 9163, 26591, 6631],
    }
    for n, first in ref.items():
        pos = draw_labelled(n, 0.5, 0)
        assert len(pos) == n // 2 and pos[:5].tolist() == first
        assert pos.tolist() == np.random.RandomState(0).choice(n, n // 2, replace=False).tolist()
        assert len(set(pos.tolist())) == len(pos)


def _check_partition(sc, n_train: int):
    idx = sc.split_indices()
    lab, unl = set(idx["labelled"]), set(idx["unlabelled"])
    assert not lab & unl
    assert len(lab | unl | set(idx["validation"])) == n_train


def test_gcd_digits_split_and_eval_sets():
    sc = GCDScenario(data={"source": "digits"})
    s = sc.session(0)
    k_old = 5
    assert sc.num_classes == 10 and s.info["num_old"] == k_old and s.info["num_clusters"] == 10
    assert int(s.labeled.targets.max()) < k_old  # D_L holds old classes only
    src_train_y = sc.source.train.targets.numpy()
    n_old = int((src_train_y < 5).sum())
    assert len(s.labeled) == n_old // 2
    assert len(s.unlabeled) == len(src_train_y) - n_old // 2
    _check_partition(sc, len(src_train_y))
    # D_L is the card's draw over the old-class rows in dataset order
    old_rows = np.flatnonzero(src_train_y < 5)
    assert sc.split_indices()["labelled"] == old_rows[draw_labelled(n_old, 0.5, 0)].tolist()
    assert set(s.eval_sets) == {"unlabelled", "test"}
    for ev in s.eval_sets.values():
        assert ev.task == "clustering" and ev.classes == () and ev.options["old_classes"] == list(range(5))
    # transductive set = D_U with its true labels (runner-held)
    assert torch.equal(s.eval_sets["unlabelled"].data.x, s.unlabeled.x)
    unl_rows = sc.split_indices()["unlabelled"]
    assert torch.equal(s.eval_sets["unlabelled"].data.targets, torch.as_tensor(src_train_y[unl_rows]))
    assert json.dumps(sc.describe()) == json.dumps(GCDScenario(data={"source": "digits"}).describe())


def test_visible_hides_unlabelled_labels():
    s = GCDScenario(data={"source": "digits"}).session(0)
    v = s.visible()
    assert v.eval_sets == {}
    assert (v.unlabeled.targets == -1).all() and (s.unlabeled.targets >= 0).all()
    assert v.unlabeled.origin[0] is v.unlabeled and v.labeled.origin[0] is v.labeled  # no link to the full source
    assert not any(isinstance(val, torch.Tensor) for val in v.info.values())


def test_relabelling_custom_classes_and_split_file(tmp_path):
    sc = GCDScenario(data={"source": "digits"}, old_classes=[7, 3], new_classes=[0, 9])
    s = sc.session(0)
    assert sc.class_order_list == [7, 3, 0, 9] and sc.num_classes == 4
    src = sc.source.train.targets.numpy()
    lab_rows = sc.split_indices()["labelled"]
    mapped = {7: 0, 3: 1}
    assert s.labeled.targets.tolist() == [mapped[int(c)] for c in src[lab_rows]]
    assert set(s.eval_sets["unlabelled"].data.targets.tolist()) == {0, 1, 2, 3}
    split = tmp_path / "split.json"
    unknown = {"Hard": [5], "Medium": [0], "Easy": [8]}
    split.write_text(json.dumps({"known_classes": [1, 2], "unknown_classes": unknown}))
    assert read_class_split(split) == ([1, 2], [5, 0, 8])
    sc2 = GCDScenario(data={"source": "digits"}, class_split=str(split))
    assert sc2.class_order_list == [1, 2, 5, 0, 8]


def test_ncd_split_and_eval_sets():
    sc = NCDScenario(data={"source": "digits"})
    s = sc.session(0)
    src = sc.source.train.targets.numpy()
    assert len(s.labeled) == int((src < 5).sum()) and len(s.unlabeled) == int((src >= 5).sum())
    assert set(s.eval_sets) == {"unlabelled", "test_novel", "test_known"}
    for name in ("unlabelled", "test_novel"):  # task-aware: the engine argmaxes over columns 5… (any width)
        ev = s.eval_sets[name]
        assert ev.classes == () and ev.options["mode"] == "ncd" and ev.options["head_offset"] == 5
        assert "publish_assignment" not in ev.options and "use_assignment" not in ev.options
    assert int(s.eval_sets["test_novel"].data.targets.min()) >= 5
    assert int(s.eval_sets["test_known"].data.targets.max()) < 5
    assert s.eval_sets["test_known"].task == "classification"
    assert s.eval_sets["test_known"].classes == (0, 1, 2, 3, 4)


def test_ncd_estimated_k_eval_sets():
    s = NCDScenario(data={"source": "digits"}, k_mode="estimated").session(0)
    assert s.info["num_clusters"] is None and s.info["k_mode"] == "estimated"
    known = s.eval_sets["test_known"]
    assert known.task == "head_classification" and known.classes == () and known.options == {"head": [0, 5]}


def test_from_transductive_shares_one_assignment():
    from openworld.metrics.clustering import SharedAssignment

    for sc, inductive in (
        (GCDScenario(data={"source": "digits"}, inductive_mapping="from_transductive"), "test"),
        (NCDScenario(data={"source": "digits"}, inductive_mapping="from_transductive"), "test_novel"),
    ):
        s = sc.session(0)
        assert list(s.eval_sets)[0] == "unlabelled"  # scored first by the runner
        shared = s.eval_sets["unlabelled"].options["publish_assignment"]
        assert isinstance(shared, SharedAssignment)
        assert s.eval_sets[inductive].options["use_assignment"] is shared
        assert sc.session(0).eval_sets["unlabelled"].options["publish_assignment"] is not shared  # fresh per session


def test_parameter_errors():
    with pytest.raises(ValueError, match="k_mode"):
        NCDScenario(data={"source": "digits"}, k_mode="guess").session(0)
    with pytest.raises(ValueError, match="inductive_mapping"):
        GCDScenario(data={"source": "digits"}, inductive_mapping="shared").session(0)
    with pytest.raises(ValueError, match="overlap"):
        GCDScenario(data={"source": "digits"}, old_classes=[1, 2], new_classes=[2, 3]).session(0)
    with pytest.raises(ValueError, match="p_lab"):
        GCDScenario(data={"source": "digits"}, p_lab=0).session(0)
    with pytest.raises(ValueError, match="no default old-class split"):
        GCDScenario(data={"source": "synth_hier"}).session(0)
    s = GCDScenario(data={"source": "digits"}, k_mode="estimated").session(0)
    assert s.info["num_clusters"] is None


def test_labelled_val_frac_carves_from_d_l():
    sc = GCDScenario(data={"source": "digits"}, labelled_val_frac=0.2)
    s = sc.session(0)
    idx = sc.split_indices()
    assert s.validation is not None and len(s.validation) == len(idx["validation"]) > 0
    assert not set(idx["validation"]) & set(idx["labelled"])
    assert not set(idx["validation"]) & set(idx["unlabelled"])


def test_fashion_mnist_sizes(shared_data):
    sc = GCDScenario(data={"source": "fashion_mnist", "root": str(shared_data)})
    s = sc.session(0)
    assert len(s.labeled) == 15000 and len(s.unlabeled) == 45000  # card §1.3 table
    pos = draw_labelled(30000, 0.5, 0)
    old_rows = np.flatnonzero(sc.source.train.targets.numpy() < 5)
    assert sc.split_indices()["labelled"][:5] == old_rows[pos[:5]].tolist()


def test_runner_never_hands_unlabelled_labels(tmp_path):
    from openworld.config import load_recipe
    from openworld.runner import Runner

    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text(
        "name: spy\nscenario: {kind: gcd, data: {source: digits}}\nbackbone: {name: cnn8}\n"
        "strategies: {kmeans: {features: input, n_init: 1}}\nseeds: [0]\ndevice: cpu\n"
    )
    import openworld.strategies.kmeans as km

    seen = []
    orig = km.KMeansBaseline.learn

    def spy_learn(self, session):
        seen.append(session)
        return orig(self, session)

    km.KMeansBaseline.learn = spy_learn
    try:
        out = Runner(load_recipe(recipe_path), out=tmp_path, progress=False, stream=open(tmp_path / "log", "w")).run()
    finally:
        km.KMeansBaseline.learn = orig
    assert out[0].status == "finished", out[0].reason
    (session,) = seen
    assert session.eval_sets == {} and (session.unlabeled.targets == -1).all()
    assert session.unlabeled.origin[0] is session.unlabeled
    m = out[0].sessions[0]["metrics"]
    assert set(m) == {"unlabelled", "test"} and 0 <= m["unlabelled"]["all_v2"] <= 100


def test_class_number_estimators_on_blobs():
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs

    from openworld.metrics.clustering import cluster_accuracy
    from openworld.strategies.kmeans import estimate_k_brent, estimate_k_silhouette

    x, y = make_blobs(n_samples=120, centers=4, cluster_std=0.3, center_box=(-10, 10), random_state=0)
    order = np.argsort(y >= 2, kind="stable")  # labelled rows (half of classes 0-1) first
    x, y = x[order], y[order]
    n_l = int((y < 2).sum()) // 2
    k_hat = estimate_k_brent(x, y[:n_l], k_min=2, k_max=8, n_init=2)
    # The GCD objective (Hungarian accuracy on the labelled rows) is flat wherever the labelled blobs
    # are not split or merged; Brent returns a K in that optimal region.
    assert 2 <= k_hat <= 8
    pred = KMeans(k_hat, n_init=2, random_state=0).fit(x).labels_[:n_l]
    assert cluster_accuracy(y[:n_l], pred, [0, 1])["all"] == 1.0
    assert estimate_k_silhouette(x[y >= 2], k_max=5) == 2
