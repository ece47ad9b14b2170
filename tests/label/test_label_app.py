"""The MONAI Label app (scripts/label_app) with stock MONAI Label 0.8.5, in-process through BundleInferTask (the
real server and the 3D Slicer plugin's way of calling it: test_slicer_plugin.py). Runs in the Label environment
(``nox -s label``)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT, TINY, TINY_OVERRIDES, app_preset, run_bundle, stage_qc_reference
from native_fixtures import native_input
from scipy import ndimage

APP_DIR = ROOT / "scripts" / "label_app"
# compact JSON: the monailabel launcher (a shell script) splits arguments at spaces
CONF = {"bundle_overrides": json.dumps({**TINY_OVERRIDES, "device": "cpu"}, separators=(",", ":"))}


def _predictions(out: Path) -> dict[str, dict]:
    return {row["subject"]: row for row in csv.DictReader((out / "predictions.csv").open())}


def _scores(params: dict) -> dict[str, float]:
    return {p["label"]: p["score"] for p in params["prediction"]}


@pytest.fixture(scope="module")
def app(tiny_bundle, tmp_path_factory):
    from monailabel.interfaces.utils.app import app_instance

    studies = tmp_path_factory.mktemp("studies")
    return app_instance(str(APP_DIR), str(studies), {"bundle": str(tiny_bundle), **CONF})


def test_in_process_tasks(app, reference):
    from monailabel.tasks.infer.bundle import BundleInferTask

    out, items = reference
    rows = _predictions(out)
    assert list(app._infers) == ["preterm_evidence", "classification", "relevance"]
    assert all(isinstance(task, BundleInferTask) for task in app._infers.values())
    assert {name: model["type"] for name, model in app.info()["models"].items()} == {
        "preterm_evidence": "segmentation", "classification": "classification", "relevance": "others"}
    for item in items[:3]:
        subject = Path(item["image"]).name.split(".")[0]
        result = app.infer({"model": "classification", "image": item["image"], "device": "cpu"})
        scores = _scores(result["params"])
        assert scores["term"] == pytest.approx(float(rows[subject]["prob_term"]), abs=1e-5)
        assert scores["preterm"] == pytest.approx(float(rows[subject]["prob_preterm"]), abs=1e-5)
        assert json.loads(Path(result["file"]).read_text())["prediction"] == result["params"]["prediction"]
        os.remove(result["file"])

        # the network-grid map, as before the scan-grid default (request param grid=network)
        result = app.infer({"model": "relevance", "image": item["image"], "device": "cpu", "grid": "network"})
        returned = nib.load(result["file"])
        handler = nib.load(out / subject / f"{subject}_relevance_{app_preset()}.nii.gz")
        np.testing.assert_allclose(returned.get_fdata(), handler.get_fdata(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(returned.affine, handler.affine, atol=1e-4)
        assert returned.get_data_dtype() == np.float32
        assert result["params"]["preset"] == app_preset() and result["params"]["grid"] == "network"
        assert result["params"]["probabilities"]["preterm"] == pytest.approx(
            float(rows[subject]["prob_preterm"]), abs=1e-5)
        os.remove(result["file"])


def test_native_scan_gets_its_evidence_on_its_own_grid(app, cohort, trained, tmp_path):
    """A native scan (scalp, rotated, 0.9 mm) sent to the evidence task, as 3D Slicer sends the volume it opened:
    registered to the template per request (``preprocess`` auto), the decision is ``run inference``'s on the same
    file, and the bands come back on the scan's own grid, on its brain (issue 25, item 1)."""
    item = json.loads((cohort / "datalist.json").read_text())["test"][0]
    subject = item["subject"]
    scan, files = native_input(cohort, item, tmp_path, np.random.default_rng(5))
    scans = scan.parent
    out = tmp_path / "out"
    run_bundle("inference", "configs/inference.json", "--dataset_dir", str(scans), "--ckpt_dir", str(trained[0]),
               "--output_dir", str(out), "--lrp_presets", json.dumps([app_preset()]), *TINY)
    row = _predictions(out)[subject]
    assert row["qc_pass"] == "true", row  # QC judged the registered input

    result = app.infer({"model": "preterm_evidence", "image": str(scan), "device": "cpu"})
    params = result["params"]
    assert params["probabilities"]["preterm"] == pytest.approx(float(row["prob_preterm"]), abs=1e-5)
    assert params["qc"]["pass"] is True
    labels, native = nib.load(result["file"]), nib.load(scan)
    assert labels.shape == native.shape
    np.testing.assert_allclose(labels.affine, native.affine, atol=1e-4)
    filled = np.asarray(labels.dataobj) > 0
    brain = ndimage.binary_dilation(np.asarray(nib.load(files["mask"]).dataobj) > 0, iterations=3)
    assert filled.sum() > 1000 and (filled & brain).sum() / filled.sum() > 0.95  # on the brain, not the scalp
    os.remove(result["file"])


def test_missing_weights_names_the_command(tmp_path):
    from monailabel.interfaces.utils.app import app_instance

    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    for name in ("configs", "scripts"):
        (bundle / name).symlink_to(ROOT / name, target_is_directory=True)
    (tmp_path / "studies").mkdir()
    with pytest.raises(FileNotFoundError, match="model.pt not found.*monai.bundle run training"):
        app_instance(str(APP_DIR), str(tmp_path / "studies"), {"bundle": str(bundle), **CONF})


class _RunsCode:
    """A pickle that runs a shell command when unpickled by a full (not weights-only) loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_load_weights_only(tmp_path, reference, trained):
    import torch
    from monailabel.interfaces.utils.app import app_instance

    _, items = reference
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    for name in ("configs", "scripts"):
        (bundle / name).symlink_to(ROOT / name, target_is_directory=True)
    marker = tmp_path / "code_ran"
    torch.save({"weights": _RunsCode(marker)}, bundle / "models" / "model.pt")
    # what training writes beside weights: the normalisation record, checked when the preprocessing is built
    stage_qc_reference(trained[0], bundle / "models", template=True)
    (tmp_path / "studies").mkdir()
    app = app_instance(str(APP_DIR), str(tmp_path / "studies"), {"bundle": str(bundle), **CONF})
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        app.infer({"model": "classification", "image": items[0]["image"], "device": "cpu"})
    assert not marker.exists()
