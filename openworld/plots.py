"""Figures for TensorBoard and reports (matplotlib, Agg backend, imported only when called)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def acc_matrix_table(R: Sequence[Sequence[float]] | np.ndarray, digits: int = 2) -> str:
    """The accuracy matrix as a markdown table (rows: after task t; columns: task j; blank above the
    diagonal or where NaN). Values are written as given (pass percentages for %)."""
    r = np.asarray(R, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"acc_matrix_table: a square T×T matrix is required, got shape {r.shape}")
    T = r.shape[0]
    lines = ["| after task | " + " | ".join(f"task {j}" for j in range(T)) + " |",
             "|---|" + "---|" * T]
    for t in range(T):
        cells = ["" if j > t or not math.isfinite(r[t, j]) else f"{r[t, j]:.{digits}f}" for j in range(T)]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def acc_matrix_image(R: Sequence[Sequence[float]] | np.ndarray, *, vmax: float | None = None,
                     title: str = "accuracy matrix R[t][j]", dpi: int = 100) -> np.ndarray:
    """Heat map of the accuracy matrix (lower triangle; NaN/upper cells blank) as an HWC uint8 RGB
    array, for ``SummaryWriter.add_image(tag, img, step, dataformats="HWC")``.

    ``vmax``: the colour scale's top (default: 100 if any value exceeds 1, else 1).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    r = np.asarray(R, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"acc_matrix_image: a non-empty square T×T matrix is required, got shape {r.shape}")
    T = r.shape[0]
    masked = np.where(np.tril(np.ones((T, T), dtype=bool)), r, np.nan)
    finite = masked[np.isfinite(masked)]
    if vmax is None:
        vmax = 100.0 if finite.size and finite.max() > 1.0 else 1.0
    size = 1.6 + 0.45 * T
    fig = Figure(figsize=(size + 0.8, size), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(masked), cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task t")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    if T <= 12:
        for t in range(T):
            for j in range(t + 1):
                if math.isfinite(masked[t, j]):
                    v = masked[t, j]
                    ax.text(j, t, f"{v:.0f}" if vmax > 1 else f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 * vmax else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(img, dtype=np.uint8)
