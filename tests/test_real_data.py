"""The real-data path: dHCP datalist builder on fake release trees (both layouts, real naming variants), and
preprocessing of synthetic subjects moved off the template by known affines: alignment, labels, resume,
failures, and relevance maps sent back onto the native scan."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ROOT
from native_fixtures import EXCLUDED, KEPT, SESSIONS, dice, fake_release, native_datalist, write_template
from scipy import ndimage


@pytest.mark.parametrize("release", [2, 3, "3-root"])
def test_dhcp_datalist_builder_finds_files_labels_and_exclusions(tmp_path, release):
    root = fake_release(tmp_path / f"rel{release}", release)
    out = root / "datalist.json"
    proc = subprocess.run([sys.executable, "-m", "scripts.data.dhcp_datalist", "--root", str(root),
                           "--output", str(out),
                           "--folds", "2", "--test-fraction", "0.25"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    items = {it["subject"]: it for it in data["training"] + data["test"]}
    assert set(items) == set(KEPT)
    for subject, (session, label) in KEPT.items():
        item = items[subject]
        assert item["session"] == session and item["label"] == label
        stem = f"{subject}_{session}"
        if subject == "sub-F06":  # no derivative: the raw scan
            assert item["image"].endswith(f"/anat/{stem}_T2w.nii.gz") and "derivatives" not in item["image"]
        else:
            assert item["image"].endswith(f"{stem}_desc-restore_T2w.nii.gz")
        assert Path(item["mask"]).is_file() and "mask" in Path(item["mask"]).name
        assert Path(item["tissue"]).is_file() and ("drawem" in Path(item["tissue"]).name)
        assert item["sex"] in ("male", "female", "Male", "Female")
    assert all("fold" in it for it in data["training"]) and len(data["test"]) == 2
    assert {it["label"] for it in data["test"]} == {0, 1}
    excluded = {(r["subject"], r["session"]): r["reason"] for r in
                csv.DictReader((root / "datalist_exclusions.csv").open())}
    assert set(excluded) == set(EXCLUDED)
    for key, reason in EXCLUDED.items():
        assert reason in excluded[key], (key, excluded[key])
    assert "8 subjects (term 4, preterm 4" in proc.stdout


def test_dhcp_builder_errors_name_what_is_missing(tmp_path):
    from scripts.data.dhcp_datalist import build_datalist

    with pytest.raises(FileNotFoundError, match="release root .*nowhere not found"):
        build_datalist(tmp_path / "nowhere", tmp_path / "d.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no combined\\*.tsv and no participants.tsv"):
        build_datalist(tmp_path / "empty", tmp_path / "d.json")
    root = fake_release(tmp_path / "rel2", 2)
    table = root / "combined_rel02.tsv"
    table.write_text(table.read_text().replace("scan_age", "age_at_scan"))
    with pytest.raises(ValueError, match=r"combined_rel02.tsv lacks the column\(s\) \['scan_age'\]"):
        build_datalist(root, tmp_path / "d.json")
    proc = subprocess.run([sys.executable, "-m", "scripts.data.dhcp_datalist", "--root", str(root), "--output",
                           str(tmp_path / "d.json")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "scan_age" in proc.stderr
    assert not (tmp_path / "d.json").exists()


def test_dhcp_builder_lists_the_exclusions_when_nothing_is_left(tmp_path):
    root = fake_release(tmp_path / "rel3", 3)
    out = root / "datalist.json"
    proc = subprocess.run([sys.executable, "-m", "scripts.data.dhcp_datalist", "--root", str(root), "--output",
                           str(out), "--min-scan-age", "50"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and not out.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "no session is left" in proc.stderr
    rows = list(csv.DictReader((root / "datalist_exclusions.csv").open()))
    assert len(rows) == len(SESSIONS)
    for row in rows:  # every reason printed before the error
        assert f"excluded {row['subject']} {row['session']}: {row['reason']}" in proc.stderr


def _before_dice(native_mask: Path, reference: Path) -> float:
    import SimpleITK as sitk

    ref = sitk.ReadImage(str(reference))
    moved = sitk.Resample(sitk.ReadImage(str(native_mask)), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return dice(sitk.GetArrayFromImage(moved), sitk.GetArrayFromImage(ref))


@pytest.fixture(scope="module")
def native(tmp_path_factory, cohort):
    work = tmp_path_factory.mktemp("native")
    template, mask = write_template(work / "template")
    datalist = native_datalist(cohort, work / "native", ["sub-0001", "sub-0002", "sub-0003"], seed=1)
    return work, datalist, template, mask


def test_preprocessing_aligns_to_the_template_resumes_and_reports_failures(native, tmp_path):
    work, datalist, template, mask = native
    data = json.loads(datalist.read_text())
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    data["training"].append({**data["training"][0], "subject": "sub-bad", "image": str(bad)})
    data["training"].append({k: v for k, v in data["training"][1].items() if k != "mask"} | {"subject": "sub-nomask"})
    listed = tmp_path / "native.json"
    listed.write_text(json.dumps(data))
    out = tmp_path / "prep"
    cmd = [sys.executable, "-m", "scripts.data.preprocess", "run", "--datalist", str(listed),
           "--template", str(template),
           "--template-mask", str(mask), "--output", str(out), "--workers", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = {r["subject"]: r["error"] for r in csv.DictReader((out / "preprocess_failures.csv").open())}
    assert set(failures) == {"sub-bad", "sub-nomask"}
    assert f"{bad}: not a readable NIfTI" in failures["sub-bad"] and "no brain mask" in failures["sub-nomask"]

    reference = out / "template_grid_mask.nii.gz"
    assert nib.load(out / "template_grid.nii.gz").shape == (128, 96, 96)
    prepared = json.loads((out / "datalist.json").read_text())
    assert [it["subject"] for it in prepared["training"]] == ["sub-0001", "sub-0002", "sub-0003"]
    for item in prepared["training"]:
        subject = item["subject"]
        image = nib.load(out / item["image"])
        assert image.shape == (128, 96, 96) and np.allclose(np.linalg.norm(image.affine[:3, :3], axis=0), 1.0)
        after = dice(nib.load(out / item["mask"]).get_fdata(), nib.load(reference).get_fdata())
        before = _before_dice(Path(next(it["mask"] for it in data["training"] if it["subject"] == subject)), reference)
        assert after > 0.95 and after > before + 0.02, (subject, before, after)
        tissue = np.asarray(nib.load(out / item["tissue"]).dataobj)
        assert set(np.unique(tissue)) >= {0, 1, 2, 3, 5}  # labels stay labels (nearest neighbour)
        assert item["native_image"].endswith(f"{subject}_T2w.nii.gz")
    stamps = {p: p.stat().st_mtime_ns for p in (out / "sub-0001").iterdir()}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "3 subjects preprocessed (3 already done), 2 failed" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    proc = subprocess.run(cmd[:7] + [str(tmp_path / "no_template.nii.gz")] + cmd[8:], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and f"template {tmp_path / 'no_template.nii.gz'} not found" in proc.stderr


@pytest.mark.parametrize("method", ["ants", "sitk_bspline"])
def test_other_registration_methods_align(native, tmp_path, method):
    work, datalist, template, mask = native
    data = json.loads(datalist.read_text())
    data["training"] = data["training"][2:3]
    listed = tmp_path / "one.json"
    listed.write_text(json.dumps(data))
    out = tmp_path / "prep"
    args = ["--method", "ants"] if method == "ants" else ["--method", "sitk", "--bspline"]
    proc = subprocess.run([sys.executable, "-m", "scripts.data.preprocess", "run", "--datalist", str(listed),
                           "--template",
                           str(template), "--template-mask", str(mask), "--output", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    item = json.loads((out / "datalist.json").read_text())["training"][0]
    after = dice(nib.load(out / item["mask"]).get_fdata(), nib.load(out / "template_grid_mask.nii.gz").get_fdata())
    assert after > 0.95 and after > _before_dice(Path(data["training"][0]["mask"]), out / "template_grid_mask.nii.gz")
    back = tmp_path / "back.nii.gz"
    subprocess.run([sys.executable, "-m", "scripts.data.preprocess", "to-native", "--subject-dir",
                    str(out / item["subject"]), "--map", str(out / item["mask"]), "--output", str(back), "--nearest"],
                   cwd=ROOT, check=True, capture_output=True)
    assert dice(nib.load(back).get_fdata(), nib.load(data["training"][0]["mask"]).get_fdata()) > 0.95


def test_relevance_map_goes_back_onto_the_native_brain(native, tmp_path, trained):
    from scripts.data.preprocess import run_batch, to_native
    from scripts.evaluation.cross_validation import run_bundle_workflow

    work, datalist, template, mask = native
    out = tmp_path / "prep"
    data = json.loads(datalist.read_text())
    data["training"] = data["training"][:1]
    data["test"] = data["training"]
    listed = tmp_path / "one.json"
    listed.write_text(json.dumps(data))
    run_batch(str(listed), str(template), str(out), str(mask))
    maps = tmp_path / "maps"
    run_bundle_workflow(["inference.json"], "inference", {
        "datalist": str(out / "datalist.json"), "dataset_dir": str(out), "ckpt_dir": str(trained[0]),
        "output_dir": str(maps), "lrp_presets": ["a2b1"], "spatial_shape": [64, 48, 48], "channels": [4, 8],
        "hidden": 8})
    subject = data["training"][0]["subject"]
    relevance = maps / subject / f"{subject}_relevance_a2b1.nii.gz"
    assert relevance.is_file()
    native_map = to_native(str(out / subject), str(relevance), str(tmp_path / "native_relevance.nii.gz"))
    r = np.abs(nib.load(native_map).get_fdata())
    native_mask = nib.load(data["training"][0]["mask"]).get_fdata() > 0
    assert r.shape == native_mask.shape and r.sum() > 0
    near_brain = ndimage.binary_dilation(native_mask, iterations=2)
    assert r[near_brain].sum() / r.sum() > 0.98  # the map lands on the baby's own brain
