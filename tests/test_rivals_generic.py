"""The runner's generic guarantees, checked for each rival of issues 11 and 14 (l2p, dualprompt, coda_prompt,
fact, gcd; crt, tau_norm, lade, ldam_drw, ride, coteaching): a killed run resumes to the same numbers, a run
whose outputs are non-finite fails alone, and ``learn`` only ever sees the label-stripped session (no eval
sets, unlabelled targets −1). The long-tail rivals' resume checks are in their own test files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from openworld.registry import STRATEGIES
from openworld.runner import Runner
from openworld.strategies.base import Prediction

TINY_VIT = {"name": "vit", "model_name": "vit_tiny_patch16_224", "img_size": 8, "patch_size": 2,
            "embed_dim": 32, "depth": 5, "num_heads": 2}
PROMPT_FAST = {"epochs": 1, "batch_size": 64}
RECIPES = {
    "cil": {
        "name": "rivals_cil",
        "scenario": {"kind": "cil", "data": {"source": "digits"}, "num_tasks": 2},
        "backbone": TINY_VIT,
        "strategies": {
            "l2p": {**PROMPT_FAST, "pool_size": 6, "length": 4, "top_k": 2},
            "dualprompt": {**PROMPT_FAST, "pool_size": 2, "e_length": 4, "g_length": 4},
            "coda_prompt": {**PROMPT_FAST, "pool_size": 6, "length": 4},
        },
        "seeds": [0], "device": "cpu",
    },
    "fscil": {
        "name": "rivals_fscil",
        "scenario": {"kind": "fscil", "data": {"source": "digits"}, "base_classes": 5, "ways": 1, "shots": 5},
        "backbone": {"name": "cnn8"},
        "base": {"epochs": 2, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
        "strategies": {"fact": {"defaults": "fact", "epochs": 2, "batch_size": 64, "lr": 0.1}},
        "seeds": [0], "device": "cpu",
    },
    "gcd": {
        "name": "rivals_gcd",
        "scenario": {"kind": "gcd", "data": {"source": "digits"}},
        "backbone": {"name": "cnn8"},
        "strategies": {"gcd": {"epochs": 1, "batch_size": 64, "proj_hidden": 64, "proj_bottleneck": 32,
                               "proj_out_dim": None, "proj_layers": 1, "lr": 0.01, "finetune": "all",
                               "kmeans_n_init": 2}},
        "seeds": [0], "device": "cpu",
    },
    "lt": {
        "name": "rivals_lt",
        "scenario": {"kind": "long_tail", "data": {"source": "digits"}, "imbalance": 10, "val_per_class": 10,
                     "test_distributions": ["uniform"]},
        "backbone": {"name": "mlp_experts", "trunk": 64, "out_features": 32},
        "strategies": {
            "crt": {"epochs": 1, "batch_size": 64, "crt_epochs": 1, "crt_batch_size": 64},
            "tau_norm": {"epochs": 1, "batch_size": 64},
            "lade": {"epochs": 1, "batch_size": 64},
            "ldam_drw": {"epochs": 1, "batch_size": 64},
            "ride": {"epochs": 1, "batch_size": 64},
            "coteaching": {"epochs": 1, "batch_size": 64},
        },
        "seeds": [0], "device": "cpu",
    },
}
LT_RIVALS = ["crt", "tau_norm", "lade", "ldam_drw", "ride", "coteaching"]
KIND = {"l2p": "cil", "dualprompt": "cil", "coda_prompt": "cil", "fact": "fscil", "gcd": "gcd",
        **{name: "lt" for name in LT_RIVALS}}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_runner(tmp_path: Path, name: str, **kwargs) -> Runner:
    import yaml

    from openworld.config import load_recipe

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPES[KIND[name]]))
    if not (tmp_path / "strategies").exists():
        (tmp_path / "strategies").symlink_to(ROOT / "strategies")  # the shipped presets (defaults: fact)
    recipe = load_recipe(path)
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return Runner(recipe, out=tmp_path / "runs", progress=False, stream=open(tmp_path / "log.txt", "a"),
                  strategies=[name], threads=1, **kwargs)


def results(tmp_path: Path, name: str) -> dict:
    recipe = RECIPES[KIND[name]]["name"]
    return json.loads((tmp_path / "runs" / recipe / name / "seed0" / "results.json").read_text())


def metrics_only(res: dict) -> list[dict]:
    return [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in res["sessions"]]


def test_every_rival_is_registered():
    assert {"l2p", "dualprompt", "coda_prompt", "fact", "gcd", *LT_RIVALS} <= set(STRATEGIES.names())


@pytest.mark.parametrize("name", ["l2p", "dualprompt", "coda_prompt", "fact"])
def test_killed_run_resumes_to_the_same_numbers(name, tmp_path, one_thread):
    make_runner(tmp_path / "a", name).run()
    reference = results(tmp_path / "a", name)
    with pytest.raises(KeyboardInterrupt):
        make_runner(tmp_path / "b", name, stop_after_session=0).run()
    assert results(tmp_path / "b", name)["status"] == "running"
    (done,) = make_runner(tmp_path / "b", name, resume=True).run()
    got = results(tmp_path / "b", name)
    assert done.status == "finished" and len(got["sessions"]) == len(reference["sessions"]) > 1
    assert metrics_only(got) == metrics_only(reference) and got["summary"] == reference["summary"]


@pytest.mark.parametrize("name", ["l2p", "fact", "gcd", *LT_RIVALS])
def test_non_finite_outputs_fail_only_that_run(name, tmp_path, monkeypatch, one_thread):
    cls = STRATEGIES.get(name)
    original = cls.predict

    def nan_predict(self, x):
        p = original(self, x)
        return Prediction(logits=torch.full_like(p.logits, float("nan")))

    monkeypatch.setattr(cls, "predict", nan_predict)
    monkeypatch.setattr(cls, "feature_cache_key", lambda self: None)  # predict is what the runner calls
    (run,) = make_runner(tmp_path, name).run()
    res = results(tmp_path, name)
    assert run.status == "failed" and res["status"] == "failed"
    assert f"strategy '{name}'" in res["reason"] and "non-finite logits" in res["reason"]


@pytest.mark.parametrize("name", ["l2p", "dualprompt", "coda_prompt", "fact", "gcd", *LT_RIVALS])
def test_learn_sees_only_the_label_stripped_session(name, tmp_path, monkeypatch, one_thread):
    cls = STRATEGIES.get(name)
    original = cls.learn
    seen = []

    def spying_learn(self, session):
        assert session.eval_sets == {}, "eval sets reached the strategy"
        if session.unlabeled is not None and len(session.unlabeled):
            assert bool((session.unlabeled.targets == -1).all()), "unlabelled targets reached the strategy"
        assert getattr(session, "oracle", None) is None
        seen.append(session.index)
        return original(self, session)

    monkeypatch.setattr(cls, "learn", spying_learn)
    (run,) = make_runner(tmp_path, name).run()
    assert run.status == "finished" and seen == list(range(len(seen))) and seen
    if name == "gcd":
        assert len(results(tmp_path, name)["sessions"]) == 1
