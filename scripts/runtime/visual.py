"""Pictures of relevance maps with one colour rule everywhere (run report, TensorBoard, study figures):

- a map is drawn on a diverging colour map (``RdBu_r``: red = evidence for the explained class, blue = against)
  with symmetric limits [-L, L], L = the 99.5th percentile of |value| over the brain voxels (``symmetric_limit``);
- a pixel is saturated at |value| >= 0.98 L, and a panel is saturated when more than half of its brain pixels
  are (``saturation``, ``is_saturated``): the figures are tested against that.

``overlay_mosaic`` draws a map over its network input as a mosaic of orthogonal slices: rows axial, coronal,
sagittal, several slices per plane through the brain, in RAS (the subject's right on the image's right,
anterior / superior up, anterior to the right in sagittal slices); the input is grey, the map is blended over it
with an opacity that grows with |value|. ``save_mosaic`` writes it as a PNG with a colour bar (matplotlib's
object API on the Agg canvas, no pyplot state).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts.runtime.outputs import atomic_target_for

__all__ = ["COLOUR_RULE", "DIVERGING", "LIMIT_PERCENTILE", "PLANES", "SATURATED_SHARE", "SATURATION_LEVEL", "Mosaic",
           "brain_mask", "is_saturated", "overlay_mosaic", "plane_slice", "plural", "save_mosaic", "saturation",
           "symmetric_limit", "to_ras"]

DIVERGING = "RdBu_r"
LIMIT_PERCENTILE = 99.5  # colour limit: this percentile of |value| over brain voxels
SATURATION_LEVEL = 0.98  # a pixel is saturated at |value| >= SATURATION_LEVEL x limit
SATURATED_SHARE = 0.5  # a panel is saturated when more than this share of its brain pixels are
PLANES = ("axial", "coronal", "sagittal")
_FIXED_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}  # RAS axis held fixed by each plane
COLOUR_RULE = ("diverging colour map (red = evidence for the explained class, blue = against) with symmetric "
               f"limits ±L, L = the {LIMIT_PERCENTILE:g}th percentile of |relevance| over brain voxels")


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 subject``, ``2 subjects``: a count with its noun in the right number (captions, the run report, logs)."""
    return f"{count} {noun if count == 1 else (nouns or noun + 's')}"


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Brain voxels of a network input: the normalised brain is non-zero, background and padding are exactly 0
    (both normalisations, scripts/runtime/normalisation.py, keep them so)."""
    image = np.asarray(image)
    return np.isfinite(image) & (image != 0)


def symmetric_limit(values: np.ndarray, brain: np.ndarray | None = None) -> float:
    """Colour limit L of a map drawn on [-L, L]: the 99.5th percentile of |value| over the ``brain`` voxels (all
    voxels without a mask). A map that is zero on more than 99.5 % of them gets its maximum |value| instead; an
    all-zero map gets 1."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    if brain is not None:
        mask = np.asarray(brain, dtype=bool)
        if mask.shape == magnitude.shape and mask.any():
            magnitude = magnitude[mask]
    magnitude = magnitude[np.isfinite(magnitude)]
    if magnitude.size == 0:
        return 1.0
    limit = float(np.percentile(magnitude, LIMIT_PERCENTILE))
    if limit <= 0:
        limit = float(magnitude.max())
    return limit if limit > 0 else 1.0


def saturation(values: np.ndarray, limit: float, brain: np.ndarray | None = None) -> float:
    """Share of a panel's brain pixels (all finite pixels without a mask) with |value| >= 0.98 x ``limit``."""
    magnitude = np.abs(np.asarray(values, dtype=np.float64))
    mask = np.isfinite(magnitude)
    if brain is not None:
        mask &= np.asarray(brain, dtype=bool)
    if not mask.any():
        return 0.0
    return float(np.mean(magnitude[mask] >= SATURATION_LEVEL * float(limit)))


def is_saturated(values: np.ndarray, limit: float, brain: np.ndarray | None = None) -> bool:
    """Whether more than half of the panel's brain pixels are saturated (``saturation`` > 0.5)."""
    return saturation(values, limit, brain) > SATURATED_SHARE


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` with its axes permuted and flipped to RAS+ (the closest orientation of ``affine``) and the voxel
    sizes along the new axes."""
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=float)
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                                nib.orientations.axcodes2ornt("RAS"))
    zooms_in = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    zooms = np.empty(3)
    zooms[transform[:, 0].astype(int)] = zooms_in
    return nib.orientations.apply_orientation(volume, transform), zooms


def _slice_positions(mask: np.ndarray, axis: int, count: int) -> list[int]:
    """``count`` slice indices along ``axis``, evenly spaced inside the mask's extent (ends left out)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(mask.any(axis=other))
    lo, hi = (int(present[0]), int(present[-1])) if present.size else (0, mask.shape[axis] - 1)
    fractions = (np.arange(count) + 1) / (count + 1)
    return sorted({int(round(lo + f * (hi - lo))) for f in fractions})


def plane_slice(volume: np.ndarray, plane: str, index: int) -> np.ndarray:
    """One slice of a RAS volume as an image with row 0 at the top: axial (rows anterior -> posterior, columns
    left -> right), coronal and sagittal (rows superior -> inferior)."""
    if plane == "axial":
        section = volume[:, :, index]
    elif plane == "coronal":
        section = volume[:, index, :]
    else:
        section = volume[index, :, :]
    return section.T[::-1]


def _square_pixels(section: np.ndarray, plane: str, zooms: np.ndarray, order: int) -> np.ndarray:
    """Resample a slice so that its pixels are square (voxel sizes may differ between axes)."""
    cols, rows = [a for a in range(3) if a != _FIXED_AXIS[plane]]
    row_mm, col_mm = zooms[rows], zooms[cols]
    if np.isclose(row_mm, col_mm, rtol=1e-3):
        return section
    finest = min(row_mm, col_mm)
    return ndimage.zoom(section, (row_mm / finest, col_mm / finest), order=order)


@dataclass
class Mosaic:
    """An RGB mosaic (rows: planes, columns: slices) of a map over its input, and how it was drawn."""

    rgb: np.ndarray  # (H, W, 3) float in [0, 1]
    limit: float  # colour limits are [-limit, limit]
    slices: dict[str, list[int]]  # plane -> slice indices (RAS)
    saturation: float  # share of the shown brain pixels at >= 0.98 x limit
    cell: tuple[int, int]  # (height, width) of one slice cell in pixels
    with_input: bool = True
    planes: list[str] = field(default_factory=lambda: list(PLANES))

    def as_uint8(self) -> np.ndarray:
        return np.clip(np.rint(self.rgb * 255), 0, 255).astype(np.uint8)


def _blend(gray: np.ndarray | None, relevance: np.ndarray, limit: float, cmap) -> np.ndarray:
    scaled = np.clip(np.nan_to_num(relevance) / limit, -1.0, 1.0)
    colours = cmap(scaled * 0.5 + 0.5)[..., :3]
    if gray is None:  # no input: the colour map itself (its centre is white)
        return colours
    alpha = np.sqrt(np.abs(scaled))[..., None]  # opacity grows with |value|: faint evidence stays faint
    return np.repeat(gray[..., None], 3, axis=2) * (1 - alpha) + colours * alpha


def overlay_mosaic(relevance: np.ndarray, affine: np.ndarray, image: np.ndarray | None = None, slices: int = 5,
                   gap: int = 2, limit: float | None = None, planes=PLANES) -> Mosaic:
    """The mosaic of ``relevance`` (3D, on the grid of ``affine``) over ``image`` (the network input on the same
    grid, or None): for each plane ``slices`` slices evenly spaced through the brain, colour limits ±``limit``
    (default ``symmetric_limit`` over the brain voxels), white gaps of ``gap`` pixels."""
    import matplotlib  # noqa: PLC0415 (colour maps only; heavy, imported when a picture is drawn)

    relevance = np.asarray(relevance, dtype=np.float64)
    rel, zooms = to_ras(relevance, affine)
    img = None if image is None else to_ras(np.asarray(image, dtype=np.float64), affine)[0]
    if img is not None and img.shape != rel.shape:
        raise ValueError(f"input {img.shape} and relevance {rel.shape} differ in shape")
    brain = brain_mask(img) if img is not None else np.isfinite(rel) & (rel != 0)
    if not brain.any():
        brain = np.ones(rel.shape, dtype=bool)
    limit = symmetric_limit(rel, brain) if limit is None else float(limit)
    window = (0.0, 1.0)
    if img is not None:
        lo, hi = np.percentile(img[brain], [1.0, 99.5])
        window = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    cmap = matplotlib.colormaps[DIVERGING]
    planes = list(planes)
    positions = {p: _slice_positions(brain, _FIXED_AXIS[p], slices) for p in planes}
    cells, shown, shown_brain = {}, [], []
    for plane in planes:
        for index in positions[plane]:
            r = _square_pixels(plane_slice(rel, plane, index), plane, zooms, 1)
            b = _square_pixels(plane_slice(brain, plane, index).astype(np.float32), plane, zooms, 0) > 0.5
            gray = None
            if img is not None:
                g = _square_pixels(plane_slice(img, plane, index), plane, zooms, 1)
                gray = np.clip((g - window[0]) / (window[1] - window[0]), 0.0, 1.0)
            cells[(plane, index)] = _blend(gray, r, limit, cmap)
            shown.append(r[b])
            shown_brain.append(b)
    height = max(c.shape[0] for c in cells.values())
    width = max(c.shape[1] for c in cells.values())
    columns = max(len(v) for v in positions.values())
    canvas = np.ones((len(planes) * (height + gap) - gap, columns * (width + gap) - gap, 3))
    for row, plane in enumerate(planes):
        for col, index in enumerate(positions[plane]):
            cell = cells[(plane, index)]
            top = row * (height + gap) + (height - cell.shape[0]) // 2
            left = col * (width + gap) + (width - cell.shape[1]) // 2
            canvas[top:top + cell.shape[0], left:left + cell.shape[1]] = cell
    values = np.concatenate(shown) if shown else np.zeros(0)
    return Mosaic(canvas, limit, positions, saturation(values, limit), (height, width), img is not None, planes)


@functools.lru_cache(maxsize=512)
def _text(text: str, size: int = 10, rotate: bool = False) -> np.ndarray:
    """``text`` rasterised by matplotlib (Agg) as a tight RGB uint8 patch, black on white."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (heavy; only when drawing)
    from matplotlib.figure import Figure  # noqa: PLC0415

    dpi = 100
    fig = Figure(figsize=(0.8 * size * max(len(text), 1) / dpi + 0.3, 2.2 * size / dpi), dpi=dpi, facecolor="white")
    fig.text(0.02, 0.5, text, fontsize=size, va="center", ha="left")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    ink = rgb.min(axis=2) < 250
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not rows.size:
        return np.full((1, 1, 3), 255, dtype=np.uint8)
    patch = rgb[max(rows[0] - 1, 0):rows[-1] + 2, max(cols[0] - 1, 0):cols[-1] + 2]
    return np.ascontiguousarray(np.rot90(patch) if rotate else patch)


def _paste(canvas: np.ndarray, patch: np.ndarray, top: int, left: int) -> None:
    h = min(patch.shape[0], canvas.shape[0] - top)
    w = min(patch.shape[1], canvas.shape[1] - left)
    canvas[top:top + h, left:left + w] = patch[:h, :w]


def _heading(title: str, width: int, size: int = 11) -> np.ndarray:
    """``title`` rasterised in lines no wider than ``width`` pixels where spaces allow (a long subject name must not
    be cut off at the picture's edge), each line centred."""
    lines: list[str] = []
    for word in title.split(" "):
        if lines and _text(f"{lines[-1]} {word}", size).shape[1] <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    patches = [_text(line, size) for line in lines]
    out = np.full((sum(p.shape[0] for p in patches) + 3 * (len(patches) - 1), max(p.shape[1] for p in patches), 3),
                  255, dtype=np.uint8)
    top = 0
    for patch in patches:
        left = (out.shape[1] - patch.shape[1]) // 2
        out[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
        top += patch.shape[0] + 3
    return out


def _colour_bar(height: int, width: int = 14) -> np.ndarray:
    import matplotlib  # noqa: PLC0415 (heavy; only when drawing)

    values = np.linspace(1.0, 0.0, height)  # top: +L (red), bottom: -L (blue)
    bar = (matplotlib.colormaps[DIVERGING](values)[:, :3] * 255).astype(np.uint8)
    bar = np.repeat(bar[:, None, :], width, axis=1)
    bar[[0, -1], :] = 0
    bar[:, [0, -1]] = 0
    return bar


def save_mosaic(mosaic: Mosaic, path: str | os.PathLike, title: str = "", label: str = "relevance",
                cell_pixels: int = 160) -> None:
    """Write ``mosaic`` as a PNG at a readable natural size (each slice cell about ``cell_pixels`` wide, nearest
    neighbour, integer scale), the plane names on the left, the title on top (in lines as wide as the picture; a
    word wider than that widens it) and a colour bar from -L to L on the right; atomically. The picture is
    composed as pixels (matplotlib rasterises the text and writes the PNG): about 0.1 s per mosaic, where a
    laid-out matplotlib figure takes 0.5 s."""
    from matplotlib.image import imsave  # noqa: PLC0415 (heavy; only when drawing)

    scale = max(1, int(np.ceil(cell_pixels / max(mosaic.cell))))
    image = np.repeat(np.repeat(mosaic.as_uint8(), scale, axis=0), scale, axis=1)
    h, w = image.shape[:2]
    names = [_text(p, 10) for p in mosaic.planes]
    ticks = [_text(f"{mosaic.limit:.2g}", 9), _text("0", 9), _text(f"{-mosaic.limit:.2g}", 9)]
    axis_label = _text(label, 9, rotate=True)
    margin = 8
    left = margin + max(n.shape[1] for n in names) + margin
    bar_h, bar_w = max(int(h * 0.8), 30), 14
    right = 2 * margin + bar_w + 4 + max(t.shape[1] for t in ticks) + margin + axis_label.shape[1] + margin
    heading = _heading(title, left + w + right - 2 * margin) if title else None
    top = margin + (heading.shape[0] + margin if heading is not None else 0)
    width = max(left + w + right, heading.shape[1] + 2 * margin if heading is not None else 0)
    canvas = np.full((top + h + margin, width, 3), 255, dtype=np.uint8)
    canvas[top:top + h, left:left + w] = image
    if heading is not None:
        _paste(canvas, heading, margin, max(margin, (canvas.shape[1] - heading.shape[1]) // 2))
    row_height = h / len(mosaic.planes)
    for i, name in enumerate(names):
        _paste(canvas, name, int(top + (i + 0.5) * row_height - name.shape[0] / 2), left - margin - name.shape[1])
    bar_top, bar_left = top + (h - bar_h) // 2, left + w + 2 * margin
    _paste(canvas, _colour_bar(bar_h, bar_w), bar_top, bar_left)
    for tick, row in zip(ticks, (bar_top, bar_top + bar_h // 2, bar_top + bar_h - 1)):
        canvas[row, bar_left + bar_w:bar_left + bar_w + 4] = 0
        _paste(canvas, tick, max(0, row - tick.shape[0] // 2), bar_left + bar_w + 6)
    label_left = bar_left + bar_w + 6 + max(t.shape[1] for t in ticks) + margin
    _paste(canvas, axis_label, bar_top + (bar_h - axis_label.shape[0]) // 2, label_left)
    with atomic_target_for(path) as tmp:
        imsave(tmp, canvas, format="png")
