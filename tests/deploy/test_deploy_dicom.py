"""The MONAI Deploy app's DICOM input and output (scripts/deploy_app/dicom.py, docs/dicom.md), run as users run
it on series written with pydicom from a synthetic scan of the test cohort (one file per slice, shuffled file
names, PixelSpacing 1.1 x 0.8 mm, 2.5 mm slices; one axial and one 20-degree oblique series).

System tools: ``dciodvfy`` (Debian dicom3tools) and ``dsrdump`` (dcmtk) are installed by ``bash run.sh test``;
without them the checks that need them skip with one line, unless ``REQUIRE_SYSTEM_TESTS=1`` (then they fail).
``segimage2itkimage`` comes from the ``dcmqi`` wheel of requirements-deploy.txt."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import ROOT, app_preset
from dicom_series import SLICE_SPACING, read_series, write_series
from pydicom.uid import generate_uid
from test_deploy_app import _run_app, model_ts  # noqa: F401  (model_ts: the exported tiny model, a fixture)

from scripts.deploy_app.dicom import RULES_FILE, series_volume
from scripts.runtime.evidence import EVIDENCE_LABELS
from scripts.runtime.outputs import save_nifti

TILTS = (0.0, 20.0)


def system_tool(name: str) -> str:
    """The path of a system tool; missing: skip with one line (fail with REQUIRE_SYSTEM_TESTS=1)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{name} not installed (bash run.sh test installs it with apt-get): check not run"
        if os.environ.get("REQUIRE_SYSTEM_TESTS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


def assert_no_dciodvfy_errors(path: Path) -> str:
    proc = subprocess.run([system_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=120)
    report = proc.stdout + proc.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, f"{path.name}: dciodvfy errors:\n" + "\n".join(errors)
    return report


@pytest.fixture(scope="module")
def scan(reference) -> np.ndarray:
    """A synthetic scan of the test cohort (scripts.data.synthetic via the session cohort), ``[i, j, k]``."""
    _, items = reference
    return np.asarray(nib.load(items[0]["image"]).dataobj, dtype=np.float32)


@pytest.fixture(scope="module")
def series(tmp_path_factory, scan) -> dict:
    """Both series (two studies) in one input folder: {tilt: write_series info}, and the folder."""
    folder = tmp_path_factory.mktemp("dicom") / "input"
    infos = {tilt: write_series(scan, folder / f"tilt{tilt:g}", tilt_degrees=tilt, seed=int(tilt) + 1)
             for tilt in TILTS}
    return {"folder": folder, "infos": infos}


def test_series_geometry_and_inputs_conform(series, scan):
    """Our affine equals the geometry the series were written with (rows 1.1, columns 0.8, slices 2.5 mm, axial and
    oblique, files shuffled); the voxels are the scan's; the inputs pass dciodvfy."""
    for tilt, info in series["infos"].items():
        folder = series["folder"] / f"tilt{tilt:g}"
        volume, affine, ordered = series_volume(read_series(folder))
        np.testing.assert_allclose(affine, info["affine"], atol=1e-5)
        np.testing.assert_array_equal(volume, np.clip(np.rint(scan), 0, 65535))
        assert [int(d.InstanceNumber) for d in ordered] == list(range(1, len(ordered) + 1))
        by_name = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)
                   for p in sorted(folder.glob("*.dcm"))]
        assert by_name != sorted(by_name)  # the files are read in shuffled slice order
        for path in sorted(folder.glob("*.dcm"))[:2]:
            assert_no_dciodvfy_errors(path)


def test_series_volume_refuses_broken_series(tmp_path):
    """A missing slice, a slice twice, and a slice with another orientation: one message naming the series."""
    volume = np.arange(4 * 3 * 6, dtype=np.float32).reshape(4, 3, 6)
    write_series(volume, tmp_path / "s", tilt_degrees=20.0)
    datasets = read_series(tmp_path / "s")
    ordered = series_volume(datasets)[2]
    with pytest.raises(ValueError, match="my series: uneven slice positions"):
        series_volume([d for d in ordered if d is not ordered[2]], "my series")
    with pytest.raises(ValueError, match="my series: two slices at the same position"):
        series_volume([*ordered, ordered[3]], "my series")
    tilted = pydicom.dcmread(sorted((tmp_path / "s").glob("*.dcm"))[0])
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="my series: slices with different ImageOrientationPatient"):
        series_volume([*datasets[1:], tilted], "my series")


def test_sdk_volume_affine_finding(tmp_path):
    """The finding of (docs/dicom.md, Finding: the SDK 4.0.0 volume affine): SDK 4.0.0's DICOMSeriesToVolumeOperator
    puts PixelSpacing[0] (row spacing) on the row direction and, for an oblique series, a slice spacing that is
    not the distance between slices. Fails when an SDK fixes it, so that docs/dicom.md gets updated."""
    from sdk_affine_repro import sdk_geometry

    volume = np.arange(60, dtype=np.float32).reshape(4, 3, 5)
    for tilt, depth_ok in ((0.0, True), (20.0, False)):
        info = write_series(volume, tmp_path / f"t{tilt:g}", tilt_degrees=tilt)
        sdk, depth = sdk_geometry(tmp_path / f"t{tilt:g}")
        np.testing.assert_allclose(np.linalg.norm(info["affine"][:3, :2], axis=0), [0.8, 1.1])
        np.testing.assert_allclose(np.linalg.norm(sdk[:3, :2], axis=0), [1.1, 0.8])  # swapped
        np.testing.assert_allclose(sdk[:3, 2:], info["affine"][:3, 2:], atol=1e-5)  # slice step and origin: right
        assert (abs(depth - SLICE_SPACING) < 1e-6) == depth_ok, depth


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory, model_ts, series):  # noqa: F811
    out = tmp_path_factory.mktemp("dicom_run") / "output"
    proc = _run_app("-i", str(series["folder"]), "-o", str(out), "-m", str(model_ts))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def test_dicom_run_equals_nifti_run(tmp_path, model_ts, series, dicom_run):  # noqa: F811
    """The same volumes as NIfTI files (the voxels read from the series, with the affine our code computed, named
    by SeriesInstanceUID): probabilities within 1e-4, same decision; the evidence labelmaps of both runs agree."""
    nifti_inputs = tmp_path / "nifti"
    for tilt, info in series["infos"].items():
        volume, affine, _ = series_volume(read_series(series["folder"] / f"tilt{tilt:g}"))
        save_nifti(volume, affine, nifti_inputs / f"{info['series']}.nii.gz")
    out = tmp_path / "output"
    proc = _run_app("-i", str(nifti_inputs), "-o", str(out), "-m", str(model_ts))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for info in series["infos"].values():
        subject = info["series"]
        from_dicom = json.loads((dicom_run / subject / f"{subject}_probabilities.json").read_text())
        from_nifti = json.loads((out / subject / f"{subject}_probabilities.json").read_text())
        for name, p in from_nifti["probabilities"].items():
            assert from_dicom["probabilities"][name] == pytest.approx(p, abs=1e-4)
        assert from_dicom["prediction"] == from_nifti["prediction"]
        evidence = {run: nib.load(run / subject / f"{subject}_evidence_orig.nii.gz") for run in (dicom_run, out)}
        np.testing.assert_allclose(evidence[dicom_run].affine, info["affine"], atol=1e-4)  # the input's grid
        agree = np.mean(evidence[dicom_run].get_fdata() == evidence[out].get_fdata())
        assert agree > 0.999, agree


def test_seg_output(tmp_path, series, dicom_run):
    """The DICOM SEG: conformant (dciodvfy), the input's Study and Frame of Reference, the sorted input slices as
    source images, seven static binary segments (SCT category, AUTOMATIC, the bundle as algorithm), every frame;
    dcmqi's segimage2itkimage gives back the input geometry and the evidence labelmap voxel for voxel."""
    metadata = json.loads((ROOT / "configs" / "metadata.json").read_text())
    for tilt, info in series["infos"].items():
        subject = info["series"]
        path = dicom_run / subject / f"{subject}_evidence_seg.dcm"
        seg = pydicom.dcmread(path)
        inputs = series_volume(read_series(series["folder"] / f"tilt{tilt:g}"))[2]
        assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
        assert seg.StudyInstanceUID == info["study"] and seg.FrameOfReferenceUID == info["frame_of_reference"]
        assert [s.SegmentLabel for s in seg.SegmentSequence] == list(EVIDENCE_LABELS)
        for s in seg.SegmentSequence:
            assert s.SegmentAlgorithmType == "AUTOMATIC"
            assert s.SegmentedPropertyCategoryCodeSequence[0].CodingSchemeDesignator == "SCT"
            algorithm = s.SegmentationAlgorithmIdentificationSequence[0]
            assert metadata["name"].startswith(algorithm.AlgorithmName)
            assert algorithm.AlgorithmVersion == metadata["version"]
        assert int(seg.NumberOfFrames) == len(inputs) * len(EVIDENCE_LABELS)  # omit_empty_frames=False
        referenced = [r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence]
        assert sorted(referenced) == sorted(d.SOPInstanceUID for d in inputs)
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == subject

        labels = nib.load(dicom_run / subject / f"{subject}_evidence_orig.nii.gz")
        assert len(np.unique(labels.get_fdata())) > 1
        converted = tmp_path / f"seg{tilt:g}"
        converted.mkdir()
        proc = subprocess.run([system_tool("segimage2itkimage"), "--inputDICOM", str(path), "--outputDirectory",
                               str(converted), "-t", "nii", "--mergeSegments"], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        back = nib.load(next(converted.glob("*.nii.gz")))
        assert back.shape == labels.shape
        np.testing.assert_allclose(back.affine, info["affine"], atol=1e-4)  # the input series' geometry
        np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(labels.dataobj))
        assert_no_dciodvfy_errors(path)


def content_items(sequence, items: dict | None = None) -> dict:
    """Concept name -> values (NUM, CODE meaning, TEXT) of an SR content tree, depth first."""
    items = {} if items is None else items
    for item in sequence:
        name = item.ConceptNameCodeSequence[0].CodeMeaning
        if item.ValueType == "NUM":
            items.setdefault(name, []).append(float(item.MeasuredValueSequence[0].NumericValue))
        elif item.ValueType == "CODE":
            items.setdefault(name, []).append(item.ConceptCodeSequence[0].CodeMeaning)
        elif item.ValueType == "TEXT":
            items.setdefault(name, []).append(item.TextValue)
        content_items(getattr(item, "ContentSequence", []), items)
    return items


def test_sr_output(series, dicom_run):
    """The SR: conformant (dciodvfy), a Comprehensive 3D SR that pydicom/highdicom (and dcmtk's dsrdump) read,
    carrying the decision, both probabilities, preset, QC and model version, about the input series."""
    for info in series["infos"].values():
        subject = info["series"]
        result = json.loads((dicom_run / subject / f"{subject}_probabilities.json").read_text())
        path = dicom_run / subject / f"{subject}_sr.dcm"
        sr = hd.sr.srread(path)
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert sr.StudyInstanceUID == info["study"]
        assert sr.Manufacturer and "MONAI" not in sr.Manufacturer
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == subject
        items = content_items(pydicom.dcmread(path).ContentSequence)
        assert items["Predicted birth class"] == [result["prediction"]]
        for name, p in result["probabilities"].items():
            assert items[f"Probability of {name} birth"][0] == pytest.approx(p, abs=1e-6)
        assert items["LRP preset"] == [app_preset()]
        assert "Quality Control" in items
        assert json.loads((ROOT / "configs" / "metadata.json").read_text())["version"] in items["Algorithm Version"]
        report = assert_no_dciodvfy_errors(path)
        assert "Comprehensive3DSR" in report
        dump = subprocess.run([system_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
        assert dump.returncode == 0 and "Probability of preterm birth" in dump.stdout, dump.stderr
    assert not list(dicom_run.rglob(".*"))  # no temporaries left


@pytest.mark.parametrize("case", ["no_t2", "not_mr", "not_dicom"])
def test_bad_series_one_line_and_nothing_written(tmp_path, model_ts, scan, case):  # noqa: F811
    """A series the rules do not pick (a T1w MR series; a CT series): one ``error:`` line naming the rules file
    and what was found; ``.dcm`` files that are not DICOM: one line naming the folder. Nothing written."""
    inputs = tmp_path / "input"
    small = scan[:, :, 40:44]
    if case == "no_t2":
        write_series(small, inputs, description="T1w MPRAGE")
    elif case == "not_mr":
        write_series(small, inputs, modality="CT", description="T2 head", study_uid=generate_uid())
    else:
        inputs.mkdir()
        (inputs / "IM0000.dcm").write_bytes(b"not a DICOM file" * 20)
    out = tmp_path / "output"
    proc = _run_app("-i", str(inputs), "-o", str(out), "-m", str(model_ts))
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    if case == "not_dicom":
        assert f"error: {inputs}: no readable DICOM study in its files" in errors[0]
    else:
        assert str(RULES_FILE) in errors[0] and "no DICOM series matches" in errors[0]
        assert ("MR 'T1w MPRAGE'" if case == "no_t2" else "CT 'T2 head'") in errors[0]
    assert not [p for p in out.rglob("*") if p.is_file()]
