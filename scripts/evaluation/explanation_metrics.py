"""Metrics for judging 3D relevance maps: the pointing game against a ground-truth region (the share of relevance
in a region and its enrichment are ``scripts.runtime.localisation``, the one localisation measure), faithfulness by
region perturbation (most relevant first, least relevant first, the area between the two curves) and the similarity of
two maps (Spearman rank correlation, SSIM) for the sanity checks. Small numpy/torch functions, each testable on
constructed cases."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage, stats

from scripts.runtime.visual import symmetric_limit

__all__ = ["abpc", "aopc", "blurred_within", "brain_patches", "magnitude_scaled", "patch_scores", "per_step",
           "perturbation_curve", "perturbation_orders", "pointing_game", "rank_correlation", "ssim"]


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
    baseline: float | torch.Tensor = 0.0,
    intact: float | None = None,
) -> np.ndarray:
    """Region perturbation: replace the patches of ``order`` (flat indices into the patch grid, in the order
    given), ``per_step`` at a time, by ``baseline`` (a value, or a volume of the image's shape whose patch is
    copied in) and record ``score`` after each step (index 0: intact; ``intact`` gives that score when it is
    already known)."""
    x = image.clone()
    spatial = x.shape[-3:]
    grid = [-(-s // patch) for s in spatial]
    values = [float(score(x)) if intact is None else float(intact)]
    for step in range(steps):
        for flat in order[step * per_step:(step + 1) * per_step].tolist():
            i, j, k = np.unravel_index(int(flat), grid)
            block = (..., slice(i * patch, (i + 1) * patch), slice(j * patch, (j + 1) * patch),
                     slice(k * patch, (k + 1) * patch))
            x[block] = baseline[block] if isinstance(baseline, torch.Tensor) else baseline
        values.append(float(score(x)))
    return np.asarray(values)


def brain_patches(brain: np.ndarray, patch: int) -> torch.Tensor:
    """Flat indices (into the patch grid of :func:`patch_scores`) of the ``patch``^3 blocks holding brain voxels."""
    inside = patch_scores(torch.as_tensor(np.asarray(brain, dtype=np.float32)), patch).flatten() > 0
    return torch.nonzero(inside).flatten()


def perturbation_orders(relevance: np.ndarray, candidates: torch.Tensor, patch: int) -> tuple[torch.Tensor, ...]:
    """(most relevant first, least relevant first): the ``candidates`` patches sorted by their relevance sum,
    descending and ascending (stable sorts, so a constant map gives the same order both ways and ABPC 0)."""
    scores = patch_scores(torch.as_tensor(np.asarray(relevance, dtype=np.float32)), patch).flatten()[candidates]
    morf = candidates[torch.argsort(scores, descending=True, stable=True)]
    lerf = candidates[torch.argsort(scores, descending=False, stable=True)]
    return morf, lerf


def per_step(candidates: int, steps: int, fraction: float) -> int:
    """Patches replaced per step so that ``steps`` steps cover ``fraction`` of the ``candidates`` patches."""
    if steps < 1 or not 0 < fraction <= 1:
        raise ValueError(f"steps must be >= 1 and fraction in (0, 1], got {steps} and {fraction}")
    return max(1, int(np.ceil(fraction * candidates / steps)))


def abpc(morf: np.ndarray, lerf: np.ndarray) -> float:
    """Area between the perturbation curves: mean over the steps 1..K of (least relevant first - most relevant
    first). Large when removing the top-ranked patches destroys the score and removing the bottom-ranked ones
    keeps (or raises) it; 0 in expectation for a random ranking."""
    morf, lerf = np.asarray(morf, dtype=np.float64), np.asarray(lerf, dtype=np.float64)
    if morf.shape != lerf.shape:
        raise ValueError(f"curves of different lengths: {morf.shape} and {lerf.shape}")
    return float(np.mean(lerf[1:] - morf[1:])) if len(morf) > 1 else 0.0


def blurred_within(image: torch.Tensor, brain: np.ndarray, sigma: float) -> torch.Tensor:
    """The image blurred inside the brain: a Gaussian of ``sigma`` voxels normalised by the blurred brain mask
    (normalised convolution), so that brain voxels take a local average of brain voxels only and the background
    keeps its value. The replacement volume of region perturbation."""
    x = image.detach().cpu().double().numpy()
    mask = np.broadcast_to(np.asarray(brain, dtype=bool), x.shape[-3:])
    out = x.copy()
    weight = ndimage.gaussian_filter(mask.astype(np.float64), sigma)
    for index in np.ndindex(*x.shape[:-3]):
        smooth = ndimage.gaussian_filter(np.where(mask, x[index], 0.0), sigma)
        out[index][mask] = smooth[mask] / np.maximum(weight[mask], 1e-12)
    return torch.as_tensor(out, dtype=image.dtype)


def aopc(curve: np.ndarray) -> float:
    """Area over the perturbation curve: mean drop of the score from the intact input over the steps."""
    curve = np.asarray(curve, dtype=np.float64)
    return float(np.mean(curve[0] - curve[1:])) if len(curve) > 1 else 0.0


def rank_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Spearman rank correlation of two maps over the ``mask`` voxels (all without a mask), ties by average rank.
    A constant map carries no ranking: its correlation with anything is defined as 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if mask is not None:
        keep = np.asarray(mask, dtype=bool)
        a, b = a[keep], b[keep]
    a, b = a.ravel(), b.ravel()
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    ra, rb = stats.rankdata(a), stats.rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def magnitude_scaled(relevance: np.ndarray, brain: np.ndarray | None = None) -> np.ndarray:
    """|map| / L clipped to [0, 1], L = the figures' colour limit (99.5th percentile of |value| over the brain):
    the map as a reader sees its strength, the input of :func:`ssim`."""
    magnitude = np.abs(np.asarray(relevance, dtype=np.float64))
    return np.clip(magnitude / symmetric_limit(magnitude, brain), 0.0, 1.0)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, window: int = 7) -> float:
    """Structural similarity of two 2D or 3D arrays (Wang et al. 2004) with a uniform ``window``^d window, sample
    covariances and K1 = 0.01, K2 = 0.03, averaged over the window positions that lie inside the arrays -- the
    definition of scikit-image's ``structural_similarity`` with its defaults. 1 for identical arrays."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim not in (2, 3) or min(a.shape) < window:
        raise ValueError(f"ssim needs two equal 2D/3D arrays of at least {window} per side, got {a.shape}, {b.shape}")
    pad = (window - 1) // 2
    inner = tuple(slice(pad, size - pad) for size in a.shape)  # the windows that lie inside the arrays

    def mean(v):  # separable box filter (scipy, O(voxels)), kept where the window is whole
        return ndimage.uniform_filter(v, size=window)[inner]

    ux, uy, uxx, uyy, uxy = (mean(v) for v in (a, b, a * a, b * b, a * b))
    n = window**a.ndim
    correction = n / (n - 1)
    vx, vy, vxy = correction * (uxx - ux * ux), correction * (uyy - uy * uy), correction * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    value = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return float(value.mean())


def median_quartiles(values) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of the finite values; NaN when there are none (the spread over
    subjects that explain_eval and sanity report)."""
    values = np.asarray([v for v in values if v == v], dtype=np.float64)
    if not values.size:
        return float("nan"), float("nan"), float("nan")
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(median), float(q1), float(q3)
