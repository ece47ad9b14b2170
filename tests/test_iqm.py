"""Image-quality measures (scripts/runtime/iqm.py, issue 39) on volumes with known answers: noise of known sigma,
a known multiplicative field, a scaled brain, a ghost replica at a known shift, and the bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scripts.runtime import iqm
from scripts.runtime.outputs import read_volume

SHAPE = (96, 80, 80)
GM, WM, CSF = 400.0, 660.0, 1000.0  # neonatal T2w order: grey matter darkest, CSF brightest


def _axes(shape=SHAPE):
    return np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")


def phantom(sigma: float = 20.0, field: float = 0.0, scale: float = 1.0, seed: int = 0) -> np.ndarray:
    """An ellipsoidal brain (semi-axes 0.85 x ``scale`` of the grid): white-matter core, grey-matter shell, CSF rim,
    Gaussian noise ``sigma``, times exp(``field`` x the first axis' coordinate); zero outside."""
    axes = _axes()
    radius = np.sqrt(sum((x / (0.85 * scale)) ** 2 for x in axes))
    image = np.where(radius < 0.45, WM, np.where(radius < 0.8, GM, CSF))
    image = (image + np.random.default_rng(seed).normal(0.0, sigma, SHAPE)) * np.exp(field * axes[0])
    return np.where(radius < 1, image, 0.0)


@pytest.mark.parametrize("sigma", [10.0, 20.0, 40.0])
def test_snr_of_noise_with_known_sigma_within_ten_percent(sigma):
    measured = iqm.measure(phantom(sigma))
    assert measured["snr_wm"] == pytest.approx(WM / sigma, rel=0.10)
    assert set(iqm.MEASURES) <= set(measured)


def test_the_same_scan_gives_the_same_measures():
    """N4 runs on one thread: its sums in one order, the same field each run."""
    image = phantom(20.0, field=0.2)
    assert iqm.measure(image) == iqm.measure(image.copy())


def test_cnr_and_cjv_follow_the_noise():
    """|WM - GM| / sqrt(2) sigma for CNR (no air term), 2 sigma / |WM - GM| for CJV (MADs of normal noise)."""
    measured = iqm.measure(phantom(10.0))
    assert measured["cnr"] == pytest.approx((WM - GM) / (np.sqrt(2) * 10.0), rel=0.10)
    assert measured["cjv"] == pytest.approx(2 * 10.0 / (WM - GM), rel=0.10)
    noisier = iqm.measure(phantom(20.0))
    assert noisier["cnr"] < measured["cnr"] and noisier["cjv"] > measured["cjv"]


def test_inu_rises_with_a_known_multiplicative_field():
    """The INU is P95 - P5 of the log field in the brain: for exp(f x) it is f times the spread of x. Tolerance: N4's
    own error, the INU it reports on the same phantom with no field."""
    axes = _axes()
    brain = phantom(0.0) != 0
    clean = iqm.measure(phantom(field=0.0))["inu"]
    previous = clean
    for strength in (0.1, 0.2, 0.4):
        truth = float(np.percentile(strength * axes[0][brain], 95) - np.percentile(strength * axes[0][brain], 5))
        measured = iqm.measure(phantom(field=strength))["inu"]
        assert measured > previous
        assert abs(measured - truth) <= max(clean, 1e-3)
        previous = measured


def test_a_scaled_brain_gives_the_volume_ratio():
    """0.6x per axis: 0.216 of the volume; tolerance: the small brain's surface layer (voxels with a background
    neighbour), the voxelisation's own error."""
    from scipy import ndimage

    full = iqm.measure(phantom(scale=1.0))["brain_volume_ml"]
    small_image = phantom(scale=0.6)
    small = iqm.measure(small_image)["brain_volume_ml"]
    brain = small_image != 0
    surface_ml = float((brain & ~ndimage.binary_erosion(brain)).sum()) / 1000.0
    assert small / full == pytest.approx(0.6**3, abs=surface_ml / full)
    # the voxel size counts: the same voxels at 0.5 mm are an eighth of the volume
    half = iqm.measure(small_image, spacing=(0.5, 0.5, 0.5))["brain_volume_ml"]
    assert half == pytest.approx(small / 8, rel=1e-12)


def test_efc_anchors():
    """EFC is 1 for equal values (the most spread) and 0 when one voxel holds all the energy."""
    assert iqm.efc(np.full(500, 3.0)) == pytest.approx(1.0, abs=1e-12)
    assert iqm.efc(np.r_[1.0, np.zeros(499)]) == pytest.approx(0.0, abs=1e-12)
    blurred, sharp = iqm.measure(phantom(5.0))["efc"], iqm.efc(np.r_[np.full(50, 10.0), np.full(450, 0.1)])
    assert sharp < blurred < 1.0


def test_tissue_classes_are_ordered_darkest_to_brightest():
    image = phantom(10.0)
    classes = iqm.tissue_classes(image, image != 0)
    means = [image[classes == k].mean() for k in (1, 2, 3)]
    assert means == sorted(means) and abs(means[0] - GM) < 5 and abs(means[1] - WM) < 5 and abs(means[2] - CSF) < 5
    assert np.all(classes[image == 0] == 0)


def test_a_ghost_replica_is_found_at_its_shift(cohort):
    """A synthetic subject read from disk, and the same with a replica of 0.2 its intensity shifted by half the
    field of view along each axis, then skull-stripped again: the artefact measure at least doubles and its lag is
    the shift."""
    data = json.loads((cohort / "datalist.json").read_text())
    path = cohort / data["training"][0]["image"]
    image, _ = read_volume(path)
    brain = image != 0
    measured = iqm.measure_file(path)  # the whole set from the file, its voxel size from the header
    assert measured["brain_volume_ml"] == pytest.approx(brain.sum() / 1000.0) and 0 < measured["artefact"] < 1
    clean, _ = iqm.artefact(image.astype(np.float64), brain)
    for axis in range(3):
        shift = image.shape[axis] // 2
        ghosted = np.where(brain, image + 0.2 * np.roll(image, shift, axis=axis), 0.0)
        peak, lag = iqm.artefact(ghosted, brain)
        assert peak >= 2 * clean
        expected = [0, 0, 0]
        expected[axis] = shift
        # the replica is smooth, so the peak may sit one voxel beside the shift
        assert max(abs(abs(v) - e) for v, e in zip(lag, expected)) <= 1, (axis, lag)


@pytest.mark.parametrize(("image", "mask", "message"), [
    (np.where(phantom(0.0) != 0, 500.0, 0.0), None, "every brain voxel is 500: a constant image"),
    (np.zeros(SHAPE), None, "the brain mask is empty"),
    (phantom(), np.zeros(SHAPE), "the brain mask is empty"),
    (phantom(), np.ones((4, 4, 4)), "mask shape (4, 4, 4) differs"),
    (np.ones((4, 4)), None, "needs a 3D volume"),
])
def test_bad_input_gets_one_clear_error_naming_the_file(image, mask, message):
    with pytest.raises(ValueError, match=r"^scan\.nii\.gz: ") as error:
        iqm.measure(image, mask=mask, name="scan.nii.gz")
    assert message in str(error.value)


def test_a_brain_with_one_tissue_class_too_small_is_refused():
    image = np.where(phantom(0.0) != 0, WM, 0.0)
    image[48, 40, 40:45] = GM  # a few dark voxels: no grey matter to measure
    image[48, 41, 40:45] = CSF
    with pytest.raises(ValueError, match=r"^scan: too few voxels in tissue class gm \(5\), csf \(5\) \(at least"):
        iqm.tissues(image, image != 0, name="scan")
    assert {k: v.size for k, v in iqm.tissues(phantom(10.0), phantom(10.0) != 0).items()}.keys() == {"gm", "wm", "csf"}
