"""The ``open_set`` scenario, the digits28 target, domain image folders and CIFAR-10-C corruptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import openworld.data.domains  # noqa: F401  (registers digits28, office_home, office31, domainnet)
from openworld.data.corruptions import SEVERITIES, corrupt, parse_domain
from openworld.data.domains import digits_to_28, load_digits28, load_domain_pair
from openworld.data.sources import SourceData
from openworld.data.transforms import get_transforms
from openworld.data.views import TensorData
from openworld.registry import register_dataset
from openworld.scenarios.open_set import OpenSetScenario


# --------------------------------------------------------------------------------------------------
# corruptions
# --------------------------------------------------------------------------------------------------
def _imgs(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)


def test_gaussian_and_shot_noise_follow_make_cifar_c():
    x = _imgs()
    out = corrupt(x, "gaussian_noise", 3, np.random.default_rng(5))
    ref = np.random.default_rng(5).normal(size=x.shape, scale=0.08)
    np.testing.assert_array_equal(out, (np.clip(x / 255.0 + ref, 0, 1) * 255).astype(np.uint8))
    out = corrupt(x, "shot_noise", 5, np.random.default_rng(1))
    ref = np.random.default_rng(1).poisson(x / 255.0 * 50) / 50
    np.testing.assert_array_equal(out, (np.clip(ref, 0, 1) * 255).astype(np.uint8))


def test_blur_contrast_pixelate_jpeg():
    from scipy.ndimage import gaussian_filter

    x = _imgs()
    blur = corrupt(x, "gaussian_blur", 5)
    ref = np.stack([gaussian_filter(im / 255.0, sigma=(1.0, 1.0, 0), mode="nearest", truncate=4.0) for im in x])
    np.testing.assert_array_equal(blur, (np.clip(ref, 0, 1) * 255).astype(np.uint8))
    con = corrupt(x, "contrast", 5)
    xf = x / 255.0
    m = xf.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_array_equal(con, (np.clip((xf - m) * 0.15 + m, 0, 1) * 255).astype(np.uint8))
    for name in ("pixelate", "jpeg"):
        out = corrupt(x, name, 3)
        assert out.shape == x.shape and out.dtype == np.uint8 and not np.array_equal(out, x)
    np.testing.assert_array_equal(corrupt(x, "clean", 0), x)
    # NCHW layout gives the same pixels
    nchw = corrupt(x.transpose(0, 3, 1, 2), "contrast", 2, layout="NCHW")
    np.testing.assert_array_equal(nchw.transpose(0, 2, 3, 1), corrupt(x, "contrast", 2))


def test_corruption_parameters_and_errors():
    assert SEVERITIES["gaussian_noise"] == (0.04, 0.06, 0.08, 0.09, 0.10)
    assert SEVERITIES["contrast"][4] == 0.15 and SEVERITIES["jpeg"] == (80, 65, 58, 50, 40)
    assert parse_domain("contrast:5") == ("contrast", 5) and parse_domain(["jpeg", 2]) == ("jpeg", 2)
    assert parse_domain("clean") == ("clean", 0)
    for bad in ("fog:3", "contrast:6", "contrast:0", 3):
        with pytest.raises(ValueError):
            parse_domain(bad)
    with pytest.raises(ValueError, match="Generator"):
        corrupt(_imgs(), "gaussian_noise", 1)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(_imgs().astype(np.float32), "contrast", 1)


# --------------------------------------------------------------------------------------------------
# digits28 (card §7.1)
# --------------------------------------------------------------------------------------------------
def test_digits28_preprocessing():
    src = load_digits28()
    assert len(src.train) == 1797 and len(src.test) == 0 and src.family == "gray28"
    x = src.train.x
    assert x.shape == (1797, 1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert float(x.mean()) == pytest.approx(0.156, abs=0.002)  # the card's pixel statistics
    assert float(x[:, :, :4].abs().sum()) == 0 and float(x[:, :, 24:].abs().sum()) == 0  # 4-pixel frame
    from sklearn.datasets import load_digits

    im = torch.tensor(load_digits().images[:2], dtype=torch.float32)[:, None] / 16
    ref = F.pad(F.interpolate(im, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4)).clamp(0, 1)
    torch.testing.assert_close(digits_to_28(load_digits().images[:2]), ref)


# --------------------------------------------------------------------------------------------------
# the scenario on synthetic in-memory sources
# --------------------------------------------------------------------------------------------------
@register_dataset("tiny_rgb_test")
def tiny_rgb(root=None, download=False, *, n_per_class: int = 12):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(5), n_per_class)
    x = torch.from_numpy(rng.integers(0, 256, (len(y), 3, 8, 8), dtype=np.uint8))
    pair = get_transforms("cifar", "none")
    return SourceData("tiny_rgb_test", TensorData(x, y, pair, "tr"), TensorData(x.clone(), y, pair, "te"),
                      classes=tuple("abcde"), family="cifar")


def test_corruption_sessions_layout_and_hidden_labels():
    sc = OpenSetScenario(data={"source": "tiny_rgb_test"}, known_classes=[1, 3], unknown_classes=[4, 0],
                         corruptions=["clean", "gaussian_noise:5", "contrast:5"], target_per_class=6, seed=2)
    assert sc.num_sessions == 3 and sc.num_classes == 4
    names = [s.name for s in sc.sessions()]
    assert names == ["clean", "gaussian_noise_s5", "contrast_s5"]
    s0, s1 = sc.session(0), sc.session(1)
    # source: known classes only (relabelled 0, 1), stratified 10% validation
    assert sorted(set(s0.labeled.targets.tolist())) == [0, 1] and len(s0.validation) == 2
    tgt = s1.eval_sets["target"]
    assert tgt.task == "open_set" and tgt.classes == ()
    assert tgt.options == {"known_classes": [0, 1], "unknown_classes": [2, 3], "num_samples": 24}
    assert np.bincount(tgt.data.targets.numpy()).tolist() == [6, 6, 6, 6]  # 1→0, 3→1, 4→2, 0→3
    assert s0.classes.seen == (0, 1) and s1.classes.new == ()
    assert (s1.visible().unlabeled.targets == -1).all() and s1.visible().eval_sets == {}
    # noise: deterministic per (seed, task index), different between domains, clean = original pixels
    again = OpenSetScenario(data={"source": "tiny_rgb_test"}, known_classes=[1, 3], unknown_classes=[4, 0],
                            corruptions=["clean", "gaussian_noise:5", "contrast:5"], target_per_class=6, seed=2)
    assert torch.equal(again.session(1).unlabeled.x, s1.unlabeled.x)
    assert not torch.equal(s0.unlabeled.x, s1.unlabeled.x)
    assert sc.describe()["target_hash"] == again.describe()["target_hash"]


def test_target_shots_support_is_disjoint_from_queries():
    sc = OpenSetScenario(data={"source": "tiny_rgb_test"}, known_classes=2, corruptions=["clean"], target_shots=3,
                         seed=1)
    s = sc.session(0)
    assert s.info["num_target_support"] == 6
    support = s.info["target_support"]
    assert np.bincount(support.targets.numpy()).tolist() == [3, 3]
    assert len(s.eval_sets["target"].data) == 60 - 6
    assert len(s.labeled) == 22 + 6  # source (24 known − 2 validation) + support
    sup_rows = set(support.origin[1].tolist())
    q_rows = set(s.eval_sets["target"].data.origin[1].tolist())
    assert not sup_rows & q_rows



def test_target_known_eval_set_holds_exactly_the_known_target_rows():
    """Card §8: eval sets ``target`` (all target samples), ``target_known``, ``source_val``. ``target_known``
    is the known-class part of the scored target set, classified over the known classes (metrics.md §3:
    ``acc``, ``acc_balanced``, ``per_class_acc``; its ``acc`` is the ``closed_acc`` of ``target``)."""
    sc = OpenSetScenario(data={"source": "tiny_rgb_test"}, known_classes=[1, 3], unknown_classes=[4, 0],
                         corruptions=["clean", "contrast:5"], target_per_class=6, seed=2)
    for index in range(sc.num_sessions):
        s = sc.session(index)
        assert list(s.eval_sets) == ["target", "target_known", "source_val"]
        tgt, tk = s.eval_sets["target"], s.eval_sets["target_known"]
        assert tk.task == "classification" and tk.classes == (0, 1) and tk.groups == {} and tk.options == {}
        t_rows, t_y = tgt.data.origin[1].numpy(), tgt.data.targets.numpy()
        k_rows, k_y = tk.data.origin[1].numpy(), tk.data.targets.numpy()
        np.testing.assert_array_equal(k_rows, t_rows[t_y < 2])  # exactly the known-class rows, same order
        np.testing.assert_array_equal(k_y, t_y[t_y < 2])
        assert np.bincount(k_y).tolist() == [6, 6]
        torch.testing.assert_close(tk.data.x, tgt.data.x[torch.as_tensor(t_y < 2)])  # same (corrupted) pixels
        assert tk.data.origin[0] is tgt.data.origin[0]  # one root: the runner's feature cache is shared
    assert sc.describe()["sizes"]["target_known"] == 12


def test_target_known_excludes_the_labelled_target_support():
    sc = OpenSetScenario(data={"source": "tiny_rgb_test"}, known_classes=2, corruptions=["clean"], target_shots=3,
                         seed=1)
    s = sc.session(0)
    known = s.eval_sets["target_known"].data
    assert len(known) == 24 - 6 and np.bincount(known.targets.numpy()).tolist() == [9, 9]
    assert not set(known.origin[1].tolist()) & set(s.info["target_support"].origin[1].tolist())
    assert s.info["num_target_known"] == 18

def test_scenario_errors():
    base = {"data": {"source": "tiny_rgb_test"}}
    with pytest.raises(ValueError, match="dafsos"):
        _ = OpenSetScenario(**base, protocol="dafsos").num_classes
    with pytest.raises(ValueError, match="known_classes"):
        _ = OpenSetScenario(**base, known_classes=[0, 9]).num_classes
    with pytest.raises(ValueError, match="unknown_classes"):
        _ = OpenSetScenario(**base, known_classes=[0, 1], unknown_classes=[1]).num_classes
    with pytest.raises(ValueError, match="not both"):
        _ = OpenSetScenario(**base, target={"source": "digits28"}, corruptions=["clean"]).num_classes
    with pytest.raises(ValueError, match="fog"):
        _ = OpenSetScenario(**base, corruptions=["fog:1"]).num_classes


# --------------------------------------------------------------------------------------------------
# domain image folders (Office-Home / Office-31 layouts)
# --------------------------------------------------------------------------------------------------
def _tree(root, dataset_dir, domains, classes, n=2):
    from PIL import Image

    for d in domains:
        for c in classes:
            p = root / dataset_dir / d / c
            p.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (10, 10), (i * 40, 10, 200)).save(p / f"{i}.jpg")


def test_domain_pair_office_home_aliases(tmp_path):
    _tree(tmp_path, "OfficeHome", ["Art", "RealWorld"], ["Bed", "Alarm_Clock", "Fork"])
    src = load_domain_pair(tmp_path, dataset="office_home", source_domain="Real World", target_domain="Art",
                           image_size=16)
    assert src.classes == ("Alarm_Clock", "Bed", "Fork")
    assert len(src.train) == len(src.test) == 6 and "RealWorld" in src.info["source_domain"]
    x, y = src.train[0]
    assert tuple(x.shape) == (3, 16, 16) and y == 0
    with pytest.raises(FileNotFoundError, match="Clipart"):
        load_domain_pair(tmp_path, dataset="office_home", source_domain="Art", target_domain="Clipart")


def test_office31_images_level_and_scenario(tmp_path):
    _tree(tmp_path, "office31", ["amazon/images", "dslr/images"], ["backpack", "bike", "ruler"], n=4)
    sc = OpenSetScenario(data={"source": "office31", "root": str(tmp_path), "source_domain": "amazon",
                               "target_domain": "dslr", "image_size": 16}, known_classes=[0, 1], unknown_classes=[2],
                         val_fraction=0.25)
    s = sc.session(0)
    assert s.classes.names == ("back_pack", "bike", "ruler")
    assert len(s.labeled) == 6 and len(s.validation) == 2 and len(s.unlabeled) == 12
    assert sc.input_shape == (3, 16, 16)


def test_mnist_to_digits_layout(shared_data):
    """Card §7.1: 5,994 source images of classes 0–5 (stratified 10% validation), 1,797 target digits."""
    sc = OpenSetScenario(data={"source": "mnist", "root": str(shared_data), "test_fraction": 0.0},
                         known_classes=[0, 1, 2, 3, 4, 5], unknown_classes=[6, 7, 8, 9], target={"source": "digits28"})
    s = sc.session(0)
    assert len(s.labeled) + len(s.validation) == 5994
    assert np.bincount(np.r_[s.labeled.targets.numpy(), s.validation.targets.numpy()]).tolist() == \
        [1001, 1127, 991, 1032, 980, 863]
    assert len(s.validation) == sum(round(0.1 * n) for n in [1001, 1127, 991, 1032, 980, 863])
    tgt = s.eval_sets["target"].data
    assert len(tgt) == 1797 and int((tgt.targets < 6).sum()) == 1083
    assert sc.input_shape == (1, 28, 28) and s.name == "digits28"
