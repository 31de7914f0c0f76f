"""Dataset loaders: real shared data, fake on-disk trees written here, error messages, determinism."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openworld.data import sources as S
from openworld.data.sources import DataNotFoundError, SourceData, load_source
from openworld.data.views import FileData, TensorData, batches
from openworld.registry import DATASETS

pytestmark = pytest.mark.usefixtures("isolated_cache")

ALL_SOURCES = (
    "digits",
    "cifar10",
    "cifar100",
    "mnist",
    "fashion_mnist",
    "omniglot",
    "image_folder",
    "mini_imagenet",
    "cub200",
    "imagenet_r",
    "synth_hier",
)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> None:
    arr = np.asarray(arr, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)


def assert_names(err: DataNotFoundError, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg, "the message is one paragraph"
    for n in needles:
        assert n in msg, f"{n!r} not in message: {msg}"


# ----------------------------------------------------------------------------------------------
# registry, roots
# ----------------------------------------------------------------------------------------------
def test_every_source_is_registered():
    for name in ALL_SOURCES:
        fn = DATASETS.get(name)
        assert fn is getattr(S, f"load_{name}")


def test_resolve_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENWORLD_DATA", str(tmp_path / "env"))
    assert S.resolve_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert S.resolve_root(None) == tmp_path / "env"
    monkeypatch.delenv("OPENWORLD_DATA")
    monkeypatch.chdir(tmp_path)
    assert S.resolve_root(None) == tmp_path / "data"


def test_hash_key_matches_card_vector():
    assert S.hash_key("fscil", 0, 6, 6) == 1346283870977963478  # FSCIL card T7


# ----------------------------------------------------------------------------------------------
# embedded / synthetic
# ----------------------------------------------------------------------------------------------
def test_digits_split_is_stratified_and_deterministic():
    a = load_source("digits")
    b = S.load_digits()
    assert isinstance(a.train, TensorData) and a.family == "digits" and a.num_classes == 10
    assert a.train.x.dtype == torch.float32 and tuple(a.train.x.shape[1:]) == (1, 8, 8)
    assert len(a.train) + len(a.test) == 1797
    assert 0.0 <= float(a.train.x.min()) and float(a.train.x.max()) <= 1.0
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.targets, b.test.targets)
    total = torch.bincount(torch.cat([a.train.targets, a.test.targets]), minlength=10)
    test = torch.bincount(a.test.targets, minlength=10)
    assert test.tolist() == [round(int(n) / 3) for n in total]
    assert a.info["split"]["num_test"] == len(a.test)
    other = S.load_digits(split_seed=1)
    assert not torch.equal(other.test.x, a.test.x)


def _synth_reference(seed: int, n_tr: int, n_te: int):
    """The card's generator written sample by sample, in the card's draw order."""
    rng = np.random.default_rng(seed)
    mu_g = [3.0 * rng.standard_normal(32) for _ in range(20)]
    mu = [mu_g[c % 20] + rng.standard_normal(32) for c in range(100)]
    a1 = rng.normal(0.0, 1 / np.sqrt(32), size=(32, 128))
    a2 = rng.normal(0.0, 1 / np.sqrt(128), size=(128, 256))
    tr, te = [], []
    for c in range(100):
        for _ in range(n_tr):
            tr.append(np.tanh((mu[c] + 2.0 * rng.standard_normal(32)) @ a1) @ a2)
        for _ in range(n_te):
            te.append(np.tanh((mu[c] + 2.0 * rng.standard_normal(32)) @ a1) @ a2)
    return np.asarray(tr, dtype=np.float32), np.asarray(te, dtype=np.float32)


def test_synth_hier_shapes_determinism_and_draw_order():
    a = load_source("synth_hier")
    b = S.load_synth_hier()
    assert a.family == "vector" and a.num_classes == 100
    assert tuple(a.train.x.shape) == (10000, 256) and tuple(a.test.x.shape) == (5000, 256)
    assert a.train.x.dtype == torch.float32
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    assert a.info["array_sha256"] == b.info["array_sha256"]
    assert torch.equal(a.train.targets, torch.arange(100).repeat_interleave(100))
    assert torch.equal(a.test.targets, torch.arange(100).repeat_interleave(50))
    small = S.load_synth_hier(train_per_class=3, test_per_class=2)
    ref_tr, ref_te = _synth_reference(0, 3, 2)
    np.testing.assert_allclose(small.train.x.numpy(), ref_tr, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(small.test.x.numpy(), ref_te, rtol=1e-5, atol=1e-6)
    assert S.load_synth_hier(seed_data=1).info["array_sha256"] != a.info["array_sha256"]


# ----------------------------------------------------------------------------------------------
# real shared data
# ----------------------------------------------------------------------------------------------
def test_fashion_mnist_real(shared_data):
    d = load_source("fashion_mnist", root=shared_data)
    assert (len(d.train), len(d.test), d.num_classes) == (60000, 10000, 10)
    assert d.train.x.dtype == torch.uint8 and tuple(d.train.x.shape[1:]) == (1, 28, 28)
    assert torch.bincount(d.train.targets).tolist() == [6000] * 10
    assert torch.bincount(d.test.targets).tolist() == [1000] * 10
    assert d.family == "gray28" and d.train_keys is None
    assert set(d.info["files"]) == {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }
    assert all(len(h) == 64 for h in d.info["files"].values())
    assert d.info["root"] == str(shared_data)


def test_fashion_mnist_found_through_environment(shared_data, monkeypatch):
    monkeypatch.setenv("OPENWORLD_DATA", str(shared_data))
    d = S.load_fashion_mnist()
    assert d.info["root_origin"] == "$OPENWORLD_DATA" and len(d.test) == 10000


def test_mnist10k_carved_split(shared_data):
    d = load_source("mnist", root=shared_data)
    assert (len(d.train), len(d.test)) == (8000, 2000)
    total = torch.bincount(torch.cat([d.train.targets, d.test.targets]), minlength=10)
    assert total[:6].tolist() == [1001, 1127, 991, 1032, 980, 863]  # open-set card §7.1
    assert torch.bincount(d.test.targets, minlength=10).tolist() == [round(0.2 * int(n)) for n in total]
    split = d.info["split"]
    assert split["kind"] == "hashed_stratified" and split["num_test"] == 2000
    again = S.load_mnist(root=shared_data)
    assert torch.equal(again.test.x, d.test.x)
    assert again.info["split"]["test_indices_sha256"] == split["test_indices_sha256"]
    everything = S.load_mnist(root=shared_data, test_fraction=0.0)
    assert (len(everything.train), len(everything.test)) == (10000, 0)


def test_omniglot_real(shared_data):
    d = load_source("omniglot", root=shared_data)
    assert d.num_classes == 242
    counts = torch.bincount(torch.cat([d.train.targets, d.test.targets]), minlength=242)
    assert counts.tolist() == [20] * 242
    assert torch.bincount(d.test.targets, minlength=242).tolist() == [5] * 242
    assert list(d.classes) == sorted(d.classes, key=lambda n: tuple(n.split("/")))
    assert d.info["duplicate_characters_dropped"] == 50 and d.info["duplicates_identical"]
    assert d.info["test_drawers"] == [16, 17, 18, 19, 20]
    assert tuple(d.train.x.shape[1:]) == (1, 28, 28) and d.train.x.dtype == torch.uint8
    assert float(d.train.x.float().mean()) < 128  # inverted: dark background, bright strokes
    full = S.load_omniglot(root=shared_data, image_size=105, test_drawers=10, invert=False)
    assert tuple(full.train.x.shape[1:]) == (1, 105, 105) and len(full.test) == 2420
    assert set(full.train.x.unique().tolist()) <= {0, 255}


def test_cifar10_image_folder_subset(cifar10_jpeg_subset):
    d = load_source("cifar10", root=cifar10_jpeg_subset)
    assert d.classes == S.CIFAR10_CLASSES == tuple(sorted(S.CIFAR10_CLASSES))
    assert d.info["class_order"] == "torchvision" and d.info["format"] == "image-folder"
    assert (len(d.train), len(d.test)) == (200, 200)
    assert tuple(d.train.x.shape[1:]) == (3, 32, 32) and d.train.x.dtype == torch.uint8
    assert torch.equal(d.train.targets, torch.arange(10).repeat_interleave(20))
    # labels follow the folder names: the first bird image decodes to the same pixels as label 2's first row
    bird = min((cifar10_jpeg_subset / "cifar10" / "train" / "bird").iterdir())
    ref = torch.from_numpy(np.array(Image.open(bird).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(d.train.x[40], ref)
    assert d.info["cache_hit"] is False
    again = S.load_cifar10(root=cifar10_jpeg_subset)
    assert again.info["cache_hit"] is True
    assert torch.equal(again.train.x, d.train.x) and torch.equal(again.test.targets, d.test.targets)
    fewer = S.load_cifar10(root=cifar10_jpeg_subset, max_per_class=3)
    assert fewer.info["cache_hit"] is False and len(fewer.train) == 30
    assert torch.equal(fewer.train.x[:3], d.train.x[:3])


def test_cifar10_archive_in_shared_root_matches_folder(shared_data, cifar10_jpeg_subset):
    a = S.load_cifar10(root=shared_data, max_per_class=5)
    b = S.load_cifar10(root=cifar10_jpeg_subset, max_per_class=5)
    assert a.info["format"] == "image-folder archive" and "cifar10-jpeg.tar.gz" in a.info["files"]
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.x, b.test.x)
    assert a.info["files_sha256_manifest"] == b.info["files_sha256_manifest"]


@pytest.mark.slow
def test_cifar10_full_decode_and_cache(cifar10_jpeg_root):
    d = S.load_cifar10(root=cifar10_jpeg_root)
    assert (len(d.train), len(d.test)) == (50000, 10000) and d.classes == S.CIFAR10_CLASSES
    assert torch.bincount(d.train.targets).tolist() == [5000] * 10
    assert torch.bincount(d.test.targets).tolist() == [1000] * 10
    again = S.load_cifar10(root=cifar10_jpeg_root)
    assert again.info["cache_hit"] and torch.equal(again.train.x, d.train.x)


# ----------------------------------------------------------------------------------------------
# fake torchvision CIFAR pickles
# ----------------------------------------------------------------------------------------------
def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _fake_cifar10(root: Path, per_batch: int = 4) -> np.ndarray:
    rng = np.random.default_rng(0)
    d = root / "cifar-10-batches-py"
    rows = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i + k) % 10 for k in range(per_batch)]
        _pickle(d / f"data_batch_{i}", {b"data": data, b"labels": labels, b"batch_label": b"x"})
        rows.append(data)
    _pickle(d / "test_batch", {b"data": rng.integers(0, 256, size=(3, 3072), dtype=np.uint8), b"labels": [9, 0, 1]})
    _pickle(d / "batches.meta", {b"label_names": [n.encode() for n in S.CIFAR10_CLASSES]})
    return np.concatenate(rows)


def test_cifar10_torchvision_pickles(tmp_path):
    rows = _fake_cifar10(tmp_path)
    d = S.load_cifar10(root=tmp_path)
    assert d.info["format"] == "torchvision-pickle" and d.classes == S.CIFAR10_CLASSES
    assert (len(d.train), len(d.test)) == (20, 3)
    assert torch.equal(d.train.x, torch.from_numpy(rows.reshape(-1, 3, 32, 32)))
    assert d.train.targets[:4].tolist() == [1, 2, 3, 4]
    assert d.test.targets.tolist() == [9, 0, 1]
    assert set(d.info["files"]) == {*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"}
    small = S.load_cifar10(root=tmp_path, max_per_class=1)
    assert sorted(small.train.targets.tolist()) == list(range(1, 9))  # classes 0 and 9 have no training row


def test_cifar100_torchvision_pickles_fine_and_coarse(tmp_path):
    d = tmp_path / "cifar-100-python"
    names = [f"class_{i:02d}" for i in range(100)]
    data = np.arange(6 * 3072, dtype=np.int64).astype(np.uint8).reshape(6, 3072)
    _pickle(d / "train", {"data": data, "fine_labels": [5, 0, 99, 5, 1, 2], "coarse_labels": [1, 0, 19, 1, 0, 0]})
    _pickle(d / "test", {"data": data[:2], "fine_labels": [3, 4], "coarse_labels": [0, 0]})
    _pickle(d / "meta", {"fine_label_names": names, "coarse_label_names": [f"super_{i}" for i in range(20)]})
    src = load_source("cifar100", root=tmp_path)
    assert src.num_classes == 100 and src.classes[99] == "class_99" and src.family == "cifar"
    assert src.train.targets.tolist() == [5, 0, 99, 5, 1, 2]  # official file order kept
    coarse = S.load_cifar100(root=tmp_path, label_type="coarse")
    assert coarse.num_classes == 20 and coarse.train.targets.tolist() == [1, 0, 19, 1, 0, 0]


def test_corrupt_cifar_pickle(tmp_path):
    _fake_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataNotFoundError) as exc:
        S.load_cifar10(root=tmp_path)
    assert_names(exc.value, "data_batch_3", str(bad.parent))


def test_cifar100_missing_names_files_dirs_and_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        S.load_cifar100(root=tmp_path)
    assert isinstance(exc.value, FileNotFoundError)
    assert_names(
        exc.value,
        "cifar-100-python",
        "train",
        "meta",
        str(tmp_path),
        "data.root",
        "OPENWORLD_DATA",
        "download: true",
        "cifar-100-python.tar.gz",
    )


# ----------------------------------------------------------------------------------------------
# idx files: fake trees, missing and corrupt files
# ----------------------------------------------------------------------------------------------
def test_official_idx_files_take_precedence(tmp_path):
    d = tmp_path / "mnist"
    rng = np.random.default_rng(1)
    write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (7, 28, 28)))
    write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(7) % 10)
    write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 256, (3, 28, 28)), compress=False)
    write_idx(d / "t10k-labels-idx1-ubyte", [3, 2, 1], compress=False)
    write_idx(d / "mnist10k-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28)))
    write_idx(d / "mnist10k-labels-idx1-ubyte.gz", [0, 1, 2, 3, 4])
    src = S.load_mnist(root=tmp_path)
    assert (len(src.train), len(src.test)) == (7, 3) and src.info["split"] == "official"
    assert src.test.targets.tolist() == [3, 2, 1]


def test_fashion_missing_names_files_dirs_and_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        S.load_fashion_mnist(root=tmp_path)
    assert_names(
        exc.value,
        "train-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        str(tmp_path / "fashion-mnist"),
        "download: true",
        "OPENWORLD_DATA",
    )


def test_mnist_missing_mentions_the_10k_subset(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        S.load_mnist(root=tmp_path)
    assert_names(exc.value, "mnist10k-images-idx3-ubyte.gz", str(tmp_path / "mnist"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_magic", "short_payload"])
def test_corrupt_idx_gzip(tmp_path, damage):
    d = tmp_path / "fashion-mnist"
    imgs = np.zeros((4, 28, 28), dtype=np.uint8)
    write_idx(d / "train-images-idx3-ubyte.gz", imgs)
    write_idx(d / "train-labels-idx1-ubyte.gz", [0, 1, 2, 3])
    write_idx(d / "t10k-images-idx3-ubyte.gz", imgs[:2])
    write_idx(d / "t10k-labels-idx1-ubyte.gz", [0, 1])
    target = d / "train-images-idx3-ubyte.gz"
    raw = bytes([0, 0, 8, 3]) + struct.pack(">3I", 4, 28, 28) + imgs.tobytes()
    if damage == "garbage":
        target.write_bytes(b"this is not gzip at all")
    elif damage == "truncated":
        target.write_bytes(gzip.compress(raw)[:40])
    elif damage == "bad_magic":
        target.write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
    else:
        target.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataNotFoundError) as exc:
        S.load_fashion_mnist(root=tmp_path)
    assert_names(exc.value, "train-images-idx3-ubyte.gz", str(d), "corrupt")


# ----------------------------------------------------------------------------------------------
# Omniglot: fake zips
# ----------------------------------------------------------------------------------------------
def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (105, 105), value).save(buf, format="PNG")
    return buf.getvalue()


def _omniglot_zip(path: Path, top: str, chars: dict[tuple[str, str], int], drawers=range(1, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for (alphabet, character), value in chars.items():
            for dr in drawers:
                zf.writestr(f"{top}/{alphabet}/{character}/0{value:03d}_{dr:02d}.png", _png(value))


def test_omniglot_fake_zips_dedup_and_drawer_split(tmp_path):
    d = tmp_path / "omniglot"
    _omniglot_zip(d / "a.zip", "a", {("Zeta", "character01"): 10, ("Greek", "character02"): 20})
    _omniglot_zip(d / "b.zip", "b", {("Greek", "character02"): 20, ("Alpha", "character01"): 30})
    src = S.load_omniglot(root=tmp_path, archives=("a", "b"), test_drawers=1, image_size=14, invert=False)
    assert src.classes == ("Alpha/character01", "Greek/character02", "Zeta/character01")
    assert (len(src.train), len(src.test)) == (9, 3)
    assert src.info["duplicate_characters_dropped"] == 1 and src.info["test_drawers"] == [4]
    assert tuple(src.train.x.shape[1:]) == (1, 14, 14)
    assert src.train.x[src.train.targets == 0].unique().tolist() == [30]


def test_omniglot_missing_and_corrupt_zip(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        S.load_omniglot(root=tmp_path)
    assert_names(
        exc.value,
        "images_background_small1.zip",
        "images_background_small2.zip",
        str(tmp_path / "omniglot"),
        "download: true",
    )
    d = tmp_path / "omniglot"
    d.mkdir()
    (d / "images_background_small1.zip").write_bytes(b"PK\x03\x04 broken")
    _omniglot_zip(d / "images_background_small2.zip", "images_background_small2", {("Greek", "c1"): 1})
    with pytest.raises(DataNotFoundError) as exc:
        S.load_omniglot(root=tmp_path)
    assert_names(exc.value, "images_background_small1.zip", str(d), "corrupt")


# ----------------------------------------------------------------------------------------------
# miniImageNet / CUB / generic image folders: fake trees
# ----------------------------------------------------------------------------------------------
def _fake_mini(root: Path, test_order=("n02", "n01", "n03")) -> None:
    base = root / "miniimagenet"
    wnids = ["n02", "n01", "n03"]  # first appearance order, deliberately not sorted
    train = [(f"{w}{k:08d}.jpg", w) for w in wnids for k in range(3)]
    test = [(f"{w}{k:08d}.jpg", w) for w in test_order for k in range(3, 5)]
    for i, (f, _) in enumerate(train + test):
        write_image(base / "images" / f, (i * 10 % 256, 0, 0), size=(30, 24))
    (base / "split").mkdir(parents=True)
    for name, rows in (("train", train), ("test", test)):
        (base / "split" / f"{name}.csv").write_text("filename,label\n" + "".join(f"{f},{w}\n" for f, w in rows))


def test_mini_imagenet_fake_tree(tmp_path):
    _fake_mini(tmp_path)
    src = load_source("mini_imagenet", root=tmp_path)
    assert src.classes == ("n02", "n01", "n03") and src.family == "imagenet"
    assert isinstance(src.train, FileData) and (len(src.train), len(src.test)) == (9, 6)
    assert src.train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert src.train_keys[3] == "n0100000000.jpg" and src.test_keys[0] == "n0200000003.jpg"
    # a CEC index-list line resolves through its 4th field
    line = "MINI-ImageNet/train/n01/n0100000000.jpg"
    assert src.train_keys.index(line.split("/")[3]) == 3
    assert set(src.info["files"]) == {"split/train.csv", "split/test.csv"}
    xb, _ = next(batches(src.train, 4, train=True))
    assert tuple(xb.shape) == (4, 3, 84, 84) and xb.dtype == torch.float32
    xt, _ = next(batches(src.test, 6))
    assert tuple(xt.shape) == (6, 3, 84, 84)


def test_mini_imagenet_checks(tmp_path):
    _fake_mini(tmp_path, test_order=("n01", "n02", "n03"))
    with pytest.raises(DataNotFoundError, match="same first-appearance order"):
        S.load_mini_imagenet(root=tmp_path)
    other = tmp_path / "other"
    _fake_mini(other)
    (other / "miniimagenet" / "images" / "n0300000001.jpg").unlink()
    with pytest.raises(DataNotFoundError) as exc:
        S.load_mini_imagenet(root=other)
    assert_names(exc.value, "n0300000001.jpg", str(other / "miniimagenet" / "images"))
    with pytest.raises(DataNotFoundError) as exc:
        S.load_mini_imagenet(root=tmp_path / "nothing")
    assert_names(exc.value, "split/train.csv", str(tmp_path / "nothing" / "miniimagenet"), "OPENWORLD_DATA")


def _fake_cub(root: Path) -> None:
    base = root / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split = [], [], []
    img_id = 0
    for c, cname in enumerate(classes, start=1):
        for k in range(4):
            img_id += 1
            rel = f"{cname}/{cname.split('.')[1]}_{k:04d}_{img_id}.jpg"
            write_image(base / "images" / rel, (c * 50, k * 20, 0), size=(40, 30))
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {c}")
            split.append(f"{img_id} {1 if k < 3 else 0}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (base / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(classes, start=1)))


def test_cub200_fake_tree(tmp_path):
    _fake_cub(tmp_path)
    src = load_source("cub200", root=tmp_path)
    assert src.classes[0] == "001.Black_footed_Albatross" and src.num_classes == 3
    assert (len(src.train), len(src.test)) == (9, 3)
    assert src.train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and src.test.targets.tolist() == [0, 1, 2]
    assert src.train_keys[0] == "CUB_200_2011/images/001.Black_footed_Albatross/Black_footed_Albatross_0000_1.jpg"
    assert all(k.startswith("CUB_200_2011/images/") for k in src.test_keys)
    assert not set(src.train_keys) & set(src.test_keys)
    xb, _ = next(batches(src.test, 3))
    assert tuple(xb.shape) == (3, 3, 224, 224)
    small = S.load_cub200(root=tmp_path, augment="none", image_size=32)
    xb, _ = next(batches(small.train, 2, train=True))
    assert tuple(xb.shape) == (2, 3, 32, 32)


def test_cub200_missing_and_broken(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        S.load_cub200(root=tmp_path)
    assert_names(exc.value, "images.txt", "train_test_split.txt", str(tmp_path / "CUB_200_2011"))
    _fake_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "train_test_split.txt").write_text("1 1\n")
    with pytest.raises(DataNotFoundError, match="image ids differ"):
        S.load_cub200(root=tmp_path)


def _fake_folder(base: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for c, color in (("cat", (255, 0, 0)), ("ant", (0, 255, 0))):
            for k in range(n):
                write_image(base / split / c / f"{k:03d}.png", color, size=(8, 8))


def test_image_folder_files_and_in_memory(tmp_path):
    _fake_folder(tmp_path / "toy")
    src = load_source("image_folder", root=tmp_path, subdir="toy", image_size=16)
    assert src.classes == ("ant", "cat") and isinstance(src.train, FileData)
    assert src.train_keys[:2] == ["train/ant/000.png", "train/ant/001.png"]
    assert src.train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    xb, _ = next(batches(src.train, 6, train=True))
    assert tuple(xb.shape) == (6, 3, 16, 16)
    mem = S.load_image_folder(root=tmp_path / "toy", in_memory=True)
    assert isinstance(mem.train, TensorData) and tuple(mem.train.x.shape) == (6, 3, 8, 8)
    assert mem.train.x[0, 1].unique().tolist() == [255] and mem.train.x[3, 0].unique().tolist() == [255]
    assert mem.info["cache_hit"] is False
    assert S.load_image_folder(root=tmp_path / "toy", in_memory=True).info["cache_hit"] is True
    one = S.load_image_folder(root=tmp_path / "toy", test_dir=None)
    assert len(one.test) == 0
    with pytest.raises(DataNotFoundError) as exc:
        S.load_image_folder(root=tmp_path, subdir="missing")
    assert_names(exc.value, "train/<class>/<image>", str(tmp_path / "missing"))


def test_with_transforms_swaps_both_parts():
    from openworld.data.transforms import get_transforms

    src = S.load_digits()
    pair = get_transforms("vector")
    other = src.with_transforms(pair)
    assert isinstance(other, SourceData)
    assert other.train.transforms is pair and other.test.transforms is pair
    assert other.train.x is src.train.x


def test_omniglot_extracted_folder_equals_zip(tmp_path):
    d = tmp_path / "omniglot"
    _omniglot_zip(d / "s.zip", "s", {("Greek", "c1"): 40, ("Greek", "c2"): 80})
    from_zip = S.load_omniglot(root=tmp_path, archives=("s",), test_drawers=1)
    with zipfile.ZipFile(d / "s.zip") as zf:
        zf.extractall(tmp_path / "extracted")
    from_dir = S.load_omniglot(root=tmp_path / "extracted", archives=("s",), test_drawers=1)
    assert from_dir.info["format"] == "png folder"
    assert torch.equal(from_zip.train.x, from_dir.train.x) and from_zip.classes == from_dir.classes
