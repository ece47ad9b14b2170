"""The MONAI Deploy app (scripts/deploy_app, MONAI Deploy App SDK 4.0 on Holoscan, CPU) run as users run it,
``python scripts/deploy_app -i -o -m models/model.ts``, against ``run inference`` of the same model. Runs in the
Deploy environment (``nox -s deploy``)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, TINY, app_preset, run_bundle, stage_qc_reference
from native_fixtures import native_input


@pytest.fixture(scope="module")
def model_ts(tmp_path_factory, trained) -> Path:
    ckpt_dir, _ = trained
    out = tmp_path_factory.mktemp("export") / "model.ts"
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(out),
                           "--ckpt_file", str(ckpt_dir / "model.pt"), "--meta_file", "configs/metadata.json",
                           "--config_file", "configs/inference.json", *TINY], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # beside it, as docs/dicom.md stages model.ts: the QC reference, which records the weights' normalisation
    stage_qc_reference(ckpt_dir, out.parent)
    return out


def _run_app(*args: str, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "deploy_app"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, env=env)


def _as_packaged(staged: Path, image_root: Path) -> Path:
    """Where ``holoscan package --models <staged>`` puts the models in the MAP, laid out by holoscan-cli's own
    code (``Models.build`` names them, ``BuilderBase._copy_model_files`` copies them) under ``image_root``
    instead of the image's /opt/holoscan: the models root, the app's HOLOSCAN_MODEL_PATH."""
    from types import SimpleNamespace

    from holoscan_cli.packager.container_builder import BuilderBase
    from holoscan_cli.packager.models import Models

    models = Models().build(staged)
    BuilderBase._copy_model_files(SimpleNamespace(_build_parameters=SimpleNamespace(models=models),
                                                       _temp_dir=str(image_root)))
    return image_root / "models"


def test_app_equals_run_inference(tmp_path, model_ts, reference):
    out_ref, items = reference
    rows = {r["subject"]: r for r in csv.DictReader((out_ref / "predictions.csv").open())}
    inputs = tmp_path / "input"
    inputs.mkdir()
    chosen = items[:3]
    for item in chosen:
        shutil.copy(item["image"], inputs)
    out = tmp_path / "output"
    proc = _run_app("-i", str(inputs), "-o", str(out), "-m", str(model_ts))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for item in chosen:
        subject = Path(item["image"]).name.split(".")[0]
        result = json.loads((out / subject / f"{subject}_probabilities.json").read_text())
        assert result["probabilities"]["term"] == pytest.approx(float(rows[subject]["prob_term"]), abs=1e-5)
        assert result["probabilities"]["preterm"] == pytest.approx(float(rows[subject]["prob_preterm"]), abs=1e-5)
        assert result["prediction_index"] == int(rows[subject]["prediction"])
        assert result["prediction"] == ("preterm" if result["prediction_index"] == 1 else "term")

        handler = nib.load(out_ref / subject / f"{subject}_relevance_{app_preset()}.nii.gz")
        grid = nib.load(out / subject / f"{subject}_relevance_{app_preset()}.nii.gz")
        np.testing.assert_allclose(grid.get_fdata(), handler.get_fdata(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grid.affine, handler.affine, atol=1e-5)

        source = nib.load(item["image"])
        orig = nib.load(out / subject / f"{subject}_relevance_{app_preset()}_orig.nii.gz")
        assert orig.shape == source.shape  # the input's grid ...
        np.testing.assert_allclose(orig.affine, source.affine, atol=1e-5)  # ... and the input's affine
        assert orig.get_data_dtype() == np.float32
        assert np.abs(orig.get_fdata()).sum() > 0
    assert not list(out.rglob(".*"))  # no temporaries left


def test_native_scan_is_registered_beside_model_ts(tmp_path, model_ts, cohort, trained):
    """A native scan (scalp, rotated, 0.9 mm) given to the app whose model.ts has the training template and QC
    reference beside it, staged and packaged as docs/dicom.md's MAP commands do (the app finds the model through
    HOLOSCAN_MODEL_PATH, as in the MAP): the decision of ``run inference`` on the same file, maps on the scan's own
    grid."""
    ckpt_dir, _ = trained
    models = tmp_path / "map" / "model"
    models.mkdir(parents=True)
    stage_qc_reference(ckpt_dir, models, template=True)
    shutil.copy(model_ts, models / "model.ts")
    item = json.loads((cohort / "datalist.json").read_text())["test"][1]
    subject = item["subject"]
    scan, _ = native_input(cohort, item, tmp_path, np.random.default_rng(7))
    inputs = scan.parent
    ref = tmp_path / "reference"
    run_bundle("inference", "configs/inference.json", "--dataset_dir", str(inputs), "--ckpt_dir", str(ckpt_dir),
               "--output_dir", str(ref), "--lrp_presets", json.dumps([app_preset()]), *TINY)
    row = next(csv.DictReader((ref / "predictions.csv").open()))
    assert row["qc_pass"] == "true", row

    out = tmp_path / "output"
    packaged = _as_packaged(models, tmp_path / "opt_holoscan")
    assert (packaged / "model" / "model.ts").is_file() and not (packaged / "model.ts").exists()
    env = {**os.environ, "HOLOSCAN_MODEL_PATH": str(packaged)}
    proc = _run_app("-i", str(inputs), "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "registering it" in log and "used as it is" not in log  # the template was found in the packaged layout
    result = json.loads((out / subject / f"{subject}_probabilities.json").read_text())
    assert result["probabilities"]["preterm"] == pytest.approx(float(row["prob_preterm"]), abs=1e-5)
    native = nib.load(scan)
    for what in (f"relevance_{app_preset()}_orig", "evidence_orig"):
        written = nib.load(out / subject / f"{subject}_{what}.nii.gz")
        assert written.shape == native.shape, what
        np.testing.assert_allclose(written.affine, native.affine, atol=1e-5)
    reference_map = nib.load(ref / subject / f"{subject}_relevance_{app_preset()}_orig.nii.gz").get_fdata()
    app_map = nib.load(out / subject / f"{subject}_relevance_{app_preset()}_orig.nii.gz").get_fdata()
    np.testing.assert_allclose(app_map, reference_map, rtol=1e-4, atol=1e-6 * np.abs(reference_map).max())


def test_missing_model_names_the_command(tmp_path):
    proc = _run_app("-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m", str(tmp_path / "models" / "model.ts"))
    assert proc.returncode == 2
    assert "model.ts: model not found" in proc.stderr
    assert "monai.bundle ckpt_export" in proc.stderr and "run training" in proc.stderr


def test_bad_input_is_named_and_nothing_written(tmp_path, model_ts, reference):
    _, items = reference
    inputs = tmp_path / "input"
    inputs.mkdir()
    shutil.copy(items[0]["image"], inputs)
    bad = inputs / "sub-broken.nii.gz"
    bad.write_bytes(Path(items[0]["image"]).read_bytes()[:3000])  # truncated
    out = tmp_path / "output"
    proc = _run_app("-i", str(inputs), "-o", str(out), "-m", str(model_ts))
    assert proc.returncode != 0
    assert "sub-broken.nii.gz: not a readable NIfTI" in proc.stdout + proc.stderr
    assert not [p for p in out.rglob("*") if p.is_file()]
