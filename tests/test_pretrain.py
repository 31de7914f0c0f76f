"""The recipe's `pretrain:` stage: validation, training on disjoint data, content-hash caching,
and an end-to-end class-incremental run on a pre-trained ViT (real data)."""

from __future__ import annotations

import json

import pytest
import torch

import openworld.models.prompts  # noqa: F401  (registers the `vit` backbone)
import openworld.scenarios.class_incremental  # noqa: F401
import openworld.strategies.ovor  # noqa: F401
from openworld.cache import Cache
from openworld.config import ConfigError, validate_recipe
from openworld.strategies import base as base_mod
from openworld.strategies.base import RunContext, TrainConfig

PRETRAIN = {"data": {"source": "digits"}, "classes": [5, 6, 7, 8, 9], "per_class": 30, "epochs": 1,
            "batch_size": 64}


def _recipe(**over):
    data = {
        "name": "pre",
        "scenario": {"kind": "cil", "data": {"source": "digits"}, "num_tasks": 5},
        "backbone": {"name": "cnn8"},
        "pretrain": dict(PRETRAIN),
        "strategies": {"ncm": {}},
    }
    data.update(over)
    return validate_recipe(data)


def test_config_section_is_validated_and_handed_to_the_backbone_block():
    r = _recipe()
    bb = r.backbone.model_dump()
    assert bb["pretrain"]["classes"] == [5, 6, 7, 8, 9]
    assert bb["pretrain"]["optimizer"]["name"] == "adamw" and bb["pretrain"]["schedule"] == "cosine"
    # the resolved recipe (both places, same values) validates again
    again = validate_recipe(r.to_dict())
    assert again.backbone.model_dump()["pretrain"] == bb["pretrain"]
    assert "pretrain" not in _recipe(pretrain=None).backbone.model_dump()
    with pytest.raises(ConfigError, match="pretrain.epochs"):
        _recipe(pretrain={**PRETRAIN, "epochs": 0})
    with pytest.raises(ConfigError, match=r"pretrain.lr: unknown key"):
        _recipe(pretrain={**PRETRAIN, "lr": 0.1})
    with pytest.raises(ConfigError, match="pretrain.data.source"):
        _recipe(pretrain={**PRETRAIN, "data": {"source": "nope"}})
    with pytest.raises(ConfigError, match="leak the scenario's classes"):
        _recipe(pretrain={**PRETRAIN, "classes": None})
    with pytest.raises(ConfigError, match="top-level `pretrain:`"):
        _recipe(pretrain=None, backbone={"name": "cnn8", "pretrain": {"epochs": 1}})


def _ctx(cache, memo=None, pretrain=None):
    pre = _recipe(pretrain=pretrain or PRETRAIN).backbone.model_dump()
    return RunContext(device=torch.device("cpu"), seed=0,
                      scenario={"kind": "cil", "num_classes": 10, "input_shape": (1, 8, 8), "num_sessions": 5},
                      backbone=pre, base=TrainConfig(), cache=cache, memo=memo, progress=False)


def test_pretrained_backbone_trains_once_and_is_cached(tmp_path, monkeypatch):
    cache = Cache(tmp_path / "cache")
    ctx = _ctx(cache)
    rng = torch.get_rng_state()
    enc = ctx.pretrained_backbone()
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched
    torch.manual_seed(123)
    random_init = _ctx(None)._new_backbone()
    a = enc.state_dict()
    assert any(not torch.equal(v, random_init.state_dict()[k]) for k, v in a.items())
    # create_backbone returns the same pre-trained weights (memo)
    again = ctx.create_backbone()
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in a.items())

    # a new process (fresh memo) loads it from the disk cache without training
    def boom(*args, **kwargs):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(base_mod, "train_classifier", boom)
    fresh = _ctx(cache, memo={}).pretrained_backbone()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in a.items())
    # another section is another hash: it trains (and here fails loudly)
    with pytest.raises(AssertionError, match="trained again"):
        _ctx(cache, memo={}, pretrain={**PRETRAIN, "epochs": 3}).pretrained_backbone()


@pytest.mark.slow
def test_pretrained_features_separate_held_out_classes(tmp_path):
    """Trained on digits 5–9 only, the encoder's features already separate digits 0–4 (nearest mean)."""
    from openworld.data.sources import load_digits
    from openworld.strategies.base import class_means

    ctx = _ctx(Cache(tmp_path / "c"), pretrain={**PRETRAIN, "per_class": None, "epochs": 15})
    enc = ctx.pretrained_backbone()
    src = load_digits()
    keep_tr = src.train.targets < 5
    keep_te = src.test.targets < 5
    tr = src.train.subset(torch.nonzero(keep_tr).flatten())
    te = src.test.subset(torch.nonzero(keep_te).flatten())
    f_tr, y_tr = ctx.extract_features(enc, tr)
    f_te, y_te = ctx.extract_features(enc, te)
    means = torch.nn.functional.normalize(class_means(f_tr, y_tr, range(5)), dim=1)
    pred = (torch.nn.functional.normalize(f_te, dim=1) @ means.T).argmax(1)
    assert float((pred == y_te).float().mean()) > 0.6  # chance: 0.2 (measured 0.75)


def test_pretrain_shape_mismatch(tmp_path):
    pre = {"data": {"source": "mnist"}, "classes": [0], "epochs": 1}
    ctx = _ctx(None, pretrain=pre)
    ctx.backbone_cfg["pretrain"]["data"]["root"] = "/nonexistent"
    with pytest.raises(Exception, match="mnist"):
        ctx.pretrained_backbone()


@pytest.mark.slow
def test_e2e_small_recipe_prompting_beats_finetuning(shared_data, tmp_path):
    """cil_small (one seed): a Fashion-MNIST-pretrained ViT, then class-incremental MNIST. Prompt
    tuning with a masked head forgets far less than naive fine-tuning of the whole network
    (3-seed run: F_T 26.9 vs 62.5, docs/results/issue3.md)."""
    from pathlib import Path

    from openworld.config import load_recipe
    from openworld.runner import Runner

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "scenarios" / "cil_small.yaml",
                         [f"scenario.data.root={shared_data}", f"pretrain.data.root={shared_data}"])
    runner = Runner(recipe, out=tmp_path, progress=False, seeds=[0], strategies=["ovor", "finetune"],
                    stream=open(tmp_path / "log.txt", "w"))
    runs = {r.strategy: r for r in runner.run()}
    assert all(r.status == "finished" for r in runs.values())
    res = json.loads((runs["ovor"].run_dir / "results.json").read_text())
    assert res["params"]["outlier_mode"] == "official"
    assert runs["ovor"].summary["forgetting"] < runs["finetune"].summary["forgetting"] - 20
