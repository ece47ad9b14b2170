import csv
import json

import nibabel as nib
import numpy as np
import pytest

from scripts.data.splits import assign_splits, stratified_folds
from scripts.data.synthetic import draw_phenotype, generate_cohort, generate_subject
from scripts.data.synthetic_anatomy import SHAPE, builtin_template, procedural_labels, template_affine
from scripts.runtime.tissues import BRAINSTEM, CEREBELLUM, CGM, CSF, DGM, DRAWEM9, VENTRICLES, WM


def _subject(seed, preterm_fraction):
    rng = np.random.default_rng(seed)
    ph = draw_phenotype(rng, preterm_fraction)
    return ph, *generate_subject(builtin_template(), ph, rng)


def test_subject_is_deterministic_for_a_seed():
    _, img1, lab1, pm1 = _subject(11, 0.5)
    _, img2, lab2, pm2 = _subject(11, 0.5)
    _, img3, _, _ = _subject(12, 0.5)
    assert np.array_equal(img1, img2) and np.array_equal(lab1, lab2) and np.array_equal(pm1, pm2)
    assert not np.array_equal(img1, img3)


def test_labels_follow_drawem9_and_t2_contrast_order():
    ph, image, labels, _ = _subject(5, 0.0)
    assert image.shape == SHAPE and labels.shape == SHAPE and image.dtype == np.float32
    present = set(np.unique(labels).tolist())
    assert present <= set(DRAWEM9) | {0}
    assert set(DRAWEM9) <= present  # every tissue class appears
    mean = {k: float(image[labels == k].mean()) for k in DRAWEM9}
    # neonatal T2w: CSF brightest, unmyelinated WM brighter than cortex, deep grey matter darker than cortex
    assert mean[CSF] > mean[WM] > mean[CGM] > mean[DGM]
    assert mean[VENTRICLES] > mean[WM]
    assert np.all(image[labels == 0] == 0)  # skull-stripped
    assert mean[CEREBELLUM] > 0 and mean[BRAINSTEM] > 0


def test_preterm_babies_have_more_csf_and_ventricle():
    def volumes(fraction):
        out = []
        for seed in range(5):
            ph, _, labels, pmask = _subject(100 + seed, fraction)
            ventricles = (labels == VENTRICLES).sum()
            out.append((ph, (labels == CSF).sum() + ventricles, ventricles, pmask.sum()))
        return out

    term, preterm = volumes(0.0), volumes(1.0)
    assert all(ph.label == 0 for ph, *_ in term) and all(ph.label == 1 for ph, *_ in preterm)
    assert np.mean([v for _, v, _, _ in preterm]) > 1.03 * np.mean([v for _, v, _, _ in term])
    assert np.mean([v for _, _, v, _ in preterm]) > np.mean([v for _, _, v, _ in term])
    # the phenotype mask marks exactly where the preterm effect changed the tissue: empty for term babies
    assert all(p == 0 for *_, p in term)
    assert np.mean([p for *_, p in preterm]) > 1000


def test_phenotype_grows_with_prematurity():
    rng = np.random.default_rng(0)
    phs = [draw_phenotype(rng, 0.5) for _ in range(400)]
    pre = [p for p in phs if p.label == 1]
    assert 0.35 < len(pre) / len(phs) < 0.65
    ages = np.array([p.birth_age for p in pre])
    effect = np.array([p.ventricle_effect for p in pre])
    assert np.corrcoef(ages, effect)[0, 1] < -0.5
    assert all(23 <= p.birth_age <= 42 and 37 <= p.scan_age <= 45 for p in phs)
    near_term = [p.ventricle_effect for p in pre if p.birth_age > 35.5]
    very_preterm = [p.ventricle_effect for p in pre if p.birth_age < 30]
    natural_sd = np.std([p.ventricle_natural for p in phs if p.label == 0])
    # babies born just before 37 weeks differ from term babies by less than their natural spread (overlap);
    # very preterm babies by many times that spread
    assert near_term and np.mean(near_term) < natural_sd < np.mean(very_preterm) / 5


def test_cohort_files_datalist_and_participants(cohort):
    datalist = json.loads((cohort / "datalist.json").read_text())
    items = datalist["training"] + datalist["test"]
    assert len(items) == 24 and {i["label"] for i in items} == {0, 1}
    assert {i["fold"] for i in datalist["training"]} == {0, 1, 2, 3}
    assert datalist["test"] and all("fold" not in i for i in datalist["test"])
    for item in items:
        img = nib.load(cohort / item["image"])
        assert img.shape == SHAPE
        assert np.allclose(img.affine, template_affine())
        assert nib.aff2axcodes(img.affine) == ("A", "L", "S")
        assert (cohort / item["tissue"]).is_file() and (cohort / item["phenotype"]).is_file()
    rows = list(csv.DictReader((cohort / "participants.tsv").open(), delimiter="\t"))
    assert [r["participant_id"] for r in rows] == sorted(i["subject"] for i in items)
    for row in rows:
        preterm = any(i["label"] == 1 for i in items if i["subject"] == row["participant_id"])
        assert (float(row["birth_age"]) < 37) == preterm


def test_cohort_regeneration_is_identical(tmp_path, cohort):
    generate_cohort(tmp_path, subjects=3, seed=3, preterm_fraction=0.4, folds=2, test_fraction=0.34, workers=1)
    for name in ("sub-0001", "sub-0003"):
        a = nib.load(tmp_path / "images" / f"{name}.nii.gz").get_fdata()
        b = nib.load(cohort / "images" / f"{name}.nii.gz").get_fdata()
        assert np.array_equal(a, b)


def test_user_template_goes_through_the_same_path(tmp_path):
    from scripts.data.synthetic import main
    from scripts.runtime.outputs import save_nifti

    labels = procedural_labels()
    image = np.where(labels > 0, 100.0 + 10 * labels, 0).astype(np.float32)
    save_nifti(labels, template_affine(), tmp_path / "tpl_dseg.nii.gz", dtype=np.uint8)
    save_nifti(image, template_affine(), tmp_path / "tpl_T2w.nii.gz")
    assert main(["--output", str(tmp_path / "out"), "--subjects", "2", "--workers", "1", "--folds", "2",
                 "--test-fraction", "0.5", "--template-image", str(tmp_path / "tpl_T2w.nii.gz"),
                 "--template-labels", str(tmp_path / "tpl_dseg.nii.gz")]) == 0
    seg = nib.load(tmp_path / "out" / "labels" / "sub-0001.nii.gz").get_fdata()
    assert set(np.unique(seg).astype(int)) >= {CSF, CGM, WM, VENTRICLES}
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        generate_cohort(tmp_path / "x", subjects=2, template_labels=str(tmp_path / "missing.nii.gz"))


def test_stratified_splits():
    labels = [1] * 22 + [0] * 78
    items = [{"label": lab, "subject": f"s{i}"} for i, lab in enumerate(labels)]
    training, test = assign_splits(items, test_fraction=0.1, folds=10, seed=0)
    assert len(test) == 10 and sum(i["label"] for i in test) == 2
    assert {i["subject"] for i in training}.isdisjoint({i["subject"] for i in test})
    per_fold = [[i["label"] for i in training if i["fold"] == f] for f in range(10)]
    assert all(len(f) in (9, 9 + 1) for f in per_fold)
    assert all(sum(f) in (2, 2 - 1, 2 + 1) for f in per_fold)
    assert assign_splits(items, 0.1, 10, 0) == (training, test)
    assert not np.array_equal(stratified_folds(labels, 10, 0), stratified_folds(labels, 10, 1))
