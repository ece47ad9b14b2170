"""The one localisation measure (scripts/runtime/localisation.py) on hand-made volumes with known answers: shares of
the positive relevance against the brain (tissue label > 0), outside-brain relevance in the denominator and on its
own line, and the group median with its bootstrap interval."""

import numpy as np
import pytest

from scripts.runtime.localisation import (
    CSF_VENTRICLES,
    OUTSIDE_BRAIN,
    localisation,
    median_ci,
    paired_median_ci,
    tissue_regions,
)
from scripts.runtime.tissues import CSF, DRAWEM9, VENTRICLES, WM

# a 10-voxel line: 6 outside the brain, 1 CSF, 1 ventricles, 2 white matter (brain = 4 voxels, 40 % of the grid)
TISSUE = np.array([0, 0, 0, 0, 0, 0, CSF, VENTRICLES, WM, WM])


def test_the_denominator_of_the_enrichment_is_the_brain_not_the_grid():
    relevance = np.array([0, 0, 0, 0, 0, 0, 1.0, 0, 0.5, 0.5])  # every positive relevance inside the brain
    loc = localisation(relevance, TISSUE)
    assert loc["csf"]["share"] == pytest.approx(0.5)
    assert loc["csf"]["brain_share"] == pytest.approx(0.25)  # 1 of the 4 brain voxels (a tenth of the grid)
    assert loc.enrichment("csf") == pytest.approx(2.0)  # the grid's denominator would have said 5
    assert loc["white_matter"]["brain_share"] == pytest.approx(0.5) and loc.enrichment("white_matter") == 1.0
    assert loc[OUTSIDE_BRAIN]["share"] == 0.0
    # the brain shares of the drawem9 tissues sum to 1, and so do their shares with the outside-brain line
    assert sum(loc[name]["brain_share"] for name in DRAWEM9.values()) == pytest.approx(1.0)
    assert sum(loc[name]["share"] for name in DRAWEM9.values()) + loc[OUTSIDE_BRAIN]["share"] == pytest.approx(1.0)
    # a uniform map within the brain has no preference: enrichment 1 in every tissue present
    uniform = localisation(np.where(TISSUE > 0, 1.0, 0.0), TISSUE)
    assert all(uniform.enrichment(n) == pytest.approx(1.0) for n in ("csf", "ventricles", "white_matter"))


def test_outside_brain_relevance_counts_in_the_share_and_has_its_own_line():
    relevance = np.array([3.0, 0, 0, 0, 0, 0, 1.0, 0, 0, 0])  # 3 of the 4 units of positive relevance outside
    loc = localisation(relevance, TISSUE)
    assert loc[OUTSIDE_BRAIN]["share"] == pytest.approx(0.75)
    assert loc.share("csf") == pytest.approx(0.25) and loc.enrichment("csf") == pytest.approx(1.0)
    assert np.isnan(loc[OUTSIDE_BRAIN]["enrichment"])  # not a region of the brain
    # the same map without the spill: the CSF's share and enrichment are four times as large
    assert localisation(np.where(TISSUE > 0, relevance, 0), TISSUE).enrichment("csf") == pytest.approx(4.0)


def test_negative_relevance_is_ignored_and_a_map_without_positive_relevance_has_nan_shares():
    relevance = np.array([-5.0, 0, 0, 0, 0, 0, 1.0, -3.0, 1.0, 0])
    loc = localisation(relevance, TISSUE)
    assert loc.share("csf") == pytest.approx(0.5) and loc.share("ventricles") == 0.0
    assert loc[OUTSIDE_BRAIN]["share"] == 0.0
    negative = localisation(-np.ones(10), TISSUE)
    assert all(np.isnan(v["share"]) for v in negative.values())
    assert np.isnan(negative.enrichment("csf")) and negative["csf"]["brain_share"] == 0.25  # the volume is known


def test_an_empty_brain_is_an_error_and_shapes_must_match():
    with pytest.raises(ValueError, match="no brain voxel"):
        localisation(np.ones(10), np.zeros(10))
    with pytest.raises(ValueError, match="differ in shape"):
        localisation(np.ones(9), TISSUE)
    with pytest.raises(ValueError, match="region 'phenotype'"):
        tissue_regions(TISSUE, {"phenotype": np.ones(9, bool)})


def test_csf_ventricles_is_labels_1_and_5_and_a_tissue_absent_has_nan_enrichment():
    regions = tissue_regions(TISSUE)
    assert list(regions)[:len(DRAWEM9)] == list(DRAWEM9.values())
    assert np.array_equal(regions[CSF_VENTRICLES], np.isin(TISSUE, (1, 5)))
    relevance = np.array([0, 0, 0, 0, 0, 0, 1.0, 2.0, 1.0, 0])
    loc = localisation(relevance, TISSUE)
    assert loc.share(CSF_VENTRICLES) == pytest.approx(0.75) and loc[CSF_VENTRICLES]["brain_share"] == 0.5
    assert loc.share(CSF_VENTRICLES) == pytest.approx(loc.share("csf") + loc.share("ventricles"))
    assert loc["cerebellum"]["brain_share"] == 0.0 and np.isnan(loc.enrichment("cerebellum"))


def test_an_extra_mask_counts_only_its_part_inside_the_brain():
    phenotype = np.zeros(10, bool)
    phenotype[4:8] = True  # 2 voxels outside the brain, the CSF and ventricle voxels inside
    relevance = np.array([0, 0, 0, 0, 2.0, 2.0, 1.0, 1.0, 0, 0])  # half the positive relevance on its outside part
    loc = localisation(relevance, TISSUE, tissue_regions(TISSUE, {"phenotype": phenotype, "absent": None}))
    assert "absent" not in loc  # a mask that is None (a term subject's phenotype) is left out
    assert loc.share("phenotype") == pytest.approx(1 / 3)  # the inside part: 2 of 6
    assert loc["phenotype"]["brain_share"] == pytest.approx(0.5)
    assert loc.enrichment("phenotype") == pytest.approx(2 / 3)
    assert loc[OUTSIDE_BRAIN]["share"] == pytest.approx(2 / 3)
    only = localisation(relevance, TISSUE, {"phenotype": phenotype})  # the regions asked for, and outside_brain
    assert set(only) == {"phenotype", OUTSIDE_BRAIN} and only.share("phenotype") == loc.share("phenotype")


def test_a_random_map_over_the_brain_has_enrichment_about_one():
    rng = np.random.default_rng(0)
    tissue = np.zeros((16, 16, 16), int)
    tissue[2:14, 2:14, 2:14] = WM
    tissue[4:8, 4:12, 6:10] = CSF
    loc = localisation(np.where(tissue > 0, rng.random(tissue.shape), 0.0), tissue)
    assert loc["csf"]["brain_share"] == pytest.approx(128 / 12**3)
    assert abs(loc.enrichment("csf") - 1) < 0.05
    assert localisation(np.where(tissue == CSF, 1.0, 0.0), tissue).enrichment("csf") == pytest.approx(12**3 / 128)


def test_median_ci_on_known_data():
    values = [1.0, 2.0, 3.0, 4.0, 100.0, float("nan")]  # NaN (a map without positive relevance) is left out
    median, low, high, n = median_ci(values)
    assert median == 3.0 and n == 5
    assert low <= median <= high and 1.0 <= low and high <= 100.0
    assert median_ci(values) == (median, low, high, n)  # the same seed gives the same interval
    assert median_ci(values, seed=1)[0] == median
    one = median_ci([2.5, float("nan")])
    assert one[0] == 2.5 and np.isnan(one[1]) and np.isnan(one[2]) and one[3] == 1
    none = median_ci([float("nan")])
    assert np.isnan(none[0]) and none[3] == 0
    assert median_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0, 3)
    # a wide interval for a spread sample, a narrow one for a tight sample around the same median
    wide, tight = median_ci(np.linspace(0, 10, 21)), median_ci(np.linspace(4.9, 5.1, 21))
    assert wide[0] == pytest.approx(5.0) and tight[0] == pytest.approx(5.0)
    assert tight[2] - tight[1] < wide[2] - wide[1]


def test_paired_median_ci_takes_per_subject_differences():
    a, b = [2.0, 3.0, 5.0, float("nan")], [1.0, 1.0, 1.0, 0.0]
    median, low, high, n = paired_median_ci(a, b)
    assert median == 2.0 and n == 3 and low <= median <= high
    with pytest.raises(ValueError, match="differ in length: 3 and 2"):
        paired_median_ci([1.0, 2.0, 3.0], [1.0, 2.0])
