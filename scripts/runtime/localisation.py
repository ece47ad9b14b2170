"""One localisation measure for relevance maps, against the brain, per subject (issue 38).

For a map ``R`` and a region ``A`` inside the brain (tissue label > 0)::

    share(A)       = sum of positive R in A / sum of positive R everywhere (outside the brain included)
    brain_share(A) = voxels of A / voxels of the brain
    enrichment(A)  = share(A) / brain_share(A)            (1 = no preference for A within the brain)

and the share of the positive relevance that falls outside the brain on its own line (``outside_brain``). The
denominator of the enrichment is the brain, never the whole grid: the brain is about a third of the 128x96x96
network grid, so a grid denominator inflates every tissue's enrichment about threefold (what the study's anatomy
table did before 0.9.0). Relevance outside the brain stays in the share's denominator, so a map that spills out of
the brain is not rewarded.

Regions: each drawem9 tissue, ``csf_ventricles`` (CSF + ventricles: the seed paper's finding), the ventricles alone
(``ventricles``, a drawem9 tissue) and any further named masks (the synthetic cohort's ``phenotype`` and its
components). Group values are medians over subjects with a percentile-bootstrap 95 % confidence interval
(``median_ci``; paired differences with ``paired_median_ci``).

The run report, the study, explain_eval, composite_search and the twin evidence command all use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from scripts.runtime.tissues import CSF, DRAWEM9, VENTRICLES

__all__ = ["CSF_VENTRICLES", "OUTSIDE_BRAIN", "Localisation", "localisation", "median_ci", "paired_median_ci",
           "tissue_regions"]

CSF_VENTRICLES = "csf_ventricles"
OUTSIDE_BRAIN = "outside_brain"
BOOTSTRAP_RESAMPLES = 4000


def tissue_regions(tissue: np.ndarray, extra: Mapping[str, np.ndarray | None] | None = None) -> dict[str, np.ndarray]:
    """Boolean masks of each drawem9 tissue (by name), ``csf_ventricles`` and the ``extra`` named masks (a mask that
    is None is left out: a term subject has no phenotype). ``tissue`` is a drawem9 label map, 0 outside the brain."""
    labels = np.rint(np.asarray(tissue)).astype(np.int16)
    regions = {name: labels == label for label, name in DRAWEM9.items()}
    regions[CSF_VENTRICLES] = np.isin(labels, (CSF, VENTRICLES))
    for name, mask in (extra or {}).items():
        if mask is None:
            continue
        mask = np.asarray(mask)
        if mask.shape != labels.shape:
            raise ValueError(f"region {name!r}: shape {mask.shape} differs from the tissue map's {labels.shape}")
        regions[name] = mask.astype(bool)
    return regions


class Localisation(dict):
    """``{region: {"share", "brain_share", "enrichment"}}`` plus ``outside_brain: {"share"}`` of one map."""

    def enrichment(self, region: str) -> float:
        return self[region]["enrichment"]

    def share(self, region: str) -> float:
        return self[region]["share"]


def localisation(relevance: np.ndarray, tissue: np.ndarray, regions: Mapping[str, np.ndarray] | None = None
                 ) -> Localisation:
    """The measure of one map (see the module docstring). ``regions`` default to ``tissue_regions(tissue)``.

    A region is taken within the brain (tissue > 0): voxels of a region outside the brain count as outside. Shares
    are NaN when the map has no positive relevance; a region with no brain voxel has NaN enrichment. An empty
    brain is an error."""
    relevance = np.asarray(relevance, dtype=np.float64)
    tissue = np.asarray(tissue)
    if relevance.shape != tissue.shape:
        raise ValueError(f"relevance {relevance.shape} and tissue labels {tissue.shape} differ in shape")
    brain = np.rint(tissue) > 0
    brain_voxels = int(brain.sum())
    if brain_voxels == 0:
        raise ValueError("the tissue map has no brain voxel (label > 0): localisation is measured against the brain")
    positive = np.clip(relevance, 0, None)
    total = float(positive.sum())
    regions = tissue_regions(tissue) if regions is None else regions
    out = Localisation()
    for name, mask in regions.items():
        inside = np.asarray(mask, dtype=bool) & brain
        share = float(positive[inside].sum()) / total if total > 0 else float("nan")
        brain_share = float(inside.sum()) / brain_voxels
        out[name] = {"share": share, "brain_share": brain_share,
                     "enrichment": share / brain_share if brain_share > 0 else float("nan")}
    out[OUTSIDE_BRAIN] = {"share": float(positive[~brain].sum()) / total if total > 0 else float("nan"),
                          "brain_share": 0.0, "enrichment": float("nan")}
    return out


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def median_ci(values: Sequence[float], confidence: float = 0.95, seed: int = 0,
              resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float, int]:
    """(median, low, high, n) over the finite ``values`` (subjects), with a percentile-bootstrap ``confidence``
    interval (scipy.stats.bootstrap, fixed ``seed``: the same values give the same interval). With fewer than two
    values the interval is NaN."""
    from scipy import stats  # noqa: PLC0415 (scipy is imported by the callers that summarise only)

    data = _finite(values)
    if data.size == 0:
        return float("nan"), float("nan"), float("nan"), 0
    median = float(np.median(data))
    if data.size < 2:
        return median, float("nan"), float("nan"), 1
    if np.all(data == data[0]):  # every resample has this median
        return median, median, median, int(data.size)
    result = stats.bootstrap((data,), np.median, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", random_state=np.random.default_rng(seed))
    return median, float(result.confidence_interval.low), float(result.confidence_interval.high), int(data.size)


def paired_median_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95, seed: int = 0,
                     resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float, float, int]:
    """``median_ci`` of the per-subject differences ``a - b`` (pairs where both are finite)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired values differ in length: {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    return median_ci(a[keep] - b[keep], confidence, seed, resamples)
