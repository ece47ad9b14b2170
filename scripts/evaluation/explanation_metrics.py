"""Metrics for judging 3D relevance maps: localisation against a ground-truth region and faithfulness by
region perturbation. Small numpy/torch functions, each testable on constructed cases."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

__all__ = ["aopc", "mass_accuracy", "patch_scores", "perturbation_curve", "pointing_game", "region_share"]


def mass_accuracy(relevance: np.ndarray, region: np.ndarray) -> float:
    """Relevance mass accuracy: share of the positive relevance that falls inside ``region`` (boolean)."""
    positive = np.clip(np.asarray(relevance, dtype=np.float64), 0, None)
    total = positive.sum()
    return float(positive[np.asarray(region, dtype=bool)].sum() / total) if total > 0 else float("nan")


def region_share(region: np.ndarray, brain: np.ndarray) -> float:
    """Chance level of :func:`mass_accuracy`: the region's share of the brain volume."""
    brain = np.asarray(brain, dtype=bool)
    return float(np.asarray(region, dtype=bool)[brain].sum() / max(brain.sum(), 1))


def pointing_game(relevance: np.ndarray, region: np.ndarray, tolerance: int = 0) -> float:
    """1.0 if the most relevant voxel lies in ``region`` (dilated by ``tolerance`` voxels), else 0.0."""
    region = np.asarray(region, dtype=bool)
    if tolerance > 0:

        region = ndimage.binary_dilation(region, iterations=tolerance)
    idx = np.unravel_index(int(np.argmax(relevance)), np.shape(relevance))
    return float(region[idx])


def patch_scores(relevance: torch.Tensor, patch: int) -> torch.Tensor:
    """Sum of relevance in each non-overlapping ``patch``^3 block of a (D, H, W) map (edges padded)."""
    r = relevance[None, None].float()
    pads = []
    for size in reversed(r.shape[2:]):
        pads += [0, (-size) % patch]
    r = F.pad(r, pads)
    return F.avg_pool3d(r, patch, patch)[0, 0] * patch**3


def perturbation_curve(
    score: Callable[[torch.Tensor], float],
    image: torch.Tensor,
    order: torch.Tensor,
    patch: int,
    steps: int,
    per_step: int = 1,
    baseline: float = 0.0,
) -> np.ndarray:
    """Region perturbation: replace the patches of ``order`` (flat indices into the patch grid, most relevant
    first), ``per_step`` at a time, by ``baseline`` and record ``score`` after each step (index 0: intact)."""
    x = image.clone()
    spatial = x.shape[-3:]
    grid = [-(-s // patch) for s in spatial]
    values = [float(score(x))]
    for step in range(steps):
        for flat in order[step * per_step:(step + 1) * per_step].tolist():
            i, j, k = np.unravel_index(int(flat), grid)
            x[..., i * patch:(i + 1) * patch, j * patch:(j + 1) * patch, k * patch:(k + 1) * patch] = baseline
        values.append(float(score(x)))
    return np.asarray(values)


def aopc(curve: np.ndarray) -> float:
    """Area over the perturbation curve: mean drop of the score from the intact input over the steps."""
    curve = np.asarray(curve, dtype=np.float64)
    return float(np.mean(curve[0] - curve[1:])) if len(curve) > 1 else 0.0
