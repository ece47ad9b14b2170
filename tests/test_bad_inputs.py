"""Bad input gets a clear error naming the file or key; inference can skip bad cases and list them."""

import csv
import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import TINY, run_bundle

from scripts.data.synthetic import generate_cohort
from scripts.runtime.checks import check_choice, check_positive_int, class_weights, validate_items
from scripts.runtime.datalist import ensure_datalist, load_split


def _bad_files(folder, good):
    """A set of damaged NIfTI files next to a copy of a good one; returns {name: (path, expected message)}."""
    folder.mkdir(parents=True, exist_ok=True)
    data = nib.load(good).get_fdata().astype(np.float32)
    affine = nib.load(good).affine
    cases = {}
    p = folder / "flat2d.nii.gz"
    nib.save(nib.Nifti1Image(data[:, :, 40], affine), p)
    cases["2d"] = (p, "expected a 3D image")
    p = folder / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), affine), p)
    cases["4d"] = (p, "expected a 3D image")
    p = folder / "nan.nii.gz"
    bad = data.copy()
    bad[60, 40, 40] = np.nan
    nib.save(nib.Nifti1Image(bad, affine), p)
    cases["nan"] = (p, "NaN or Inf")
    p = folder / "inf.nii.gz"
    bad = data.copy()
    bad[60, 40, 40] = np.inf
    nib.save(nib.Nifti1Image(bad, affine), p)
    cases["inf"] = (p, "NaN or Inf")
    p = folder / "truncated.nii.gz"
    raw = open(good, "rb").read()
    p.write_bytes(raw[: len(raw) // 2])
    cases["truncated"] = (p, "not a readable NIfTI")
    p = folder / "zero_bytes.nii.gz"
    p.write_bytes(b"")
    cases["zero_bytes"] = (p, "not a readable NIfTI")
    p = folder / "not_nifti.nii.gz"
    p.write_bytes(gzip.compress(b"this is not an image"))
    cases["not_nifti"] = (p, "not a readable NIfTI")
    p = folder / "empty.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros_like(data), affine), p)
    cases["all_zero"] = (p, "every voxel is zero")
    p = folder / "constant.nii.gz"  # a scan that does not vary: no intensity normalisation is defined on it
    nib.save(nib.Nifti1Image(np.full_like(data, data[data > 0].mean()), affine), p)
    cases["constant"] = (p, "a constant image, not a scan")
    cases["missing"] = (folder / "missing.nii.gz", "not found")
    return cases


@pytest.fixture(scope="module")
def bad_cases(tmp_path_factory, cohort):
    return _bad_files(tmp_path_factory.mktemp("bad"), cohort / "images" / "sub-0001.nii.gz")


@pytest.mark.parametrize("case", ["2d", "4d", "nan", "inf", "truncated", "zero_bytes", "not_nifti", "all_zero",
                                  "constant", "missing"])
def test_each_bad_image_names_the_file(bad_cases, case):
    path, message = bad_cases[case]
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        validate_items([{"image": str(path), "subject": case}])
    assert str(path) in str(err.value) and message in str(err.value)


def test_a_mask_may_be_constant_a_scan_may_not(tmp_path, cohort):
    """Only a scan (key ``image``) must vary: a binary mask under another key passes the same checks."""
    good = nib.load(cohort / "images" / "sub-0001.nii.gz")
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image((good.get_fdata() > 0).astype(np.uint8), good.affine), mask)
    item = {"image": str(cohort / "images" / "sub-0001.nii.gz"), "phenotype": str(mask), "subject": "sub-0001"}
    assert validate_items([item], keys=("image", "phenotype")) == [item]
    with pytest.raises(ValueError, match="a constant image, not a scan"):
        validate_items([{"image": str(mask), "subject": "mask"}])


def _datalist(tmp_path, cohort, items):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items, "test": items[:1]}))
    return str(path)


def test_datalist_errors_name_file_and_key(tmp_path, cohort):
    good = {"image": str(cohort / "images" / "sub-0001.nii.gz"), "label": 0, "fold": 0}
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        load_split(_datalist(tmp_path, cohort, [good, dict(good, image="nope.nii.gz", fold=1)]), "train", 0)
    with pytest.raises(ValueError, match=r"sub-0001.*label 2"):
        load_split(_datalist(tmp_path, cohort, [dict(good, label=2), dict(good, fold=1)]), "train", 1)
    with pytest.raises(ValueError, match="no 'label'"):
        load_split(_datalist(tmp_path, cohort, [{"image": good["image"], "fold": 0}]), "validation", 0)
    with pytest.raises(ValueError, match="fold=5 is out of range"):
        load_split(_datalist(tmp_path, cohort, [good]), "train", 5)
    with pytest.raises(TypeError, match="config key 'fold'"):
        load_split(_datalist(tmp_path, cohort, [good]), "train", "0")
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{ not json")
    with pytest.raises(ValueError, match=r"broken.json is not valid JSON"):
        load_split(str(bad_json), "train", 0)
    with pytest.raises(ValueError, match="needs an 'image' key"):
        load_split(_datalist(tmp_path, cohort, [{"label": 0, "fold": 0}]), "validation", 0)
    with pytest.raises(ValueError, match="every class needs"):
        class_weights([{"label": 0}, {"label": 0}])
    with pytest.raises(ValueError, match="config key 'num_epochs'"):
        check_positive_int("3", "num_epochs")
    with pytest.raises(ValueError, match="config key 'checkpoint' must be one of 'last', 'best', got 'lats'"):
        check_choice("lats", "checkpoint", ("last", "best"))
    with pytest.raises(FileNotFoundError, match="config key 'datalist': .*absent.json does not exist"):
        ensure_datalist(str(tmp_path / "absent.json"), str(cohort))


def test_named_data_location_that_does_not_exist_creates_nothing(tmp_path):
    """A mistyped --dataset_dir or --datalist is one error line naming the key, the path and the fix; the synthetic
    cohort is not generated into it (only into the default folder, or where --generate_synthetic true asks)."""
    typo = tmp_path / "in_typo"
    for args, key in ((["--dataset_dir", str(typo)], "dataset_dir"),
                      (["--datalist", str(typo / "list.json")], "datalist")):
        proc = run_bundle("inference", "configs/inference.json", *args, "--output_dir", str(tmp_path / "out"),
                          *TINY, check=False)
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1, proc.stderr
        assert len(lines) == 1 and f"config key '{key}': {typo}" in lines[0], proc.stderr
        assert "--" + key in lines[0]  # the fix
        assert not typo.exists() and not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="'dataset_dir': .*empty is empty.*--generate_synthetic true"):
        ensure_datalist(None, str(tmp_path / "empty"), synthetic_dir=str(tmp_path / "default"))
    with pytest.raises(ValueError, match="config key 'generate_synthetic' must be auto, true or false"):
        ensure_datalist(None, str(typo), generate="yes")
    assert not typo.exists()


def test_synthetic_cohort_only_where_asked(tmp_path):
    """The default folder (synthetic_dir) and an explicit generate=True get the cohort from the generator the caller
    passes (the configs' ``synthetic_cohort`` item); generate=False never; no generator is an error naming the keys."""
    default = tmp_path / "synthetic"
    with pytest.raises(ValueError, match=r"'dataset_dir': .*synthetic does not exist and generate_synthetic=auto "
                                         r"asks .*generator=scripts\.data\.synthetic\.generate_cohort"):
        ensure_datalist(None, str(default), synthetic_subjects=4, synthetic_dir=str(default))
    assert not default.exists()
    assert ensure_datalist(None, str(default), synthetic_subjects=4, synthetic_dir=str(default),
                           generator=generate_cohort) == str(default / "datalist.json")
    with pytest.raises(FileNotFoundError, match="config key 'dataset_dir'"):
        ensure_datalist(None, str(tmp_path / "other"), synthetic_subjects=4, generate=False,
                        synthetic_dir=str(tmp_path / "other"))
    named = tmp_path / "named"
    assert ensure_datalist(None, str(named), synthetic_subjects=4, generate="true",
                           generator=generate_cohort) == str(named / "datalist.json")
    assert len(list((named / "images").glob("*.nii.gz"))) == 4


def test_class_weights_favour_the_rare_class():
    weights = class_weights([{"label": 0}] * 6 + [{"label": 1}] * 2)
    assert weights == [8 / 12, 8 / 4]
    assert class_weights([{"label": 0}] * 6 + [{"label": 1}] * 2, factor=2.0)[1] == 4.0


def test_inference_skips_bad_cases_and_lists_them(tmp_path, cohort, trained, bad_cases):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("sub-0001", "sub-0002"):
        shutil.copy(cohort / "images" / f"{name}.nii.gz", folder)
    for case in ("truncated", "nan", "2d"):
        shutil.copy(bad_cases[case][0], folder)
    out = tmp_path / "out"
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(folder), "--ckpt_dir",
                      str(trained[0]), "--output_dir", str(out), "--lrp_presets", "['a2b1']", *TINY, check=False)
    # default: stop at the first bad file (sorted order), naming it and what is wrong
    assert proc.returncode != 0 and f"{folder / 'flat2d.nii.gz'}: expected a 3D image" in proc.stdout + proc.stderr
    assert not (out / "predictions.csv").exists()
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(folder), "--ckpt_dir",
                      str(trained[0]), "--output_dir", str(out), "--lrp_presets", "['a2b1']", "--skip_bad", "true",
                      *TINY, check=False)
    # skip_bad: the run finishes, and its status (3) tells a script that some inputs have no prediction
    assert proc.returncode == 3, proc.stderr[-3000:]
    summary = f"2 predicted, 0 flagged, 3 refused/skipped -> {out / 'predictions.csv'}"
    assert proc.stdout.strip().splitlines()[-1] == summary
    skipped = list(csv.DictReader((out / "skipped.csv").open()))
    assert sorted(r["subject"] for r in skipped) == ["flat2d", "nan", "truncated"]
    assert all(r["image"] in r["reason"] for r in skipped)
    predicted = sorted(row["subject"] for row in csv.DictReader((out / "predictions.csv").open()))
    assert predicted == ["sub-0001", "sub-0002"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["sub-0001", "sub-0002"]


def test_an_input_error_leaves_no_new_output_folder(tmp_path, cohort, trained, bad_cases):
    """A 2D image stops inference, evaluation and training before anything is written: no output (or checkpoint)
    folder is created for it, and an output folder that already existed is left as it was."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(cohort / "images" / "sub-0001.nii.gz", folder)
    shutil.copy(bad_cases["2d"][0], folder)
    items = [{"image": str(folder / "flat2d.nii.gz"), "label": label, "fold": label} for label in (0, 1)]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "test": items}))
    message = f"{folder / 'flat2d.nii.gz'}: expected a 3D image"
    runs = {
        "inference": ("inference", "configs/inference.json", "--dataset_dir", str(folder), "--ckpt_dir",
                      str(trained[0]), "--output_dir", str(tmp_path / "out_inference")),
        "evaluation": ("evaluating", "['configs/train.json','configs/evaluate.json']", "--datalist", str(datalist),
                       "--ckpt_dir", str(trained[0]), "--output_dir", str(tmp_path / "out_evaluation")),
        "training": ("training", "configs/train.json", "--datalist", str(datalist), "--ckpt_dir",
                     str(tmp_path / "models_training"), "--output_dir", str(tmp_path / "out_training")),
    }
    for name, (run_id, config, *args) in runs.items():
        proc = run_bundle(run_id, config, *args, *TINY, check=False)
        assert proc.returncode != 0 and message in proc.stderr, f"{name}: {proc.stderr[-2000:]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datalist.json", "in"]
    existing = tmp_path / "existing"
    (existing / "keep").mkdir(parents=True)
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(folder), "--ckpt_dir",
                      str(trained[0]), "--output_dir", str(existing), *TINY, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert [p.name for p in existing.iterdir()] == ["keep"]

def test_config_override_of_the_wrong_type_names_the_key(tmp_path, cohort):
    proc = run_bundle("training", "configs/train.json", "--dataset_dir", str(cohort), "--ckpt_dir", str(tmp_path / "m"),
                      "--output_dir", str(tmp_path / "o"), "--num_epochs", "two", *TINY, check=False)
    assert proc.returncode != 0
    assert "config key 'num_epochs' must be a positive integer, got 'two'" in proc.stdout + proc.stderr
    assert not (tmp_path / "m" / "model.pt").exists()
