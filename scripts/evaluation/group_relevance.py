"""Group-level relevance: voxel-wise mean maps per class (Figure 2 of the seed paper) and the anatomy table: per
class, preset and region the median over subjects of the localisation measure (``scripts.runtime.localisation``:
enrichment against the brain with its bootstrap 95 % interval, share of the positive relevance, share of the brain),
and the share of the positive relevance outside the brain."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from scripts.runtime.localisation import OUTSIDE_BRAIN, Localisation, median_ci
from scripts.runtime.outputs import read_volume

__all__ = ["ANATOMY_COLUMNS", "mean_volume", "tissue_shares_table"]

ANATOMY_COLUMNS = ["class", "preset", "region", "subjects", "enrichment", "enrichment_low", "enrichment_high", "share",
                   "share_low", "share_high", "brain_share"]


def mean_volume(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """Voxel-wise mean (float64) of NIfTI volumes on one grid, and their affine; a file on another grid is named."""
    if not paths:
        raise ValueError("no volumes to average")
    total, affine, shape = None, None, None
    for path in paths:
        data, aff = read_volume(path)
        if total is None:
            total, affine, shape = np.zeros(data.shape, dtype=np.float64), aff, data.shape
        elif data.shape != shape or not np.allclose(aff, affine, atol=1e-4):
            raise ValueError(f"{path}: grid {data.shape} differs from {paths[0]} ({shape}); maps must share one grid")
        total += data
    return total / len(paths), affine


def tissue_shares_table(per_subject: Mapping[tuple[str, str], Sequence[Localisation]], seed: int = 0) -> list[dict]:
    """Rows (``ANATOMY_COLUMNS``) per (class, preset) and region, the ``outside_brain`` row last: the median over
    subjects of the enrichment and of the share, each with its percentile-bootstrap 95 % interval (``median_ci``,
    ``seed``), and the median share of the brain. ``per_subject[(class, preset)]`` lists the ``localisation`` of
    each subject's map; a region that only some subjects have (the phenotype) is summarised over those.

    A map without positive relevance has no shares (NaN): alpha1-beta0 propagates the sign of the explained logit,
    so when the predicted class's logit is negative the whole map is negative. Such subjects are left out of the
    share and the enrichment (``subjects`` counts the subjects with an enrichment; for ``outside_brain``, with a
    share); the share of the brain is over every subject that has the region."""
    rows = []
    for (cls, preset), measures in per_subject.items():
        regions = [r for r in dict.fromkeys(r for m in measures for r in m) if r != OUTSIDE_BRAIN] + [OUTSIDE_BRAIN]
        for region in regions:
            values = [m[region] for m in measures if region in m]
            enrichment, e_low, e_high, n = median_ci([v["enrichment"] for v in values], seed=seed)
            share, s_low, s_high, n_share = median_ci([v["share"] for v in values], seed=seed)
            brain = float(np.median([v["brain_share"] for v in values])) if region != OUTSIDE_BRAIN else float("nan")
            rows.append({"class": cls, "preset": preset, "region": region,
                         "subjects": n_share if region == OUTSIDE_BRAIN else n, "enrichment": enrichment,
                         "enrichment_low": e_low, "enrichment_high": e_high, "share": share, "share_low": s_low,
                         "share_high": s_high, "brain_share": brain})
    return rows
