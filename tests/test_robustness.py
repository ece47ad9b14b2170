"""Robustness to the grids real scans come on (issue 24, item 3): the ``robustness`` command's table, the
deployed preprocessing putting a scan on another grid exactly where the scan on the template grid lands (no
voxel shift, no dim rim around the brain)."""

from __future__ import annotations

import csv
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_OVERRIDES, read_json
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    GaussianSmoothd,
    LoadImaged,
    Orientationd,
    ResizeWithPadOrCropd,
    Spacingd,
)

from scripts.evaluation import robustness
from scripts.runtime.normalisation import Normalisedd
from scripts.runtime.outputs import save_nifti
from scripts.runtime.transforms import MaskedGaussianSmoothd, RandAcquiredGridd

GRIDS = {"0.7 mm": (0.7, 0.7, 0.7), "0.8 mm": (0.8, 0.8, 0.8), "1.2 mm": (1.2, 1.2, 1.2),
         "0.8x0.8x2 mm": (0.8, 0.8, 2.0)}


def _preprocessing(config: str = "inference.json", key: str = "preprocessing", overlays: tuple = (), **overrides):
    """``key`` of ``configs/<config>`` (with ``overlays``, further config files read on top of it), parsed."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / config), *map(str, overlays)])
    parser.update({"bundle_root": str(ROOT), "device": "$torch.device('cpu')", **overrides})
    return parser.get_parsed_content(key)


def _old_preprocessing(spatial_shape=(128, 96, 96), normalise: bool = True):
    """The preprocessing before the fix: Spacingd anchored at the first voxel, then a centred cut or pad; the
    normalisation is inference.json's (``zscore`` was MONAI's ``NormalizeIntensityd(nonzero=True)``, tested equal
    in tests/test_normalisation.py)."""
    method = read_json(ROOT / "configs" / "inference.json")["normalisation"]
    return Compose([LoadImaged("image", reader="NibabelReader", image_only=True), EnsureChannelFirstd("image"),
                    Orientationd("image", axcodes="ALS", labels=None),
                    Spacingd("image", pixdim=(1.0, 1.0, 1.0), mode="bilinear"),
                    *([Normalisedd("image", method=method)] if normalise else []),
                    ResizeWithPadOrCropd("image", spatial_size=spatial_shape),
                    EnsureTyped("image", dtype=torch.float32, track_meta=True)])


@pytest.fixture(scope="module")
def scan(cohort):
    return str(cohort / read_json(cohort / "datalist.json")["test"][0]["image"])


def test_command_writes_the_table_with_every_perturbation(tmp_path, cohort, trained):
    ckpt_dir, _ = trained
    out = tmp_path / "out"
    args = ["--datalist", str(cohort / "datalist.json"), "--ckpt_dir", str(ckpt_dir), "--limit", "2",
            "--override", json.dumps(TINY_OVERRIDES), "--output", str(out), "--work_dir", str(tmp_path / "work")]
    assert robustness.main(args) == 0
    text = (out / "robustness.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == list(robustness.PERTURBATIONS)  # the header, then one row per perturbation, in order
    assert "python -m scripts.evaluation.robustness --datalist" in text
    sha = hashlib.sha256((ckpt_dir / "model.pt").read_bytes()).hexdigest()[:12]
    assert f"sha256 `{sha}`" in text and str(ckpt_dir / "model.pt") in text
    subjects = [item["subject"] for item in read_json(cohort / "datalist.json")["test"][:2]]
    assert all(s in text for s in subjects)
    table = list(csv.DictReader((out / "robustness.csv").open()))
    assert len(table) == 2 * len(robustness.PERTURBATIONS)
    assert {r["subject"] for r in table} == set(subjects)
    control = [r for r in table if r["perturbation"] == "reoriented"]
    assert all(r["axcodes"] == "RAS" and abs(float(r["delta"])) < 1e-5 for r in control)  # orientation alone: no change
    written = {r["perturbation"]: r for r in table if r["subject"] == subjects[0]}
    assert written["resampled_0.8x0.8x2mm"]["voxel_mm"] == "0.8x0.8x2"
    image = nib.load(tmp_path / "work" / "inputs" / f"{subjects[0]}__resampled_0.7mm.nii.gz")
    assert np.allclose(nib.affines.voxel_sizes(image.affine), 0.7) and nib.aff2axcodes(image.affine) == tuple("RAS")


def test_fresh_cohort_refuses_the_default_seed(tmp_path):
    with pytest.raises(ValueError, match="default cohort"):
        robustness.fresh_cohort(tmp_path, 0, 8)


@pytest.mark.parametrize("grid", list(GRIDS))
def test_a_scan_on_another_grid_lands_where_the_template_grid_scan_does(scan, tmp_path, grid):
    """The same scan written on another grid (same field of view, RAS) goes through the deployed preprocessing onto
    the same network grid (same affine), with its brain where it was (centroid within 0.1 voxel) and as many brain
    voxels (no partial-volume rim, which NormalizeIntensityd(nonzero=True) would count as brain). Before the fix
    (Spacingd + ResizeWithPadOrCropd) 0.8x0.8x2 mm landed 0.5 mm off with the brain 0.8 voxel lower, and every grid
    added 3-7 % dim rim voxels."""
    preprocessing = _preprocessing()
    reference = preprocessing({"image": scan})["image"]
    image = nib.load(scan)
    data, affine = robustness.resample_scan(np.asarray(image.dataobj, dtype=np.float32), image.affine, GRIDS[grid])
    path = save_nifti(data, affine, tmp_path / "resampled.nii.gz")
    moved = preprocessing({"image": str(path)})["image"]
    assert moved.shape == reference.shape
    np.testing.assert_allclose(np.asarray(moved.affine), np.asarray(reference.affine), atol=1e-3)
    shift = robustness.centroid(moved) - robustness.centroid(reference)
    assert np.abs(shift).max() < 0.1, f"{grid}: brain moved by {shift} voxels"
    brain, brain_ref = int((moved != 0).sum()), int((reference != 0).sum())
    assert abs(brain - brain_ref) < 0.01 * brain_ref, f"{grid}: {brain} brain voxels, {brain_ref} on the template grid"


@pytest.mark.parametrize("pad", [(0, 0, 0), (1, 2, 0), (3, 0, 1)])
def test_a_scan_on_the_network_voxel_size_is_cut_or_padded_as_before(scan, tmp_path, pad):
    """On 1 mm voxels the new resampling is the old centred cut or pad, also for array sizes whose parity differs
    from the grid's: the same voxels. Where the brain fits the grid (the default 128x96x96) the whole network input
    is the same bit for bit, so the shipped weights see what they were trained on; a grid that cuts into the brain
    (the tests' 64x48x48) is now normalised over the brain it keeps (the old order normalised before cutting)."""
    image = nib.load(scan)
    data = np.pad(np.asarray(image.dataobj, dtype=np.float32), [(p, 0) for p in pad])
    affine = image.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.asarray(pad, dtype=float)
    path = save_nifti(data, affine, tmp_path / "padded.nii.gz")
    for shape in ((128, 96, 96), (64, 48, 48), (130, 97, 95)):
        spatial = Compose(_preprocessing("train.json", "spatial_transforms", spatial_shape=list(shape)))
        new = spatial({"image": str(path)})["image"]
        old = _old_preprocessing(shape, normalise=False)({"image": str(path)})["image"]
        assert torch.equal(new.as_tensor(), old.as_tensor())
        np.testing.assert_allclose(np.asarray(new.affine), np.asarray(old.affine), atol=1e-6)
    # the input as given (preprocess off): under auto, the white-peak template's similarity threshold judges the
    # brain of the odd pad, 1.5 and 0.5 voxels off centre, as not registered, and registers it
    new = _preprocessing(preprocess="off")({"image": str(path)})["image"]
    assert torch.equal(new.as_tensor(), _old_preprocessing()({"image": str(path)})["image"].as_tensor())


def test_label_maps_follow_the_image_grid(cohort):
    item = {k: str(cohort / v) for k, v in read_json(cohort / "datalist.json")["test"][0].items()
            if k in ("image", "tissue")}
    image = _preprocessing()({"image": item["image"]})["image"]
    tissue = _preprocessing(key="label_preprocessing")({"tissue": item["tissue"]})["tissue"]
    assert tissue.shape == image.shape and np.allclose(np.asarray(tissue.affine), np.asarray(image.affine))
    assert set(np.unique(tissue.numpy())) <= set(range(10))  # nearest neighbour: labels only


def test_training_caches_the_resampling_before_the_random_transforms():
    """The cached part ends with the scan on the network grid and its copy (the consistency view); the view is
    acquired on another grid before both are normalised, so that the normalisation sees what inference would see."""
    steps = [type(t).__name__ for t in _preprocessing("train.json", "train#preprocessing").transforms]
    first_random = steps.index("RandFlipd")
    assert steps[:first_random] == ["LoadImaged", "EnsureChannelFirstd", "Orientationd", "CentredGridd", "EnsureTyped",
                                    "CopyItemsd"]
    assert steps.index("RandAcquiredGridd") < steps.index("Normalisedd") < steps.index("RandScaleIntensityd")


@pytest.mark.parametrize("voxel", [0.7, 0.8, 1.2])
def test_the_brain_edge_is_not_darkened_by_the_resampling(tmp_path, voxel):
    """Normalised interpolation in CentredGridd (mask_nonzero): a skull-stripped brain of one intensity keeps that
    intensity up to its edge on the network grid. Plain bilinear interpolation mixes the zeros around the brain
    into its outer voxels, a darker edge that a network reading the outer CSF takes for less CSF."""
    shape = np.round(np.array([150, 110, 110]) / voxel).astype(int)
    centre = (shape - 1) / 2.0
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1) * voxel
    inside = (((grid - centre * voxel) / np.array([50.0, 40.0, 38.0])) ** 2).sum(-1) <= 1.0
    data = np.where(inside, 700.0, 0.0).astype(np.float32)
    path = save_nifti(data, np.diag([voxel, voxel, voxel, 1.0]), tmp_path / "brain.nii.gz")
    spatial = Compose(_preprocessing("train.json", "spatial_transforms"))
    moved = spatial({"image": str(path)})["image"][0].numpy()
    brain = moved[moved != 0]
    assert brain.size > 100_000
    np.testing.assert_allclose(brain, 700.0, rtol=1e-4)
    plain = _old_preprocessing(normalise=False)({"image": str(path)})["image"][0].numpy()
    assert plain[plain != 0].min() < 0.9 * 700.0  # what the edge looked like before


@pytest.mark.parametrize("seed", [0, 2, 4, 6])  # erosions 0.60, 0.97; dilations 0.55, 0.82
def test_mask_jitter_moves_only_the_brain_edge(seed):
    """RandMaskJitterd (the augmentation of docs/experiments/augment_mask_jitter.json): an erosion removes only
    voxels of the brain's inner edge, a dilation adds only voxels of its outer edge, each with the mean of its brain
    neighbours; every other voxel keeps its value, and the same seed gives the same image."""
    from scipy import ndimage  # noqa: PLC0415

    from scripts.runtime.transforms import RandMaskJitterd  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    data = np.zeros((24, 20, 22), np.float32)
    data[4:20, 5:16, 3:19] = rng.uniform(1.0, 2.0, (16, 11, 16))
    image = torch.as_tensor(data[None])
    jitter = RandMaskJitterd("image", prob=1.0, max_fraction=1.0)
    out = jitter.set_random_state(seed)({"image": image})["image"][0].numpy()
    again = RandMaskJitterd("image", prob=1.0, max_fraction=1.0).set_random_state(seed)({"image": image})["image"]
    np.testing.assert_array_equal(again[0].numpy(), out)
    brain, moved = data != 0, out != 0
    changed = brain != moved
    faces = ndimage.generate_binary_structure(3, 1)
    edge = (ndimage.binary_dilation(brain, faces) & ~brain) if jitter._dilate else \
        (brain & ~ndimage.binary_erosion(brain, faces))
    n, fraction = edge.sum(), jitter._fraction  # each edge voxel flips with probability `fraction`
    assert abs(changed.sum() - n * fraction) <= 5 * np.sqrt(n * fraction * (1 - fraction)) + 1
    if jitter._dilate:
        assert not (brain & ~moved).any()
        assert (changed <= edge).all()
        sums = ndimage.convolve(data, np.ones((3, 3, 3)), mode="constant")
        counts = ndimage.convolve(brain.astype(float), np.ones((3, 3, 3)), mode="constant")
        np.testing.assert_allclose(out[changed], (sums / np.maximum(counts, 1))[changed], rtol=1e-5)
    else:
        assert not (moved & ~brain).any()
        assert (changed <= edge).all()
    np.testing.assert_array_equal(out[moved & brain], data[moved & brain])
    assert RandMaskJitterd("image", prob=0.0)({"image": image})["image"] is image
    meta = MetaTensor(image, affine=torch.diag(torch.tensor([0.5, 0.5, 2.0, 1.0], dtype=torch.float64)))
    jittered = RandMaskJitterd("image", prob=1.0, max_fraction=1.0).set_random_state(seed)({"image": meta})["image"]
    assert isinstance(jittered, MetaTensor)
    np.testing.assert_array_equal(jittered.as_tensor()[0].numpy(), out)
    assert torch.equal(jittered.affine, meta.affine)


@pytest.mark.parametrize("grid", list(GRIDS))
def test_acquired_grid_augmentation_is_the_scan_acquired_on_that_grid(scan, tmp_path, grid):
    """RandAcquiredGridd gives the network the same input (before the z-score) as the same scan acquired on that grid,
    written as a NIfTI by the robustness command and read back through the training's own spatial steps."""
    spatial = Compose(_preprocessing("train.json", "spatial_transforms"))
    reference = spatial({"image": scan})["image"]
    image = nib.load(scan)
    data, affine = robustness.resample_scan(np.asarray(image.dataobj, dtype=np.float32), image.affine, GRIDS[grid])
    expected = spatial({"image": str(save_nifti(data, affine, tmp_path / "acquired.nii.gz"))})["image"]
    inplane, slices = GRIDS[grid][0], GRIDS[grid][2]  # R-L = A-P here; S-I is the array's last axis in ALS
    augment = RandAcquiredGridd("image", pixdim=(1.0, 1.0, 1.0), spatial_size=reference.shape[1:], prob=1.0,
                                iso_range=(inplane, inplane), thick_prob=float(slices != inplane),
                                inplane_range=(inplane, inplane), thick_range=(slices, slices), thick_axes=(2,))
    out = augment.set_random_state(0)({"image": reference})["image"]
    assert augment._spacing == (inplane, inplane, slices)
    assert isinstance(out, MetaTensor) and out.shape == reference.shape
    assert torch.equal(out.affine, reference.affine)  # back on the network grid
    scale = float(reference.abs().max())
    np.testing.assert_allclose(out.as_tensor().numpy(), expected.as_tensor().numpy(), atol=1e-4 * scale)
    assert not torch.equal(out.as_tensor(), reference.as_tensor())


def test_acquired_grid_augmentation_draws_reproducibly_within_its_ranges(scan):
    reference = Compose(_preprocessing("train.json", "spatial_transforms"))({"image": scan})["image"]
    assert RandAcquiredGridd("image", (1.0, 1.0, 1.0), reference.shape[1:], prob=0.0)({"image": reference})[
        "image"] is reference
    draws = []
    for seed in range(12):
        augment = RandAcquiredGridd("image", (1.0, 1.0, 1.0), reference.shape[1:], prob=1.0).set_random_state(seed)
        augment.randomize()
        draws.append(augment._spacing)
        again = RandAcquiredGridd("image", (1.0, 1.0, 1.0), reference.shape[1:], prob=1.0).set_random_state(seed)
        again.randomize()
        assert again._spacing == augment._spacing
    thick = [d for d in draws if max(d) >= 1.5]
    iso = [d for d in draws if max(d) < 1.5]
    assert thick and iso, draws
    assert all(len(set(d)) == 1 and 0.6 <= d[0] <= 1.4 for d in iso)
    assert all(sorted(d)[0] == sorted(d)[1] and 0.6 <= sorted(d)[0] <= 1.1 and max(d) <= 3.0 for d in thick)
    assert len({int(np.argmax(d)) for d in thick}) > 1  # slices along more than one axis
    with pytest.raises(ValueError, match="thick_range"):
        RandAcquiredGridd("image", (1.0, 1.0, 1.0), (8, 8, 8), thick_range=(3.0, 1.5))


def test_masked_smoothing_keeps_the_brain_edge_and_the_background():
    """MaskedGaussianSmoothd (docs/experiments/harmonise_masked.json): a brain of one intensity keeps it up to its
    edge (plain Gaussian smoothing darkens the edge with the zeros around it), the background stays 0, and inside
    a two-intensity brain the step between them is smoothed."""
    image = torch.zeros((1, 24, 20, 20))
    image[:, 4:20, 4:16, 4:16] = 5.0
    meta = MetaTensor(image.clone(), affine=torch.diag(torch.tensor([0.8, 0.8, 2.0, 1.0], dtype=torch.float64)))
    out = MaskedGaussianSmoothd("image", sigma=1.0)({"image": meta})["image"]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, meta.affine)
    brain = image != 0
    np.testing.assert_allclose(out.as_tensor()[brain].numpy(), 5.0, rtol=1e-5)
    assert torch.count_nonzero(out.as_tensor()[~brain]) == 0
    plain = GaussianSmoothd("image", sigma=1.0)({"image": image.clone()})["image"]
    assert float(plain[brain].min()) < 3.0  # the plain smoothing's darkened edge, for contrast
    image[:, 12:20, 4:16, 4:16] = 9.0
    out = MaskedGaussianSmoothd("image", sigma=1.0)({"image": image})["image"]
    assert 5.0 < float(out[0, 11, 10, 10]) < 9.0 and 5.0 < float(out[0, 12, 10, 10]) < 9.0
    assert torch.count_nonzero(out[~brain]) == 0


@pytest.mark.parametrize("overlay", sorted(p.name for p in (ROOT / "docs" / "experiments").glob("*.json")
                                           if not p.name.endswith("_inference.json")))
def test_the_recorded_experiments_still_parse(overlay):
    """docs/experiments/README.md's experiments are commands on train.json + an overlay: each overlay still builds
    the training preprocessing, its random steps after the cached ones, and names the trainer, loss and checkpoint
    rule it was measured with (with ``best``, also its tie rule), so that it reproduces on a later train.json
    (consistency training and the ``last`` checkpoint became the defaults after most of them)."""
    overlay_file = ROOT / "docs" / "experiments" / overlay
    content = json.loads(overlay_file.read_text())
    assert {"train#preprocessing#transforms", "train#trainer#_target_", "train#trainer#loss_function",
            "checkpoint"} <= set(content)
    assert content["checkpoint"] in ("best", "last")
    if content["checkpoint"] == "best":
        assert "validate#best_saver#key_metric_greater_or_equal" in content
    preprocessing = _preprocessing("train.json", "train#preprocessing", overlays=(overlay_file,))
    steps = [type(t).__name__ for t in preprocessing.transforms]
    assert steps[:5] == ["LoadImaged", "EnsureChannelFirstd", "Orientationd", "CentredGridd", "EnsureTyped"]
    first_random = steps.index("RandFlipd")
    assert not any(step.startswith("Rand") for step in steps[:first_random])
    assert "Normalisedd" in steps  # cached before the random steps, or redone after them
