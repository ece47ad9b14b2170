"""The evidence task's level sets (scripts/runtime/evidence.py) on hand-made relevance volumes: each band holds
the documented share of the positive relevance, exactly."""

from __future__ import annotations

import numpy as np
import pytest
from band_edges import assert_same_bands_up_to_edges

from scripts.runtime.evidence import (
    CLASS_NAMES,
    COUNTER_EVIDENCE,
    EVIDENCE_LABELS,
    LEVELS,
    band_index,
    evidence_labelmap,
    label_shares,
)


def _volume(values, shape=(4, 3, 2)) -> np.ndarray:
    """``values`` at scattered voxels of a zero volume (so that ranking, not position, decides the bands)."""
    volume = np.zeros(shape)
    positions = np.random.default_rng(0).permutation(volume.size)[: len(values)]
    volume.flat[positions] = values
    return volume


def test_bands_hold_exact_quarters():
    # 20 units of positive relevance, ranked 5 | 3 2 | 2 2 1 | 1 1 1 1 1: the share held above each voxel is
    # 0 | .25 .40 | .50 .60 .70 | .75 ...: band 0 = {5}, band 1 = {3, 2}, band 2 = {2, 2, 1}, 25 % each; the weakest
    # 25 % gets no band, and negative and zero voxels never get one
    values = [5, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1, -4, -1, 0]
    volume = _volume(values)
    bands = band_index(volume)
    positive = volume.clip(min=0).sum()
    for k, level in enumerate(LEVELS):
        assert volume[bands == k].sum() / positive == pytest.approx(0.25, abs=0)
        assert volume[(bands >= 0) & (bands <= k)].sum() / positive == level
    assert sorted(volume[bands == 0]) == [5]
    assert sorted(volume[bands == 1]) == [2, 3]
    assert sorted(volume[bands == 2]) == [1, 2, 2]
    assert (bands[volume <= 0] == -1).all()
    assert sorted(volume[(bands == -1) & (volume > 0)]) == [1, 1, 1, 1, 1]


def test_a_voxel_crossing_a_level_stays_in_the_band_it_starts():
    # 10 units: 4 alone holds 40 % (band 0 overshoots 25 %), then 3 starts at 40 % (band 1, reaching 70 %),
    # 2 starts at 70 % (band 2); the last 1 starts at 90 % (no band)
    volume = _volume([4, 3, 2, 1])
    bands = band_index(volume)
    assert [int(bands[volume == v][0]) for v in (4, 3, 2, 1)] == [0, 1, 2, -1]


def test_ties_go_in_flat_index_order():
    volume = np.zeros(8)
    volume[[1, 3, 5, 7]] = 1.0  # four equal voxels, 25 % each
    assert band_index(volume)[[1, 3, 5, 7]].tolist() == [0, 1, 2, -1]


@pytest.mark.parametrize("seed", range(5))
def test_bands_are_the_smallest_top_sets(seed):
    """Independent of the implementation: bands 0..k together are the strongest voxels, and the smallest such set
    whose share reaches LEVELS[k] (dropping its weakest voxel falls below it)."""
    rng = np.random.default_rng(seed)
    volume = rng.standard_normal((6, 5, 4)) ** 3
    bands = band_index(volume)
    positive = volume[volume > 0].sum()
    for k, level in enumerate(LEVELS):
        inside = (bands >= 0) & (bands <= k)
        assert volume[inside].min() >= volume[~inside].max()
        held = volume[inside].sum()
        assert held / positive >= level
        assert (held - volume[inside].min()) / positive < level


def test_labelmap_fills_only_the_target_class_and_counter_evidence():
    values = [5, 3, 2, 2, 2, 1, 1, 1, 1, 1, 1, -6, -2, -1, -1, 0]
    volume = _volume(values, (5, 3, 2))
    for target, name in CLASS_NAMES.items():
        labels = evidence_labelmap(volume, target)
        assert labels.dtype == np.uint8
        shares = label_shares(volume, labels)
        for segment, value in EVIDENCE_LABELS.items():
            if segment.startswith(f"{name} evidence"):
                assert shares[segment] == 0.25, segment
            elif segment == COUNTER_EVIDENCE:
                # strongest negative voxels holding >= 25 % of the negative relevance: -6 alone (60 %)
                assert sorted(volume[labels == value]) == [-6]
                assert shares[segment] == 0.6
            else:
                assert not (labels == value).any(), segment
        assert set(np.unique(labels)) <= {0, *EVIDENCE_LABELS.values()}


def test_no_positive_relevance_fills_nothing_but_counter_evidence():
    volume = -np.arange(24, dtype=float).reshape(2, 3, 4)
    labels = evidence_labelmap(volume, 1)
    assert set(np.unique(labels)) == {0, EVIDENCE_LABELS[COUNTER_EVIDENCE]}
    assert not evidence_labelmap(np.zeros((2, 2, 2)), 0).any()
    with pytest.raises(ValueError, match="target must be one of"):
        evidence_labelmap(volume, 2)


def test_rounding_noise_moves_voxels_only_across_one_band_edge():
    """What the NIfTI-vs-NRRD comparison in test_slicer_plugin.py relies on: a map perturbed by float32 rounding
    (relative 1e-6) gives the same labelmap but for a few voxels, each moved to a neighbouring band, and only voxels
    whose share of the ranked relevance lies near a level."""
    rng = np.random.default_rng(3)
    relevance = rng.standard_normal((40, 30, 30)) * rng.exponential(1.0, (40, 30, 30))
    noisy = relevance * (1 + 1e-6 * rng.standard_normal(relevance.shape))
    a, b = evidence_labelmap(relevance, 1), evidence_labelmap(noisy, 1)
    assert_same_bands_up_to_edges(a, b, max_fraction=10 / a.size, classes=["preterm"])  # <= 10 of 36,000 voxels
