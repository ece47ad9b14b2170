"""The MONAI Deploy app (scripts/deploy_app, MONAI Deploy App SDK 4.0 on Holoscan, CPU) run as users run it,
``python scripts/deploy_app -i -o -m models/model.ts``, against ``run inference`` of the same model. Runs in the
Deploy environment (``nox -s deploy``)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, TINY, app_preset


@pytest.fixture(scope="module")
def model_ts(tmp_path_factory, trained) -> Path:
    ckpt_dir, _ = trained
    out = tmp_path_factory.mktemp("export") / "model.ts"
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(out),
                           "--ckpt_file", str(ckpt_dir / "model.pt"), "--meta_file", "configs/metadata.json",
                           "--config_file", "configs/inference.json", *TINY], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _run_app(*args: str, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "deploy_app"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


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
