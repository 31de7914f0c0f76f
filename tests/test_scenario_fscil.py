"""FSCIL scenario: card fscil-teen §1 (protocol, index lists, fallback, validation split), T7 and T8."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from openworld.data.views import TensorData
from openworld.registry import DATASETS, SCENARIOS
from openworld.scenarios.base import ClassInfo, Session, hash_indices
from openworld.scenarios.fscil import (
    FSCILScenario,
    class_order,
    fallback_index_lists,
    fallback_key,
    load_index_lists,
    pick,
    validation_split,
)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
@dataclass
class FakeSource:
    """SourceData-like: what ``DATASETS.get(name)(...)`` returns."""

    name: str
    train: TensorData
    test: TensorData
    classes: list[str]
    info: dict = field(default_factory=dict)
    train_keys: list[str] | None = None
    test_keys: list[str] | None = None
    family: str = "fake"


def _rows_data(labels, name) -> TensorData:
    """x[i] = [i]: every sample carries its own row index, so subsets can be traced back."""
    labels = np.asarray(labels, dtype=np.int64)
    return TensorData(torch.arange(len(labels), dtype=torch.float32).unsqueeze(1), labels, name=name)


def _register(monkeypatch, name, source, calls=None):
    def loader(root=None, download=False, **options):
        if calls is not None:
            calls.append((root, download, options))
        return source

    monkeypatch.setitem(DATASETS._objects, name, loader)


def _rows(data) -> list[int]:
    return [int(v) for v in data.x[:, 0].tolist()]


def _synthetic(num_classes=20, per_class=30, test_per_class=10, name="fake_fscil"):
    """labels x mod C: classes interleave in dataset order (train and test)."""
    train = [x % num_classes for x in range(num_classes * per_class)]
    test = [x % num_classes for x in range(num_classes * test_per_class)]
    return FakeSource(
        name=name,
        train=_rows_data(train, "train"),
        test=_rows_data(test, "test"),
        classes=[f"class{c}" for c in range(num_classes)],
        info={"generator": "x mod C"},
    )


def _local_shared_data() -> Path | None:
    env = os.environ.get("OPENWORLD_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    for path in candidates:
        if path.is_dir():
            return path
    return None


@pytest.fixture
def lists_root(request) -> Path:
    """The shared data folder holding fscil_index_list/ (conftest's ``shared_data`` when it exists)."""
    try:
        root = Path(request.getfixturevalue("shared_data"))
    except pytest.FixtureLookupError:
        root = _local_shared_data()
    if root is None or not (root / "fscil_index_list").is_dir():
        pytest.skip("shared data folder with fscil_index_list/ not found (set OPENWORLD_SHARED_DATA)")
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# --------------------------------------------------------------------------------------------------
# T7 — the seeded fallback (§1.5) and the validation pick (§1.6)
# --------------------------------------------------------------------------------------------------
def test_t7_fallback_lists():
    labels = [x % 10 for x in range(80)]
    lists = fallback_index_lists(labels, base_classes=6, ways=2, shots=3, num_sessions=3, seed=0, order=None)
    assert len(lists) == 3
    assert len(lists[0]) == 48
    assert lists[0] == sorted(x for x in range(80) if x % 10 < 6)
    assert lists[0][:8] == [0, 1, 2, 3, 4, 5, 10, 11]
    assert lists[1] == [6, 16, 26, 17, 37, 67]
    assert lists[2] == [8, 58, 78, 39, 49, 59]


def test_t7_val_pick_and_key():
    pool = [x for x in range(80) if x % 10 == 0]
    assert pick(pool, 2, "val", 0, 0) == [0, 40]
    assert fallback_key("fscil", 0, 6, 6) == 1346283870977963478
    train, val = validation_split([x % 10 for x in range(80)], [0], 0.25, seed=0)
    assert val == [0, 40] and train == [10, 20, 30, 50, 60, 70]


def test_pick_errors_name_the_class():
    with pytest.raises(ValueError, match="class 7"):
        pick([1, 2, 3], 4, "fscil", 0, 7)
    assert pick([5, 3, 9], 3, "x", 1, 2) == [3, 5, 9]
    assert pick([], 0, "x", 1, 2) == []


def test_class_order_matches_python_random():
    assert class_order(10, "natural", 5) == list(range(10))
    assert class_order(10, "shuffled", 0) == list(range(10))
    state = random.getstate()
    try:
        random.seed(3)
        expected = list(range(100))
        random.shuffle(expected)
        after = random.random()
        random.seed(3)
        random.shuffle(list(range(100)))
        assert class_order(100, "shuffled", 3) == expected
        assert random.random() == after  # the global stream is left untouched
    finally:
        random.setstate(state)
    with pytest.raises(ValueError, match="natural, shuffled"):
        class_order(10, "random", 1)


# --------------------------------------------------------------------------------------------------
# T8 — the real CEC/TOPIC index lists
# --------------------------------------------------------------------------------------------------
LINE_COUNTS = {
    "cifar100": {1: 30000, **{k: 25 for k in range(2, 10)}},
    "mini_imagenet": {1: 30000, **{k: 25 for k in range(2, 10)}},
    "cub200": {1: 3000, **{k: 50 for k in range(2, 12)}},
}


def test_t8_line_counts(lists_root):
    for name, counts in LINE_COUNTS.items():
        directory = lists_root / "fscil_index_list" / name
        for k, n in counts.items():
            assert len(_lines(directory / f"session_{k}.txt")) == n, (name, k)
        assert not (directory / f"session_{max(counts) + 1}.txt").exists()


def _mini_csv(path: Path) -> list[tuple[str, str]]:
    with path.open() as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["filename", "label"]
        return [(row[0], row[1]) for row in reader]


def _first_seen(wnids) -> list[str]:
    return list(dict.fromkeys(wnids))


def test_t8_mini_labels_by_wnid_rank(lists_root):
    directory = lists_root / "fscil_index_list" / "mini_imagenet"
    train = _mini_csv(directory / "train.csv")
    test = _mini_csv(directory / "test.csv")
    assert len(train) == 50000 and len(test) == 10000
    order = _first_seen(w for _, w in train)
    assert order == _first_seen(w for _, w in test)  # same wnid order in train.csv and test.csv
    rank = {w: i for i, w in enumerate(order)}
    label_of = {f: rank[w] for f, w in train}
    test_files = {f for f, _ in test}
    for k in range(2, 10):
        lines = _lines(directory / f"session_{k}.txt")
        files = [line.split("/")[3] for line in lines]
        labels = Counter(label_of[f] for f in files)
        lo = 60 + 5 * (k - 2)
        assert labels == {c: 5 for c in range(lo, lo + 5)}, k
        assert not test_files.intersection(files)
    base = [line.split("/")[3] for line in _lines(directory / "session_1.txt")]
    assert set(base) == {f for f, lab in label_of.items() if lab < 60}


def test_t8_cub_label_ranges(lists_root):
    directory = lists_root / "fscil_index_list" / "cub200"
    base = Counter(int(line.split("/")[2].split(".")[0]) - 1 for line in _lines(directory / "session_1.txt"))
    assert base == {c: 30 for c in range(100)}
    for k in range(2, 12):
        labels = Counter(int(line.split("/")[2].split(".")[0]) - 1 for line in _lines(directory / f"session_{k}.txt"))
        lo = 100 + 10 * (k - 2)
        assert labels == {c: 5 for c in range(lo, lo + 10)}, k


def test_mini_scenario_on_real_lists(lists_root, monkeypatch):
    """The real mini lists through the scenario: keys are file names (4th '/'-field)."""
    directory = lists_root / "fscil_index_list" / "mini_imagenet"
    train = _mini_csv(directory / "train.csv")
    test = _mini_csv(directory / "test.csv")
    rank = {w: i for i, w in enumerate(_first_seen(w for _, w in train))}
    source = FakeSource(
        name="mini_imagenet",
        train=_rows_data([rank[w] for _, w in train], "train"),
        test=_rows_data([rank[w] for _, w in test], "test"),
        classes=list(rank),
        train_keys=[f for f, _ in train],
        test_keys=[f for f, _ in test],
    )
    _register(monkeypatch, "mini_imagenet", source)
    scenario = FSCILScenario(
        data={"source": "mini_imagenet", "root": str(lists_root)}, base_classes=60, ways=5, shots=5,
        split_files="cec",
    )
    assert scenario.num_sessions == 9 and scenario.num_classes == 100
    desc = scenario.describe()
    assert desc["index_source"] == f"cec:{directory}"
    assert set(desc["index_files"]) == {f"session_{k}.txt" for k in range(1, 10)}
    assert desc["val_size"] == 60 * 50 and desc["base_train_size"] == 60 * 450
    assert desc["test_sizes"] == [100 * (60 + 5 * i) for i in range(9)]
    s3 = scenario.session(3)
    files = [line.split("/")[3] for line in _lines(directory / "session_4.txt")]
    assert [train[r][0] for r in _rows(s3.labeled)] == files  # file order kept
    assert sorted(set(s3.labeled.targets.tolist())) == [70, 71, 72, 73, 74]


def test_cub_lists_on_real_files(lists_root, tmp_path):
    """CUB path lists matched on the whole relative path; a test image in a list is rejected."""
    directory = lists_root / "fscil_index_list" / "cub200"
    keys = [line for k in range(1, 12) for line in _lines(directory / f"session_{k}.txt")]
    labels = [int(key.split("/")[2].split(".")[0]) - 1 for key in keys]
    lists, hashes = load_index_lists(directory, labels, 100, 10, 5, 11, train_keys=keys, test_keys=[])
    assert len(lists[0]) == 3000 and [len(rows) for rows in lists[1:]] == [50] * 10
    assert all(len(h) == 64 for h in hashes.values()) and len(hashes) == 11
    for k, rows in enumerate(lists[1:], start=2):
        assert [keys[r] for r in rows] == _lines(directory / f"session_{k}.txt")
    shot = _lines(directory / "session_5.txt")[7]
    with pytest.raises(ValueError, match=r"session_5\.txt.*line 8.*test image"):
        load_index_lists(directory, labels, 100, 10, 5, 11, train_keys=keys, test_keys=[shot])


def _fake_cifar_labels(directory: Path) -> np.ndarray:
    """50,000 labels consistent with the CIFAR lists: session_1 rows are the base classes, session_k
    lines 5j…5j+4 are class 60+5(k-2)+j, every other row fills the novel classes up to 500 each."""
    labels = np.full(50000, -1, dtype=np.int64)
    base = [int(v) for v in _lines(directory / "session_1.txt")]
    labels[base] = np.arange(len(base)) // 500
    for k in range(2, 10):
        rows = [int(v) for v in _lines(directory / f"session_{k}.txt")]
        labels[rows] = 60 + 5 * (k - 2) + np.arange(25) // 5
    free = np.flatnonzero(labels < 0)
    labels[free] = 60 + np.arange(len(free)) // 495
    assert np.bincount(labels).tolist() == [500] * 100
    return labels


@pytest.fixture
def cifar_lists(lists_root):
    return lists_root / "fscil_index_list" / "cifar100"


def test_cifar_integer_lists(lists_root, cifar_lists, monkeypatch):
    labels = _fake_cifar_labels(cifar_lists)
    test_labels = np.repeat(np.arange(100), 100)
    source = FakeSource("cifar100", _rows_data(labels, "train"), _rows_data(test_labels, "test"),
                        [f"c{c}" for c in range(100)])
    _register(monkeypatch, "cifar100", source)
    scenario = FSCILScenario(data={"source": "cifar100", "root": str(lists_root)}, base_classes=60, ways=5,
                             shots=5, split_files="cec")
    assert scenario.num_sessions == 9
    for k in range(2, 10):
        s = scenario.session(k - 1)
        assert _rows(s.labeled) == [int(v) for v in _lines(cifar_lists / f"session_{k}.txt")]
        assert s.classes.new == tuple(range(60 + 5 * (k - 2), 65 + 5 * (k - 2)))
        assert len(s.eval_sets["test"].data) == 100 * (60 + 5 * (k - 1))
    s0 = scenario.session(0)
    assert len(s0.labeled) == 27000 and len(s0.validation) == 3000
    base_rows = sorted(int(v) for v in _lines(cifar_lists / "session_1.txt"))
    assert sorted(_rows(s0.labeled) + _rows(s0.validation)) == base_rows
    desc = scenario.describe()
    assert desc["index_source"] == f"cec:{cifar_lists}"
    file_hash = hashlib.sha256((cifar_lists / "session_2.txt").read_bytes()).hexdigest()
    assert desc["index_files"]["session_2.txt"] == file_hash

    # base_subsample (card §9 fscil_cifar_lite): 100 per base class, then 10 held out
    lite = FSCILScenario(data={"source": "cifar100", "root": str(lists_root)}, base_classes=60, ways=5, shots=5,
                         split_files="cec", base_subsample=100)
    s0 = lite.session(0)
    assert len(s0.labeled) == 60 * 90 and len(s0.validation) == 60 * 10
    assert len(s0.info["prototype_data"]) == 6000
    rows_c3 = [int(r) for r in np.flatnonzero(labels == 3)]
    assert sorted(r for r in _rows(s0.info["prototype_data"]) if labels[r] == 3) == pick(rows_c3, 100, "base_sub", 0, 3)


def _copy_lists(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for path in dst.iterdir():
        path.chmod(0o644)
    return dst


def test_cifar_lists_failing_checks(cifar_lists, tmp_path):
    labels = _fake_cifar_labels(cifar_lists)
    bad = _copy_lists(cifar_lists, tmp_path / "bad")
    lines = _lines(bad / "session_3.txt")
    (bad / "session_3.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"session_3\.txt: 24 lines, expected exactly W·K"):
        load_index_lists(bad, labels, 60, 5, 5, 9)

    wrong = labels.copy()
    wrong[int(_lines(cifar_lists / "session_4.txt")[0])] = 99
    with pytest.raises(ValueError, match=r"session_4\.txt: label set .* session 3's classes"):
        load_index_lists(cifar_lists, wrong, 60, 5, 5, 9)

    wrong = labels.copy()
    wrong[int(_lines(cifar_lists / "session_1.txt")[0])] = 70
    with pytest.raises(ValueError, match=r"session_1\.txt: differs from the label-selected base"):
        load_index_lists(cifar_lists, wrong, 60, 5, 5, 9)

    (bad / "session_3.txt").write_text("\n".join(lines[:-1] + ["50000"]) + "\n")
    with pytest.raises(ValueError, match=r"session_3\.txt: line 25: row index 50000"):
        load_index_lists(bad, labels, 60, 5, 5, 9)

    (bad / "session_3.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"session_3\.txt"):
        load_index_lists(bad, labels, 60, 5, 5, 9)
    # without session_1 the base set is still selected by label; its hash is recorded as absent
    ok = _copy_lists(cifar_lists, tmp_path / "nobase")
    (ok / "session_1.txt").unlink()
    lists, hashes = load_index_lists(ok, labels, 60, 5, 5, 9)
    assert hashes["session_1.txt"] is None and len(lists[0]) == 30000


# --------------------------------------------------------------------------------------------------
# The whole scenario on a small in-memory dataset (20 classes × 30 train / 10 test, B=10, W=2, K=3)
# --------------------------------------------------------------------------------------------------
def _scenario(monkeypatch, calls=None, source=None, **kw):
    source = source or _synthetic()
    _register(monkeypatch, source.name, source, calls)
    params = {"data": {"source": source.name, "opt": 1}, "base_classes": 10, "ways": 2, "shots": 3}
    params.update(kw)
    return FSCILScenario(**params), source


def test_registered_and_lazy(monkeypatch):
    assert SCENARIOS.get("fscil") is FSCILScenario
    calls = []
    scenario, _ = _scenario(monkeypatch, calls)
    assert calls == [] and scenario.kind == "fscil"
    assert scenario.num_sessions == 6 and scenario.num_classes == 20
    scenario.describe()
    list(scenario.sessions())
    assert calls == [(None, False, {"opt": 1})]  # loaded once, options passed through
    assert scenario.input_shape == (1,)


def test_sessions_sizes_and_sets(monkeypatch):
    scenario, source = _scenario(monkeypatch)
    sessions = list(scenario.sessions())
    assert [s.name for s in sessions] == [f"session_{i}" for i in range(6)]
    assert [len(s.labeled) for s in sessions] == [270, 6, 6, 6, 6, 6]
    fallback = fallback_index_lists(source.train.targets.numpy(), 10, 2, 3, 6, 0)
    train_labels = source.train.targets.numpy()
    test_labels = source.test.targets.numpy()
    for i, s in enumerate(sessions):
        seen = tuple(range(10 + 2 * i))
        assert s.unlabeled is None
        assert s.classes == ClassInfo(
            num_classes=20, seen=seen, new=tuple(range(10)) if i == 0 else (10 + 2 * (i - 1), 11 + 2 * (i - 1)),
            base=tuple(range(10)), known=seen,
            train_counts=s.classes.train_counts, names=tuple(f"class{c}" for c in range(20)),
        )
        counts = np.bincount(s.labeled.targets.numpy(), minlength=20).tolist()
        assert list(s.classes.train_counts) == counts and len(counts) == 20
        if i:
            assert _rows(s.labeled) == fallback[i] and s.validation is None
            assert counts == [3 if c in s.classes.new else 0 for c in range(20)]
        ev = s.eval_sets["test"]
        assert ev.classes == seen
        assert ev.groups == {"base": tuple(range(10)), "novel": tuple(range(10, 10 + 2 * i))}
        expected = [x for c in seen for x in range(len(test_labels)) if test_labels[x] == c]
        assert _rows(ev.data) == expected  # ascending class, then dataset order
        assert ev.data.targets.tolist() == [int(test_labels[x]) for x in expected]
        assert s.info["num_test"] == len(expected) == 10 * len(seen)
        assert s.info["num_labeled"] == len(s.labeled)
    s0 = sessions[0]
    train0, val = set(_rows(s0.labeled)), set(_rows(s0.validation))
    base_rows = {x for x in range(len(train_labels)) if train_labels[x] < 10}
    assert not train0 & val and train0 | val == base_rows
    assert Counter(int(train_labels[x]) for x in val) == {c: 3 for c in range(10)}
    for c in range(10):  # §1.6 pick per base class
        pool = [x for x in range(len(train_labels)) if train_labels[x] == c]
        assert sorted(x for x in val if train_labels[x] == c) == pick(pool, 3, "val", 0, c)
    assert set(_rows(s0.info["prototype_data"])) == base_rows
    assert s0.validation.targets.tolist() == [int(train_labels[x]) for x in _rows(s0.validation)]
    assert _rows(scenario.base_prototype_data()) == sorted(base_rows)
    assert scenario.session(4).info == sessions[4].info


def test_visible_hides_eval_sets_and_labels(monkeypatch):
    scenario, _ = _scenario(monkeypatch)
    for s in scenario.sessions():
        v = s.visible()
        assert v.eval_sets == {} and v.unlabeled is None
        assert len(v.labeled) == len(s.labeled)
    # structural guarantee of the Session type: unlabelled targets are all -1 once visible
    s = scenario.session(1)
    leaky = Session(index=1, name="x", classes=s.classes, labeled=s.labeled, unlabeled=s.labeled,
                    eval_sets=s.eval_sets)
    v = leaky.visible()
    assert v.eval_sets == {} and bool((v.unlabeled.targets == -1).all())
    assert bool((leaky.unlabeled.targets >= 0).all())


def test_shuffled_order_relabels(monkeypatch):
    scenario, source = _scenario(monkeypatch, class_order="shuffled", seed=2)
    order = list(range(20))
    random.Random(2).shuffle(order)
    assert scenario.class_order_list == order != list(range(20))
    orig_train = source.train.targets.numpy()
    orig_test = source.test.targets.numpy()
    for s in scenario.sessions():
        for data, orig in ((s.labeled, orig_train), (s.eval_sets["test"].data, orig_test)):
            new = data.targets.tolist()
            assert all(order[k] == orig[x] for k, x in zip(new, _rows(data)))
        if s.index:
            assert set(s.labeled.targets.tolist()) == set(s.classes.new)
            # the fallback picks with the ORIGINAL class id
            for k in s.classes.new:
                pool = [x for x in range(len(orig_train)) if orig_train[x] == order[k]]
                assert sorted(x for x, t in zip(_rows(s.labeled), s.labeled.targets.tolist()) if t == k) == pick(
                    pool, 3, "fscil", 0, order[k])
        assert s.classes.names == tuple(f"class{order[k]}" for k in range(20))
        test_targets = s.eval_sets["test"].data.targets.tolist()
        assert test_targets == sorted(test_targets)
    natural, _ = _scenario(monkeypatch, class_order="shuffled", seed=0)
    plain, _ = _scenario(monkeypatch)
    a, b = natural.describe(), plain.describe()
    a.pop("params"), b.pop("params")
    assert a == b and a["class_order"] == list(range(20))
    with pytest.raises(ValueError, match="shuffled"):
        _scenario(monkeypatch, class_order="shuffled", seed=2, split_files="cec")[0].describe()


def test_describe_deterministic(monkeypatch):
    one, _ = _scenario(monkeypatch)
    two, _ = _scenario(monkeypatch)
    d1 = one.describe()
    assert json.dumps(d1, sort_keys=True) == json.dumps(two.describe(), sort_keys=True)
    assert json.loads(json.dumps(d1)) == d1
    assert d1["kind"] == "fscil" and d1["index_source"] == "fallback(0)"
    assert d1["class_order"] == list(range(20)) and d1["test_sizes"] == [100, 120, 140, 160, 180, 200]
    assert d1["params"]["split_seed"] == 0 and d1["source"]["info"] == {"generator": "x mod C"}
    assert d1["session_index_hashes"] == [hash_indices(rows) for rows in one.index_lists()]
    assert d1["val_hash"] == hash_indices(one.validation_indices())
    other, _ = _scenario(monkeypatch, split_seed=1)
    d2 = other.describe()
    assert d2["index_source"] == "fallback(1)"
    assert d2["val_hash"] != d1["val_hash"]
    assert d2["session_index_hashes"][0] == d1["session_index_hashes"][0]  # base is label-selected
    assert d2["session_index_hashes"][1:] != d1["session_index_hashes"][1:]


def test_split_files_directory_equals_fallback(monkeypatch, tmp_path):
    """Fallback lists written in the §1.3 integer format and read back give the same scenario."""
    fallback, source = _scenario(monkeypatch)
    for k, rows in enumerate(fallback.index_lists(), start=1):
        (tmp_path / f"session_{k}.txt").write_text("".join(f"{r}\n" for r in rows))
    listed, _ = _scenario(monkeypatch, source=source, split_files=str(tmp_path))
    a, b = fallback.describe(), listed.describe()
    assert b["index_source"] == f"cec:{tmp_path}"
    assert a["index_files"] == b["index_files"]  # generated-list hashes = file hashes
    assert a["session_index_hashes"] == b["session_index_hashes"] and a["val_hash"] == b["val_hash"]
    with pytest.raises(ValueError, match="no standard CEC index lists"):
        _scenario(monkeypatch, source=source, split_files="cec")[0].describe()
    with pytest.raises(FileNotFoundError, match="not found"):
        _scenario(monkeypatch, source=source, split_files=str(tmp_path / "missing"))[0].describe()


def test_layout_and_parameter_errors(monkeypatch):
    with pytest.raises(ValueError, match="not a multiple of ways"):
        _scenario(monkeypatch, ways=3)[0].describe()
    three, _ = _scenario(monkeypatch, ways=3, num_sessions=3)
    assert three.num_sessions == 3 and [len(s.labeled) for s in three.sessions()] == [270, 9, 9]
    with pytest.raises(ValueError, match="classes, but the data has 20"):
        _scenario(monkeypatch, num_sessions=7)[0].describe()
    with pytest.raises(ValueError, match="class 10 has only 30 samples"):
        _scenario(monkeypatch, shots=31)[0].describe()
    with pytest.raises(ValueError, match="class_order"):
        _scenario(monkeypatch, class_order="random")[0].describe()
    with pytest.raises(ValueError, match="val_frac"):
        _scenario(monkeypatch, val_frac=0)[0].describe()
    with pytest.raises(TypeError):
        FSCILScenario({"source": "x"})  # keyword-only


def test_subsampling(monkeypatch):
    scenario, source = _scenario(monkeypatch, base_subsample=12, test_subsample=4)
    s0 = scenario.session(0)
    assert len(s0.labeled) == 110 and len(s0.validation) == 10 and len(s0.info["prototype_data"]) == 120
    assert scenario.describe()["test_sizes"] == [40, 48, 56, 64, 72, 80]
    test_labels = source.test.targets.numpy()
    s5 = scenario.session(5)
    rows = _rows(s5.eval_sets["test"].data)
    for c in range(20):
        pool = [x for x in range(len(test_labels)) if test_labels[x] == c]
        assert [x for x in rows if test_labels[x] == c] == pick(pool, 4, "test_sub", 0, c)


# --------------------------------------------------------------------------------------------------
# Oracle data (card §2.1, ``joint.data: full``): the full training set of each session's new classes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw", [{}, {"base_subsample": 12}, {"class_order": "shuffled", "seed": 3}, {"holdout_unknown": 2}]
)
def test_oracle_is_every_training_row_of_the_new_classes(monkeypatch, kw):
    scenario, source = _scenario(monkeypatch, **kw)
    train_labels = source.train.targets.numpy()
    order = scenario.class_order_list  # order[k] = original class of scenario class k
    val_rows = set(_rows(scenario.session(0).validation))
    sessions = list(scenario.sessions())
    assert sessions[0].oracle is None  # the base session: nothing beyond its labelled data (validation held out)
    covered = set()
    for s in sessions[1:]:
        new_original = {order[c] for c in s.classes.new}
        expected = [x for x in range(len(train_labels)) if int(train_labels[x]) in new_original]
        assert len(expected) == 30 * len(s.classes.new)  # all 30 training images per class, none held out
        assert _rows(s.oracle) == expected  # exactly those rows, ascending
        assert s.oracle.targets.tolist() == [order.index(int(train_labels[x])) for x in expected]
        assert set(s.oracle.targets.tolist()) == set(s.classes.new)
        assert set(_rows(s.labeled)) < set(expected)  # the shots are among them
        assert not set(expected) & val_rows  # disjoint from the base-session selection set
        covered |= set(expected)
    if kw.get("holdout_unknown"):  # never-taught classes never reach the oracle
        held = {order[c] for c in range(20 - kw["holdout_unknown"], 20)}
        assert not {int(train_labels[x]) for x in covered} & held


def test_visible_hides_the_oracle_unless_asked(monkeypatch):
    scenario, _ = _scenario(monkeypatch)
    s = scenario.session(2)
    assert s.oracle is not None
    assert s.visible().oracle is None  # default: a strategy never sees it
    v = s.visible(oracle=True)
    assert _rows(v.oracle) == _rows(s.oracle) and torch.equal(v.oracle.targets, s.oracle.targets)
    assert v.oracle.origin[1] is None and v.eval_sets == {}  # detached from the source, like labeled
    assert len(v.labeled) == len(s.labeled) == 6  # the shots are unchanged
    assert scenario.session(0).visible(oracle=True).oracle is None
    # a session built without oracle data (every other scenario) is unaffected
    plain = Session(index=0, name="x", classes=s.classes, labeled=s.labeled)
    assert plain.oracle is None and plain.visible(oracle=True).oracle is None
