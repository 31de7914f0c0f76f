"""FACT (card docs/methods/fact.md): the pure pieces against the official code's outputs (oracle fixtures
in tests/fixtures/fact, made by its make_fixtures.py), FACT's own cached base model, and end to end runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openworld.cache import Cache
from openworld.config import load_recipe
from openworld.models import create_backbone
from openworld.runner import Runner
from openworld.scenarios.fscil import FSCILScenario
from openworld.strategies.base import RunContext, TrainConfig, class_means
from openworld.strategies.fact import (
    FACT,
    backbone_halves,
    cosine_logits,
    draw_virtual_mask,
    fact_losses,
    integrated_logits,
    mix_features,
    virtual_logits,
)

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "fact"
ATOL = 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    """The training tests run on one CPU thread (fast and stable on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load(name: str) -> dict:
    return json.loads((FIX / f"{name}.json").read_text())


def t64(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64)


def close(a, b) -> None:
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), t64(b), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# Oracle fixtures
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [1, 7])
def test_mask_matches_official_draws(seed):
    f = load(f"mask_seed{seed}")
    mask = draw_virtual_mask(f["base_class"], f["num_classes"], seed, picks=3)
    assert torch.equal(mask, t64(f["mask"]))
    assert (mask[:, : f["base_class"]] == 0).all() and (mask[:, f["base_class"]:].sum(0) == 3).all()


def test_base_train_loss_terms_match_official():
    f = load("base_train_virtual")
    a = f["args"]
    B, T = a["base_class"], a["temperature"]
    weight, z, y = t64(f["weight"]), t64(f["z"]), torch.tensor(f["y"])
    logits = virtual_logits(z, weight, B, T)
    close(logits, f["logits"])  # MYNET.forward_metric
    mixed = cosine_logits(t64(f["h_mixed"]), weight, T)
    close(mixed, f["mixed_logits"])  # MYNET.post_encode of the mixed activations
    index = torch.tensor(f["index"])
    out = fact_losses(t64(f["logits"]), t64(f["mixed_logits"]), y, index, t64(f["mask"]), B)
    for name in ("ce", "virtual", "mix_virtual", "mix_base"):
        close(out[name], f[f"{name}_loss"])
    keep = out["mix_selected"]
    assert out["virtual_target"].tolist() == f["virtual_target"]
    assert out["mix_virtual_target"][keep].tolist() == f["mix_virtual_target"]
    assert out["mix_base_target"][keep].tolist() == f["mix_base_target"]
    total = out["ce"] + a["balance"] * (out["virtual"] + out["mix_virtual"] + out["mix_base"])
    close(total, f["total_loss"])


def test_base_train_before_loss_iter_is_plain_ce():
    f = load("base_train_ce_only")
    a = f["args"]
    logits = virtual_logits(t64(f["z"]), t64(f["weight"]), a["base_class"], a["temperature"])
    close(logits, f["logits"])
    out = fact_losses(logits, None, torch.tensor(f["y"]), None, None, a["base_class"])
    assert set(out) == {"ce"}
    close(out["ce"], f["ce_loss"])
    close(out["ce"], f["total_loss"])


@pytest.mark.parametrize("name", ["test_intergrate_s2", "test_intergrate_s1_eta05"])
def test_integrated_inference_matches_official(name):
    f = load(name)
    a = f["args"]
    B, W, s = a["base_class"], a["way"], f["session"]
    new = list(range(B, B + s * W))
    close(class_means(t64(f["shot_z"]), torch.tensor(f["shot_y"]), new), f["prototypes"])  # update_fc_avg
    probs = integrated_logits(t64(f["z"]), t64(f["class_rows"]), t64(f["virtual_rows"]), a["temperature"], a["eta"],
                              topk=40)
    close(probs, f["logits"])
    close(probs.sum(1), torch.ones(len(probs)))


# ------------------------------------------------------------------------------------------------
# Properties of the pieces
# ------------------------------------------------------------------------------------------------
def test_virtual_rows_learn_only_through_mixup_logits():
    torch.manual_seed(0)
    B, K = 3, 7
    w = torch.randn(K, 5, requires_grad=True)
    z, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    mask = draw_virtual_mask(B, K, 0)
    out = fact_losses(virtual_logits(z, w, B, 16.0), None, y, None, mask, B)
    (out["ce"]).backward()
    assert (w.grad[B:] == 0).all()
    w.grad = None
    logits = virtual_logits(z, w, B, 16.0)
    index = torch.tensor([1, 0, 3, 2, 5, 4])
    out = fact_losses(logits, None, y, None, mask, B)
    terms = fact_losses(logits, cosine_logits(z, w, 16.0), y, index, mask, B)
    terms["virtual"].backward(retain_graph=True)
    assert (w.grad[B:] == 0).all()  # the instance-level virtual loss does not reach the virtual rows
    (terms["mix_virtual"] + terms["mix_base"]).backward()
    assert (w.grad[B:].abs().sum() > 0)
    w.grad = None
    all_grad = fact_losses(virtual_logits(z, w, B, 16.0, detach_virtual=False), cosine_logits(z, w, 16.0), y, index,
                           mask, B)
    all_grad["virtual"].backward()
    assert w.grad[B:].abs().sum() > 0  # virtual_grad="all"


def test_pseudo_label_rules_and_empty_mixup_pairs():
    B, K = 2, 5
    logits = torch.tensor([[5.0, 1.0, -3.0, -1.0, -2.0]])
    mask = torch.zeros(B, K)
    mask[0, 2] = 1.0  # class 0 may only pick virtual class 2, whose logit is negative
    y = torch.tensor([0])
    masked = fact_losses(logits, logits, y, torch.tensor([0]), mask, B)
    plain = fact_losses(logits, logits, y, torch.tensor([0]), mask, B, pseudo_label_rule="argmax")
    # released: un-picked columns are multiplied to 0, so the first of them (virtual class 3) beats -3
    assert masked["virtual_target"].tolist() == [3]
    assert plain["virtual_target"].tolist() == [3]
    mask[0, 2] = 0.0
    mask[0, 4] = 1.0
    logits2 = torch.tensor([[5.0, 1.0, 2.0, 3.0, 1.0]])
    assert fact_losses(logits2, None, y, None, mask, B)["ce"].isfinite()
    m2 = fact_losses(logits2, logits2, y, torch.tensor([0]), mask, B)
    assert m2["virtual_target"].tolist() == [4]  # the only picked virtual class with a positive logit
    assert fact_losses(logits2, logits2, y, torch.tensor([0]), mask, B, pseudo_label_rule="argmax")[
        "virtual_target"].tolist() == [3]
    # a batch whose permutation pairs only same-class samples: mixup terms are 0, not NaN
    assert m2["mix_virtual"].item() == 0.0 and m2["mix_base"].item() == 0.0
    all_cols = fact_losses(logits2, None, y, None, None, B, ce_columns="all")["ce"]
    assert all_cols > fact_losses(logits2, None, y, None, None, B)["ce"]


def test_integrated_logits_options():
    torch.manual_seed(1)
    z, rows, virt = torch.randn(4, 6), torch.randn(5, 6), torch.randn(9, 6)
    p = integrated_logits(z, rows, virt, 16.0, 0.0)
    torch.testing.assert_close(p, torch.softmax(cosine_logits(z, rows, 16.0), 1))  # eta 0: plain cosine
    q = integrated_logits(z, rows, virt, 16.0, 0.3, topk=40, proj_normalize="class")  # topk > V: all kept
    assert torch.allclose(q.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="proj_normalize"):
        integrated_logits(z, rows, virt, 16.0, 0.3, proj_normalize="rows")
    pre = torch.randn(3, 2)
    torch.testing.assert_close(mix_features(pre, 0.25, torch.tensor([2, 0, 1])), 0.25 * pre + 0.75 * pre[[2, 0, 1]])


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("resnet20", {}, (3, 32, 32)),
        ("cnn28", {}, (1, 28, 28)),
        ("cnn8", {}, (1, 8, 8)),
        ("mlp", {"hidden": (16,), "out_features": 8}, (12,)),
        ("resnet18", {"small_input": True}, (3, 32, 32)),
    ],
)
def test_backbone_halves_compose_to_the_encoder(name, kwargs, shape):
    torch.manual_seed(0)
    enc = create_backbone(name, in_channels=shape[0] if len(shape) == 3 else 1, input_size=shape, **kwargs).eval()
    pre, post = backbone_halves(enc)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(post(pre(x)), enc(x))


def test_constructor_choices_are_checked():
    ctx = _ctx(None)
    with pytest.raises(ValueError, match="pseudo_label_rule must be one of 'masked', 'argmax'"):
        FACT(pseudo_label_rule="paper").setup(ctx)
    with pytest.raises(ValueError, match="eta"):
        FACT(eta=1.5).setup(ctx)


# ------------------------------------------------------------------------------------------------
# Own base model, own cache key; real data end to end
# ------------------------------------------------------------------------------------------------
def _scenario():
    return FSCILScenario(data={"source": "digits"}, base_classes=5, ways=1, shots=5)


def _ctx(cache, scenario=None, seed=0):
    sc = scenario or _scenario()
    return RunContext(
        device="cpu", seed=seed,
        scenario={"kind": "fscil", "num_classes": sc.num_classes, "input_shape": sc.input_shape,
                  "num_sessions": sc.num_sessions, "fingerprint": "digits-test"},
        backbone={"name": "cnn8"},
        base=TrainConfig.from_dict({"epochs": 30, "batch_size": 64, "temperature": 16}),
        cache=cache, progress=False,
    )


def _run(strategy, ctx, scenario):
    for session in scenario.sessions():
        ctx.start_session(session.index)
        strategy.learn(session.visible())
    return strategy


def _accuracies(strategy, scenario):
    """Per-class recall (base mean, novel mean) on the last session's test set."""
    last = list(scenario.sessions())[-1]
    data = last.eval_sets["test"].data
    pred = strategy.predict(data.x).logits.argmax(1)
    y = data.targets
    recall = torch.stack([(pred[y == c] == c).double().mean() for c in range(int(y.max()) + 1)])
    return recall[:5].mean().item(), recall[5:].mean().item()


def test_own_cache_key_loads_instead_of_training(tmp_path, monkeypatch, caplog):
    scenario = _scenario()
    cache = Cache(tmp_path)
    calls = []

    def no_shared(*a, **k):
        raise AssertionError("FACT must not use the shared base model")

    monkeypatch.setattr(RunContext, "base_model", no_shared)
    orig = FACT._train_base
    monkeypatch.setattr(FACT, "_train_base", lambda self, *a: calls.append(1) or orig(self, *a))
    first = FACT(epochs=6, batch_size=64)
    ctx = _ctx(cache, scenario)
    first.setup(ctx)
    with caplog.at_level("INFO", logger="openworld.strategies.fact"):
        _run(first, ctx, scenario)
    assert calls == [1] and "training its own base model" in caplog.text
    entries = list(tmp_path.rglob("*.json"))
    assert [json.loads(p.read_text())["tag"] for p in entries] == ["fact_base"]  # nothing else in the cache
    base, novel = _accuracies(first, scenario)
    assert base > 0.8 and novel > 0.3, (base, novel)  # chance: 1/10

    # same settings, a new process (empty memo): loaded from disk, not trained; identical predictions
    second = FACT(epochs=6, batch_size=64, eta=0.5)  # an inference-only knob is not part of the key
    ctx2 = _ctx(cache, scenario)
    second.setup(ctx2)
    with caplog.at_level("INFO", logger="openworld.strategies.fact"):
        ctx2.start_session(0)
        second.learn(next(iter(scenario.sessions())).visible())
    assert calls == [1] and "loaded from the cache" in caplog.text
    assert second.run_info()["fact_base"]["source"] == "cache"
    assert torch.equal(second.weights[:5], first.weights[:5])

    # different training settings, different key
    s0 = next(iter(scenario.sessions())).visible()
    keys = set()
    for kw in ({"epochs": 6, "batch_size": 64}, {"epochs": 6, "batch_size": 64, "balance": 0.1},
               {"epochs": 7, "batch_size": 64}, {"epochs": 6, "batch_size": 64, "pseudo_label_rule": "argmax"}):
        s = FACT(**kw)
        s.setup(_ctx(cache, scenario))
        keys.add(s.base_cache_key(s0))
    assert len(keys) == 4
    s = FACT(epochs=6, batch_size=64)
    s.setup(_ctx(cache, scenario, seed=1))
    assert s.base_cache_key(s0) not in keys


def test_state_dict_round_trip(tmp_path):
    scenario = _scenario()
    ctx = _ctx(Cache(tmp_path), scenario)
    a = FACT(epochs=2, batch_size=64, bn_passes="single", loss_iter=1)
    a.setup(ctx)
    _run(a, ctx, scenario)
    state = a.state_dict()
    b = FACT(epochs=2, batch_size=64, bn_passes="single", loss_iter=1)
    b.setup(_ctx(None, scenario))
    b.load_state_dict(state)
    x = list(scenario.sessions())[-1].eval_sets["test"].data.x[:50]
    torch.testing.assert_close(b.predict(x).logits, a.predict(x).logits)
    assert b.feature_cache_key() == a.feature_cache_key()


def test_runner_second_entry_reuses_the_base_model_and_keeps_the_shared_one_apart(tmp_path):
    """Through the runner on digits (quickstart): FACT and TEEN side by side; a second FACT entry with
    another eta reuses FACT's base model from memory; the shared base model (ncm) has its own cache entry."""
    overrides = ["strategies={fact: {epochs: 8, batch_size: 64}, fact_eta: {strategy: fact, epochs: 8, "
                 "batch_size: 64, eta: 0.5}, ncm: {}}", "base.epochs=8"]
    recipe = load_recipe(ROOT / "scenarios" / "quickstart.yaml", overrides)
    out = Runner(recipe, out=tmp_path, progress=False, stream=open(tmp_path / "log.txt", "w")).run()
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    res = {r.strategy: json.loads((r.run_dir / "results.json").read_text())["sessions"] for r in out}
    assert res["fact"][0]["strategy_info"]["fact_base"]["source"] == "trained"
    assert res["fact_eta"][0]["strategy_info"]["fact_base"]["source"] == "memo"
    assert res["fact"][0]["metrics"]["test"]["acc"] == res["fact_eta"][0]["metrics"]["test"]["acc"]
    assert res["fact"][0]["metrics"]["test"]["acc"] > 80
    assert res["fact"][-1]["metrics"]["test"]["acc_novel"] > 25  # chance among 10 classes: 10
    tags = sorted(json.loads(p.read_text())["tag"] for p in (tmp_path / ".cache").rglob("*.json"))
    assert tags == ["base", "fact_base"]  # ncm's shared model and FACT's own, under separate keys


@pytest.mark.slow
def test_omniglot_small_tiny(tmp_path, shared_data):
    """Real Omniglot (shared data; skipped without it), 142 base characters, 2 incremental 10-way 5-shot
    sessions, 6 epochs (about 15 s on one core; `-m slow`)."""
    overrides = [f"scenario.data.root={shared_data}", "scenario.num_sessions=3",
                 "strategies={fact: {defaults: fact, epochs: 6, batch_size: 128, lr: 0.1, temperature: 16}}"]
    recipe = load_recipe(ROOT / "scenarios" / "fscil_omniglot_small.yaml", overrides)
    out = Runner(recipe, out=tmp_path, progress=False, seeds=[1], stream=open(tmp_path / "log.txt", "w")).run()
    assert all(r.status == "finished" for r in out), [(r.strategy, r.reason) for r in out]
    s = json.loads((out[0].run_dir / "results.json").read_text())["sessions"]
    assert s[0]["metrics"]["test"]["acc"] > 30  # chance 0.7 %
    assert s[-1]["metrics"]["test"]["acc_novel"] > 20  # chance among 162 classes: 0.6 %
