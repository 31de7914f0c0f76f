"""Multi-domain data for domain-adaptive open-set scenarios (``specs/open-set.md`` §§2.1, 7.1).

* :func:`load_domain_pair` and its presets ``office_home``, ``office31``, ``domainnet``: two domains
  of a multi-domain image-folder dataset, ``<root>/<dataset dir>/<domain>/[images/]<class>/<image>``.
  The returned :class:`~openworld.data.sources.SourceData` holds the **source domain as ``train``**
  and the **target domain as ``test``**, with one class list: the alias-normalised folder names in
  Python ``sorted()`` order (spellings differ between copies: ``back_pack``/``backpack``,
  ``Real World``/``RealWorld``/``Real_World``). Images are decoded per sample (:class:`FileData`).
* :func:`load_digits28`: scikit-learn's 1,797 optdigits upsampled to MNIST's framing, the target of
  the MNIST → digits recipe: x/16, bilinear resize to 20×20 (``align_corners=False``), zero padding
  of 4 pixels to 28×28, clamp to [0, 1]; transform family ``gray28`` (MNIST mean/std).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from openworld.data.sources import (
    IMAGE_EXTENSIONS,
    SourceData,
    _resolve_root,
    _transforms,
    sha256_array,
)
from openworld.data.views import FileData, TensorData
from openworld.registry import register_dataset

__all__ = ["DOMAIN_DATASETS", "canonical_class", "canonical_domain", "load_digits28", "load_domain_pair"]

#: dataset -> (folder names tried under root, domains, whether classes sit under ``<domain>/images``)
DOMAIN_DATASETS: dict[str, dict] = {
    "office_home": {"dirs": ("OfficeHome", "office_home", "Office-Home", "OfficeHomeDataset_10072016", "."),
                    "domains": ("Art", "Clipart", "Product", "Real World")},
    "office31": {"dirs": ("office31", "Office31", "office-31", "Office-31", "."),
                 "domains": ("amazon", "dslr", "webcam")},
    "domainnet": {"dirs": ("domainnet", "DomainNet", "."),
                  "domains": ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")},
}
_DOMAIN_ALIASES = {"realworld": "Real World", "real_world": "Real World", "real world": "Real World",
                   "art": "Art", "clipart": "Clipart", "product": "Product"}
_CLASS_ALIASES = {"backpack": "back_pack"}  # Office-31 copies spell it both ways


def canonical_domain(dataset: str, name: str) -> str:
    key = name.strip().lower()
    if dataset == "office_home":
        return _DOMAIN_ALIASES.get(key, name)
    return key


def canonical_class(dataset: str, name: str) -> str:
    if dataset == "office31":
        return _CLASS_ALIASES.get(name.lower(), name.lower())
    return name


def _domain_dir(base: Path, dataset: str, domain: str) -> Path | None:
    want = canonical_domain(dataset, domain)
    if not base.is_dir():
        return None
    for child in sorted(base.iterdir()):
        if child.is_dir() and canonical_domain(dataset, child.name) == want:
            return child / "images" if (child / "images").is_dir() else child
    return None


def _listing(dataset: str, d: Path, exts: tuple[str, ...], max_per_class: int | None) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for cdir in sorted(p for p in d.iterdir() if p.is_dir()):
        files = sorted(p for p in cdir.iterdir() if p.suffix.lower() in exts)
        if max_per_class:
            files = files[:max_per_class]
        name = canonical_class(dataset, cdir.name)
        if name in out:
            raise ValueError(f"{dataset}: two class folders map to {name!r} in {d}")
        out[name] = files
    if not out:
        raise ValueError(f"{dataset}: no class folders in {d}")
    return out


def load_domain_pair(root=None, download: bool = False, *, dataset: str = "office_home",
                     source_domain: str = "Art", target_domain: str = "Clipart",
                     extensions: Sequence[str] = IMAGE_EXTENSIONS, max_per_class: int | None = None,
                     augment: str = "default", image_size: int | None = 224) -> SourceData:
    """Source domain (``train``) and target domain (``test``) of a multi-domain image-folder dataset."""
    if download:
        raise ValueError(f"{dataset}: download is not available; place the image folders under the data root")
    if dataset not in DOMAIN_DATASETS:
        raise ValueError(f"unknown domain dataset {dataset!r}; allowed: {', '.join(DOMAIN_DATASETS)}")
    spec = DOMAIN_DATASETS[dataset]
    root_p, origin = _resolve_root(root)
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    found: dict[str, Path] = {}
    tried = []
    for sub in spec["dirs"]:
        base = root_p / sub
        tried.append(str(base))
        dirs = {d: _domain_dir(base, dataset, d) for d in (source_domain, target_domain)}
        if all(dirs.values()):
            found = dirs
            break
    if not found:
        raise FileNotFoundError(
            f"{dataset}: domains {source_domain!r} and {target_domain!r} not found (root {root_p} from {origin}); "
            f"looked in {', '.join(tried)} for <domain>/<class>/<image> (known domains: {', '.join(spec['domains'])})"
        )
    src = _listing(dataset, found[source_domain], exts, max_per_class)
    tgt = _listing(dataset, found[target_domain], exts, max_per_class)
    classes = sorted(set(src) | set(tgt))
    index = {c: i for i, c in enumerate(classes)}
    pair = _transforms("imagenet", augment, image_size)

    def files(listing: dict[str, list[Path]], name: str) -> FileData:
        paths = [p for c in classes for p in listing.get(c, [])]
        y = [index[c] for c in classes for _ in listing.get(c, [])]
        return FileData(paths, y, pair, f"{dataset}/{name}")

    info = {"root": str(root_p), "origin": origin, "format": "domain image folders", "dataset": dataset,
            "source_domain": str(found[source_domain]), "target_domain": str(found[target_domain]),
            "num_train": sum(map(len, src.values())), "num_test": sum(map(len, tgt.values())),
            "classes_only_in_source": sorted(set(src) - set(tgt)),
            "classes_only_in_target": sorted(set(tgt) - set(src)), "transforms": pair.name}
    return SourceData(name=dataset, train=files(src, source_domain), test=files(tgt, target_domain),
                      classes=tuple(classes), info=info, family="imagenet")


@register_dataset("office_home")
def load_office_home(root=None, download: bool = False, *, source_domain: str = "Art",
                     target_domain: str = "Clipart", max_per_class: int | None = None, augment: str = "default",
                     image_size: int | None = 224) -> SourceData:
    """Office-Home (65 classes; Art, Clipart, Product, Real World): source → target domain pair."""
    return load_domain_pair(root, download, dataset="office_home", source_domain=source_domain,
                            target_domain=target_domain, max_per_class=max_per_class, augment=augment,
                            image_size=image_size)


@register_dataset("office31")
def load_office31(root=None, download: bool = False, *, source_domain: str = "amazon",
                  target_domain: str = "dslr", max_per_class: int | None = None, augment: str = "default",
                  image_size: int | None = 224) -> SourceData:
    """Office-31 (31 classes; amazon, dslr, webcam, optionally with an ``images/`` level)."""
    return load_domain_pair(root, download, dataset="office31", source_domain=source_domain,
                            target_domain=target_domain, max_per_class=max_per_class, augment=augment,
                            image_size=image_size)


@register_dataset("domainnet")
def load_domainnet(root=None, download: bool = False, *, source_domain: str = "real",
                   target_domain: str = "sketch", max_per_class: int | None = None, augment: str = "default",
                   image_size: int | None = 224) -> SourceData:
    """DomainNet (345 classes; clipart, infograph, painting, quickdraw, real, sketch)."""
    return load_domain_pair(root, download, dataset="domainnet", source_domain=source_domain,
                            target_domain=target_domain, max_per_class=max_per_class, augment=augment,
                            image_size=image_size)


def digits_to_28(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """optdigits ``[N, 8, 8]`` in 0…16 -> float32 ``[N, 1, 28, 28]`` in [0, 1] (card §7.1)."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    return F.pad(x, (4, 4, 4, 4)).clamp(0.0, 1.0)


@register_dataset("digits28")
def load_digits28(root=None, download: bool = False, *, augment: str = "default") -> SourceData:
    """scikit-learn's 1,797 digits in MNIST framing (28×28, digit in a 20×20 box), all in ``train``;
    ``test`` is empty. ``root`` is unused (the data ships with scikit-learn)."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = digits_to_28(d.images)
    y = d.target.astype(np.int64)
    pair = _transforms("gray28", augment)
    info = {"root": None, "format": "sklearn.load_digits → 28×28 (x/16, bilinear 20×20, pad 4)",
            "array_sha256": {"x": sha256_array(x.numpy()), "y": sha256_array(y)}, "num_train": len(y),
            "num_test": 0, "transforms": pair.name, "image_shape": [1, 28, 28]}
    return SourceData(name="digits28", train=TensorData(x, y, pair, "digits28/all"),
                      test=TensorData(x[:0], y[:0], pair, "digits28/empty"),
                      classes=tuple(str(i) for i in range(10)), info=info, family="gray28")
