"""Stage-0 SimCLR pre-training (gcd-ncd card §9 R2): `pretrain: {objective: simclr}` — the loss
decreases, no label is read, the result is cached by content hash, and the config allows the
scenario's own training images (labels unused)."""

from __future__ import annotations

import pytest
import torch

import openworld.scenarios.discovery  # noqa: F401
from openworld.cache import Cache
from openworld.config import ConfigError, validate_recipe
from openworld.registry import DATASETS
from openworld.strategies import simclr as simclr_mod
from openworld.strategies.base import RunContext, TrainConfig
from openworld.strategies.simclr import simclr_pretrain

SIMCLR = {
    "objective": "simclr",
    "data": {"source": "digits"},
    "epochs": 2,
    "batch_size": 128,
    "temperature": 0.5,
    "proj_dim": 16,
    "optimizer": {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0},
}


def _recipe(pretrain):
    return validate_recipe(
        {
            "name": "s",
            "scenario": {"kind": "gcd", "data": {"source": "digits"}},
            "backbone": {"name": "cnn8"},
            "pretrain": pretrain,
            "strategies": {"kmeans": {}},
        }
    )


def _ctx(cache, pretrain=SIMCLR, memo=None):
    return RunContext(
        device=torch.device("cpu"),
        seed=0,
        scenario={"kind": "gcd", "num_classes": 10, "input_shape": (1, 8, 8)},
        backbone=_recipe(pretrain).backbone.model_dump(),
        base=TrainConfig(),
        cache=cache,
        memo=memo,
        progress=False,
    )


def _encoder():
    from openworld.models import create_backbone

    torch.manual_seed(0)
    return create_backbone("cnn8", in_channels=1, input_size=(1, 8, 8))


def test_loss_decreases_and_labels_are_never_read():
    train = DATASETS.get("digits")(root=None).train.subset(torch.arange(512)).detach_origin()
    hidden = train.hide_labels()
    assert (hidden.targets == -1).all()
    a, b = _encoder(), _encoder()
    kw = {
        "epochs": 4,
        "batch_size": 128,
        "temperature": 0.5,
        "proj_dim": 16,
        "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
    }
    info = simclr_pretrain(a, train, generator=torch.Generator().manual_seed(0), **kw)
    info_hidden = simclr_pretrain(b, hidden, generator=torch.Generator().manual_seed(0), **kw)
    assert len(info["epoch_loss"]) == 4 and info["steps"] == 4 * (512 // 128)
    assert info["epoch_loss"][-1] < info["epoch_loss"][0] - 0.05, info
    # same numbers whether the targets are the true ones or all -1: the labels play no part
    assert info["epoch_loss"] == info_hidden["epoch_loss"]
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    with pytest.raises(ValueError, match="batch_size"):
        simclr_pretrain(_encoder(), train.subset(torch.arange(10)), batch_size=64)


def test_cached_by_content_hash(tmp_path, monkeypatch):
    cache = Cache(tmp_path / "cache")
    calls = []
    orig = simclr_mod.simclr_pretrain

    def spy(encoder, data, **kw):
        calls.append(data)
        return orig(encoder, data, **kw)

    monkeypatch.setattr(simclr_mod, "simclr_pretrain", spy)
    rng = torch.get_rng_state()
    enc = _ctx(cache).pretrained_backbone()
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(calls) == 1 and (calls[0].targets == -1).all()  # the whole training split, labels hidden
    assert len(calls[0]) == len(DATASETS.get("digits")(root=None).train)
    fresh = _ctx(cache, memo={}).pretrained_backbone()  # new process: the disk cache, no training
    assert len(calls) == 1
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in enc.state_dict().items())
    _ctx(cache, pretrain={**SIMCLR, "temperature": 0.2}, memo={}).pretrained_backbone()  # another hash
    assert len(calls) == 2


def test_config():
    bb = _recipe(SIMCLR).backbone.model_dump()["pretrain"]  # the scenario's own images: allowed (no labels)
    assert bb["objective"] == "simclr" and bb["temperature"] == 0.5 and bb["proj_dim"] == 16
    with pytest.raises(ConfigError, match="leak the scenario's classes"):
        _recipe({k: v for k, v in SIMCLR.items() if k not in ("objective", "temperature", "proj_dim")})
    with pytest.raises(ConfigError, match="pretrain.objective"):
        _recipe({**SIMCLR, "objective": "byol"})
    sup = validate_recipe(
        {
            "name": "s",
            "scenario": {"kind": "gcd", "data": {"source": "digits"}},
            "backbone": {"name": "cnn8"},
            "strategies": {"kmeans": {}},
            "pretrain": {"data": {"source": "digits"}, "classes": [1]},
        }
    )
    assert "objective" not in sup.backbone.model_dump()["pretrain"]  # supervised cache keys unchanged
    assert validate_recipe(_recipe(SIMCLR).to_dict()).backbone.model_dump()["pretrain"] == bb


def test_trains_when_the_backbone_is_built_under_no_grad(tmp_path):
    # the k-means baselines build the backbone inside their no-grad feature extraction
    with torch.no_grad():
        enc = _ctx(Cache(tmp_path / "c"), pretrain={**SIMCLR, "epochs": 1}).pretrained_backbone()
    assert enc.out_features > 0
