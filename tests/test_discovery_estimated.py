"""NCD with an estimated number of novel clusters and the `from_transductive` inductive mapping,
end to end through the runner on sklearn digits (card gcd-ncd §1.5, §2.7)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import openworld.scenarios.discovery  # noqa: F401
import openworld.strategies.kmeans  # noqa: F401
import openworld.strategies.simgcd  # noqa: F401
from openworld.config import load_recipe
from openworld.metrics.clustering import assignment_from_counts, cluster_accuracy_with_assignment, count_matrix
from openworld.runner import Runner
from openworld.scenarios.discovery import GCDScenario, NCDScenario
from openworld.strategies.kmeans import estimate_k_silhouette, estimate_num_clusters, l2_features


def _run(tmp_path: Path, text: str) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "r.yaml").write_text(text)
    out = Runner(
        load_recipe(tmp_path / "r.yaml"), out=tmp_path / "out", progress=False, stream=open(tmp_path / "log.txt", "w")
    ).run()
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    res = {}
    for r in out:
        ckpt = torch.load(r.run_dir / "checkpoints" / "session_0.pt", map_location="cpu", weights_only=True)
        res[r.strategy] = (json.loads((r.run_dir / "results.json").read_text()), ckpt["strategy"])
    return res


def _pixels(data) -> torch.Tensor:
    return l2_features(data.transforms.test(data.x).flatten(1))


def test_ncd_estimated_k_end_to_end(tmp_path):
    text = (
        "name: ncd_est\nscenario: {kind: ncd, data: {source: digits}, k_mode: estimated}\n"
        "backbone: {name: cnn8}\n"
        "strategies:\n  ss_kmeans: {features: input, n_init: 2}\n  kmeans: {features: input, n_init: 2}\n"
        "  simgcd: {defaults: simgcd, epochs: 1, batch_size: 64, proj_hidden: 64, proj_dim: 16, finetune: all,"
        " teacher_warmup: null}\n"
        "seeds: [0]\ndevice: cpu\n"
    )
    runs = _run(tmp_path, text)
    session = NCDScenario(data={"source": "digits"}, k_mode="estimated").session(0)
    # the estimate from D_U pixels alone (no label): silhouette over K_u in [2, 2·K_old]
    expected = estimate_k_silhouette(_pixels(session.unlabeled), k_max=10)
    assert 2 <= expected <= 10
    for name in ("ss_kmeans", "kmeans"):
        res, state = runs[name]
        assert state["k_hat"] == expected, name
        assert res["sessions"][0]["strategy_info"] == {"k_hat": expected, "num_clusters": 5 + expected}, name
        assert state["centroids"].shape[0] == 5 + expected  # known means + K̂_u novel centroids
    res, state = runs["simgcd"]
    assert state["k_hat"] is not None and 2 <= state["k_hat"] <= 10
    assert state["num_clusters"] == 5 + state["k_hat"] and state["model"]["head.weight"].shape[0] == 5 + state["k_hat"]
    for name, (res, _) in runs.items():
        m = res["sessions"][0]["metrics"]
        assert set(m) == {"unlabelled", "test_novel", "test_known"}
        assert set(m["unlabelled"]) == {"acc", "nmi", "ari"} and 0 < m["test_novel"]["acc"] <= 100
        assert 0 <= m["test_known"]["acc"] <= 100, name
    # k-means on 8x8 digit pixels: the known-class means classify the known test digits well
    assert runs["ss_kmeans"][0]["sessions"][0]["metrics"]["test_known"]["acc"] > 80


def test_estimate_uses_no_unlabelled_labels():
    # the estimators take D_L labels and features only; hiding D_U labels changes nothing
    session = GCDScenario(data={"source": "digits"}).session(0)
    x_l, y_l, x_u = _pixels(session.labeled), session.labeled.targets, _pixels(session.unlabeled)
    k_ncd = estimate_num_clusters("ncd", x_l, y_l, x_u[:300], 5, k_max=4)
    assert 7 <= k_ncd <= 9  # 5 + K̂_u, K̂_u in [2, 4]
    assert k_ncd == 5 + estimate_k_silhouette(x_u[:300], k_max=4)
    assert estimate_num_clusters("gcd", x_l[:200], y_l[:200], x_u[:200], 5, k_max=7, n_init=1) in range(5, 8)


@pytest.mark.parametrize("kind", ["gcd", "ncd"])
def test_from_transductive_exact_through_the_runner(tmp_path, kind):
    base = (
        "name: m\nscenario: {kind: %s, data: {source: digits}, variants: [v2b, v1], inductive_mapping: %s}\n"
        "backbone: {name: cnn8}\nstrategies: {kmeans: {features: input, n_init: 2}}\nseeds: [0]\ndevice: cpu\n"
    )
    if kind == "ncd":
        base = base.replace(", variants: [v2b, v1]", "")
    own = _run(tmp_path / "own", base % (kind, "own"))["kmeans"]
    fixed = _run(tmp_path / "fixed", base % (kind, "from_transductive"))["kmeans"]
    assert torch.equal(own[1]["centroids"], fixed[1]["centroids"])  # same clustering, only the scoring differs
    m_own, m_fix = own[0]["sessions"][0]["metrics"], fixed[0]["sessions"][0]["metrics"]
    inductive = "test" if kind == "gcd" else "test_novel"
    assert m_own["unlabelled"] == m_fix["unlabelled"]
    assert m_own[inductive]["nmi"] == m_fix[inductive]["nmi"] and m_own[inductive]["ari"] == m_fix[inductive]["ari"]
    # recompute the expected values from the predictions
    sc = (GCDScenario if kind == "gcd" else NCDScenario)(data={"source": "digits"})
    s = sc.session(0)
    c = fixed[1]["centroids"]
    off = 0 if kind == "gcd" else 5

    def pred(data):
        d = torch.cdist(_pixels(data), c).pow(2)
        return (d[:, off:].argmin(1) + off).numpy()

    unl, ind = s.eval_sets["unlabelled"].data, s.eval_sets[inductive].data
    w_u = count_matrix(unl.targets.numpy(), pred(unl))
    w_t = count_matrix(ind.targets.numpy(), pred(ind))
    old = list(range(5)) if kind == "gcd" else []
    for v in ("v2", "v2b", "v1") if kind == "gcd" else ("v2",):
        r = cluster_accuracy_with_assignment(w_t, old, assignment_from_counts(w_u, old, v), v)
        key = f"all_{v}" if kind == "gcd" else "acc"
        assert m_fix[inductive][key] == pytest.approx(100 * r["all"], abs=1e-9), v
        if kind == "gcd":
            assert m_fix[inductive][f"new_{v}"] == pytest.approx(100 * r["new"], abs=1e-9)
        assert m_fix[inductive][key] <= m_own[inductive][key] + 1e-9  # a fresh Hungarian is optimal on its set
    assert np.isfinite(m_fix[inductive]["acc"])
