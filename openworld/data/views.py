"""Dataset views: in-memory tensors, file lists, subsets, hidden labels, and batch iteration.

Two kinds of dataset, one interface (``targets``, ``subset``, ``hide_labels``, ``__len__``):

* :class:`TensorData` — every sample already in memory as one tensor. Batches are cut by index
  slicing on the run's device (no per-sample collation); its transforms are *batched* callables
  ``Tensor[B, ...] -> Tensor[B, ...]``. This is the fast path for digits, MNIST, Omniglot, CIFAR.
* :class:`FileData` — image files decoded per sample in DataLoader workers, with per-sample
  transforms (miniImageNet, CUB, ImageNet-R).

Hiding labels is structural: :meth:`hide_labels` returns a view whose targets are a fresh ``-1``
tensor and which keeps no link to the dataset it came from, so a strategy handed the view cannot
read the labels by any attribute walk. Subsets remember their ``origin`` (root dataset + row
indices) so the runner can reuse features of evaluation data; :meth:`detach_origin` drops that link
and :meth:`Session.visible` applies it to everything a strategy receives.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

HIDDEN = -1


@dataclass(frozen=True)
class TransformPair:
    """Train-time (augmenting) and test-time transforms of one data family.

    ``batched=True``: both take and return a whole batch tensor (used by :class:`TensorData`).
    ``batched=False``: both take one sample (PIL image or tensor) and are applied in DataLoader
    workers. ``name`` is recorded in results.
    """

    train: Callable
    test: Callable
    batched: bool = True
    name: str = "custom"


def _as_long_tensor(y) -> Tensor:
    return torch.as_tensor(np.asarray(y), dtype=torch.long).reshape(-1)


class TensorData(Dataset):
    """In-memory samples ``x`` ([N, ...], any dtype) with integer targets ``y`` ([N])."""

    def __init__(self, x: Tensor, y, transforms: TransformPair | None = None, name: str = "data", origin=None):
        y = _as_long_tensor(y)
        if len(x) != len(y):
            raise ValueError(f"{name}: {len(x)} samples but {len(y)} targets")
        if transforms is not None and not transforms.batched:
            raise ValueError(f"{name}: TensorData needs batched transforms, got {transforms.name!r}")
        self.x = x
        self._y = y
        self.transforms = transforms
        self.name = name
        # (root dataset, LongTensor of row indices into it): lets the runner encode a root once and
        # reuse the features for every subset of it (e.g. growing FSCIL test sets).
        self.origin = origin if origin is not None else (self, None)

    @property
    def targets(self) -> Tensor:
        return self._y

    def __len__(self) -> int:
        return len(self._y)

    def __getitem__(self, i: int):
        x = self.x[i : i + 1]
        if self.transforms is not None:
            x = self.transforms.test(x)
        return x[0], int(self._y[i])

    def subset(self, indices) -> TensorData:
        idx = _as_long_tensor(indices)
        return TensorData(self.x[idx], self._y[idx], self.transforms, self.name, _compose(self.origin, idx))

    def hide_labels(self) -> TensorData:
        return TensorData(self.x, torch.full_like(self._y, HIDDEN), self.transforms, self.name)

    def detach_origin(self) -> TensorData:
        """The same samples with no link to the dataset they were cut from (given to strategies)."""
        return TensorData(self.x, self._y, self.transforms, self.name)

    def relabel(self, mapping: Tensor) -> TensorData:
        """Targets through ``mapping`` (a [C] tensor old id -> new id); hidden stays hidden."""
        y = torch.where(self._y >= 0, mapping[self._y.clamp(min=0)], self._y)
        return TensorData(self.x, y, self.transforms, self.name, self.origin)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(str(tuple(self.x.shape)).encode())
        h.update(self.x.contiguous().numpy().tobytes() if self.x.device.type == "cpu" else b"")
        h.update(self._y.numpy().tobytes())
        return h.hexdigest()


class FileData(Dataset):
    """Samples stored as files; decoded one at a time by ``loader`` (PIL RGB by default)."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        y,
        transforms: TransformPair | None = None,
        name: str = "files",
        loader: Callable | None = None,
        train: bool = False,
        origin=None,
    ):
        y = _as_long_tensor(y)
        if len(paths) != len(y):
            raise ValueError(f"{name}: {len(paths)} files but {len(y)} targets")
        if transforms is not None and transforms.batched:
            raise ValueError(f"{name}: FileData needs per-sample transforms, got {transforms.name!r}")
        self.paths = [str(p) for p in paths]
        self._y = y
        self.transforms = transforms
        self.name = name
        self.loader = loader or _pil_rgb
        self.train = train
        self.origin = origin if origin is not None else (self, None)

    @property
    def targets(self) -> Tensor:
        return self._y

    def __len__(self) -> int:
        return len(self._y)

    def __getitem__(self, i: int):
        img = self.loader(self.paths[i])
        if self.transforms is not None:
            img = (self.transforms.train if self.train else self.transforms.test)(img)
        return img, int(self._y[i])

    def _copy(self, paths, y, train, origin=None) -> FileData:
        return FileData(paths, y, self.transforms, self.name, self.loader, train, origin or self.origin)

    def subset(self, indices) -> FileData:
        idx = _as_long_tensor(indices)
        return self._copy([self.paths[i] for i in idx.tolist()], self._y[idx], self.train, _compose(self.origin, idx))

    def hide_labels(self) -> FileData:
        return self.detach_origin()._copy(self.paths, torch.full_like(self._y, HIDDEN), self.train)

    def detach_origin(self) -> FileData:
        """The same samples with no link to the dataset they were cut from (given to strategies)."""
        return FileData(self.paths, self._y, self.transforms, self.name, self.loader, self.train)

    def relabel(self, mapping: Tensor) -> FileData:
        y = torch.where(self._y >= 0, mapping[self._y.clamp(min=0)], self._y)
        return self._copy(self.paths, y, self.train)

    def with_train(self, train: bool) -> FileData:
        return self._copy(self.paths, self._y, train)

    def fingerprint(self) -> str:
        h = hashlib.sha256("\n".join(self.paths).encode())
        h.update(self._y.numpy().tobytes())
        return h.hexdigest()


def _compose(origin, idx: Tensor):
    root, base = origin
    return (root, idx if base is None else base[idx])


def _pil_rgb(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def concat(datasets: Sequence[TensorData | FileData]) -> TensorData | FileData:
    """Concatenate datasets of the same kind and transforms (e.g. base data + earlier shots)."""
    datasets = [d for d in datasets if d is not None and len(d) > 0]
    if not datasets:
        raise ValueError("concat() of no non-empty datasets")
    first = datasets[0]
    if isinstance(first, TensorData):
        return TensorData(
            torch.cat([d.x for d in datasets]), torch.cat([d.targets for d in datasets]), first.transforms, first.name
        )
    paths = [p for d in datasets for p in d.paths]
    return FileData(
        paths, torch.cat([d.targets for d in datasets]), first.transforms, first.name, first.loader, first.train
    )


def batches(
    data: TensorData | FileData,
    batch_size: int,
    *,
    train: bool = False,
    shuffle: bool = False,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    num_workers: int = 0,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches on ``device``; ``train`` selects the augmenting transform.

    TensorData: the whole tensor is moved to ``device`` once per call and batches are index slices.
    FileData: a DataLoader with ``num_workers`` workers; the shuffling order comes from ``generator``.
    Either way, the order depends only on ``generator``'s state, so runs are reproducible.

    ``shard=(rank, world)``: every rank draws the same order and takes every ``world``-th sample of
    each global batch, so the ranks' slices together form the global batch (distributed training);
    a last global batch smaller than ``world`` is dropped so that no rank gets an empty batch.
    Augmentation draws from a generator seeded by one draw of ``generator`` (plus the rank), so
    ``generator`` advances identically on every rank whatever the slice sizes.
    """
    n = len(data)
    if n == 0:
        return
    rank, world = shard if shard is not None else (0, 1)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    aug_generator = None
    if train and generator is not None:
        aug_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        aug_generator = torch.Generator().manual_seed(aug_seed + rank)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    chunks = [order[s : min(s + batch_size, stop)] for s in range(0, stop, batch_size)]
    if world > 1:
        chunks = [c[rank::world] for c in chunks if len(c) >= world]
    if isinstance(data, TensorData):
        x_all = data.x.to(device, non_blocking=True)
        y_all = data.targets.to(device, non_blocking=True)
        tf = None if data.transforms is None else (data.transforms.train if train else data.transforms.test)
        sequential = not shuffle and world == 1
        for idx in chunks:
            if sequential:
                start = int(idx[0])
                xb, yb = x_all[start : start + len(idx)], y_all[start : start + len(idx)]
            else:
                idx = idx.to(device)
                xb, yb = x_all[idx], y_all[idx]
            if tf is not None:
                xb = tf(xb, generator=aug_generator) if train else tf(xb)
            yield xb, yb
        return
    view = data.with_train(train)
    loader = DataLoader(
        view,
        batch_sampler=[c.tolist() for c in chunks],
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
    )
    for xb, yb in loader:
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
