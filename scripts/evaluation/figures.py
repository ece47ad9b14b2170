"""Figures of the study and of the explanation evaluation, readable at their natural size (grids, not strips)
and with one colour rule per figure (``scripts.runtime.visual``): a map is drawn on a diverging colour map with
symmetric limits ±L, L = the 99.5th percentile of |value| over brain voxels.

- ``group_figure``: group-averaged brain and relevance maps per class (after Figure 2 of the seed paper); one L per
  column (preset), shared by the classes so that they compare.
- ``explanation_panel``: one subject's maps from every explanation method; one L per method (per-method scaling),
  so that GradCAM's coarse map (the 8x6x6 grid of the last block, upsampled by MONAI to the input) and occlusion
  show their structure next to the voxel-sharp LRP maps.

Each returns one row per panel (panel, limit, share of saturated brain pixels) for the saturation test.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from scripts.evaluation.tables import save_figure
from scripts.runtime.visual import (
    DIVERGING,
    LIMIT_PERCENTILE,
    brain_mask,
    plane_slice,
    saturation,
    symmetric_limit,
    to_ras,
)

__all__ = ["COLOUR_RULE_TEXT", "explanation_panel", "group_figure", "orthogonal_montage"]

COLOUR_RULE_TEXT = (f"diverging colour map with symmetric limits ±L, L = the {LIMIT_PERCENTILE:g}th percentile of "
                    "|value| over brain voxels")


def _pyplot():
    import matplotlib  # noqa: PLC0415 (the Agg backend is chosen before pyplot is imported)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return matplotlib, plt


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
                 counts: Mapping[str, int] | None = None, title: str = "") -> list[dict]:
    """Rows: classes (``means`` keys, e.g. preterm, term); columns: the mean input ("input") then the mean
    relevance for each preset, on a diverging map with symmetric limits (one per column, over the brain voxels
    of every class's mean input) and one colour bar per column. Returns one row per panel (class, column,
    limit, saturated share of its brain pixels)."""
    matplotlib, plt = _pyplot()
    classes = list(means)
    columns = ["input", *presets]
    first = orthogonal_montage(means[classes[0]]["input"])
    cell_w = 4.6
    cell_h = cell_w * first.shape[0] / first.shape[1]
    fig, axes = plt.subplots(len(classes), len(columns), squeeze=False, layout="constrained",
                             figsize=(cell_w * len(columns) + 0.6, (cell_h + 0.45) * len(classes) + 1.3))
    brains = {cls: brain_mask(means[cls]["input"]) for cls in classes}
    stats = []
    for j, column in enumerate(columns):
        values = [means[c][column] for c in classes]
        if column == "input":
            inside = np.concatenate([v[brains[c]] for v, c in zip(values, classes)]) if any(
                b.any() for b in brains.values()) else np.concatenate([v.ravel() for v in values])
            cmap, vmin, vmax = "gray", float(np.percentile(inside, 1)), float(np.percentile(inside, 99.5))
        else:
            joined = np.concatenate([v[brains[c]] for v, c in zip(values, classes)])
            lim = symmetric_limit(joined)
            cmap, vmin, vmax = DIVERGING, -lim, lim
        colormap = matplotlib.colormaps[cmap].with_extremes(bad="white")
        for i, cls in enumerate(classes):
            ax = axes[i, j]
            shown = orthogonal_montage(means[cls][column])
            im = ax.imshow(shown, cmap=colormap, vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
            if column != "input":
                stats.append({"panel": f"{cls} {column}", "limit": vmax,
                              "saturated": saturation(shown, vmax, orthogonal_montage(brains[cls]) > 0.5)})
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("average brain" if column == "input" else f"LRP {column}", fontsize=11)
            if j == 0:
                n = f" (n={counts[cls]})" if counts else ""
                ax.set_ylabel(f"{cls}{n}", fontsize=11)
        ticks = None if column == "input" else [vmin, 0.0, vmax]
        bar = fig.colorbar(im, ax=axes[:, j].tolist(), orientation="horizontal", fraction=0.08, shrink=0.9,
                           ticks=ticks, format=None if column == "input" else "%.1e")
        bar.ax.tick_params(labelsize=9)
    fig.suptitle((title + "\n" if title else "") + f"Relevance: {COLOUR_RULE_TEXT}, one L per column", fontsize=10)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return stats


def explanation_panel(image: np.ndarray, maps: Mapping[str, np.ndarray], path: str | os.PathLike,
                      brain: np.ndarray | None = None, region: np.ndarray | None = None,
                      affine: np.ndarray | None = None, columns: int = 5, title: str = "") -> list[dict]:
    """One axial slice (through the largest part of ``region``, else the middle of the brain) of the network input
    (with ``region`` outlined) and of each method's map, in a grid of ``columns`` panels per row. Each map has its
    own symmetric limits over the ``brain`` voxels (default: the input's non-zero voxels) and its own colour bar;
    orientation RAS from ``affine`` (the subject's right on the right, anterior up). Returns one row per map
    panel (panel, limit, saturated share of its brain pixels)."""
    matplotlib, plt = _pyplot()
    affine = np.eye(4) if affine is None else np.asarray(affine)
    volume, _ = to_ras(image, affine)
    brain_ras = to_ras((brain_mask(image) if brain is None else np.asarray(brain)).astype(np.uint8), affine)[0] > 0
    region_ras = to_ras(np.asarray(region).astype(np.uint8), affine)[0] > 0 if region is not None else None
    if region_ras is not None and region_ras.any():
        z = int(np.argmax(region_ras.sum(axis=(0, 1))))
    else:
        present = np.flatnonzero(brain_ras.any(axis=(0, 1)))
        z = int(present[len(present) // 2]) if present.size else volume.shape[2] // 2
    names = list(maps)
    count = len(names) + 1
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    section = plane_slice(volume, "axial", z)
    cell = 3.0
    height = cell * section.shape[0] / section.shape[1] + 0.9
    fig, axes = plt.subplots(rows, columns, squeeze=False, layout="constrained",
                             figsize=(cell * columns, height * rows + (0.5 if title else 0.2)))
    brain_2d = plane_slice(brain_ras, "axial", z)
    inside = section[brain_2d] if brain_2d.any() else section.ravel()
    ax = axes[0, 0]
    im = ax.imshow(section, cmap="gray", vmin=float(np.percentile(inside, 1)),
                   vmax=float(np.percentile(inside, 99.5)), interpolation="nearest")
    fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.06, pad=0.02).ax.tick_params(labelsize=8)
    if region_ras is not None:
        ax.contour(plane_slice(region_ras, "axial", z).astype(float), levels=[0.5], colors="y", linewidths=0.8)
    ax.set_title("input" + (" + phenotype (yellow)" if region_ras is not None else ""), fontsize=10)
    stats = []
    for k, name in enumerate(names, start=1):
        ax = axes[k // columns, k % columns]
        values = to_ras(np.asarray(maps[name], dtype=np.float64), affine)[0]
        limit = symmetric_limit(values, brain_ras)
        shown = plane_slice(values, "axial", z)
        im = ax.imshow(shown, cmap=DIVERGING, vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        bar = fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.06, pad=0.02, ticks=[-limit, 0.0, limit],
                           format="%.1e")
        bar.ax.tick_params(labelsize=8)
        stats.append({"panel": name, "limit": limit, "saturated": saturation(shown, limit, brain_2d)})
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for k in range(count, rows * columns):
        axes[k // columns, k % columns].set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return stats
