"""Level sets of a relevance map as a labelmap with static segment names, for 3D Slicer's MONAI Label plugin.

Bands, not nested sets: the voxels with positive relevance are ranked by it (strongest first; ties in flat-index
order), and a voxel belongs to band k when the share of the positive relevance held by the voxels ranked *above*
it lies in ``[LEVELS[k-1], LEVELS[k])`` (with ``LEVELS[-1] = 0``). So band 0 is the smallest set of strongest
voxels that holds at least 25 % of the positive relevance, bands 0-1 together the smallest that holds at least
50 %, bands 0-2 at least 75 %; the weakest voxels that share the last 25 % get no band. Counter-evidence is the
same rule applied to the negative relevance with one level: the strongest voxels holding at least 25 % of it.

The segment names are fixed (``EVIDENCE_LABELS``, values 1..7 in this order) so that Slicer's *Next Sample*,
which creates one empty segment per label of ``/info``, and a result fill the same segments. A result fills only
the bands of the explained (predicted) class, so the non-empty segment names show the decision.

No MONAI Label import here: the rule is tested on hand-made volumes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BAND_NAMES", "CLASS_NAMES", "COUNTER_EVIDENCE", "EVIDENCE_LABELS", "LEVELS", "band_index",
           "evidence_labelmap", "label_shares"]

LEVELS = (0.25, 0.5, 0.75)
BAND_NAMES = ("0-25 %", "25-50 %", "50-75 %")
CLASS_NAMES = {0: "term", 1: "preterm"}
COUNTER_EVIDENCE = "counter-evidence"
COUNTER_LEVELS = (0.25,)

# label value -> name, in the order Slicer maps label values 1..N onto segment names
EVIDENCE_LABELS: dict[str, int] = {
    **{f"preterm evidence {band}": 1 + k for k, band in enumerate(BAND_NAMES)},
    **{f"term evidence {band}": 1 + len(BAND_NAMES) + k for k, band in enumerate(BAND_NAMES)},
    COUNTER_EVIDENCE: 1 + 2 * len(BAND_NAMES),
}


def band_index(values: np.ndarray, levels=LEVELS) -> np.ndarray:
    """For every voxel the band (0..len(levels)-1) of its positive value, -1 for no band (value <= 0, or among
    the weakest voxels beyond the last level). See the module docstring for the rule."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    out = np.full(flat.shape, -1, dtype=np.int64)
    positive = np.flatnonzero(flat > 0)
    if positive.size:
        order = positive[np.argsort(-flat[positive], kind="stable")]
        ranked = flat[order]
        cumulative = np.cumsum(ranked)
        above = np.concatenate(([0.0], cumulative[:-1])) / cumulative[-1]  # share held by the voxels ranked above
        band = np.searchsorted(np.asarray(levels, dtype=np.float64), above, side="right")
        inside = band < len(levels)
        out[order[inside]] = band[inside]
    return out.reshape(np.shape(values))


def evidence_labelmap(relevance: np.ndarray, target: int) -> np.ndarray:
    """The uint8 labelmap (values of ``EVIDENCE_LABELS``, 0 elsewhere) of a relevance map explaining class
    ``target``: its positive relevance in the bands of that class, its strongest negative relevance as
    counter-evidence."""
    if target not in CLASS_NAMES:
        raise ValueError(f"target must be one of {sorted(CLASS_NAMES)} (a class index), got {target!r}")
    relevance = np.asarray(relevance)
    labels = np.zeros(relevance.shape, dtype=np.uint8)
    bands = band_index(relevance)
    for k, band in enumerate(BAND_NAMES):
        labels[bands == k] = EVIDENCE_LABELS[f"{CLASS_NAMES[target]} evidence {band}"]
    labels[band_index(-relevance, COUNTER_LEVELS) == 0] = EVIDENCE_LABELS[COUNTER_EVIDENCE]
    return labels


def label_shares(relevance: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """For every segment name, the share of the positive relevance (of the negative one for counter-evidence)
    that its voxels hold on the grid of ``relevance``."""
    relevance = np.asarray(relevance, dtype=np.float64)
    positive = float(relevance[relevance > 0].sum())
    negative = float(-relevance[relevance < 0].sum())
    shares = {}
    for name, value in EVIDENCE_LABELS.items():
        held = relevance[labels == value]
        if name == COUNTER_EVIDENCE:
            shares[name] = float(-held.sum()) / negative if negative > 0 else 0.0
        else:
            shares[name] = float(held.sum()) / positive if positive > 0 else 0.0
    return shares
