"""Band edges of the evidence labelmaps, for tests that compare two labelmaps of (nearly) the same relevance.

A band edge is a level of the cumulative share of ranked relevance (the evidence bands' module): a voxel whose share
lies within rounding of a level can fall on either side. So two labelmaps of relevance maps that differ by rounding
are equal but for a few voxels, each moved across one band edge: between consecutive bands of a class, between the
last band and no band, or between counter-evidence and no band.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from scripts.runtime.evidence import BAND_NAMES, CLASS_NAMES, COUNTER_EVIDENCE, EVIDENCE_LABELS


def neighbour_labels(classes: Iterable[str] = tuple(CLASS_NAMES.values())) -> set[frozenset]:
    """Label pairs one band edge apart, for the bands of ``classes`` (class names, default both)."""
    pairs = {frozenset((EVIDENCE_LABELS[COUNTER_EVIDENCE], 0))}
    for name in classes:
        values = [EVIDENCE_LABELS[f"{name} evidence {band}"] for band in BAND_NAMES] + [0]
        pairs |= {frozenset(p) for p in zip(values, values[1:])}
    return pairs


def assert_same_bands_up_to_edges(a: np.ndarray, b: np.ndarray, max_fraction: float,
                                  classes: Iterable[str] = tuple(CLASS_NAMES.values())) -> None:
    """``a`` and ``b`` are equal but for at most ``max_fraction`` of their voxels, each moved across one band edge of
    ``classes``."""
    differ = np.asarray(a) != np.asarray(b)
    assert differ.mean() <= max_fraction, f"{int(differ.sum())} of {differ.size} evidence voxels differ"
    moves = {frozenset((int(x), int(y))) for x, y in zip(a[differ], b[differ])}
    allowed = neighbour_labels(classes)
    assert moves <= allowed, f"voxels moved further than one band edge: {sorted(map(sorted, moves - allowed))}"
