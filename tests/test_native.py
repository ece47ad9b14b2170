"""Native scans in ``run inference`` (``preprocess``: auto | on | off, issue 25 item 1): a scan with scalp, rotated,
on a 0.9 mm grid, is registered to the template written by training, skull-stripped by the template's brain mask,
passes the QC measures that tell a registered scan, and its relevance maps come back on its own grid; an
atlas-space scan is left exactly as before."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, TINY, TINY_OVERRIDES, run_bundle
from native_fixtures import dice, native_input
from scipy import ndimage

from scripts.runtime.reference import TEMPLATE_IMAGE, TEMPLATE_MASK


def _rows(path) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row["subject"]: row for row in csv.DictReader(f)}


@pytest.fixture(scope="module")
def scans(tmp_path_factory, cohort):
    """Two test subjects as native scans (``native/``, with their brain masks kept aside) and as they are
    (``atlas/``)."""
    root = tmp_path_factory.mktemp("native")
    items = json.loads((cohort / "datalist.json").read_text())["test"][:2]
    rng = np.random.default_rng(5)
    masks = {}
    for item in items:
        subject = item["subject"]
        _, files = native_input(cohort, item, root, rng)
        masks[subject] = files["mask"]
        (root / "atlas").mkdir(exist_ok=True)
        shutil.copy(cohort / item["image"], root / "atlas" / f"{subject}.nii.gz")
    return root, masks


def _infer(data, out, ckpt_dir, *extra, check=True):
    return run_bundle("inference", "configs/inference.json", "--dataset_dir", str(data), "--ckpt_dir",
                      str(ckpt_dir), "--output_dir", str(out), "--lrp_presets", '["a2b1"]', *TINY, *extra,
                      check=check)


def test_training_writes_the_template(trained):
    ckpt_dir, _ = trained
    template, mask = nib.load(ckpt_dir / TEMPLATE_IMAGE), nib.load(ckpt_dir / TEMPLATE_MASK)
    # the network grid (the tests' tiny shape: a crop inside the brain)
    assert template.shape == mask.shape == (64, 48, 48)
    brain = np.asarray(mask.dataobj) > 0
    assert brain.mean() > 0.5 and np.all(np.asarray(template.dataobj)[~brain] == 0)


def test_template_command_writes_what_training_writes(tmp_path, cohort, trained):
    """``python -m scripts.data.preprocess template`` (weights from before the template; the shipped models/)
    gives the files training wrote beside its weights, voxel for voxel."""
    from scripts.data.preprocess import main

    ckpt_dir, _ = trained
    overrides = json.dumps({**TINY_OVERRIDES, "dataset_dir": str(cohort)})
    assert main(["template", "--ckpt_dir", str(tmp_path / "old"), "--override", overrides]) == 0
    for name in (TEMPLATE_IMAGE, TEMPLATE_MASK):
        written, trained_with = nib.load(tmp_path / "old" / name), nib.load(ckpt_dir / name)
        np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(trained_with.dataobj))
        np.testing.assert_allclose(written.affine, trained_with.affine)


def test_native_scan_is_registered_and_its_maps_come_back_on_its_grid(tmp_path, scans, trained):
    root, masks = scans
    ckpt_dir, _ = trained
    proc = _infer(root / "native", tmp_path / "auto", ckpt_dir)
    off = _infer(root / "native", tmp_path / "off", ckpt_dir, "--preprocess", "off")
    auto_rows, off_rows = _rows(tmp_path / "auto" / "relevance.csv"), _rows(tmp_path / "off" / "relevance.csv")
    for subject, mask_path in masks.items():
        assert f"{subject}.nii.gz: not registered to the template" in proc.stdout + proc.stderr
        # without preprocessing the unregistered scan is what QC says it is; registered, it is not
        assert "similarity" in off_rows[subject]["qc_failed"]
        failed = auto_rows[subject]["qc_failed"].split(";")
        assert "similarity" not in failed and "outside_brain" not in failed, auto_rows[subject]
        # the network input: the native brain (its own mask, which the app never saw) where the input is
        net = nib.load(tmp_path / "auto" / subject / f"{subject}_input.nii.gz")
        native_mask = nib.load(mask_path)
        to_mask = np.linalg.inv(native_mask.affine) @ net.affine
        coords = np.indices(net.shape).reshape(3, -1)
        coords = (to_mask[:3, :3] @ coords + to_mask[:3, 3:4]).reshape(3, *net.shape)
        brain_on_input = ndimage.map_coordinates(np.asarray(native_mask.dataobj), coords, order=0) > 0
        assert dice(np.asarray(net.dataobj) != 0, brain_on_input) > 0.9
        # the relevance map on the native scan's own grid, holding the relevance
        original = nib.load(tmp_path / "auto" / subject / f"{subject}_relevance_a2b1_orig.nii.gz")
        native = nib.load(root / "native" / f"{subject}.nii.gz")
        assert original.shape == native.shape
        np.testing.assert_allclose(original.affine, native.affine, atol=1e-4)
        assert np.abs(np.asarray(original.dataobj)).sum() > 0
        assert not (tmp_path / "off" / subject / f"{subject}_relevance_a2b1_orig.nii.gz").exists()
    assert off.returncode == 0


def test_atlas_scan_is_left_as_it_was(tmp_path, scans, trained):
    root, masks = scans
    ckpt_dir, _ = trained
    proc = _infer(root / "atlas", tmp_path / "auto", ckpt_dir)
    _infer(root / "atlas", tmp_path / "off", ckpt_dir, "--preprocess", "off")
    assert "not registered to the template" not in proc.stdout + proc.stderr
    auto, off = _rows(tmp_path / "auto" / "predictions.csv"), _rows(tmp_path / "off" / "predictions.csv")
    for subject in masks:
        assert auto[subject]["prob_preterm"] == off[subject]["prob_preterm"]
        assert not (tmp_path / "auto" / subject / f"{subject}_relevance_a2b1_orig.nii.gz").exists()


def test_preprocess_on_without_template_and_bad_value_are_one_line_errors(tmp_path, scans, trained):
    root, _ = scans
    ckpt_dir, _ = trained
    bare = tmp_path / "models"
    shutil.copytree(ckpt_dir, bare, ignore=shutil.ignore_patterns("template_*"))
    proc = _infer(root / "native", tmp_path / "out", bare, "--preprocess", "on", check=False)
    assert proc.returncode != 0
    assert str(bare / TEMPLATE_IMAGE) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "predictions.csv").exists()
    proc = _infer(root / "native", tmp_path / "out2", ckpt_dir, "--preprocess", "maybe", check=False)
    assert proc.returncode != 0 and "'preprocess'" in proc.stderr and "Traceback" not in proc.stderr
    shipped = ROOT / "models"  # the shipped template is for 128x96x96, the tiny network's input is smaller
    proc = _infer(root / "native", tmp_path / "out3", shipped, "--preprocess", "on", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"registration template in {shipped} does not fit config key 'spatial_shape'" in proc.stderr
    assert not (tmp_path / "out3" / "predictions.csv").exists()


def test_registration_is_the_same_on_every_run(scans, trained):
    """Seeded metric sampling (not SimpleITK's wall-clock seed 0) and one thread: identical transforms, so that
    a native scan's relevance maps are identical on reruns."""
    from scripts.runtime.registration import affine_to_template

    root, masks = scans
    ckpt_dir, _ = trained
    template, mask = nib.load(ckpt_dir / TEMPLATE_IMAGE), nib.load(ckpt_dir / TEMPLATE_MASK)
    scan = nib.load(root / "native" / f"{next(iter(masks))}.nii.gz")
    first, second = (affine_to_template(template.get_fdata(), template.affine, mask.get_fdata(), scan.get_fdata(),
                                        scan.affine) for _ in range(2))
    np.testing.assert_array_equal(first, second)


def test_a_scan_registration_cannot_rescue_is_refused_by_qc_and_the_batch_goes_on(tmp_path, scans, trained):
    """Something that is no neonatal head (a small bright cube in an empty 0.9 mm volume) is registered as well as
    it can be; QC on the registered input names it, ``refuse`` writes nothing for it, and the native scan beside
    it is predicted (exit status 3: not every input got a prediction)."""
    root, masks = scans
    ckpt_dir, _ = trained
    good = next(iter(masks))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(root / "native" / f"{good}.nii.gz", inputs)
    affine = np.diag([0.9, 0.9, 0.9, 1.0])
    affine[:3, 3] = -50.0
    volume = np.zeros((120, 120, 120), np.float32)
    volume[10:14, 10:14, 10:14] = np.random.default_rng(0).uniform(400, 600, (4, 4, 4))  # not constant: a scan
    nib.save(nib.Nifti1Image(volume, affine), inputs / "sub-cube.nii.gz")
    out = tmp_path / "out"
    proc = _infer(inputs, out, ckpt_dir, "--qc", "refuse", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert set(_rows(out / "predictions.csv")) == {good}
    skipped = _rows(out / "skipped.csv")
    assert set(skipped) == {"sub-cube"} and skipped["sub-cube"]["reason"].startswith("input QC failed")
    assert not (out / "sub-cube").exists() and (out / good).is_dir()


def test_grid_checks_name_the_problem_before_touching_the_template():
    """A wrong number of sizes is reported as such (not as a template mismatch); the QC reference refuses an input of
    another grid with the same rule as Template.check_grid (QCReference.fits)."""
    from scripts.runtime.reference import Template
    from scripts.runtime.transforms import CentredGridd

    shipped = ROOT / "models"
    with pytest.raises(ValueError, match="need 3 values"):
        CentredGridd("image", pixdim=[1.0, 1.0, 1.0], spatial_size=[128, 96], preprocess="on", template_dir=shipped)
    reference = Template(shipped).require().reference
    assert reference.fits([128, 96, 96]) and not reference.fits([64, 48, 48])
    with pytest.raises(ValueError, match=r"does not fit an input of shape \(64, 48, 48\)"):
        reference.registration_scores(np.zeros((64, 48, 48), np.float32))
    assert set(reference.registration_scores(np.ones((128, 96, 96), np.float32))) == {"similarity", "outside_brain"}
