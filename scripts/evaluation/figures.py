"""Figures of the study: group-averaged brain and relevance maps per class (after Figure 2 of the seed paper)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from scripts.evaluation.tables import save_figure

__all__ = ["group_figure", "orthogonal_montage"]


def orthogonal_montage(volume: np.ndarray, centre: Sequence[int] | None = None, gap: int = 2) -> np.ndarray:
    """The three orthogonal slices through ``centre`` (default: the grid centre) side by side, NaN between them."""
    c = [s // 2 for s in volume.shape] if centre is None else list(centre)
    slices = [volume[c[0], :, :].T, volume[:, c[1], :].T, volume[:, :, c[2]].T]
    height = max(s.shape[0] for s in slices)
    parts = []
    for s in slices:
        pad = np.full((height, s.shape[1]), np.nan)
        pad[(height - s.shape[0]) // 2:(height - s.shape[0]) // 2 + s.shape[0]] = s
        parts += [pad, np.full((height, gap), np.nan)]
    return np.concatenate(parts[:-1], axis=1)


def group_figure(means: Mapping[str, Mapping[str, np.ndarray]], presets: Sequence[str], path: str | os.PathLike,
                 counts: Mapping[str, int] | None = None, title: str = "") -> None:
    """Rows: classes (``means`` keys, e.g. preterm, term); columns: the mean input ("input") then the mean
    relevance for each preset, on a diverging map centred on zero with one colour bar per column."""
    import matplotlib  # noqa: PLC0415 (the Agg backend is chosen before pyplot is imported)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    classes = list(means)
    columns = ["input", *presets]
    first = orthogonal_montage(means[classes[0]]["input"])
    cell_w = 3.3
    cell_h = cell_w * first.shape[0] / first.shape[1]
    fig, axes = plt.subplots(len(classes), len(columns), squeeze=False, layout="constrained",
                             figsize=(cell_w * len(columns) + 0.6, (cell_h + 0.3) * len(classes) + 1.0))
    for j, column in enumerate(columns):
        values = [means[c][column] for c in classes]
        if column == "input":
            cmap, vmin, vmax = "gray", min(float(np.percentile(v, 1)) for v in values), \
                max(float(np.percentile(v, 99.5)) for v in values)
        else:
            lim = max(float(np.percentile(np.abs(v), 99.9)) for v in values) or 1.0
            cmap, vmin, vmax = "RdBu_r", -lim, lim
        colormap = matplotlib.colormaps[cmap].copy()
        colormap.set_bad("white")
        for i, cls in enumerate(classes):
            ax = axes[i, j]
            im = ax.imshow(orthogonal_montage(means[cls][column]), cmap=colormap, vmin=vmin, vmax=vmax,
                           origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("average brain" if column == "input" else f"LRP {column}", fontsize=9)
            if j == 0:
                n = f" (n={counts[cls]})" if counts else ""
                ax.set_ylabel(f"{cls}{n}", fontsize=9)
        ticks = None if column == "input" else [vmin, 0.0, vmax]
        fig.colorbar(im, ax=axes[:, j].tolist(), orientation="horizontal", fraction=0.08, shrink=0.9, ticks=ticks,
                     format=None if column == "input" else "%.1e")
    if title:
        fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
