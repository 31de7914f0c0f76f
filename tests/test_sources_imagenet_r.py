"""The ``imagenet_r`` source: official tar layout + CODA-Prompt's split lists, or a flagged seeded split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from openworld.data import sources as S
from openworld.data.sources import DataNotFoundError, load_source
from openworld.data.views import FileData, batches
from openworld.registry import DATASETS

WNIDS = ("n01443537", "n01484850", "n01494475")
FILES = {  # 5 images per class
    w: [f"{kind}_{i}.jpg" for kind, i in (("art", 0), ("art", 1), ("cartoon", 0), ("sketch", 0), ("toy", 2))]
    for w in WNIDS
}
# hand-written split lists, in a deliberately non-sorted order, CODA-Prompt's path prefix
TRAIN = [
    ("n01484850", "art_0.jpg", 1),
    ("n01443537", "toy_2.jpg", 0),
    ("n01494475", "sketch_0.jpg", 2),
    ("n01443537", "art_0.jpg", 0),
    ("n01494475", "art_1.jpg", 2),
    ("n01484850", "cartoon_0.jpg", 1),
]
TEST = [("n01494475", "toy_2.jpg", 2), ("n01443537", "cartoon_0.jpg", 0), ("n01484850", "sketch_0.jpg", 1)]


def make_tree(root: Path) -> Path:
    images = root / "imagenet-r"
    for k, w in enumerate(WNIDS):
        for j, f in enumerate(FILES[w]):
            p = images / w / f
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20 + j, 16), (40 * k, 10 * j, 200)).save(p)
    return images


def write_split(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["data:"] + [f"- data/imagenet-r/{w}/{f}" for w, f, _ in rows] + ["targets:"] + [f"- {y}" for *_, y in rows]
    path.write_text("\n".join(lines) + "\n")


def make_splits(folder: Path, names=("imagenet-r_train.yaml", "imagenet-r_test.yaml")) -> tuple[Path, Path]:
    tr, te = folder / names[0], folder / names[1]
    write_split(tr, TRAIN)
    write_split(te, TEST)
    return tr, te


def test_registered():
    assert DATASETS.get("imagenet_r") is S.load_imagenet_r


def test_split_files_loaded_in_file_order(tmp_path):
    images = make_tree(tmp_path)
    tr, te = make_splits(images / "splits")
    src = load_source("imagenet_r", root=tmp_path)
    assert src.name == "imagenet_r" and src.family == "imagenet"
    assert src.classes == WNIDS  # class names = wnids, label k = its folder
    assert isinstance(src.train, FileData) and isinstance(src.test, FileData)
    assert src.train.paths == [str(images / w / f) for w, f, _ in TRAIN]
    assert src.train.targets.tolist() == [y for *_, y in TRAIN]
    assert src.test.paths == [str(images / w / f) for w, f, _ in TEST]
    assert src.test.targets.tolist() == [y for *_, y in TEST]
    assert src.train_keys == [f"{w}/{f}" for w, f, _ in TRAIN]
    assert src.test_keys == [f"{w}/{f}" for w, f, _ in TEST]
    info = src.info
    assert info["files"] == {
        "imagenet-r_train.yaml": hashlib.sha256(tr.read_bytes()).hexdigest(),
        "imagenet-r_test.yaml": hashlib.sha256(te.read_bytes()).hexdigest(),
    }
    assert info["split"]["kind"] == "files" and info["split"]["paper_split"] is True
    assert info["transforms"] == "imagenet/ovor@224"
    assert (info["num_train"], info["num_test"], info["num_classes"]) == (6, 3, 3)
    # the ovor transforms: [0, 1] tensors at 224
    x, y = next(batches(src.test, 3))
    assert tuple(x.shape) == (3, 3, 224, 224) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.tolist() == [2, 0, 1]


@pytest.mark.parametrize("where", ["root_splits", "split_dir", "imr_names"])
def test_split_file_locations(tmp_path, where):
    make_tree(tmp_path / "data")
    if where == "root_splits":
        make_splits(tmp_path / "data" / "splits")
        src = load_source("imagenet_r", root=tmp_path / "data")
    elif where == "split_dir":
        make_splits(tmp_path / "elsewhere")
        src = load_source("imagenet_r", root=tmp_path / "data", split_dir=str(tmp_path / "elsewhere"))
    else:
        make_splits(tmp_path / "data" / "imagenet-r" / "splits", ("imr_train.yaml", "imr_test.yaml"))
        src = load_source("imagenet_r", root=tmp_path / "data")
        assert set(src.info["files"]) == {"imr_train.yaml", "imr_test.yaml"}
    assert src.train.targets.tolist() == [y for *_, y in TRAIN]


def test_missing_split_files_error_names_paths_and_fix(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(DataNotFoundError) as exc:
        load_source("imagenet_r", root=tmp_path, split_dir=str(tmp_path / "mine"))
    msg = str(exc.value)
    for needle in (
        "imagenet_r: split files not found",
        "imagenet-r_train.yaml",
        "imr_train.yaml",
        str(tmp_path / "mine"),
        str(tmp_path / "imagenet-r" / "splits"),
        str(tmp_path / "splits"),
        "CODA-Prompt",
        "dataloaders/splits/",
        "split: seeded",
    ):
        assert needle in msg, (needle, msg)
    # only one of the two files present: still missing
    write_split(tmp_path / "imagenet-r" / "splits" / "imagenet-r_train.yaml", TRAIN)
    with pytest.raises(DataNotFoundError, match="split files not found"):
        load_source("imagenet_r", root=tmp_path)


def test_missing_image_folder_and_listed_images(tmp_path):
    with pytest.raises(DataNotFoundError) as exc:
        load_source("imagenet_r", root=tmp_path)
    assert "imagenet-r/<wnid>/<image>.jpg" in str(exc.value) and str(tmp_path) in str(exc.value)
    images = make_tree(tmp_path)
    make_splits(images / "splits")
    (images / "n01443537" / "toy_2.jpg").unlink()
    with pytest.raises(DataNotFoundError, match=r"1 of 9 images listed by the split files are missing .*toy_2"):
        load_source("imagenet_r", root=tmp_path)
    assert len(load_source("imagenet_r", root=tmp_path, verify_files=False).train) == 6


def test_inconsistent_split_file_is_reported(tmp_path):
    images = make_tree(tmp_path)
    tr, _ = make_splits(images / "splits")
    write_split(tr, [("n01443537", "art_0.jpg", 0), ("n01484850", "art_0.jpg", 0)])
    with pytest.raises(DataNotFoundError, match="label 0 is given to two folders"):
        load_source("imagenet_r", root=tmp_path)
    tr.write_text("data: [a/b.jpg]\n")
    with pytest.raises(DataNotFoundError, match="expected the keys 'data'"):
        load_source("imagenet_r", root=tmp_path)


def test_seeded_split_is_deterministic_and_flagged(tmp_path):
    images = make_tree(tmp_path)
    (images / "splits").mkdir()  # a splits/ folder is not a class
    a = load_source("imagenet_r", root=tmp_path, split="seeded")
    b = load_source("imagenet_r", root=tmp_path, split="seeded")
    assert a.classes == WNIDS
    assert a.train.paths == b.train.paths and a.test.paths == b.test.paths
    assert torch.equal(a.train.targets, b.train.targets)
    assert len(a.train) == 12 and len(a.test) == 3  # round(0.2 · 5) = 1 test image per class
    assert sorted(a.test.targets.tolist()) == [0, 1, 2]
    assert set(a.train.paths).isdisjoint(a.test.paths)
    assert all(Path(p).parent.name == WNIDS[y] for p, y in zip(a.train.paths, a.train.targets.tolist()))
    split = a.info["split"]
    assert split["kind"] == "seeded" and split["paper_split"] is False and split["seed"] == 0
    assert "NOT the paper's split" in a.info["description"]
    assert a.info["files"] == {}
    c = load_source("imagenet_r", root=tmp_path, split="seeded", split_seed=1)
    assert c.info["split"]["seed"] == 1 and len(c.test) == 3


def test_bad_options(tmp_path):
    make_tree(tmp_path)
    with pytest.raises(ValueError, match="unknown split 'paper'"):
        load_source("imagenet_r", root=tmp_path, split="paper")
    with pytest.raises(ValueError, match="no automatic download"):
        load_source("imagenet_r", root=tmp_path, download=True)


def test_cil_scenario_uses_the_source(tmp_path):
    from openworld.scenarios.class_incremental import ClassIncrementalScenario

    images = make_tree(tmp_path)
    make_splits(images / "splits")
    sc = ClassIncrementalScenario(
        data={"source": "imagenet_r", "root": str(tmp_path), "augment": "ovor"}, num_tasks=3, class_order="natural"
    )
    s0 = sc.session(0)
    assert s0.classes.names == WNIDS and len(s0.labeled) == 2
    assert sc.describe()["source"]["info"]["transforms"] == "imagenet/ovor@224"
