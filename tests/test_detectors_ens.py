"""``mahalanobis_ens`` — the full Lee et al. (2018) ensemble (specs/open-set.md §4): a hand-computed test
vector for the input pre-processing and the per-layer score, the α fit on source vs FGSM-source, and
the detector end to end on an in-domain digits open-set task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import openworld.scenarios.open_set  # noqa: F401
import openworld.strategies.detectors  # noqa: F401
from openworld.metrics import open_set as osm
from openworld.registry import STRATEGIES
from openworld.scenarios.open_set import OpenSetScenario
from openworld.strategies.base import OptimizerConfig, RunContext, TrainConfig
from openworld.strategies.detectors import MahalanobisEnsemble, MahalanobisModel, layer_modules, tnr_at_tpr95


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 1, bias=False)
        self.out_features = 1
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, -1.0]]))
            self.b.weight.copy_(torch.tensor([[1.0, 1.0]]))

    def forward(self, x):
        return self.b(self.a(x))


def test_preprocessing_and_layer_score_test_vector():
    enc = TwoLayer()
    det = MahalanobisEnsemble(input_std=[0.5, 2.0])
    det.net = nn.Module()
    det.net.encoder = enc
    det._mods = layer_modules(enc)
    assert [n for n, _ in det._mods] == ["a", "b"]
    # layer a: μ = {(0, 0), (4, -1)}, Σ⁻¹ = diag(1, 4); layer b: μ = {0, 10}, Σ⁻¹ = 1
    p_a = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    det.models = [
        MahalanobisModel(torch.tensor([[0.0, 0.0], [4.0, -1.0]], dtype=torch.float64), p_a),
        MahalanobisModel(torch.tensor([[0.0], [10.0]], dtype=torch.float64), torch.eye(1, dtype=torch.float64)),
    ]
    x = torch.tensor([[1.0, 1.0], [2.0, 1.0]])
    eps = 0.1
    got = det._layer_scores(x, eps)
    # by hand. Layer a, W = [[1, 2], [0, -1]]: f(x1) = (3, -1): d² = (9 + 4, 1 + 0) → c = 1, f − μ = (-1, 0),
    # ∇x d² = 2 Wᵀ P (f − μ) = 2·(−1, −2) → sign (−1, −1); x̃ = x + ε/σ = (1.2, 1.05); f(x̃) = (3.3, −1.05);
    # d² to μ_1 = 0.49 + 4·0.0025 = 0.5, to μ_0 = 10.89 + 4.41 → M = −0.5.
    # f(x2) = (4, −1) = μ_1: zero gradient → sign +1: x̃ = (2 − 0.2, 1 − 0.05) = (1.8, 0.95); f = (3.7, −0.95);
    # d² = 0.09 + 4·0.0025 = 0.1 → M = −0.1.
    # Layer b, w = (1, 3) overall (b∘a = x1 + x2·(2 − 1)) → g(x) = x1 + x2: g(x1) = 2 (c = 0, d² = 4),
    # ∇ = 2·2·(1, 1) > 0 → x̃ = x − ε/σ = (0.8, 0.95), g = 1.75 → M = −3.0625; g(x2) = 3 → x̃ = (1.8, 0.95),
    # g = 2.75 → M = −7.5625.
    want = torch.tensor([[-0.5, -3.0625], [-0.1, -7.5625]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(det._layer_scores(x, 0.0)[:, 0], -torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert tnr_at_tpr95(np.arange(100.0), np.array([1.0, 50.0, 99.0])) == pytest.approx(1 / 3)


@pytest.fixture(scope="module")
def fitted_ens():
    sc = OpenSetScenario(data={"source": "digits"}, known_classes=6, unknown_classes=[6, 7, 8, 9])
    ctx = RunContext(
        device=torch.device("cpu"),
        seed=0,
        scenario={
            "kind": "open_set",
            "num_classes": sc.num_classes,
            "input_shape": sc.input_shape,
            "num_sessions": 1,
            "fingerprint": "test",
        },
        backbone={"name": "mlp", "hidden": [64], "out_features": 32},
        base=TrainConfig(
            epochs=8,
            batch_size=64,
            optimizer=OptimizerConfig("adam", 1e-2, 0.0, False, 0.0),
            schedule="constant",
            selection="last",
        ),
        progress=False,
        memo={},
    )
    det = STRATEGIES.get("mahalanobis_ens")(epsilons=[0.0, 0.01], head="linear")
    det.setup(ctx)
    session = sc.session(0)
    det.ctx.start_session(0)
    det.learn(session.visible())
    return det, session, ctx


def test_ensemble_end_to_end(fitted_ens):
    det, session, ctx = fitted_ens
    info = det.info_
    assert info["epsilon"] in (0.0, 0.01) and info["ood_fit"] == "fgsm_source_val"
    assert info["layers"] == ["net.2", "net.5"] and len(info["alpha"]) == 2  # mlp: each Linear-BN-ReLU output
    tgt = session.eval_sets["target"].data
    x = tgt.transforms.test(tgt.x)
    pred = det.predict(x)
    assert osm.auroc(pred.unknown_score, tgt.targets >= 6) > 0.75
    # τ: 95% of the source validation accepted
    v = det.predict(session.validation.transforms.test(session.validation.x)).unknown_score
    assert (v <= 0).float().mean() >= 0.95 - 1 / len(v)
    fresh = STRATEGIES.get("mahalanobis_ens")(epsilons=[0.0, 0.01], head="linear")
    fresh.setup(ctx)
    fresh.load_state_dict(det.state_dict())
    torch.testing.assert_close(fresh.predict(x[:16]).unknown_score, pred.unknown_score[:16])
    with pytest.raises(ValueError, match="base: null"):
        STRATEGIES.get("mahalanobis_ens")(base="teen")
    with pytest.raises(ValueError, match="epsilons"):
        STRATEGIES.get("mahalanobis_ens")(epsilons=[-1.0])


def test_osbp_head_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(\|K\|\+1\)-way head"):
        STRATEGIES.get("osbp_head")()
