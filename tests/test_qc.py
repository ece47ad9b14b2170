"""Input quality control: the reference training writes next to the weights, the verdicts ``run inference`` gives
on test subjects and on corrupted variants of them (voxel array changed, header unchanged), the ``refuse``
policy, weights trained before QC existed, and what a failure tells the user to do (a native scan: the
preprocessing command it gives, run as given, makes the scan pass)."""

from __future__ import annotations

import csv
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, TINY_OVERRIDES, run_bundle, tiny_args
from monai.bundle import ConfigParser
from native_fixtures import native_datalist, write_template

from scripts.evaluation.qc_eval import CORRUPTIONS, write_variants
from scripts.runtime.datalist import load_split
from scripts.runtime.outputs import report_index, report_page
from scripts.runtime.qc import advice, evaluate_input
from scripts.runtime.reference import (
    INTENSITY_EROSION,
    MEAN_IMAGE,
    MEASURES,
    REFERENCE,
    REGION,
    TEMPLATE_IMAGE,
    TEMPLATE_MASK,
    QCReference,
    fingerprint,
    intensity_stats,
)


def _rows(path: Path) -> dict[str, dict]:
    return {r["subject"]: r for r in csv.DictReader(path.open())} if path.is_file() else {}


def _network(ckpt_dir: Path):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), **TINY_OVERRIDES, "ckpt_dir": str(ckpt_dir), "preprocess": "off",
                   "device": "$torch.device('cpu')"})  # the input as given, as the inference runs below take it
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(ckpt_dir / "model.pt", weights_only=True))
    return network.eval(), parser.get_parsed_content("preprocessing")


@pytest.fixture(scope="module")
def variants(tmp_path_factory, cohort):
    items = load_split(str(cohort / "datalist.json"), "test", -1)
    folder = tmp_path_factory.mktemp("qc_inputs")
    return folder, write_variants(items, folder)


def test_training_writes_a_reference_that_round_trips(trained, tmp_path):
    ckpt_dir, _ = trained
    reference = QCReference.load(ckpt_dir)
    assert reference is not None, "training wrote no QC reference next to model.pt"
    network, _ = _network(ckpt_dir)
    assert reference.fingerprint == fingerprint(network)
    for m in MEASURES:  # threshold = training maximum x margin, no training subject above it by construction
        assert reference.thresholds[m] == pytest.approx(reference.training_max[m] * reference.margins[m])
        assert reference.margins[m] >= 1
    reference.save(tmp_path)
    again = QCReference.load(tmp_path)
    np.testing.assert_array_equal(again.mean_image, reference.mean_image)
    np.testing.assert_array_equal(again.region, reference.region)
    np.testing.assert_allclose(again.precision, reference.precision)
    assert again.thresholds == reference.thresholds and again.fingerprint == reference.fingerprint
    # the weights' normalisation (train.json's key), which inference checks (tests/test_normalisation.py)
    normalisation = json.loads((ROOT / "configs" / "train.json").read_text())["normalisation"]
    assert json.loads((ckpt_dir / REFERENCE).read_text())["normalisation"] == normalisation == again.normalisation
    # the intensity measure's interior, recorded; a reference written before it read with the whole brain
    assert again.intensity_erosion == INTENSITY_EROSION == json.loads((ckpt_dir / REFERENCE).read_text())[
        "intensity_erosion"]
    # the policy changes by editing the JSON, without retraining
    content = json.loads((tmp_path / REFERENCE).read_text())
    content["thresholds"]["similarity"] = 0.0
    (tmp_path / REFERENCE).write_text(json.dumps(content))
    assert QCReference.load(tmp_path).verdict({**dict.fromkeys(MEASURES, 0.0), "similarity": 0.01}) == (
        False, ["similarity"])
    del content["intensity_erosion"]
    (tmp_path / REFERENCE).write_text(json.dumps(content))
    assert QCReference.load(tmp_path).intensity_erosion == 0


def test_run_id_qc_reference_rebuilds_what_training_wrote(tmp_path, cohort, trained):
    """``run qc_reference`` (train.json) on weights alone writes the QC reference and the registration template that
    training wrote beside them, the same statistics and thresholds and the same images."""
    ckpt_dir, _ = trained
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(ckpt_dir / "model.pt", models)
    run_bundle("qc_reference", "configs/train.json", "--dataset_dir", str(cohort), "--ckpt_dir", str(models), *TINY)
    assert json.loads((models / REFERENCE).read_text()) == json.loads((ckpt_dir / REFERENCE).read_text())
    for name in (MEAN_IMAGE, REGION, TEMPLATE_IMAGE, TEMPLATE_MASK):
        np.testing.assert_array_equal(np.asarray(nib.load(models / name).dataobj),
                                      np.asarray(nib.load(ckpt_dir / name).dataobj), err_msg=name)


def test_the_intensity_statistics_are_the_brain_interiors():
    """A hand-made brain (three tissues in an ellipsoid) whose two outer voxel layers are dimmed, as partial volume
    with the background dims them after a resampling: the interior's statistics are exactly the undimmed brain's,
    the whole brain's 1st percentile drops; ``erosion=0`` reads every non-zero voxel."""
    from scipy import ndimage

    grid = np.mgrid[:40, :32, :32].astype(np.float32)
    radius = np.sqrt(((grid[0] - 20) / 16) ** 2 + ((grid[1] - 16) / 12) ** 2 + ((grid[2] - 16) / 12) ** 2)
    brain = radius < 1
    volume = np.where(radius < 0.4, 1.6, np.where(radius < 0.7, 1.0, 0.6)).astype(np.float32) * brain
    volume += 0.01 * np.random.default_rng(0).standard_normal(volume.shape).astype(np.float32) * brain
    edge = brain & ~ndimage.binary_erosion(brain, iterations=INTENSITY_EROSION)
    dimmed = np.where(edge, 0.1 * volume, volume)
    np.testing.assert_array_equal(intensity_stats(dimmed), intensity_stats(volume))
    assert intensity_stats(dimmed, 0)[1] < 0.5 * intensity_stats(volume, 0)[1]
    values = volume[brain].astype(np.float64)
    np.testing.assert_allclose(intensity_stats(volume, 0)[1:], np.percentile(values, [1, 99]))
    assert not intensity_stats(np.zeros_like(volume)).any()  # an empty input


def test_shipped_qc_passes_resampled_scans_and_fails_an_inverted_one(tmp_path, cohort):
    """The shipped weights' QC on the deployed path (``robustness.Measurer``, as docs/results/robustness.md
    measures it): a test scan resampled onto another grid (1.2 mm; 0.8 mm leaving a dim rim at the brain's edge, as
    a user's tool writes it) passes the intensity measure; the same scan with its contrast inverted fails it."""
    from scripts.evaluation.robustness import Measurer, perturb

    measurer = Measurer(ROOT / "models")
    reference = measurer.qc
    assert reference.intensity_erosion == INTENSITY_EROSION  # the shipped reference reads the interior
    rng = np.random.default_rng(0)
    for item in load_split(str(cohort / "datalist.json"), "test", -1)[:3]:
        image = nib.load(item["image"])
        data = np.asarray(image.dataobj, dtype=np.float32)
        for name in ("resampled_1.2mm", "resampled_0.8mm_rim", "inverted"):
            if name == "inverted":
                array, affine = CORRUPTIONS[name](data, image.affine, rng), image.affine
            else:
                array, affine = perturb(name, data, image.affine, rng)
            path = tmp_path / f"{Path(item['image']).name.split('.')[0]}__{name}.nii.gz"
            nib.save(nib.Nifti1Image(array, affine), str(path))
            score = evaluate_input(reference, measurer.network, measurer.input(path))["scores"]["intensity"]
            assert (score > reference.thresholds["intensity"]) == (name == "inverted"), (path, score)


def test_flag_passes_the_test_split_and_flags_every_corruption(tmp_path, variants, trained):
    folder, records = variants
    ckpt_dir, _ = trained
    out = tmp_path / "out"
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(folder), "--ckpt_dir",
                      str(ckpt_dir), "--output_dir", str(out), "--lrp_presets", "['a2b1']", "--skip_bad", "true",
                      "--save_input", "false", "--preprocess", "off", *TINY, check=False)
    predictions, skipped = _rows(out / "predictions.csv"), _rows(out / "skipped.csv")
    assert proc.returncode == (3 if skipped else 0), proc.stderr[-3000:]  # skip_bad: 3 when an input was skipped
    relevance = _rows(out / "relevance.csv")
    log = proc.stdout + proc.stderr
    for record in records:
        subject, corruption = record["subject"], record["corruption"]
        if corruption == "none":
            assert predictions[subject]["qc_pass"] == "true", (subject, predictions[subject])
            assert predictions[subject]["qc_advice"] == ""
            continue
        if subject in skipped:  # refused before QC by the input checks: the tiny network's small field of view; a
            # constant volume, on which no intensity normalisation is defined
            reason = skipped[subject]["reason"]
            assert (corruption, True) in (("upsampled_2x", "field of view" in reason),
                                          ("constant", "a constant image, not a scan" in reason)), (corruption, reason)
            continue
        row = predictions[subject]
        assert row["qc_pass"] == "false", (corruption, row)
        failed = row["qc_failed"].split(";")
        assert failed and set(failed) <= set(MEASURES), row
        assert all(float(row[f"qc_{m}"]) >= 0 for m in MEASURES)
        assert relevance[subject]["qc_pass"] == "false" and relevance[subject]["qc_failed"] == row["qc_failed"]
        assert f"{record['image']}: input QC failed: {failed[0]}" in log  # one warning naming file and measure
        # what to do, in the warning and both tables
        assert row["qc_advice"] == advice(failed, record["image"]) and row["qc_advice"].startswith("What to do: ")
        assert relevance[subject]["qc_advice"] == row["qc_advice"] and row["qc_advice"] in log
    assert {r["corruption"] for r in records} == {"none", *CORRUPTIONS}


def test_qc_itself_flags_the_array_not_resampled_to_1mm(variants, trained):
    """The upsampled variant is refused earlier by the field-of-view check at the tiny test size; QC on its
    network input flags it too (at the default size the field-of-view check lets it through)."""
    folder, records = variants
    ckpt_dir, _ = trained
    network, preprocessing = _network(ckpt_dir)
    reference = QCReference.load(ckpt_dir)
    for record in records:
        if record["corruption"] in ("upsampled_2x", "none"):
            verdict = evaluate_input(reference, network, preprocessing({"image": record["image"]})["image"])
            assert verdict["pass"] == (record["corruption"] == "none"), (record, verdict)


def test_refuse_writes_nothing_for_a_flagged_subject_and_goes_on(tmp_path, variants, trained):
    folder, records = variants
    ckpt_dir, _ = trained
    chosen = [r for r in records if r["corruption"] in ("none", "noise", "shifted_20mm")][:6]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for record in chosen:
        shutil.copy(record["image"], inputs)
    out = tmp_path / "out"
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(inputs), "--ckpt_dir",
                      str(ckpt_dir), "--output_dir", str(out), "--lrp_presets", "['a2b1']", "--qc", "refuse",
                      "--preprocess", "off", *TINY, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]  # the run goes on; its status says some were refused
    predictions, skipped = _rows(out / "predictions.csv"), _rows(out / "skipped.csv")
    good = {r["subject"] for r in chosen if r["corruption"] == "none"}
    bad = {r["subject"] for r in chosen} - good
    assert good and bad
    assert set(predictions) == good and set(_rows(out / "relevance.csv")) == good
    assert set(skipped) == bad and all(skipped[s]["reason"].startswith("input QC failed") for s in bad)
    assert all((out / s).is_dir() for s in good) and not any((out / s).exists() for s in bad)


def test_weights_without_a_reference_run_with_qc_off(tmp_path, cohort, trained):
    ckpt_dir, _ = trained
    old = tmp_path / "models"
    old.mkdir()
    shutil.copy(ckpt_dir / "model.pt", old)
    out = tmp_path / "out"
    # weights from before QC are z-score weights (no record: scripts/runtime/normalisation.py), run as the refusal
    # of the default white_peak tells their user to
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(cohort), "--ckpt_dir", str(old),
                      "--output_dir", str(out), "--lrp_presets", "['a2b1']", "--normalisation", "zscore", *TINY)
    notices = [line for line in (proc.stdout + proc.stderr).splitlines() if "no QC reference" in line]
    assert len(notices) == 1 and "input QC is off" in notices[0]
    assert all(r["qc_pass"] == "" for r in _rows(out / "predictions.csv").values())


def test_bad_policy_names_the_key(tmp_path, cohort, trained):
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(cohort), "--ckpt_dir",
                      str(trained[0]), "--output_dir", str(tmp_path), "--qc", "maybe", *TINY, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-2] == "error: config key 'qc' must be one of ['flag', 'refuse', 'off'], " \
                                                   "got 'maybe'"


def test_advice_says_what_to_do_for_each_measure():
    """The registration measures point to the preprocessing (its command once, however many of them fail, with
    the scan's path in the datalist it reads); intensity to the contrast; the features to a review."""
    scan = "/data/new scans/sub-1_T2w.nii.gz"
    for measure in ("similarity", "outside_brain", "missing_brain"):
        text = advice([measure], scan)
        assert text.startswith("What to do: ") and "`python -m scripts.data.preprocess run --datalist native.json " \
            "--template TEMPLATE_T2w.nii.gz --template-mask TEMPLATE_mask.nii.gz --output prep`" in text, text
        assert '`{"test": [{"image": "/data/new scans/sub-1_T2w.nii.gz", "mask": "BRAIN_MASK.nii.gz"}]}`' in text
        assert "`python -m monai.bundle run inference --config_file configs/inference.json --dataset_dir prep`" in text
    everything = advice(list(MEASURES))
    assert everything.count("scripts.data.preprocess") == 1 and everything.count("Check the intensities") == 1
    assert '"image": "SCAN_T2w.nii.gz"' in everything  # no path known: a placeholder
    intensity = advice(["intensity"])
    assert "preprocess" not in intensity and all(w in intensity for w in ("T2w", "T1w", "inverted", "bias-field"))
    assert "without review" in advice(["feature_distance"]) and "preprocess" not in advice(["feature_distance"])
    assert advice([]) == ""


def test_a_native_scan_is_refused_with_the_preprocessing_that_makes_it_pass(tmp_path, cohort, trained):
    """A native scan (not registered, scalp around the brain) of a synthetic subject fails QC; the reason in
    skipped.csv, the log and the run report says to run the bundle's preprocessing and gives its commands. Run as
    given (placeholders filled in), they make the scan pass."""
    ckpt_dir, _ = trained
    template, template_mask = write_template(tmp_path / "template")
    native = json.loads(native_datalist(cohort, tmp_path / "native", ["sub-0001"], seed=1).read_text())["training"]
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = scans / Path(native[0]["image"]).name
    shutil.copy(native[0]["image"], scan)
    out = tmp_path / "out"
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(scans), "--ckpt_dir", str(ckpt_dir),
                      "--output_dir", str(out), "--lrp_presets", "['a2b1']", "--qc", "refuse", "--preprocess", "off",
                      *tiny_args(report=True), check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]  # refused: no prediction
    log = proc.stdout + proc.stderr
    (row,) = _rows(out / "skipped.csv").values()
    reason = row["reason"]
    assert row["image"] == str(scan) and reason.startswith("input QC failed: ") and "What to do: " in reason, row
    assert f"{scan} (refused): {reason}" in log and "input QC of 1 subject took" in log
    index = report_index(out).read_text()
    assert "<code>python -m scripts.data.preprocess run --datalist native.json" in index

    datalist, preprocess, predict = re.findall(r"`([^`]*)`", reason.split("What to do: ", 1)[1])
    assert json.loads(datalist) == {"test": [{"image": str(scan), "mask": "BRAIN_MASK.nii.gz"}]}
    (tmp_path / "native.json").write_text(datalist.replace("BRAIN_MASK.nii.gz", native[0]["mask"]))
    fill = {"python": sys.executable, "native.json": str(tmp_path / "native.json"), "prep": str(tmp_path / "prep"),
            "TEMPLATE_T2w.nii.gz": str(template), "TEMPLATE_mask.nii.gz": str(template_mask)}
    done = subprocess.run([fill.get(t, t) for t in shlex.split(preprocess)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    again = tmp_path / "again"
    done = subprocess.run([fill.get(t, t) for t in shlex.split(predict)] + [
        "--ckpt_dir", str(ckpt_dir), "--output_dir", str(again), "--lrp_presets", "['a2b1']", "--qc", "refuse", *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (passed,) = _rows(again / "predictions.csv").values()
    assert passed["qc_pass"] == "true" and passed["qc_advice"] == "" and not _rows(again / "skipped.csv"), passed
    assert not report_page(out, row["subject"]).exists()  # refused: no page, the index gives the reason


def test_a_brain_of_the_wrong_size_is_flagged_with_its_size_and_what_to_check(tmp_path, cohort):
    """``brain_volume`` (issue 39), with the shipped weights and network (the tiny one's template is a crop of the
    brain, to which a whole small brain does not register): a brain scaled to 0.6x its size (0.216x its volume) is
    registered by ``run inference`` with ``preprocess auto``, which scales it to the template's size, and is flagged
    by the registration's determinant; so is the same scan with a header whose voxel size is 0.6 mm instead of 1 mm.
    The reason gives the size, the advice says to check the header. The unchanged scan passes that measure."""
    from scipy import ndimage

    models = ROOT / "models"
    reference = json.loads((models / REFERENCE).read_text())
    assert reference["brain_volume_ml"] > 0 and reference["thresholds"]["brain_volume"] > 1
    source = nib.load(str(cohort / load_split(cohort / "datalist.json", "test")[0]["image"]))
    image = np.asarray(source.dataobj, dtype=np.float32)
    small = ndimage.zoom(image, 0.6, order=1)
    small[small < 0.5 * image[image > 0].min()] = 0  # the interpolated rim outside the brain stays background
    shrunk = np.zeros_like(image)
    corner = [(a - b) // 2 for a, b in zip(image.shape, small.shape, strict=True)]
    shrunk[tuple(slice(c, c + s) for c, s in zip(corner, small.shape, strict=True))] = small
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(shrunk, source.affine), str(scans / "small_T2w.nii.gz"))
    header = source.affine.copy()
    header[:3, :3] *= 0.6
    nib.save(nib.Nifti1Image(image, header), str(scans / "header_T2w.nii.gz"))
    nib.save(nib.Nifti1Image(image, source.affine), str(scans / "clean_T2w.nii.gz"))
    out = tmp_path / "out"
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(scans), "--ckpt_dir", str(models),
                      "--output_dir", str(out), "--lrp_presets", "['a2b1']", "--preprocess", "auto",
                      "--report", "false")
    rows = _rows(out / "predictions.csv")
    log = proc.stdout + proc.stderr
    for name in ("small_T2w", "header_T2w"):
        row = rows[name]
        assert f"{name}.nii.gz: not registered to the template" in log
        assert row["qc_pass"] == "false" and "brain_volume" in row["qc_failed"].split(";"), row
        assert 1 / 0.3 < float(row["qc_brain_volume"]) < 1 / 0.15, row  # 1 / 0.216 = 4.6
        assert "Check the header's voxel size" in row["qc_advice"], row
        assert re.search(rf"{name}.nii.gz: input QC failed: .*brain volume 0\.[12]\dx the training brains' median "
                         r"\(allowed 0\.\d+x-1\.\d+x\)", log), log[-3000:]
    clean = rows["clean_T2w"]
    assert "not registered" not in log.split("clean_T2w.nii.gz", 1)[-1][:100]
    assert clean["qc_pass"] == "true" and float(clean["qc_brain_volume"]) < 1.1, clean


def test_a_reference_written_before_brain_volume_loads_and_leaves_it_out(tmp_path, trained):
    """Weights whose QC reference predates ``brain_volume`` keep working: the measure is not applied (no threshold,
    no score), the others are."""
    ckpt_dir, _ = trained
    folder = tmp_path / "old"
    shutil.copytree(ckpt_dir, folder)
    content = json.loads((folder / REFERENCE).read_text())
    for key in ("margins", "training_max", "thresholds"):
        del content[key]["brain_volume"]
    del content["brain_volume_ml"]
    (folder / REFERENCE).write_text(json.dumps(content))
    old = QCReference.load(folder)
    assert "brain_volume" not in old.thresholds and old.brain_volume_ml is None
    network, _ = _network(folder)
    x = torch.zeros(1, *TINY_OVERRIDES["spatial_shape"])
    x[0, 16:48, 12:36, 12:36] = 1.0
    verdict = evaluate_input(old, network, x)
    assert "brain_volume" not in verdict["scores"] and "brain_volume" not in verdict["failed"]
    assert set(verdict["scores"]) == set(MEASURES) - {"brain_volume"}
