"""OOD scores ``maxlogit``, ``odin``, ``react``, ``knn``, ``vim`` (openworld/strategies/ood_scores.py).

* oracle fixtures: every score of the official OpenOOD postprocessors on a tiny seeded network
  (tests/fixtures/openood, made by its make_fixtures.py), reproduced through the strategies to 1e-6;
* hand-computed vectors (max logit, ReAct's percentile and clip, KNN's k-th distance) and the
  parameter checks;
* end to end through the runner on scikit-learn digits (known 0–5, unknown 6–9): the scores separate
  the unknown digits, ``learn`` sees only the label-stripped session, state round-trips, a killed
  incremental run resumes to the same numbers, and DA-FSOS episodes work.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import openworld.metrics.open_set  # noqa: F401  (registers the "open_set" engine)
import openworld.scenarios.open_set  # noqa: F401
import openworld.strategies.ood_scores  # noqa: F401  (registers the scores)
from openworld.config import load_recipe
from openworld.data.views import TensorData
from openworld.metrics import open_set as osm
from openworld.models.heads import ClassifierNet, CosineClassifier, LinearClassifier
from openworld.registry import STRATEGIES
from openworld.runner import Runner
from openworld.scenarios.open_set import OpenSetScenario
from openworld.strategies.base import OptimizerConfig, RunContext, TrainConfig
from openworld.strategies.ood_scores import knn_score, maxlogit_score, react_clip_value, vim_fit

FIX = Path(__file__).parent / "fixtures" / "openood"
ATOL = 1e-6
NAMES = ["maxlogit", "odin", "react", "knn", "vim"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def t64(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64)


def make_ctx(scenario: dict, memo=None, backbone=None) -> RunContext:
    return RunContext(
        device=torch.device("cpu"),
        seed=0,
        scenario={"kind": "open_set", "num_sessions": 1, "fingerprint": "t", **scenario},
        backbone=backbone or {"name": "mlp", "hidden": [64], "out_features": 32},
        base=TrainConfig(
            epochs=8,
            batch_size=64,
            optimizer=OptimizerConfig("adam", 1e-2, 0.0, False, 0.0),
            schedule="constant",
            selection="last",
        ),
        progress=False,
        memo={} if memo is None else memo,
    )


# ------------------------------------------------------------------------------------------------
# Oracle fixtures (official OpenOOD postprocessors)
# ------------------------------------------------------------------------------------------------
def _generator():
    spec = importlib.util.spec_from_file_location("openood_make_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny():
    gen = _generator()
    arrays = gen.tiny_problem(gen.SEED)
    return gen, arrays


def load(name: str) -> dict:
    return json.loads((FIX / f"{name}.json").read_text())


def tiny_detector(name: str, arrays, **params):
    """The strategy on the fixture network (Linear 12→16 + ReLU feature, linear head 16→10, float64),
    fitted on the fixture's source training / validation inputs exactly as ``learn`` would call it."""
    enc = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU())
    enc.out_features = 16
    head = LinearClassifier(16, 10)
    with torch.no_grad():
        enc[1].weight.copy_(t64(arrays["w1"]))
        enc[1].bias.copy_(t64(arrays["b1"]))
        head.fc.weight.copy_(t64(arrays["w2"]))
        head.fc.bias.copy_(t64(arrays["b2"]))
    det = STRATEGIES.get(name)(**params)
    det.setup(make_ctx({"num_classes": 10, "input_shape": (3, 2, 2)}))
    det.net = ClassifierNet(enc, head).double().eval()
    det.num_known = 10
    det._validation = TensorData(t64(arrays["x_val"]), torch.zeros(len(arrays["x_val"])))
    det._fit(TensorData(t64(arrays["x_train"]), torch.zeros(len(arrays["x_train"]))), range(10))
    return det


def cases(name: str):
    f = load(name)
    return [(name, i) for i in range(len(f.get("cases", [f])))]


def test_fixture_inputs_are_the_ones_the_oracle_saw(tiny):
    gen, arrays = tiny
    for name in NAMES:
        f = load(name)
        assert f["sha256"] == gen.problem_sha256(arrays) and f["seed"] == gen.SEED, name


@pytest.mark.parametrize("name,i", [c for n in NAMES for c in cases(n)])
def test_score_matches_openood(name, i, tiny):
    _, arrays = tiny
    f = load(name)
    case = f.get("cases", [f])[i]
    params = {
        "maxlogit": lambda c: {},
        "odin": lambda c: {"temperature": c["temperature"], "epsilon": c["noise"], "input_std": c["input_std"]},
        "react": lambda c: {"percentile": c["percentile"]},
        "knn": lambda c: {"k": c["K"]},
        "vim": lambda c: {"vim_dim": c["dim"]},
    }[name](case)
    det = tiny_detector(name, arrays, **params)
    with torch.no_grad():
        got = det._score(t64(arrays["x_test"]))
    torch.testing.assert_close(got.to(torch.float64), t64(case["scores"]), atol=ATOL, rtol=0)
    if name == "react":  # the clip value from the ID validation features (OpenOOD's setup)
        assert det.clip_ == pytest.approx(case["threshold"], abs=1e-9)
    if name == "vim":
        assert float(det.stats["alpha"]) == pytest.approx(case["alpha"], abs=1e-9)
        torch.testing.assert_close(det.stats["u"], t64(case["u"]), atol=1e-9, rtol=0)
    if name == "odin" and case["temperature"] == 1000:  # perturbation matters at the fixture's ε
        plain = torch.softmax(det._logits(t64(arrays["x_test"])) / 1000, 1).max(1).values
        assert (plain - got).abs().max() > 1e-6


# ------------------------------------------------------------------------------------------------
# Hand-computed vectors
# ------------------------------------------------------------------------------------------------
class Features(nn.Module):
    """Identity encoder: the inputs are the features."""

    def __init__(self, d):
        super().__init__()
        self.out_features = d

    def forward(self, x):
        return x


def identity_detector(name: str, head: nn.Module, train: torch.Tensor, val: torch.Tensor, **params):
    det = STRATEGIES.get(name)(**params)
    det.setup(make_ctx({"num_classes": head.num_classes, "input_shape": (train.shape[1],)}))
    det.net = ClassifierNet(Features(train.shape[1]), head).double().eval()
    det.num_known = head.num_classes
    det._validation = TensorData(val, torch.zeros(len(val)))
    det._fit(TensorData(train, torch.zeros(len(train))), range(head.num_classes))
    return det


def eye_head(d=2) -> LinearClassifier:
    head = LinearClassifier(d, d)
    with torch.no_grad():
        head.fc.weight.copy_(torch.eye(d))
        head.fc.bias.zero_()
    return head


def test_maxlogit_three_points():
    z = torch.tensor([[1.0, 3.0, 2.0], [-1.0, -2.0, -0.5], [0.0, 0.0, 0.0]])
    assert maxlogit_score(z).tolist() == [3.0, -0.5, 0.0]
    assert maxlogit_score(z.half()).dtype == torch.float32


def test_react_percentile_and_clipping_three_points():
    val = t64([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])  # all activations 0…5: 90th percentile (linear) = 4.5
    assert react_clip_value(val, 90) == pytest.approx(4.5, abs=1e-12)
    assert react_clip_value(val, 0) == 0.0 and react_clip_value(val, 100) == 5.0
    x = t64([[1.0, 6.0], [5.0, 0.5], [4.5, 4.6]])  # clipped: (1, 4.5), (4.5, 0.5), (4.5, 4.5)
    det = identity_detector("react", eye_head(), train=t64([[9.0, 9.0]]), val=val)
    assert det.clip_ == pytest.approx(4.5) and det.info_["react_source"] == "source_validation"
    want = [math.log(math.exp(1) + math.exp(4.5)), math.log(math.exp(4.5) + math.exp(0.5)), 4.5 + math.log(2)]
    torch.testing.assert_close(det._score(x), t64(want), atol=1e-12, rtol=0)
    train = identity_detector("react", eye_head(), train=t64([[9.0, 9.0]]), val=val, react_source="train")
    assert train.clip_ == 9.0 and train.info_["react_source"] == "source_train"
    # a cosine head works the same way (features → head), with the clip applied before it
    cos = CosineClassifier(2, 2, temperature=16.0)
    with torch.no_grad():
        cos.weight.copy_(torch.eye(2))
    det_c = identity_detector("react", cos, train=t64([[9.0, 9.0]]), val=val)
    f = x.clamp(max=4.5)
    want_c = torch.logsumexp(16 * torch.nn.functional.normalize(f, dim=1), dim=1)
    torch.testing.assert_close(det_c._score(x), want_c, atol=1e-12, rtol=0)


def test_knn_three_points():
    bank = t64([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    r = 1 / math.sqrt(2)
    q = t64([[1.0, 0.0], [0.0, 1.0], [r, r]])
    # squared distances: q1 → 0, 2, 4; q2 → 2, 0, 2; q3 → 2−√2, 2−√2, 2+√2
    s2 = 2 - math.sqrt(2)
    torch.testing.assert_close(knn_score(q, bank, 1), t64([0.0, 0.0, -s2]), atol=1e-12, rtol=0)
    torch.testing.assert_close(knn_score(q, bank, 2), t64([-2.0, -2.0, -s2]), atol=1e-12, rtol=0)
    torch.testing.assert_close(knn_score(q, bank, 3), t64([-4.0, -2.0, -(2 + math.sqrt(2))]), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        knn_score(q, bank, 2, "euclidean"), t64([-math.sqrt(2), -math.sqrt(2), -math.sqrt(s2)]), atol=1e-12, rtol=0
    )
    # chunked scan = one pass; the strategy normalises bank and queries (scale does not matter)
    torch.testing.assert_close(knn_score(q, bank, 2, chunk=1), knn_score(q, bank, 2), atol=0, rtol=0)
    det = identity_detector("knn", eye_head(), train=3 * bank, val=bank, k=2)
    torch.testing.assert_close(det._score(5 * q), t64([-2.0, -2.0, -s2]), atol=1e-12, rtol=0)
    assert det.info_["knn_bank"] == "source_train" and det.info_["knn_bank_size"] == 3


def test_vim_residual_is_orthogonal_to_the_principal_subspace():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(200, 6, generator=g, dtype=torch.float64) * t64([5, 4, 3, 0.3, 0.2, 0.1])
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    b = torch.zeros(4, dtype=torch.float64)  # u = 0
    st = vim_fit(f, w, b, dim=3)
    torch.testing.assert_close(st["u"], torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)
    # the residual space of this data is (close to) the last three axes
    assert st["basis"][:3].abs().max() < 0.1 and st["basis"].shape == (6, 3)
    res = (f @ st["basis"]).norm(dim=1)
    assert float(st["alpha"]) == pytest.approx(float((f @ w.T).max(1).values.mean() / res.mean()))


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,params,message",
    [
        ("odin", {"epsilon": -0.1}, r"odin: epsilon must be ≥ 0, got -0.1"),
        ("odin", {"input_std": [0.5, 0.0]}, r"odin: input_std must be positive"),
        ("odin", {"temperature": 0}, r"temperature must be positive"),
        ("react", {"percentile": 101}, r"react: percentile must be in \[0, 100\], got 101"),
        ("react", {"react_source": "test"}, r"react: react_source must be one of validation, train; got 'test'"),
        ("knn", {"k": 0}, r"knn: k must be a positive integer, got 0"),
        ("knn", {"k": 2.5}, r"knn: k must be a positive integer, got 2.5"),
        ("knn", {"knn_distance": "cosine"}, r"knn: knn_distance must be one of squared, euclidean; got 'cosine'"),
        (
            "vim",
            {"head": "cosine"},
            r"^vim: needs the weight and bias of a linear head; head must be 'linear', got 'cosine'$",
        ),
        ("vim", {"base": "teen"}, r"vim: needs the linear head of the shared source model \(base: null\)"),
        ("vim", {"vim_dim": 0}, r"vim: vim_dim must be a positive integer or null"),
        ("maxlogit", {"threshold": "best"}, r"threshold must be one of"),
        ("knn", {"alignment": "recenter"}, r"recenter"),
    ],
)
def test_parameter_validation(name, params, message):
    with pytest.raises(ValueError, match=message):
        STRATEGIES.get(name)(**params)


def test_errors_at_fit_and_score_time():
    bank = t64([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    with pytest.raises(ValueError, match=r"knn: k = 4 exceeds the 3 source_train features"):
        identity_detector("knn", eye_head(), train=bank, val=bank, k=4)
    with pytest.raises(ValueError, match=r"vim: vim_dim must be in \[1, 1\] for 2-d features, got 2"):
        identity_detector("vim", eye_head(), train=bank, val=bank, vim_dim=2)
    with pytest.raises(ValueError, match=r"react_source 'validation' needs a source validation split"):
        det = STRATEGIES.get("react")()
        det.setup(make_ctx({"num_classes": 2, "input_shape": (2,)}))
        det.net = ClassifierNet(Features(2), eye_head()).double()
        det.num_known = 2
        det._fit(TensorData(bank, torch.zeros(3)), range(2))
    odin = identity_detector(
        "odin",
        eye_head(3),
        train=torch.eye(3, dtype=torch.float64),
        val=torch.eye(3, dtype=torch.float64),
        input_std=[1.0, 2.0],
    )
    with pytest.raises(ValueError, match=r"odin: input_std has 2 values for inputs of shape \(1, 3\)"):
        odin._score(t64([[1.0, 2.0, 3.0]]))
    assert STRATEGIES.get("vim")().head == "linear" and STRATEGIES.get("odin")().temperature == 1000.0


def test_odin_perturbation_by_hand():
    # identity features, eye head, T = 1: CE(z, ŷ) with ŷ = argmax; ∇ = softmax(z) − onehot(ŷ)
    odin = identity_detector(
        "odin",
        eye_head(3),
        train=torch.eye(3, dtype=torch.float64),
        val=torch.eye(3, dtype=torch.float64),
        temperature=1.0,
        epsilon=0.1,
        input_std=[1.0, 2.0, 0.5],
    )
    x = t64([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = torch.softmax(x, 1)
    grad = p - torch.nn.functional.one_hot(x.argmax(1), 3)
    sign = torch.where(grad >= 0, 1.0, -1.0).double()
    x_t = x - 0.1 * sign / t64([1.0, 2.0, 0.5])
    torch.testing.assert_close(odin.perturb(x), x_t, atol=1e-12, rtol=0)
    # x2: all logits equal → ŷ = 0, ∇ = (−2/3, 1/3, 1/3): moves towards class 0
    torch.testing.assert_close(odin.perturb(x)[1], t64([0.1, -0.05, -0.2]), atol=1e-12, rtol=0)
    torch.testing.assert_close(odin._score(x), torch.softmax(x_t, 1).max(1).values, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# End to end on digits through the runner
# ------------------------------------------------------------------------------------------------
DIGITS = {
    "name": "ood_scores_digits",
    "scenario": {
        "kind": "open_set",
        "data": {"source": "digits"},
        "known_classes": [0, 1, 2, 3, 4, 5],
        "unknown_classes": [6, 7, 8, 9],
    },
    "backbone": {"name": "mlp", "hidden": [64], "out_features": 32},
    "base": {
        "epochs": 8,
        "batch_size": 64,
        "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
        "schedule": "constant",
        "selection": "last",
    },
    "strategies": {
        "maxlogit": {"head": "linear"},
        "odin": {"head": "linear"},
        "react": {"head": "linear"},
        "knn": {},
        "vim": {},
        "knn_adabn": {"strategy": "knn", "alignment": "adabn"},
        "vim_adabn": {"strategy": "vim", "alignment": "adabn"},
    },
    "seeds": [0],
    "device": "cpu",
}


def run_recipe(recipe: dict, tmp_path: Path, **kwargs):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return Runner(
        load_recipe(path),
        out=tmp_path / "runs",
        progress=False,
        stream=open(tmp_path / "log.txt", "a"),
        threads=1,
        **kwargs,
    ).run()


def test_digits_end_to_end_label_stripped(tmp_path, monkeypatch):
    seen = []
    for name in NAMES:
        cls = STRATEGIES.get(name)
        original = cls.learn

        def spying_learn(self, session, _original=original):
            assert session.eval_sets == {}, "eval sets reached the strategy"
            assert session.unlabeled is not None and bool((session.unlabeled.targets == -1).all()), (
                "unlabelled targets reached the strategy"
            )
            assert getattr(session, "oracle", None) is None
            seen.append(self.name)
            return _original(self, session)

        monkeypatch.setattr(cls, "learn", spying_learn)
    out = run_recipe(DIGITS, tmp_path)
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    assert sorted(seen) == sorted(["maxlogit", "odin", "react", "knn", "vim", "knn", "vim"])
    res = {r.strategy: json.loads((r.run_dir / "results.json").read_text()) for r in out}
    auroc = {k: r["sessions"][0]["metrics"]["target"]["auroc"] for k, r in res.items()}
    for k, v in auroc.items():  # in-domain unknown digits: every score well above chance (percent)
        assert v > 70, (k, auroc)
    assert auroc["knn"] > 60
    info = {k: r["sessions"][0]["strategy_info"] for k, r in res.items()}
    assert info["react"]["react_source"] == "source_validation" and info["react"]["react_clip"] > 0
    assert info["knn"]["knn_bank"] == "source_train" and info["knn"]["knn_bank_size"] > 500
    assert info["vim"]["vim_dim"] == 16 and info["vim"]["vim_alpha"] > 0
    assert info["knn_adabn"]["adabn_layers"] >= 1
    assert info["odin"]["odin_temperature"] == 1000.0
    # AdaBN changes the target features, not the source statistics: the knn bank is the same
    assert info["knn_adabn"]["knn_bank_size"] == info["knn"]["knn_bank_size"]
    assert auroc["knn_adabn"] != auroc["knn"]


@pytest.fixture(scope="module")
def fitted():
    sc = OpenSetScenario(data={"source": "digits"}, known_classes=6, unknown_classes=[6, 7, 8, 9])
    return sc, {}


@pytest.mark.parametrize(
    "name,params",
    [("maxlogit", {}), ("odin", {"head": "linear"}), ("react", {}), ("knn", {"alignment": "adabn"}), ("vim", {})],
)
def test_state_dict_round_trip(name, params, fitted):
    sc, memo = fitted
    ctx = {"num_classes": sc.num_classes, "input_shape": sc.input_shape}
    det = STRATEGIES.get(name)(**params)
    det.setup(make_ctx(ctx, memo))
    session = sc.session(0)
    det.ctx.start_session(0)
    det.learn(session.visible())
    tgt = session.eval_sets["target"].data
    x = tgt.transforms.test(tgt.x[:64])
    fresh = STRATEGIES.get(name)(**params)
    fresh.setup(make_ctx(ctx, memo))
    fresh.load_state_dict(det.state_dict())
    a, b = det.predict(x), fresh.predict(x)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.unknown_score, b.unknown_score, atol=0, rtol=0)
    assert osm.auroc(det.predict(tgt.transforms.test(tgt.x)).unknown_score, tgt.targets >= 6) > 0.7


FSCIL = {
    "name": "ood_scores_fscil",
    "scenario": {"kind": "fscil", "data": {"source": "digits"}, "base_classes": 7, "ways": 1, "shots": 5},
    "backbone": {"name": "mlp", "hidden": [64], "out_features": 32},
    "base": {
        "epochs": 4,
        "batch_size": 64,
        "optimizer": {"name": "adam", "lr": 0.01, "weight_decay": 0.0},
        "schedule": "constant",
        "selection": "last",
    },
    "strategies": {
        "knn_teen": {"strategy": "knn", "base": "teen", "k": 5},
        "react_teen": {"strategy": "react", "base": "teen", "react_source": "train"},
    },
    "seeds": [0],
    "device": "cpu",
}


def test_killed_incremental_run_resumes_to_the_same_numbers(tmp_path):
    def metrics_only(path):
        res = json.loads(path.read_text())
        return [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in res["sessions"]], res

    ref = run_recipe(FSCIL, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(FSCIL, tmp_path / "b", stop_after_session=0)
    again = run_recipe(FSCIL, tmp_path / "b", resume=True)
    assert len(ref) == len(again) == 2
    for r, g in zip(ref, again):
        assert r.status == g.status == "finished", (r.strategy, r.reason, g.reason)
        want, res_a = metrics_only(r.run_dir / "results.json")
        got, res_b = metrics_only(g.run_dir / "results.json")
        assert len(got) == 4 and got == want and res_a["summary"] == res_b["summary"]


def test_dafsos_episodes(tmp_path):
    recipe = {
        "name": "ood_scores_dafsos",
        "scenario": {
            "kind": "open_set",
            "protocol": "dafsos",
            "data": {"source": "digits"},
            "meta_train_classes": 5,
            "n_way": 3,
            "n_unknown": 2,
            "shots": 2,
            "queries": 5,
            "episodes": 3,
        },
        "backbone": {"name": "mlp", "hidden": [64], "out_features": 32},
        "base": DIGITS["base"],
        "strategies": {
            "maxlogit": {"threshold": "target_otsu"},
            "odin": {"threshold": "target_otsu", "epsilon": 0.01},
            "react": {"threshold": "target_otsu"},
            "knn": {"threshold": "target_otsu", "k": 3, "alignment": "adabn"},
        },
        "seeds": [0],
        "device": "cpu",
    }
    out = run_recipe(recipe, tmp_path)
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    for r in out:
        res = json.loads((r.run_dir / "results.json").read_text())
        assert len(res["sessions"]) == 3 and res["summary"]["episodes/auroc"] > 55, (r.strategy, res["summary"])
    info = {
        r.strategy: json.loads((r.run_dir / "results.json").read_text())["sessions"][-1]["strategy_info"] for r in out
    }
    assert info["knn"]["knn_bank"] == "episode_support" and info["knn"]["knn_bank_size"] == 6
    assert info["react"]["react_source"] == "source_validation"
    sc = OpenSetScenario(**{k: v for k, v in recipe["scenario"].items() if k != "kind"})
    vim = STRATEGIES.get("vim")(threshold="target_otsu")
    vim.setup(make_ctx({"num_classes": sc.num_classes, "input_shape": sc.input_shape}))
    with pytest.raises(ValueError, match="vim: DA-FSOS episodes are not supported"):
        vim.learn(sc.session(0).visible())
