"""Group-level relevance: voxel-wise mean maps per class (Figure 2 of the seed paper) and the share of positive
relevance per tissue class next to that tissue's share of the volume (the anatomy table)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from scripts.runtime.outputs import read_volume
from scripts.runtime.report import relevance_by_tissue  # one definition: the run report uses it too

__all__ = ["mean_volume", "relevance_by_tissue", "tissue_shares_table"]


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


def tissue_shares_table(per_subject: Mapping[tuple[str, str], list[dict[str, tuple]]]) -> list[dict]:
    """Rows (class, preset, tissue, subjects, relevance share, volume share, enrichment) averaged over subjects, each
    subject weighted equally. ``per_subject[(class, preset)]`` is a list of ``relevance_by_tissue`` results.

    A map without positive relevance has no relevance shares (NaN): alpha1-beta0 propagates the sign of the
    explained logit, so when the predicted class's logit is negative the whole map is negative. Such subjects are
    left out of the relevance share (``subjects`` counts the subjects it averages; NaN when none has one); the
    volume share averages every subject."""
    rows = []
    for (cls, preset), shares in per_subject.items():
        defined = [s for s in shares if not any(np.isnan(v[0]) for v in s.values())]
        for tissue in shares[0]:
            rel = float(np.mean([s[tissue][0] for s in defined])) if defined else float("nan")
            vol = float(np.mean([s[tissue][1] for s in shares]))
            rows.append({"class": cls, "preset": preset, "tissue": tissue, "subjects": len(defined),
                         "relevance_share": rel, "volume_share": vol,
                         "enrichment": rel / vol if vol > 0 else float("nan")})
    return rows
