"""Anatomy of the synthetic cohort: a 40-week-like template label map (built-in and procedural, or given by
the user) and the distance fields that let every subject's phenotype be drawn from it by thresholds.

Labels follow the dHCP drawem9 tissue convention (``scripts/runtime/tissues.py``; 0 outside the brain mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from scripts.runtime.tissues import BACKGROUND, BRAINSTEM, CEREBELLUM, CGM, CSF, DGM, DRAWEM9, HIPPO, VENTRICLES, WM

__all__ = ["SHAPE", "Template", "build_template", "builtin_template", "procedural_labels", "template_affine"]

SHAPE = (128, 96, 96)


def template_affine(shape=SHAPE) -> np.ndarray:
    """1 mm voxel-to-world matrix of the template space: axis 0 runs posterior->anterior, axis 1 right->left,
    axis 2 inferior->superior ("ALS"), the volume centred on the world origin."""
    affine = np.array([[0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    centre = (np.asarray(shape, dtype=float) - 1) / 2
    affine[:3, 3] = -affine[:3, :3] @ centre
    return affine


def _grid(shape):
    centre = (np.asarray(shape, dtype=np.float32) - 1) / 2
    return [np.arange(n, dtype=np.float32)[idx] - c for n, c, idx in zip(shape, centre, _AXES)]


_AXES = (np.s_[:, None, None], np.s_[None, :, None], np.s_[None, None, :])


def _ellipsoid(grid, centre, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))


@lru_cache(maxsize=2)
def procedural_labels(shape=SHAPE, seed: int = 40) -> np.ndarray:
    """Built-in 40-week template: cerebrum with folded cortex, extra-axial CSF, lateral ventricles, deep grey
    matter, hippocampi, cerebellum and brainstem, left-right symmetric, in voxel units of 1 mm."""
    rng = np.random.default_rng(seed)
    a, l, s = _grid(shape)  # noqa: E741 (anterior, left, superior offsets in mm: the axes' letters)
    labels = np.zeros(shape, dtype=np.uint8)
    # cerebrum: ellipsoid, slightly wider posteriorly
    semi = np.array([54.0, 42.0, 36.0], dtype=np.float32)
    widen = 1.0 - 0.06 * (a / semi[0])
    rho = np.sqrt((a / semi[0]) ** 2 + (l / (semi[1] * widen)) ** 2 + ((s - 4.0) / semi[2]) ** 2)
    mean_r = float(semi.mean())
    depth = (1.0 - rho) * mean_r  # mm below the outer brain surface (approx.)
    labels[depth > -1.0] = BACKGROUND
    # folding: sulci at the zero crossings of a smooth random field of the direction
    norm = np.sqrt(a**2 + l**2 + (s - 4.0) ** 2) + 1e-3
    field = np.zeros(shape, dtype=np.float32)
    for _ in range(14):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        freq = rng.uniform(9.0, 15.0)
        phase = rng.uniform(0, 2 * np.pi)
        proj = (a * d[0] + np.abs(l) * d[1] + (s - 4.0) * d[2]) / norm  # |l|: symmetric hemispheres
        field += np.sin(freq * proj + phase).astype(np.float32)
    field /= np.sqrt(14 / 2)
    sulcus = np.exp(-((field / 0.22) ** 2))
    sulcal_depth = 9.0 * sulcus  # mm
    csf_shell = 1.2
    cortex = 2.0
    wall = 9.0 * np.exp(-((field / 0.40) ** 2))
    inside = depth > 0
    labels[inside] = WM
    labels[inside & (depth < csf_shell + cortex + wall)] = CGM
    labels[inside & ((depth < csf_shell) | (depth < csf_shell + sulcal_depth - 1.0))] = CSF
    # interhemispheric fissure
    labels[inside & (np.abs(l) < 1.0) & (depth < 30.0) & (s > -8)] = CSF
    labels[inside & (np.abs(l) < 2.6) & (np.abs(l) >= 1.0) & (depth < 30.0) & (s > -8) & (labels == WM)] = CGM
    # deep grey matter (thalami / basal ganglia), ventricles, hippocampi
    for side in (-1.0, 1.0):
        labels[_ellipsoid((a, l, s), (-2.0, side * 10.0, 0.0), (14.0, 7.5, 9.0)) < 1] = DGM
        labels[_ellipsoid((a, l, s), (-22.0, side * 22.0, -14.0), (9.0, 4.0, 4.0)) < 1] = HIPPO
        body = _ellipsoid((a, l, s), (-2.0, side * 7.5, 12.0), (26.0, 2.8, 4.0)) < 1
        horn = _ellipsoid((a, l, s), (-28.0, side * 13.0, 4.0), (8.0, 3.0, 6.0)) < 1
        labels[body | horn] = VENTRICLES
    labels[_ellipsoid((a, l, s), (-2.0, 0.0, 0.0), (10.0, 1.2, 6.0)) < 1] = VENTRICLES  # third ventricle
    # cerebellum and brainstem below the posterior cerebrum
    cereb = _ellipsoid((a, l, s), (-40.0, 0.0, -26.0), (13.0, 26.0, 10.0))
    labels[(cereb < 1.25) & (labels == 0)] = BACKGROUND
    labels[(cereb < 1.12) & ((labels == BACKGROUND) | (labels == 0))] = CSF
    labels[cereb < 1] = CEREBELLUM
    stem = _ellipsoid((a, l, s), (-18.0, 0.0, -26.0), (8.0, 7.0, 20.0)) < 1
    labels[stem & (s < -4)] = BRAINSTEM
    return labels


@dataclass(frozen=True)
class Template:
    """A template label map and the fields each subject's phenotype is thresholded on (all in mm)."""

    labels: np.ndarray  # drawem9 labels, uint8
    affine: np.ndarray
    ventricle_distance: np.ndarray  # distance outside the ventricles
    surface_depth: np.ndarray  # depth inside the cerebral tissue, from the CSF/outside
    hull_depth: np.ndarray  # depth below the closed (convex-ish) outer hull: how deep a sulcus runs
    intensity: np.ndarray | None = None  # optional user template image, scaled to [0, 1]


def build_template(labels: np.ndarray, affine: np.ndarray | None = None,
                   intensity: np.ndarray | None = None) -> Template:
    """Precompute the distance fields of a template label map (a few seconds, once per template)."""
    labels = np.asarray(labels).astype(np.uint8)
    if labels.ndim != 3:
        raise ValueError(f"template labels must be 3D, got shape {labels.shape}")
    present = set(np.unique(labels).tolist()) - {0}
    missing = {CSF, CGM, WM, VENTRICLES} - present
    if missing:
        names = ", ".join(f"{m} ({DRAWEM9[m]})" for m in sorted(missing))
        raise ValueError(f"template labels lack drawem9 classes {names}")
    ventricle_distance = ndimage.distance_transform_edt(labels != VENTRICLES).astype(np.float32)
    tissue = np.isin(labels, (CGM, WM, DGM, HIPPO, VENTRICLES))
    surface_depth = ndimage.distance_transform_edt(tissue).astype(np.float32)
    brain = np.isin(labels, tuple(range(1, 10)))
    ball = _ball(4)
    hull = ndimage.binary_closing(np.pad(brain, 6), structure=ball, iterations=2)[6:-6, 6:-6, 6:-6]
    hull_depth = ndimage.distance_transform_edt(hull).astype(np.float32)
    if intensity is not None:
        intensity = np.asarray(intensity, dtype=np.float32)
        hi = np.percentile(intensity[brain], 99.5)
        intensity = np.clip(intensity / max(hi, 1e-6), 0, 1.2)
    return Template(
        labels=labels,
        affine=template_affine(labels.shape) if affine is None else np.asarray(affine, dtype=float),
        ventricle_distance=ventricle_distance,
        surface_depth=surface_depth,
        hull_depth=hull_depth,
        intensity=intensity,
    )


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


@lru_cache(maxsize=1)
def builtin_template() -> Template:
    return build_template(procedural_labels())
