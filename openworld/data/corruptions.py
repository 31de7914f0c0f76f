"""CIFAR-10-C corruptions of a clean image batch (``specs/open-set.md`` §7.2).

Parameters are exactly those of ``hendrycks/robustness: ImageNet-C/create_c/make_cifar_c.py``: the
input is uint8 ``[N, H, W, C]`` (or ``[N, C, H, W]`` with ``layout="NCHW"``), x = img/255, and the
output is ``uint8(floor(clip(·, 0, 1)·255))``. Noise is drawn from one ``numpy.random.Generator``
over the whole batch in sample order, so a given generator state gives the same pixels everywhere.

``gaussian_noise``, ``shot_noise``, ``gaussian_blur`` and ``contrast`` are vectorised over the batch
(numpy / ``scipy.ndimage.gaussian_filter`` with a zero sigma on the batch and channel axes).
``pixelate`` and ``jpeg`` go through PIL (BOX resampling, JPEG re-encoding), which works one image at a
time: they loop over the images in Python, as the reference code does.
"""

from __future__ import annotations

import io

import numpy as np

#: corruption -> parameter per severity 1…5 (make_cifar_c.py)
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg": (80, 65, 58, 50, 40),
}
CORRUPTIONS = ("clean", *SEVERITIES)

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "parse_domain"]


def parse_domain(spec) -> tuple[str, int]:
    """``"gaussian_noise:5"``, ``["contrast", 3]`` or ``"clean"`` -> ``(name, severity)`` (clean: 0)."""
    if isinstance(spec, str):
        name, _, sev = spec.partition(":")
        severity = int(sev) if sev else 0
    elif isinstance(spec, (list, tuple)) and len(spec) == 2:
        name, severity = str(spec[0]), int(spec[1])
    else:
        raise ValueError(f"corruption domain must be 'name:severity', [name, severity] or 'clean'; got {spec!r}")
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; allowed: {', '.join(CORRUPTIONS)}")
    if name == "clean":
        if severity not in (0,):
            raise ValueError(f"'clean' takes no severity, got {severity}")
    elif not 1 <= severity <= 5:
        raise ValueError(f"corruption {name!r}: severity must be 1…5, got {severity}")
    return name, severity


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).astype(np.uint8)  # astype truncates toward zero = floor on [0, 255]


def corrupt(images: np.ndarray, name: str, severity: int, rng: np.random.Generator | None = None,
            layout: str = "NHWC") -> np.ndarray:
    """Corrupt a uint8 batch; returns uint8 in the same layout. ``rng`` is needed for the noises."""
    if layout not in ("NHWC", "NCHW"):
        raise ValueError(f"layout must be 'NHWC' or 'NCHW', got {layout!r}")
    imgs = np.asarray(images)
    if imgs.dtype != np.uint8 or imgs.ndim != 4:
        raise ValueError(f"corrupt: expected a uint8 batch [N, H, W, C], got {imgs.dtype} {imgs.shape}")
    if layout == "NCHW":
        imgs = imgs.transpose(0, 2, 3, 1)
    if name == "clean":
        out = imgs.copy()
    else:
        if name not in SEVERITIES:
            raise ValueError(f"unknown corruption {name!r}; allowed: {', '.join(CORRUPTIONS)}")
        if not 1 <= int(severity) <= 5:
            raise ValueError(f"corruption {name!r}: severity must be 1…5, got {severity}")
        c = SEVERITIES[name][int(severity) - 1]
        if name in ("gaussian_noise", "shot_noise") and rng is None:
            raise ValueError(f"corruption {name!r} needs a numpy random Generator")
        out = _apply(imgs, name, c, rng)
    return out.transpose(0, 3, 1, 2).copy() if layout == "NCHW" else out


def _apply(imgs: np.ndarray, name: str, c: float, rng) -> np.ndarray:
    x = imgs.astype(np.float64) / 255.0
    if name == "gaussian_noise":
        return _to_uint8(x + rng.normal(size=x.shape, scale=c))
    if name == "shot_noise":
        return _to_uint8(rng.poisson(x * c) / c)
    if name == "gaussian_blur":
        from scipy.ndimage import gaussian_filter

        return _to_uint8(gaussian_filter(x, sigma=(0, c, c, 0), mode="nearest", truncate=4.0))
    if name == "contrast":
        means = x.mean(axis=(1, 2), keepdims=True)  # per image, per channel
        return _to_uint8((x - means) * c + means)
    from PIL import Image

    out = np.empty_like(imgs)
    h, w = imgs.shape[1:3]
    for i, img in enumerate(imgs):  # PIL works image by image
        pil = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
        if name == "pixelate":
            pil = pil.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
        else:  # jpeg
            buf = io.BytesIO()
            pil.save(buf, "JPEG", quality=int(c))
            pil = Image.open(buf)
            pil.load()
        arr = np.asarray(pil)
        out[i] = arr.reshape(out[i].shape)
    return out
