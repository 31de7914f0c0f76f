"""Where samples come from: dataset loaders returning :class:`SourceData`.

Every loader has the signature ``load_<name>(root=None, download=False, **options) -> SourceData`` and
is registered under ``<name>`` (decorator here, entry points in ``pyproject.toml``). ``root`` resolves
as: the explicit argument → ``$OPENWORLD_DATA`` → ``./data``. Inside a root each loader looks for its
dataset's usual sub-folders (``cifar-100-python/``, ``cifar10/{train,test}/``, ``cifar10*.tar.gz``,
``fashion-mnist/*.gz``, ``mnist/…``, ``omniglot/*.zip``, ``miniimagenet/``, ``CUB_200_2011/``,
``imagenet-r/``), so a root that holds several datasets (such as the project's shared data folder) serves
all of them.

Missing or corrupt files raise :class:`DataNotFoundError` (a ``FileNotFoundError``) whose message names
the files looked for, the folders searched and the fix.

Small datasets come back as :class:`~openworld.data.views.TensorData` (uint8 images ``[N, C, H, W]``,
or float features) with batched transforms; image-file datasets (miniImageNet, CUB-200, ImageNet-R,
generic image folders) as :class:`~openworld.data.views.FileData` with per-sample transforms. Image
folders that are decoded into memory (CIFAR JPEG folders or archives) are cached as ``.npy`` under ``$OPENWORLD_CACHE``
(default ``~/.cache/openworld``), keyed by a hash of the file list, so the second load is fast.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openworld.data.views import FileData, TensorData, TransformPair
from openworld.registry import register_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_DECODER_VERSION = "v2"  # bump when decoding changes, to invalidate cached arrays

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)  # torchvision's order (= batches.meta label_names)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))

CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing or unreadable; the message says what was looked for and the fix."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class SourceData:
    """One dataset's train and test parts.

    ``classes[k]`` is the name of label k. ``info`` records the root used, the format, the files read
    with their SHA-256, the image shape and any split that was carved. ``train_keys[i]`` is the key
    index lists use for training sample i (e.g. its relative path; ``None`` for in-memory data).
    ``family`` names the transform family (:func:`openworld.data.transforms.get_transforms`).
    """

    name: str
    train: TensorData | FileData
    test: TensorData | FileData
    classes: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)
    train_keys: list[str] | None = None
    family: str = "custom"
    test_keys: list[str] | None = None  # same keys for the test samples (lets index lists be checked)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_transforms(self, transforms: TransformPair | None) -> SourceData:
        """The same data with another transform pair on both parts."""
        return replace(self, train=_retransform(self.train, transforms), test=_retransform(self.test, transforms))


def _retransform(data: TensorData | FileData, transforms: TransformPair | None) -> TensorData | FileData:
    if isinstance(data, TensorData):
        return TensorData(data.x, data.targets, transforms, data.name)
    return FileData(data.paths, data.targets, transforms, data.name, data.loader, data.train)


# ----------------------------------------------------------------------------------------------
# Roots, caches, hashing, errors
# ----------------------------------------------------------------------------------------------
def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: explicit ``root`` → ``$OPENWORLD_DATA`` → ``./data`` (made absolute)."""
    return _resolve_root(root)[0]


def _resolve_root(root) -> tuple[Path, str]:
    if root is not None and str(root) != "":
        return Path(root).expanduser().absolute(), "data.root"
    env = os.environ.get("OPENWORLD_DATA")
    if env:
        return Path(env).expanduser().absolute(), "$OPENWORLD_DATA"
    return Path("data").absolute(), "default ./data"


def cache_dir() -> Path:
    """``$OPENWORLD_CACHE`` or ``~/.cache/openworld``."""
    env = os.environ.get("OPENWORLD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "openworld"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_array(a: np.ndarray | torch.Tensor) -> str:
    """SHA-256 of an array's dtype, shape and C-order bytes."""
    arr = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}|{arr.shape}|".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def hash_key(tag: str, seed: int, c: int, x: int) -> int:
    """First 8 bytes (big-endian) of SHA-256 of ``"tag|seed|c|x"`` — the FSCIL card's split key."""
    return int.from_bytes(hashlib.sha256(f"{tag}|{seed}|{c}|{x}".encode("ascii")).digest()[:8], "big")


def stratified_carve(labels: np.ndarray, fraction: float, tag: str, seed: int = 0) -> np.ndarray:
    """Deterministic stratified pick: per class c, the ``round(fraction·n_c)`` indices x with the
    smallest ``(hash_key(tag, seed, c, x), x)``. Returns the picked indices in ascending order."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    picked: list[int] = []
    for c in np.unique(labels).tolist():
        pool = np.flatnonzero(labels == c).tolist()
        n = round(fraction * len(pool))
        if n:
            ranked = sorted(pool, key=lambda x: (hash_key(tag, seed, int(c), x), x))
            picked.extend(ranked[:n])
    return np.asarray(sorted(picked), dtype=np.int64)


def _fmt_list(items: Iterable[Any], limit: int = 8) -> str:
    items = [str(i) for i in items]
    if len(items) > limit:
        items = items[:limit] + [f"… ({len(items) - limit} more)"]
    return ", ".join(items)


def _not_found(
    name: str, looked_for: Sequence[str], dirs: Sequence[Path], root: Path, origin: str, fix: str = ""
) -> DataNotFoundError:
    msg = (
        f"{name}: dataset not found. Looked for {_fmt_list(looked_for)} in {_fmt_list(dirs)} "
        f"(data root {root}, from {origin}). To fix it, set `data.root` in the recipe (or the OPENWORLD_DATA "
        f"environment variable) to the folder that holds the dataset"
    )
    msg += f", {fix}" if fix else ""
    return DataNotFoundError(msg.rstrip(".") + ".")


def _corrupt(name: str, path: Path | str, reason: str, fix: str = "") -> DataNotFoundError:
    msg = (
        f"{name}: file {path} (in {Path(path).parent}) is corrupt or truncated: {reason}. Delete it and "
        f"fetch it again{(' (' + fix + ')') if fix else ''}, or point `data.root` / OPENWORLD_DATA at an intact copy."
    )
    return DataNotFoundError(msg)


def _candidates(root: Path, subdirs: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for s in subdirs:
        p = root if s in ("", ".") else root / s
        if p not in out:
            out.append(p)
    return out


def _root_info(root: Path, origin: str, found: Path, fmt: str) -> dict[str, Any]:
    return {"root": str(root), "root_origin": origin, "dir": str(found), "format": fmt}


# ----------------------------------------------------------------------------------------------
# Small helpers shared by loaders
# ----------------------------------------------------------------------------------------------
def _transforms(family: str, augment: str, image_size: int | None = None) -> TransformPair:
    from openworld.data.transforms import get_transforms

    return get_transforms(family, augment, image_size)


def _tensor_source(
    name: str, x_tr, y_tr, x_te, y_te, classes, info, family, augment, image_size: int | None = None
) -> SourceData:
    pair = _transforms(family, augment, image_size)
    x_tr = torch.as_tensor(x_tr)
    x_te = torch.as_tensor(x_te)
    info.setdefault("image_shape", list(x_tr.shape[1:]))
    info.setdefault("num_train", len(x_tr))
    info.setdefault("num_test", len(x_te))
    info.setdefault("num_classes", len(classes))
    info.setdefault("transforms", pair.name)
    return SourceData(
        name=name,
        train=TensorData(x_tr, y_tr, pair, f"{name}/train"),
        test=TensorData(x_te, y_te, pair, f"{name}/test"),
        classes=tuple(classes),
        info=info,
        train_keys=None,
        family=family,
    )


def _carve_info(labels: np.ndarray, test_idx: np.ndarray, fraction: float, tag: str, seed: int) -> dict:
    return {
        "kind": "hashed_stratified",
        "tag": tag,
        "seed": seed,
        "test_fraction": fraction,
        "rule": "per class c: round(f*n_c) indices x with smallest (sha256('tag|seed|c|x')[:8], x)",
        "num_total": len(labels),
        "num_test": len(test_idx),
        "test_indices_sha256": hashlib.sha256("".join(f"{int(i)}\n" for i in test_idx).encode()).hexdigest(),
    }


def _split_by(test_idx: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(n, dtype=bool)
    mask[test_idx] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


# ----------------------------------------------------------------------------------------------
# digits (scikit-learn, embedded)
# ----------------------------------------------------------------------------------------------
@register_dataset("digits")
def load_digits(
    root=None, download: bool = False, *, test_fraction: float = 1 / 3, split_seed: int = 0, augment: str = "default"
) -> SourceData:
    """scikit-learn's 1,797 8×8 digits; x float32 ``[N, 1, 8, 8]`` in [0, 1] (values / 16).

    No official split: a deterministic stratified test split (``test_fraction``, hashed pick with tag
    ``"digits"`` and ``split_seed``) is carved and recorded in ``info["split"]``. ``root`` is unused.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    test_idx = stratified_carve(y, test_fraction, "digits", split_seed)
    tr, te = _split_by(test_idx, len(y))
    info = {
        "root": None,
        "format": "sklearn.load_digits",
        "files": {},
        "array_sha256": {"x": sha256_array(x), "y": sha256_array(y)},
        "split": _carve_info(y, test_idx, test_fraction, "digits", split_seed),
    }
    return _tensor_source("digits", x[tr], y[tr], x[te], y[te], MNIST_CLASSES, info, "digits", augment)


# ----------------------------------------------------------------------------------------------
# idx (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------
def read_idx(path: Path, name: str = "idx") -> np.ndarray:
    """Read an idx file (``.gz`` or raw) of unsigned bytes; corrupt files raise DataNotFoundError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise _corrupt(name, path, f"cannot decompress ({exc})", "download: true") from exc
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise _corrupt(name, path, "not an unsigned-byte idx file (bad magic number)", "download: true")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise _corrupt(
            name, path, f"header promises {expected} bytes {tuple(dims)}, found {len(raw) - offset}", "download: true"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims).copy()


_IDX_OFFICIAL = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_MNIST10K = {"images": "mnist10k-images-idx3-ubyte", "labels": "mnist10k-labels-idx1-ubyte"}


def _find_idx(d: Path, stem: str) -> Path | None:
    for cand in (d / f"{stem}.gz", d / stem):
        if cand.is_file():
            return cand
    return None


def _idx_pair(name: str, images: Path, labels: Path, files: dict) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images, name)
    y = read_idx(labels, name)
    files[images.name] = sha256_file(images)
    files[labels.name] = sha256_file(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise _corrupt(name, images, f"{x.shape} images do not match {y.shape} labels in {labels.name}")
    if y.size and int(y.max()) >= 10:
        raise _corrupt(name, labels, f"label {int(y.max())} out of range 0..9")
    return x[:, None], y.astype(np.int64)


def _load_idx_dataset(
    name: str,
    root,
    download: bool,
    subdirs: Sequence[str],
    tv_class: str,
    classes: tuple[str, ...],
    allow_10k: bool,
    test_fraction: float,
    split_seed: int,
    augment: str,
    image_size: int | None,
) -> SourceData:
    root_p, origin = _resolve_root(root)
    dirs = _candidates(root_p, subdirs)
    for attempt in range(2):
        for d in dirs:
            found = {k: _find_idx(d, v) for k, v in _IDX_OFFICIAL.items()}
            if all(found.values()):
                files: dict[str, str] = {}
                x_tr, y_tr = _idx_pair(name, found["train_images"], found["train_labels"], files)
                x_te, y_te = _idx_pair(name, found["test_images"], found["test_labels"], files)
                info = {
                    **_root_info(root_p, origin, d, "idx" + (".gz" if found["train_images"].suffix == ".gz" else "")),
                    "files": files,
                    "split": "official",
                }
                return _tensor_source(name, x_tr, y_tr, x_te, y_te, classes, info, "gray28", augment, image_size)
            if allow_10k:
                f10 = {k: _find_idx(d, v) for k, v in _IDX_MNIST10K.items()}
                if all(f10.values()):
                    files = {}
                    x, y = _idx_pair(name, f10["images"], f10["labels"], files)
                    tag = "mnist10k_test"
                    test_idx = stratified_carve(y, test_fraction, tag, split_seed)
                    tr, te = _split_by(test_idx, len(y))
                    info = {
                        **_root_info(root_p, origin, d, "idx.gz (mnist10k subset)"),
                        "files": files,
                        "split": _carve_info(y, test_idx, test_fraction, tag, split_seed),
                    }
                    return _tensor_source(
                        name, x[tr], y[tr], x[te], y[te], classes, info, "gray28", augment, image_size
                    )
        if not download or attempt:
            break
        import torchvision

        cls = getattr(torchvision.datasets, tv_class)
        for train in (True, False):
            cls(str(root_p), train=train, download=True)
    looked = [f"{v}.gz" for v in _IDX_OFFICIAL.values()]
    if allow_10k:
        looked += [f"or {_IDX_MNIST10K['images']}.gz + {_IDX_MNIST10K['labels']}.gz"]
    raise _not_found(
        name,
        looked,
        dirs,
        root_p,
        origin,
        f"or set `download: true` to fetch it with torchvision.datasets.{tv_class} (into {root_p / tv_class / 'raw'})",
    )


@register_dataset("mnist")
def load_mnist(
    root=None,
    download: bool = False,
    *,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    augment: str = "default",
    image_size: int | None = None,
) -> SourceData:
    """MNIST from idx(.gz): the official 60k/10k files, or else the 10k subset ``mnist10k-*`` split
    deterministically (stratified hashed pick, ``test_fraction``; 0 keeps all 10k in train)."""
    return _load_idx_dataset(
        "mnist",
        root,
        download,
        ("mnist", "MNIST/raw", "MNIST", "."),
        "MNIST",
        MNIST_CLASSES,
        True,
        test_fraction,
        split_seed,
        augment,
        image_size,
    )


@register_dataset("fashion_mnist")
def load_fashion_mnist(
    root=None, download: bool = False, *, augment: str = "default", image_size: int | None = None
) -> SourceData:
    """Fashion-MNIST from the official idx(.gz) files: 60,000 train / 10,000 test, 28×28, 10 classes."""
    return _load_idx_dataset(
        "fashion_mnist",
        root,
        download,
        ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST", "."),
        "FashionMNIST",
        FASHION_MNIST_CLASSES,
        False,
        0.0,
        0,
        augment,
        image_size,
    )


# ----------------------------------------------------------------------------------------------
# Image decoding + cache (image folders and archives decoded into memory)
# ----------------------------------------------------------------------------------------------
def _tv_decoder() -> Callable | None:
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # pragma: no cover - torchvision without image decoding
        return None

    def decode(data: bytes, channels: int) -> np.ndarray:
        mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode).permute(1, 2, 0).numpy()

    return decode


@contextlib.contextmanager
def _decoder(name: str, channels: int) -> Iterator[Callable[[bytes, str], np.ndarray]]:
    """A function decoding image bytes to uint8 HWC with ``channels`` channels, for one decoding loop.

    torchvision's libjpeg/libpng decoder is used when available (the same pixels as PIL, faster; its
    deprecation notice is silenced inside the loop), PIL for anything it cannot decode.
    """
    fast = _tv_decoder()

    def decode(data: bytes, where: str) -> np.ndarray:
        if fast is not None:
            try:
                return fast(data, channels)
            except (RuntimeError, ValueError, TypeError):  # formats torchvision cannot decode: use PIL
                pass
        try:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                arr = np.asarray(img.convert("RGB" if channels == 3 else "L"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise _corrupt(name, where, f"cannot decode image ({exc})") from exc
        return arr if arr.ndim == 3 else arr[:, :, None]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io.*")
        yield decode


def _stack_images(name: str, images: list[np.ndarray], wheres: list[str]) -> np.ndarray:
    if not images:
        return np.zeros((0, 3, 0, 0), dtype=np.uint8)
    shape = images[0].shape
    for img, where in zip(images, wheres):
        if img.shape != shape:
            raise ValueError(
                f"{name}: images differ in size ({where} is {img.shape}, the first is {shape}); in-memory decoding "
                "needs equal sizes — load it as files (image_folder with in_memory: false) instead"
            )
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))


class _ArrayCache:
    """Decoded splits as .npy files in one folder per key; written atomically (temp folder + rename)."""

    def __init__(self, name: str, key: str, enabled: bool = True):
        self.dir = cache_dir() / "sources" / f"{name}-{key[:24]}"
        self.enabled = enabled

    def load(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict] | None:
        meta_path = self.dir / "meta.json"
        if not self.enabled or not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            names = meta.pop("splits")
            splits = {s: (np.load(self.dir / f"{s}_x.npy"), np.load(self.dir / f"{s}_y.npy")) for s in names}
        except (OSError, ValueError, KeyError):
            return None  # unreadable cache: decode again
        return splits, meta

    def save(self, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
        if not self.enabled:
            return
        try:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir.parent))
            for s, (x, y) in splits.items():
                np.save(tmp / f"{s}_x.npy", x)
                np.save(tmp / f"{s}_y.npy", y)
            (tmp / "meta.json").write_text(json.dumps({**meta, "splits": list(splits)}))
            try:
                os.replace(tmp, self.dir)
            except OSError:  # another process wrote it first
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # an unwritable cache only costs speed


def _class_order(class_names: Sequence[str], canonical: Sequence[str] | None) -> tuple[tuple[str, ...], str]:
    names = sorted(class_names)
    if canonical is not None and set(names) == set(canonical):
        return tuple(canonical), "torchvision"
    return tuple(names), "sorted folder names"


def _split_listing(
    name: str, split_dir: Path, classes: Sequence[str] | None, max_per_class: int | None, extensions: Sequence[str]
) -> tuple[list[str], list[Path]]:
    """Class folder names (sorted) and files (class-major, sorted by name) of one split folder."""
    if classes is None:
        with os.scandir(split_dir) as it:
            class_names = sorted(e.name for e in it if e.is_dir())
    else:
        class_names = list(classes)
    files: list[Path] = []
    for c in class_names:
        cdir = split_dir / c
        if not cdir.is_dir():
            continue
        with os.scandir(cdir) as it:  # DirEntry.is_file() needs no stat call on most file systems
            names = sorted(e.name for e in it if os.path.splitext(e.name)[1].lower() in extensions and e.is_file())
        if max_per_class:
            names = names[:max_per_class]
        files.extend(cdir / n for n in names)
    return class_names, files


def _decode_folder_splits(
    name: str,
    base: Path,
    split_dirs: dict[str, Path],
    canonical: Sequence[str] | None,
    max_per_class: int | None,
    channels: int,
    cache: bool,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> tuple[dict, dict]:
    """Decode ``<split>/<class>/*`` folders into uint8 NCHW arrays, via the .npy cache."""
    train_classes, _ = _split_listing(name, split_dirs["train"], None, None, extensions)
    classes, order = _class_order(train_classes, canonical)
    listing: dict[str, list[Path]] = {}
    key_h = hashlib.sha256(f"{_DECODER_VERSION}|{channels}|{max_per_class}|{'|'.join(classes)}\n".encode())
    for split, sdir in split_dirs.items():
        _, files = _split_listing(name, sdir, classes, max_per_class, extensions)
        listing[split] = files
        for f in files:
            st = f.stat()
            key_h.update(f"{split}\t{f.relative_to(sdir).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    key = key_h.hexdigest()
    store = _ArrayCache(name, key, cache)
    hit = store.load()
    meta_extra = {"cache_key": key, "cache_dir": str(store.dir), "class_order": order}
    if hit is not None:
        splits, meta = hit
        return splits, {**meta, **meta_extra, "cache_hit": True}
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    manifest = hashlib.sha256()
    with _decoder(name, channels) as decode:
        for split, files in listing.items():
            imgs, labels, wheres = [], [], []
            for f in files:
                data = f.read_bytes()
                rel = f"{split}/{f.parent.name}/{f.name}"
                manifest.update(f"{sha256_bytes(data)}  {rel}\n".encode())
                imgs.append(decode(data, str(f)))
                labels.append(index[f.parent.name])
                wheres.append(str(f))
            splits[split] = (_stack_images(name, imgs, wheres), np.asarray(labels, dtype=np.int64))
    meta = {
        "classes": list(classes),
        "files_sha256_manifest": manifest.hexdigest(),
        "num_files": sum(len(v) for v in listing.values()),
    }
    store.save(splits, meta)
    return splits, {**meta, **meta_extra, "cache_hit": False}


_SPLIT_RE = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+)$")


def _decode_archive_splits(
    name: str, archive: Path, canonical: Sequence[str] | None, max_per_class: int | None, channels: int, cache: bool
) -> tuple[dict, dict]:
    """Decode a tar(.gz) holding ``…/<train|test>/<class>/<file>`` images, via the .npy cache."""
    archive_sha = sha256_file(archive)
    key = hashlib.sha256(f"{_DECODER_VERSION}|{channels}|{max_per_class}|{archive_sha}".encode()).hexdigest()
    store = _ArrayCache(name, key, cache)
    hit = store.load()
    meta_extra = {"cache_key": key, "cache_dir": str(store.dir), "files": {archive.name: archive_sha}}
    if hit is not None:
        splits, meta = hit
        return splits, {**meta, **meta_extra, "cache_hit": True}
    members: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    try:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                match = _SPLIT_RE.search(m.name)
                if not match or Path(match.group(3)).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                fobj = tf.extractfile(m)
                if fobj is None:
                    continue
                members[match.group(1)].setdefault(match.group(2), []).append((m.name, fobj.read()))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _corrupt(name, archive, f"cannot read the archive ({exc})") from exc
    if not members["train"]:
        raise _corrupt(name, archive, "no <train|test>/<class>/<image> members found")
    classes, order = _class_order(members["train"], canonical)
    index = {c: i for i, c in enumerate(classes)}
    unknown = set(members["test"]) - set(index)
    if unknown:
        raise _corrupt(name, archive, f"test classes {sorted(unknown)} have no training folder")
    splits = {}
    manifest = hashlib.sha256()
    count = 0
    with _decoder(name, channels) as decode:
        for split in ("train", "test"):
            imgs, labels, wheres = [], [], []
            for c in classes:
                items = sorted(members[split].get(c, []), key=lambda t: Path(t[0]).name)
                for member_name, data in items[:max_per_class] if max_per_class else items:
                    rel = f"{split}/{c}/{Path(member_name).name}"
                    manifest.update(f"{sha256_bytes(data)}  {rel}\n".encode())
                    imgs.append(decode(data, f"{archive}:{member_name}"))
                    labels.append(index[c])
                    wheres.append(member_name)
                    count += 1
            splits[split] = (_stack_images(name, imgs, wheres), np.asarray(labels, dtype=np.int64))
    meta = {
        "classes": list(classes),
        "files_sha256_manifest": manifest.hexdigest(),
        "num_files": count,
        "class_order": order,
    }
    store.save(splits, meta)
    return splits, {**meta, **meta_extra, "cache_hit": False}


# ----------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100
# ----------------------------------------------------------------------------------------------
_CIFAR = {
    "cifar10": {
        "pickle_dir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "names_key": "label_names",
        "folders": ("cifar10", "CIFAR10", "cifar-10", "CIFAR-10"),
        "archive_re": re.compile(r"^cifar[-_]?10(?!0).*\.(tar\.gz|tgz|tar)$", re.IGNORECASE),
        "tv": "CIFAR10",
    },
    "cifar100": {
        "pickle_dir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "names_key": "fine_label_names",
        "folders": ("cifar100", "CIFAR100", "cifar-100", "CIFAR-100"),
        "archive_re": re.compile(r"^cifar[-_]?100.*\.(tar\.gz|tgz|tar)$", re.IGNORECASE),
        "tv": "CIFAR100",
    },
}


def _unpickle(name: str, where: str, data: bytes) -> dict:
    try:
        obj = pickle.loads(data, encoding="latin1")
    except Exception as exc:
        raise _corrupt(
            name, where, f"not a CIFAR python pickle ({type(exc).__name__}: {exc})", "download: true"
        ) from exc
    if not isinstance(obj, dict):
        raise _corrupt(name, where, "not a CIFAR python pickle (no dict inside)", "download: true")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_from_pickles(name: str, read: Callable[[str], tuple[bytes, str]], label_key: str) -> tuple:
    """Parse CIFAR pickles; ``read(file_name) -> (bytes, where)``."""
    spec = _CIFAR[name]
    out = []
    files: dict[str, str] = {}
    for split in ("train", "test"):
        xs, ys = [], []
        for fname in spec[split]:
            data, where = read(fname)
            files[fname] = sha256_bytes(data)
            d = _unpickle(name, where, data)
            labels = d.get(label_key, d.get("labels"))
            if "data" not in d or labels is None:
                raise _corrupt(name, where, f"missing 'data' or '{label_key}' entries", "download: true")
            x = np.asarray(d["data"], dtype=np.uint8)
            if x.ndim != 2 or x.shape[1] != 3072 or len(x) != len(labels):
                raise _corrupt(
                    name, where, f"unexpected data shape {x.shape} for {len(labels)} labels", "download: true"
                )
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(np.asarray(labels, dtype=np.int64))
        out.append((np.concatenate(xs), np.concatenate(ys)))
    meta_bytes, where = read(spec["meta"])
    files[spec["meta"]] = sha256_bytes(meta_bytes)
    meta = _unpickle(name, where, meta_bytes)
    names_key = "coarse_label_names" if label_key == "coarse_labels" else spec["names_key"]
    classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(names_key, []))
    if not classes:
        raise _corrupt(name, where, f"no '{names_key}' entry", "download: true")
    return out, classes, files


def _read_file(d: Path) -> Callable[[str], tuple[bytes, str]]:
    def read(fname: str) -> tuple[bytes, str]:
        p = d / fname
        try:
            return p.read_bytes(), str(p)
        except OSError as exc:
            raise DataNotFoundError(f"cannot read {p}: {exc}") from exc

    return read


def _pickles_in_tar(name: str, archive: Path) -> Callable[[str], tuple[bytes, str]] | None:
    """If ``archive`` is the official python-format download, a reader of its members; else None."""
    spec = _CIFAR[name]
    wanted = {f"{spec['pickle_dir']}/{f}" for f in [*spec["train"], *spec["test"], spec["meta"]]}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tf:
            first = tf.next()
            if first is None or not first.name.startswith(spec["pickle_dir"]):
                return None
            for m in [first, *tf]:
                if m.name in wanted and m.isfile():
                    f = tf.extractfile(m)
                    found[m.name] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise _corrupt(name, archive, f"cannot read the archive ({exc})", "download: true") from exc
    if len(found) != len(wanted):
        raise _corrupt(name, archive, f"missing members {sorted(wanted - set(found))}", "download: true")

    def read(fname: str) -> tuple[bytes, str]:
        return found[f"{spec['pickle_dir']}/{fname}"], f"{archive}:{spec['pickle_dir']}/{fname}"

    return read


def _load_cifar(
    name: str,
    root,
    download: bool,
    fmt: str,
    max_per_class: int | None,
    cache: bool,
    augment: str,
    image_size: int | None,
    label_type: str = "fine",
) -> SourceData:
    spec = _CIFAR[name]
    formats = ("auto", "pickle", "folder", "archive")
    if fmt not in formats:
        raise ValueError(f"{name}: unknown format {fmt!r}; allowed: {', '.join(formats)}")
    if label_type not in ("fine", "coarse"):
        raise ValueError(f"{name}: unknown label_type {label_type!r}; allowed: fine, coarse")
    label_key = "coarse_labels" if label_type == "coarse" else ("fine_labels" if name == "cifar100" else "labels")
    root_p, origin = _resolve_root(root)
    canonical = CIFAR10_CLASSES if name == "cifar10" else None
    t0 = time.perf_counter()

    def finish(x_tr, y_tr, x_te, y_te, classes, info) -> SourceData:
        if max_per_class and info.get("format", "").startswith("torchvision"):
            keep_tr = _first_per_class(y_tr, max_per_class)
            keep_te = _first_per_class(y_te, max_per_class)
            x_tr, y_tr, x_te, y_te = x_tr[keep_tr], y_tr[keep_tr], x_te[keep_te], y_te[keep_te]
        if max_per_class:
            info["max_per_class"] = max_per_class
        info["load_seconds"] = round(time.perf_counter() - t0, 3)
        return _tensor_source(
            name,
            torch.from_numpy(x_tr),
            y_tr,
            torch.from_numpy(x_te),
            y_te,
            classes,
            info,
            "cifar",
            augment,
            image_size,
        )

    def from_pickle_dir(d: Path) -> SourceData:
        (tr, te), classes, files = _cifar_from_pickles(name, _read_file(d), label_key)
        info = {
            **_root_info(root_p, origin, d, "torchvision-pickle"),
            "files": files,
            "class_order": "torchvision",
            "label_type": label_type,
        }
        return finish(*tr, *te, classes, info)

    def pickle_dirs() -> list[Path]:
        return [d for d in (root_p / spec["pickle_dir"], root_p) if (d / spec["meta"]).is_file()]

    pickle_candidates = [root_p / spec["pickle_dir"], root_p]
    folder_candidates = [root_p / f for f in spec["folders"]] + [root_p]
    if fmt in ("auto", "pickle") and pickle_dirs():
        return from_pickle_dir(pickle_dirs()[0])
    if fmt in ("auto", "folder"):
        for base in folder_candidates:
            if (base / "train").is_dir() and (base / "test").is_dir():
                splits, meta = _decode_folder_splits(
                    name, base, {"train": base / "train", "test": base / "test"}, canonical, max_per_class, 3, cache
                )
                info = {**_root_info(root_p, origin, base, "image-folder"), **meta}
                return finish(*splits["train"], *splits["test"], tuple(meta["classes"]), info)
    if fmt in ("auto", "archive") and root_p.is_dir():
        for archive in sorted(p for p in root_p.iterdir() if spec["archive_re"].match(p.name) and p.is_file()):
            reader = _pickles_in_tar(name, archive)
            if reader is not None:
                (tr, te), classes, files = _cifar_from_pickles(name, reader, label_key)
                info = {
                    **_root_info(root_p, origin, root_p, "torchvision-pickle (tar)"),
                    "files": {archive.name: sha256_file(archive), **files},
                    "class_order": "torchvision",
                    "label_type": label_type,
                }
                return finish(*tr, *te, classes, info)
            splits, meta = _decode_archive_splits(name, archive, canonical, max_per_class, 3, cache)
            info = {**_root_info(root_p, origin, archive, "image-folder archive"), **meta}
            return finish(*splits["train"], *splits["test"], tuple(meta["classes"]), info)
    if download and fmt in ("auto", "pickle"):
        import torchvision

        cls = getattr(torchvision.datasets, spec["tv"])
        root_p.mkdir(parents=True, exist_ok=True)
        cls(str(root_p), train=True, download=True)
        if pickle_dirs():
            return from_pickle_dir(pickle_dirs()[0])
    pick_files = [*spec["train"], *spec["test"], spec["meta"]]
    looked = [
        f"{spec['pickle_dir']}/{{{','.join(pick_files)}}} (torchvision python format)",
        f"{spec['folders'][0]}/{{train,test}}/<class>/<image> (image folders)",
        f"{name}*.tar.gz (an archive of those folders)",
    ]
    raise _not_found(
        name,
        looked,
        _unique(pickle_candidates + folder_candidates),
        root_p,
        origin,
        f"or set `download: true` to fetch the python-format dataset with torchvision ({CIFAR_URLS[name]})",
    )


def _unique(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def _first_per_class(y: np.ndarray, n: int) -> np.ndarray:
    keep = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        keep[np.flatnonzero(y == c)[:n]] = True
    return np.flatnonzero(keep)


@register_dataset("cifar10")
def load_cifar10(
    root=None,
    download: bool = False,
    *,
    format: str = "auto",
    max_per_class: int | None = None,
    cache: bool = True,
    augment: str = "default",
    image_size: int | None = None,
) -> SourceData:
    """CIFAR-10: torchvision python pickles (``cifar-10-batches-py/``), image folders
    (``cifar10/{train,test}/<class>/*``) or a tar(.gz) of them (``cifar10*.tar.gz``), auto-detected in that
    order. Labels follow torchvision's class order. Folders/archives are decoded once and cached as .npy.
    ``max_per_class`` keeps the first n images per class of each split (for quick runs)."""
    return _load_cifar("cifar10", root, download, format, max_per_class, cache, augment, image_size)


@register_dataset("cifar100")
def load_cifar100(
    root=None,
    download: bool = False,
    *,
    format: str = "auto",
    max_per_class: int | None = None,
    cache: bool = True,
    augment: str = "default",
    image_size: int | None = None,
    label_type: str = "fine",
) -> SourceData:
    """CIFAR-100 (fine labels 0–99 by default; ``label_type: coarse`` for the 20 superclasses with the
    pickle format), with the same formats as :func:`load_cifar10`. Training rows keep the official
    file order, so the FSCIL index lists index them directly."""
    return _load_cifar("cifar100", root, download, format, max_per_class, cache, augment, image_size, label_type)


# ----------------------------------------------------------------------------------------------
# Omniglot
# ----------------------------------------------------------------------------------------------
OMNIGLOT_ARCHIVES = ("images_background_small1", "images_background_small2")


def _omniglot_members(name: str, d: Path, archive: str) -> tuple[list[tuple[str, str, str, bytes]], dict] | None:
    """(alphabet, character, file, bytes) of one Omniglot subset, from ``<d>/<archive>.zip`` or ``<d>/<archive>/``."""
    zpath = d / f"{archive}.zip"
    items = []
    if zpath.is_file():
        try:
            with zipfile.ZipFile(zpath) as zf:
                for info in zf.infolist():
                    parts = info.filename.rstrip("/").split("/")
                    if info.is_dir() or not parts[-1].lower().endswith(".png") or len(parts) < 3:
                        continue
                    items.append((parts[-3], parts[-2], parts[-1], zf.read(info)))
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise _corrupt(name, zpath, f"cannot read the zip archive ({exc})", "download: true") from exc
        return items, {zpath.name: sha256_file(zpath)}
    folder = d / archive
    if folder.is_dir():
        for p in sorted(folder.glob("*/*/*.png")):
            items.append((p.parts[-3], p.parts[-2], p.name, p.read_bytes()))
        if items:
            manifest = hashlib.sha256()
            for alphabet, character, fname, data in items:
                manifest.update(f"{sha256_bytes(data)}  {alphabet}/{character}/{fname}\n".encode())
            return items, {f"{archive}/ (folder manifest)": manifest.hexdigest()}
    return None


def _drawer(file_name: str) -> int:
    stem = Path(file_name).stem
    try:
        return int(stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


@register_dataset("omniglot")
def load_omniglot(
    root=None,
    download: bool = False,
    *,
    archives: Sequence[str] = OMNIGLOT_ARCHIVES,
    test_drawers: int = 5,
    image_size: int = 28,
    invert: bool = True,
    augment: str = "default",
) -> SourceData:
    """Omniglot characters as classes, drawers split into train/test.

    Reads ``<archive>.zip`` (or the extracted ``<archive>/`` folder) for each of ``archives`` from
    ``<root>/omniglot/`` (or ``omniglot-py/``, or the root). Characters present in several archives
    (Greek and Latin in the two "small" subsets) are kept once, from the first archive. Classes are
    sorted by (alphabet, character) and named ``"<alphabet>/<character>"``. Of the sorted drawer ids
    the last ``test_drawers`` are test. Images are resized to ``image_size`` (bilinear, antialiased)
    and, with ``invert`` (default), strokes are bright on a dark background like MNIST.
    """
    from PIL import Image

    root_p, origin = _resolve_root(root)
    dirs = _candidates(root_p, ("omniglot", "omniglot-py", "Omniglot", "."))
    t0 = time.perf_counter()
    found_dir = None
    for attempt in range(2):
        for d in dirs:
            if all(_omniglot_exists(d, a) for a in archives):
                found_dir = d
                break
        if found_dir is not None or not download or attempt:
            break
        from torchvision.datasets.utils import download_url

        target = root_p / "omniglot"
        for a in archives:
            if not (target / f"{a}.zip").is_file():
                download_url(f"{OMNIGLOT_URL}/{a}.zip", str(target), f"{a}.zip")
    if found_dir is None:
        raise _not_found(
            "omniglot",
            [f"{a}.zip (or an extracted {a}/ folder)" for a in archives],
            dirs,
            root_p,
            origin,
            f"or set `download: true` to fetch the zips from {OMNIGLOT_URL}/ (layout inside: "
            "<archive>/<alphabet>/<character>/<id>_<drawer>.png)",
        )
    chars: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
    files: dict[str, str] = {}
    dup_chars, dup_identical = 0, True
    for a in archives:
        got = _omniglot_members("omniglot", found_dir, a)
        assert got is not None
        items, fhash = got
        files.update(fhash)
        local: dict[tuple[str, str], list[tuple[str, bytes]]] = {}
        for alphabet, character, fname, data in items:
            local.setdefault((alphabet, character), []).append((fname, data))
        for key, lst in local.items():
            lst.sort()
            if key in chars:
                dup_chars += 1
                dup_identical &= chars[key] == lst
            else:
                chars[key] = lst
    if not chars:
        raise _corrupt("omniglot", found_dir, "no <alphabet>/<character>/*.png images inside")
    classes = sorted(chars)
    drawer_ids = sorted({_drawer(f) for lst in chars.values() for f, _ in lst})
    if test_drawers < 0 or test_drawers >= len(drawer_ids):
        raise ValueError(f"omniglot: test_drawers must be in 0..{len(drawer_ids) - 1}, got {test_drawers}")
    test_ids = set(drawer_ids[len(drawer_ids) - test_drawers :]) if test_drawers else set()
    imgs, labels, is_test = [], [], []
    for ci, key in enumerate(classes):
        for fname, data in sorted(chars[key], key=lambda t: (_drawer(t[0]), t[0])):
            try:
                with Image.open(io.BytesIO(data)) as im:
                    imgs.append(np.asarray(im.convert("L"), dtype=np.uint8))
            except Exception as exc:
                raise _corrupt("omniglot", f"{found_dir}/{key[0]}/{key[1]}/{fname}", f"cannot decode ({exc})") from exc
            labels.append(ci)
            is_test.append(_drawer(fname) in test_ids)
    x = torch.from_numpy(np.stack(imgs))[:, None]
    if invert:
        x = 255 - x
    if image_size and tuple(x.shape[-2:]) != (image_size, image_size):
        xf = torch.nn.functional.interpolate(
            x.float(), size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
        x = xf.round_().clamp_(0, 255).to(torch.uint8)
    y = np.asarray(labels, dtype=np.int64)
    test_mask = np.asarray(is_test, dtype=bool)
    tr, te = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    info = {
        **_root_info(
            root_p, origin, found_dir, "zip of png" if any(k.endswith(".zip") for k in files) else "png folder"
        ),
        "files": files,
        "archives": list(archives),
        "duplicate_characters_dropped": dup_chars,
        "duplicates_identical": bool(dup_identical),
        "drawers": drawer_ids,
        "test_drawers": sorted(test_ids),
        "invert": invert,
        "resize": {"size": image_size, "mode": "bilinear", "antialias": True},
        "array_sha256": sha256_array(x),
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    names = tuple(f"{a}/{c}" for a, c in classes)
    return _tensor_source(
        "omniglot", x[torch.from_numpy(tr)], y[tr], x[torch.from_numpy(te)], y[te], names, info, "gray28", augment
    )


def _omniglot_exists(d: Path, archive: str) -> bool:
    return (d / f"{archive}.zip").is_file() or (d / archive).is_dir()


# ----------------------------------------------------------------------------------------------
# Image-file datasets: generic image folders, miniImageNet, CUB-200
# ----------------------------------------------------------------------------------------------
def _file_source(
    name: str,
    base: Path,
    train_paths: list[Path],
    y_tr,
    test_paths: list[Path],
    y_te,
    classes,
    info: dict,
    train_keys: list[str] | None,
    family: str,
    augment: str,
    image_size: int | None,
    test_keys: list[str] | None = None,
) -> SourceData:
    pair = _transforms(family, augment, image_size)
    info.setdefault("num_train", len(train_paths))
    info.setdefault("num_test", len(test_paths))
    info.setdefault("num_classes", len(classes))
    info.setdefault("transforms", pair.name)
    return SourceData(
        name=name,
        train=FileData(train_paths, y_tr, pair, f"{name}/train", train=False),
        test=FileData(test_paths, y_te, pair, f"{name}/test", train=False),
        classes=tuple(classes),
        info=info,
        train_keys=train_keys,
        family=family,
        test_keys=test_keys,
    )


def _listing_digest(base: Path, paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.relative_to(base).as_posix()}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()


@register_dataset("image_folder")
def load_image_folder(
    root=None,
    download: bool = False,
    *,
    subdir: str | None = None,
    train_dir: str = "train",
    test_dir: str | None = "test",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    max_per_class: int | None = None,
    in_memory: bool = False,
    channels: int = 3,
    cache: bool = True,
    family: str | None = None,
    augment: str = "default",
    image_size: int | None = None,
    name: str = "image_folder",
) -> SourceData:
    """Any ``<root>[/<subdir>]/<train_dir>/<class>/<image>`` (+ ``<test_dir>/…``) tree.

    Classes are the sorted training class folders; samples are class-major, sorted by file name.
    Default: :class:`FileData` with per-sample ``imagenet``-family transforms, and ``train_keys`` the
    paths relative to the dataset folder (``train/<class>/<file>``). ``in_memory: true`` decodes all
    images (equal sizes required) into a cached uint8 :class:`TensorData` instead (family default
    ``cifar``). ``test_dir: null`` gives an empty test part (e.g. one Office-Home domain).
    """
    if download:
        raise ValueError("image_folder: download is not available for a generic image folder")
    root_p, origin = _resolve_root(root)
    base = root_p / subdir if subdir else root_p
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    tr_dir = base / train_dir
    te_dir = base / test_dir if test_dir else None
    missing = [d for d in (tr_dir, te_dir) if d is not None and not d.is_dir()]
    if missing:
        raise _not_found(
            name,
            [f"{train_dir}/<class>/<image>"] + ([f"{test_dir}/<class>/<image>"] if test_dir else []),
            [base],
            root_p,
            origin,
            f"with the layout <folder>/{train_dir}/<class name>/<image>; `subdir`, `train_dir` and `test_dir` "
            f"choose the folders (missing: {_fmt_list(missing)})",
        )
    fam = family or ("cifar" if in_memory else "imagenet")
    if in_memory:
        split_dirs = {"train": tr_dir} | ({"test": te_dir} if te_dir is not None else {})
        splits, meta = _decode_folder_splits(name, base, split_dirs, None, max_per_class, channels, cache, exts)
        if "test" not in splits:
            x0 = splits["train"][0]
            splits["test"] = (np.zeros((0, *x0.shape[1:]), dtype=np.uint8), np.zeros(0, dtype=np.int64))
        info = {**_root_info(root_p, origin, base, "image-folder (decoded)"), **meta}
        return _tensor_source(
            name,
            torch.from_numpy(splits["train"][0]),
            splits["train"][1],
            torch.from_numpy(splits["test"][0]),
            splits["test"][1],
            tuple(meta["classes"]),
            info,
            fam,
            augment,
            image_size,
        )
    classes, tr_files = _split_listing(name, tr_dir, None, max_per_class, exts)
    index = {c: i for i, c in enumerate(classes)}
    te_files: list[Path] = []
    if te_dir is not None:
        te_classes = sorted(p.name for p in te_dir.iterdir() if p.is_dir())
        unknown = [c for c in te_classes if c not in index]
        if unknown:
            raise ValueError(f"{name}: test classes {unknown} in {te_dir} have no folder in {tr_dir}")
        _, te_files = _split_listing(name, te_dir, classes, max_per_class, exts)
    y_tr = [index[p.parent.name] for p in tr_files]
    y_te = [index[p.parent.name] for p in te_files]
    info = {
        **_root_info(root_p, origin, base, "image-folder"),
        "listing_sha256": _listing_digest(base, [*tr_files, *te_files]),
        "listing_rule": "sha256 of '<relative path>\\t<size>' lines; image bytes are not hashed",
    }
    keys = [p.relative_to(base).as_posix() for p in tr_files]
    te_keys = [p.relative_to(base).as_posix() for p in te_files]
    return _file_source(
        name, base, tr_files, y_tr, te_files, y_te, classes, info, keys, fam, augment, image_size, te_keys
    )


def _read_csv_rows(name: str, path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise _corrupt(name, path, f"unreadable csv ({exc})") from exc
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise _corrupt(name, path, "expected the header 'filename,label'")
    out = []
    for i, r in enumerate(rows[1:], start=2):
        if not r:
            continue
        if len(r) < 2:
            raise _corrupt(name, path, f"line {i} has fewer than 2 fields")
        out.append((r[0].strip(), r[1].strip()))
    return out


def _first_appearance(values: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def _check_files_exist(name: str, d: Path, rels: Sequence[str]) -> None:
    present: dict[Path, set[str]] = {}
    missing = []
    for rel in rels:
        p = d / rel
        names = present.get(p.parent)
        if names is None:
            try:
                names = {e.name for e in os.scandir(p.parent)}
            except OSError:
                names = set()
            present[p.parent] = names
        if p.name not in names:
            missing.append(rel)
    if missing:
        raise DataNotFoundError(
            f"{name}: {len(missing)} of {len(rels)} images listed by the split files are missing from {d} "
            f"(first: {_fmt_list(missing, 5)}). Check that the image folder is complete, or point `data.root` / "
            "OPENWORLD_DATA at a complete copy."
        )


@register_dataset("mini_imagenet")
def load_mini_imagenet(
    root=None,
    download: bool = False,
    *,
    verify_files: bool = True,
    augment: str = "mini",
    image_size: int | None = None,
) -> SourceData:
    """miniImageNet in the CEC layout: ``<root>/miniimagenet/{images/, split/train.csv, split/test.csv}``.

    Label = rank of the wnid's first appearance in ``train.csv`` (the test csv must list the wnids in
    the same order). ``train_keys`` are the csv file names (the 4th field of the index-list lines).
    """
    root_p, origin = _resolve_root(root)
    dirs = _candidates(root_p, ("miniimagenet", "mini_imagenet", "mini-imagenet", "miniImageNet", "MINI-ImageNet", "."))
    need = ("split/train.csv", "split/test.csv", "images/")
    found = next((d for d in dirs if all((d / n).exists() for n in need)), None)
    if found is None:
        raise _not_found(
            "mini_imagenet",
            need,
            dirs,
            root_p,
            origin,
            "laid out as CEC's miniimagenet/ folder (images/<file>.jpg and split/{train,test}.csv with header "
            "'filename,label'; see the CEC-CVPR2021 repository for the download); there is no automatic download",
        )
    tr_rows = _read_csv_rows("mini_imagenet", found / "split/train.csv")
    te_rows = _read_csv_rows("mini_imagenet", found / "split/test.csv")
    wnids = _first_appearance(w for _, w in tr_rows)
    te_wnids = _first_appearance(w for _, w in te_rows)
    if te_wnids != wnids:
        raise _corrupt(
            "mini_imagenet",
            found / "split/test.csv",
            "its wnids are not in the same first-appearance order as train.csv",
        )
    index = {w: i for i, w in enumerate(wnids)}
    if verify_files:
        _check_files_exist("mini_imagenet", found / "images", [f for f, _ in tr_rows + te_rows])
    images = found / "images"
    info = {
        **_root_info(root_p, origin, found, "csv + images (CEC)"),
        "files": {
            "split/train.csv": sha256_file(found / "split/train.csv"),
            "split/test.csv": sha256_file(found / "split/test.csv"),
        },
        "image_shape": None,
    }
    return _file_source(
        "mini_imagenet",
        found,
        [images / f for f, _ in tr_rows],
        [index[w] for _, w in tr_rows],
        [images / f for f, _ in te_rows],
        [index[w] for _, w in te_rows],
        tuple(wnids),
        info,
        [f for f, _ in tr_rows],
        "imagenet",
        augment,
        image_size,
        [f for f, _ in te_rows],
    )


def _read_id_table(name: str, path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise _corrupt(name, path, f"unreadable ({exc})") from exc
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise _corrupt(name, path, f"line {i} is not '<id> <value>': {line[:80]!r}")
        out[int(parts[0])] = parts[1]
    return out


@register_dataset("cub200")
def load_cub200(
    root=None, download: bool = False, *, verify_files: bool = True, augment: str = "cub", image_size: int | None = None
) -> SourceData:
    """CUB-200-2011: ``<root>/CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, images/}``.

    Label = class id − 1; train/test from ``train_test_split.txt`` (1 = train); samples in image-id
    order. ``train_keys`` are ``CUB_200_2011/images/<dir>/<file>`` (the index-list line format).
    """
    root_p, origin = _resolve_root(root)
    dirs = _candidates(root_p, ("CUB_200_2011", "cub200/CUB_200_2011", "CUB_200_2011/CUB_200_2011", "."))
    need = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "images/")
    found = next((d for d in dirs if all((d / n).exists() for n in need)), None)
    if found is None:
        raise _not_found(
            "cub200",
            need,
            dirs,
            root_p,
            origin,
            "with the official CUB_200_2011 layout (download CUB_200_2011.tgz from "
            "https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract it into the root); there is no "
            "automatic download",
        )
    name = "cub200"
    paths = _read_id_table(name, found / "images.txt")
    labels = _read_id_table(name, found / "image_class_labels.txt")
    split = _read_id_table(name, found / "train_test_split.txt")
    if set(paths) != set(labels) or set(paths) != set(split):
        raise _corrupt(
            name, found / "images.txt", "its image ids differ from image_class_labels.txt / train_test_split.txt"
        )
    ids = sorted(paths)
    try:
        cls_ids = {i: int(labels[i]) for i in ids}
        is_train = {i: int(split[i]) == 1 for i in ids}
    except ValueError as exc:
        raise _corrupt(name, found / "image_class_labels.txt", f"non-integer class or split value ({exc})") from exc
    n_classes = max(cls_ids.values())
    if min(cls_ids.values()) < 1 or len(set(cls_ids.values())) != n_classes:
        raise _corrupt(name, found / "image_class_labels.txt", f"class ids are not 1..{n_classes}")
    names: dict[int, str] = {}
    files = {n: sha256_file(found / n) for n in need if not n.endswith("/")}
    if (found / "classes.txt").is_file():
        names = {k: v for k, v in _read_id_table(name, found / "classes.txt").items()}
        files["classes.txt"] = sha256_file(found / "classes.txt")
    for i in ids:
        names.setdefault(cls_ids[i], paths[i].split("/")[0])
    classes = tuple(names[c] for c in range(1, n_classes + 1))
    if verify_files:
        _check_files_exist(name, found / "images", [paths[i] for i in ids])
    tr = [i for i in ids if is_train[i]]
    te = [i for i in ids if not is_train[i]]
    images = found / "images"
    info = {
        **_root_info(root_p, origin, found, "CUB_200_2011 text tables + images"),
        "files": files,
        "image_shape": None,
    }
    return _file_source(
        name,
        found,
        [images / paths[i] for i in tr],
        [cls_ids[i] - 1 for i in tr],
        [images / paths[i] for i in te],
        [cls_ids[i] - 1 for i in te],
        classes,
        info,
        [f"CUB_200_2011/images/{paths[i]}" for i in tr],
        "imagenet",
        augment,
        image_size,
        [f"CUB_200_2011/images/{paths[i]}" for i in te],
    )


# ----------------------------------------------------------------------------------------------
# ImageNet-R with CODA-Prompt's fixed 80/20 list split (OVOR card §1)
# ----------------------------------------------------------------------------------------------
IMAGENET_R_SPLIT_FILES = (
    ("imagenet-r_train.yaml", "imagenet-r_test.yaml"),  # the names in CODA-Prompt / OVOR dataloaders/splits/
    ("imr_train.yaml", "imr_test.yaml"),
)
IMAGENET_R_SPLITS_URL = "https://github.com/GT-RIPL/CODA-Prompt/tree/main/dataloaders/splits"
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"


def _read_split_yaml(name: str, path: Path) -> tuple[list[str], list[int]]:
    """``data`` (image paths) and ``targets`` (int labels) of one CODA-Prompt split file."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path, "rb") as f:
            cfg = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    except (OSError, yaml.YAMLError) as exc:
        raise _corrupt(name, path, f"unreadable YAML ({exc})", f"from {IMAGENET_R_SPLITS_URL}") from exc
    if not isinstance(cfg, dict) or not isinstance(cfg.get("data"), list) or not isinstance(cfg.get("targets"), list):
        raise _corrupt(name, path, "expected the keys 'data' (list of image paths) and 'targets' (list of labels)")
    data, targets = cfg["data"], cfg["targets"]
    if len(data) != len(targets):
        raise _corrupt(name, path, f"{len(data)} paths but {len(targets)} targets")
    try:
        labels = [int(t) for t in targets]
    except (TypeError, ValueError) as exc:
        raise _corrupt(name, path, f"non-integer target ({exc})") from exc
    rels = []
    for i, p in enumerate(data):
        parts = [q for q in str(p).replace("\\", "/").split("/") if q]
        if len(parts) < 2:
            raise _corrupt(name, path, f"entry {i} ({p!r}) is not '<...>/<wnid>/<file>'")
        rels.append(f"{parts[-2]}/{parts[-1]}")
    return rels, labels


def _imagenet_r_split_files(images: Path, root_p: Path, split_dir) -> tuple[list[Path], tuple[Path, Path] | None]:
    dirs = [Path(split_dir).expanduser().absolute()] if split_dir else []
    dirs += [images / "splits", root_p / "splits", images]
    dirs = _unique(dirs)
    for d in dirs:
        for tr, te in IMAGENET_R_SPLIT_FILES:
            if (d / tr).is_file() and (d / te).is_file():
                return dirs, (d / tr, d / te)
    return dirs, None


@register_dataset("imagenet_r")
def load_imagenet_r(
    root=None,
    download: bool = False,
    *,
    split: str = "files",
    split_dir: str | None = None,
    split_seed: int = 0,
    test_fraction: float = 0.2,
    verify_files: bool = True,
    augment: str = "ovor",
    image_size: int | None = None,
) -> SourceData:
    """ImageNet-R (200 classes) from the official tar layout ``<root>/imagenet-r/<wnid>/<file>.jpg``.

    ``split: files`` (default, the OVOR/CODA-Prompt protocol): the fixed 80/20 lists
    ``imagenet-r_train.yaml`` / ``imagenet-r_test.yaml`` (also accepted as ``imr_train.yaml`` /
    ``imr_test.yaml``) from CODA-Prompt's ``dataloaders/splits/``, looked for in ``split_dir`` (if set),
    ``<root>/imagenet-r/splits/``, ``<root>/splits/`` and ``<root>/imagenet-r/``. Their ``data`` entries
    (e.g. ``data/imagenet-r/n01443537/art_0.jpg``) resolve by their last two components under
    ``<root>/imagenet-r/``; labels are their ``targets``; samples keep the files' order; the files'
    SHA-256 go to ``info["files"]``. Class names are the wnids (label k's folder).

    ``split: seeded``: no split files; per class, ``round(test_fraction·n_c)`` images of the folder go to
    the test part by :func:`stratified_carve` (tag ``imagenet_r``, ``split_seed``). **Not the paper's
    split**: ``info["split"]["paper_split"]`` is false and ``info["description"]`` says so. Labels are the
    sorted wnid folders' ranks.

    Default transforms: ``imagenet`` family, ``ovor`` (224, [0, 1] inputs). ``train_keys`` / ``test_keys``
    are ``<wnid>/<file>``.
    """
    name = "imagenet_r"
    if download:
        raise ValueError(
            f"{name}: there is no automatic download; extract {IMAGENET_R_URL} into the data root and put "
            f"CODA-Prompt's split files ({IMAGENET_R_SPLITS_URL}) in <root>/imagenet-r/splits/"
        )
    if split not in ("files", "seeded"):
        raise ValueError(f"{name}: unknown split {split!r}; allowed: files (CODA-Prompt's lists), seeded")
    root_p, origin = _resolve_root(root)
    images = root_p / "imagenet-r"
    if not images.is_dir():
        raise _not_found(
            name,
            ["imagenet-r/<wnid>/<image>.jpg"],
            [root_p],
            root_p,
            origin,
            f"extracting the official archive ({IMAGENET_R_URL}) there, so that <root>/imagenet-r/n01443537/… "
            f"exists; there is no automatic download",
        )
    if split == "seeded":
        with os.scandir(images) as it:
            wnid_dirs = sorted(e.name for e in it if e.is_dir() and e.name != "splits")
        classes, files = _split_listing(name, images, wnid_dirs, None, IMAGE_EXTENSIONS)
        present = {f.parent.name for f in files}
        classes = [c for c in classes if c in present]
        if not files:
            raise _not_found(name, ["<wnid>/<image>.jpg"], [images], root_p, origin, "with the official tar layout")
        index = {c: i for i, c in enumerate(classes)}
        labels = np.asarray([index[f.parent.name] for f in files], dtype=np.int64)
        te_idx = stratified_carve(labels, test_fraction, name, split_seed)
        tr_idx, te_idx = _split_by(te_idx, len(labels))
        rel = [f.relative_to(images).as_posix() for f in files]
        info = {
            **_root_info(root_p, origin, images, "image folder, seeded split"),
            "files": {},
            "listing_sha256": _listing_digest(images, files),
            "listing_rule": "sha256 of '<relative path>\\t<size>' lines; image bytes are not hashed",
            "split": {
                **_carve_info(labels, te_idx, test_fraction, name, split_seed),
                "method": "hashed_stratified",
                "kind": "seeded",
                "paper_split": False,
            },
            "description": (
                f"ImageNet-R, seeded {1 - test_fraction:.0%}/{test_fraction:.0%} per-class split (seed "
                f"{split_seed}) — NOT the paper's split (CODA-Prompt's fixed imagenet-r_train/test.yaml lists)"
            ),
            "image_shape": None,
        }
        return _file_source(
            name,
            images,
            [files[i] for i in tr_idx],
            labels[tr_idx].tolist(),
            [files[i] for i in te_idx],
            labels[te_idx].tolist(),
            tuple(classes),
            info,
            [rel[i] for i in tr_idx],
            "imagenet",
            augment,
            image_size,
            [rel[i] for i in te_idx],
        )
    dirs, found = _imagenet_r_split_files(images, root_p, split_dir)
    if found is None:
        looked = [f"{a} + {b}" for a, b in IMAGENET_R_SPLIT_FILES]
        raise DataNotFoundError(
            f"{name}: split files not found. Looked for {_fmt_list(looked)} in {_fmt_list(dirs)} (data root "
            f"{root_p}, from {origin}). To fix it, copy imagenet-r_train.yaml and imagenet-r_test.yaml from the "
            f"CODA-Prompt repository's dataloaders/splits/ ({IMAGENET_R_SPLITS_URL}; the OVOR code ships the same "
            f"files) into {images / 'splits'}, or set `split_dir` to the folder that holds them; or set "
            "`split: seeded` for a seeded 80/20 per-class split of the folder (not the paper's split)."
        )
    tr_path, te_path = found
    tr_rel, y_tr = _read_split_yaml(name, tr_path)
    te_rel, y_te = _read_split_yaml(name, te_path)
    wnid_of: dict[int, str] = {}
    for path, rels, ys in ((tr_path, tr_rel, y_tr), (te_path, te_rel, y_te)):
        for r, y in zip(rels, ys):
            w = r.split("/")[0]
            if wnid_of.setdefault(y, w) != w:
                raise _corrupt(name, path, f"label {y} is given to two folders ({wnid_of[y]} and {w})")
    n_classes = max(wnid_of) + 1 if wnid_of else 0
    if sorted(wnid_of) != list(range(n_classes)) or len(set(wnid_of.values())) != n_classes:
        raise _corrupt(name, tr_path, f"labels are not 0..{n_classes - 1} with one folder each")
    if verify_files:
        _check_files_exist(name, images, tr_rel + te_rel)
    info = {
        **_root_info(root_p, origin, images, "image folder + CODA-Prompt split lists"),
        "files": {tr_path.name: sha256_file(tr_path), te_path.name: sha256_file(te_path)},
        "split_files": {"train": str(tr_path), "test": str(te_path)},
        "split": {"kind": "files", "paper_split": True, "source": IMAGENET_R_SPLITS_URL},
        "description": "ImageNet-R, CODA-Prompt's fixed 80/20 list split (the OVOR paper's split)",
        "image_shape": None,
    }
    return _file_source(
        name,
        images,
        [images / r for r in tr_rel],
        y_tr,
        [images / r for r in te_rel],
        y_te,
        tuple(wnid_of[k] for k in range(n_classes)),
        info,
        tr_rel,
        "imagenet",
        augment,
        image_size,
        te_rel,
    )


# ----------------------------------------------------------------------------------------------
# synth_hier (FSCIL card §9)
# ----------------------------------------------------------------------------------------------
def synth_hier_arrays(
    seed_data: int = 0,
    train_per_class: int = 100,
    test_per_class: int = 50,
    num_classes: int = 100,
    num_super: int = 20,
    latent_dim: int = 32,
    hidden_dim: int = 128,
    out_dim: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The card's generator, draws in the card's order, computed in float64 and returned as float32.

    1. μ_g = 3·N(0, I) for the 20 superclasses; 2. μ_c = μ_{c mod 20} + N(0, I) for c = 0…99;
    3. A₁ [32×128] ~ N(0, 1/32), A₂ [128×256] ~ N(0, 1/128); 4. per class, its train then its test
    samples: z = μ_c + 2·N(0, I), x = tanh(z A₁) A₂.
    """
    rng = np.random.default_rng(seed_data)
    mu_super = rng.normal(0.0, 3.0, size=(num_super, latent_dim))
    mu = mu_super[np.arange(num_classes) % num_super] + rng.normal(0.0, 1.0, size=(num_classes, latent_dim))
    a1 = rng.normal(0.0, 1.0 / np.sqrt(latent_dim), size=(latent_dim, hidden_dim))
    a2 = rng.normal(0.0, 1.0 / np.sqrt(hidden_dim), size=(hidden_dim, out_dim))
    z_tr = np.empty((num_classes, train_per_class, latent_dim))
    z_te = np.empty((num_classes, test_per_class, latent_dim))
    for c in range(num_classes):  # draw order: class c's train samples, then its test samples
        z_tr[c] = mu[c] + rng.normal(0.0, 2.0, size=(train_per_class, latent_dim))
        z_te[c] = mu[c] + rng.normal(0.0, 2.0, size=(test_per_class, latent_dim))
    # one product for all samples (many small BLAS calls are slow on a busy multi-threaded BLAS)
    x_tr = (np.tanh(z_tr.reshape(-1, latent_dim) @ a1) @ a2).astype(np.float32)
    x_te = (np.tanh(z_te.reshape(-1, latent_dim) @ a1) @ a2).astype(np.float32)
    y_tr = np.repeat(np.arange(num_classes, dtype=np.int64), train_per_class)
    y_te = np.repeat(np.arange(num_classes, dtype=np.int64), test_per_class)
    return x_tr, y_tr, x_te, y_te


@register_dataset("synth_hier")
def load_synth_hier(
    root=None,
    download: bool = False,
    *,
    seed_data: int = 0,
    train_per_class: int = 100,
    test_per_class: int = 50,
    augment: str = "default",
) -> SourceData:
    """Synthetic hierarchical features (FSCIL card §9): 100 classes in 20 superclasses, x float32 [N, 256].
    ``info["array_sha256"]`` keys golden numbers (numpy's Generator streams may change across versions)."""
    x_tr, y_tr, x_te, y_te = synth_hier_arrays(seed_data, train_per_class, test_per_class)
    info = {
        "root": None,
        "format": "synthetic (numpy default_rng)",
        "files": {},
        "seed_data": seed_data,
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "numpy_version": np.__version__,
        "array_sha256": {
            "x_train": sha256_array(x_tr),
            "y_train": sha256_array(y_tr),
            "x_test": sha256_array(x_te),
            "y_test": sha256_array(y_te),
        },
        "superclass": "c mod 20",
    }
    classes = tuple(f"class_{c:02d}" for c in range(100))
    return _tensor_source(
        "synth_hier", torch.from_numpy(x_tr), y_tr, torch.from_numpy(x_te), y_te, classes, info, "vector", augment
    )


# ----------------------------------------------------------------------------------------------
def load_source(name: str, **options: Any) -> SourceData:
    """Look a dataset up in the registry (built-ins, entry points, ``module:function``) and load it."""
    from openworld.registry import DATASETS

    return DATASETS.get(name)(**options)


__all__ = [
    "CIFAR10_CLASSES",
    "FASHION_MNIST_CLASSES",
    "DataNotFoundError",
    "SourceData",
    "cache_dir",
    "hash_key",
    "load_cifar10",
    "load_cifar100",
    "load_cub200",
    "load_digits",
    "load_fashion_mnist",
    "load_image_folder",
    "load_imagenet_r",
    "load_mini_imagenet",
    "load_mnist",
    "load_omniglot",
    "load_source",
    "load_synth_hier",
    "read_idx",
    "resolve_root",
    "sha256_array",
    "sha256_file",
    "stratified_carve",
    "synth_hier_arrays",
]
