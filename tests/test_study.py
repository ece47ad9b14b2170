"""The study: splits, class weights and LR schedule of train.json, clinical metrics, group averaging and the
one-command cross-validated study on a synthetic cohort (tiny settings), with its resume and bad datalists."""

import csv
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from browser import browser_page, open_pages
from conftest import ROOT

from scripts.evaluation.clinical_metrics import classification_metrics, misclassification_table, subject_table
from scripts.evaluation.cross_validation import expand_grid, select_best, summarise_cv
from scripts.evaluation.group_relevance import mean_volume, tissue_shares_table
from scripts.runtime.checks import class_weights
from scripts.runtime.datalist import check_study_datalist, load_split
from scripts.runtime.localisation import localisation, tissue_regions

TINY_STUDY = {"spatial_shape": [64, 48, 48], "pixdim": [2, 2, 2], "channels": [4, 8], "hidden": 8, "num_epochs": 2}


def _parse_train(cohort, **overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(ROOT), "dataset_dir": str(cohort), **TINY_STUDY, **overrides})
    return parser


def _write_datalist(path, training, test):
    path.write_text(json.dumps({"training": training, "test": test}))
    return path


def test_splits_command_stratifies_test_split_and_folds(tmp_path, cohort):
    items = load_split(str(cohort / "datalist.json"), "all", -1)
    plain = [{"image": it["image"], "label": it["label"]} for it in items]
    datalist = _write_datalist(tmp_path / "d.json", plain, [])
    with pytest.raises(ValueError,
                       match="lack a 'fold' field; add stratified folds with: python -m scripts.data.splits"):
        check_study_datalist(str(datalist))
    out = subprocess.run([sys.executable, "-m", "scripts.data.splits", "--datalist", str(datalist), "--folds", "3",
                          "--test-fraction", "0.25", "--seed", "5"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    data = json.loads(datalist.read_text())
    n_pre = sum(it["label"] for it in plain)
    assert len(data["test"]) == round(n_pre * 0.25) + round((len(plain) - n_pre) * 0.25)
    split_images = {it["image"] for it in data["training"]} | {it["image"] for it in data["test"]}
    assert split_images == {it["image"] for it in plain}
    info = check_study_datalist(str(datalist))
    assert info["folds"] == [0, 1, 2]
    for _ in info["folds"]:  # every class spread evenly over the folds
        for label in (0, 1):
            counts = [sum(1 for it in data["training"] if it["fold"] == f and it["label"] == label) for f in range(3)]
            assert max(counts) - min(counts) <= 1
    test_before = data["test"]
    subprocess.run([sys.executable, "-m", "scripts.data.splits", "--datalist", str(datalist), "--folds", "2",
                    "--keep-test"], cwd=ROOT, check=True, capture_output=True)
    data = json.loads(datalist.read_text())
    assert data["test"] == test_before and {it["fold"] for it in data["training"]} == {0, 1}


def test_class_weights_come_from_the_training_split(cohort):
    parser = _parse_train(cohort, fold=1, class_weight_factor=1.5)
    train = load_split(str(cohort / "datalist.json"), "train", 1)
    counts = [sum(1 for it in train if it["label"] == c) for c in (0, 1)]
    expected = [len(train) / (2 * counts[0]), 1.5 * len(train) / (2 * counts[1])]
    weight = parser.get_parsed_content("loss").weight
    assert torch.allclose(weight, torch.tensor(expected, dtype=torch.float32))
    assert class_weights(train, 1.5) == pytest.approx(expected)


def test_cyclical_learning_rate_values(cohort):
    parser = _parse_train(cohort, learning_rate=1e-3, min_learning_rate=1e-5, cycle_epochs=2, batch_size=2)
    optimizer = parser.get_parsed_content("optimizer")
    scheduler = parser.get_parsed_content("lr_scheduler")
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["betas"] == (0.9, 0.999)
    assert isinstance(scheduler, torch.optim.lr_scheduler.CyclicLR) and not scheduler.cycle_momentum
    iterations = len(parser.get_parsed_content("train#dataloader"))
    half = 2 * iterations // 2  # cycle_epochs * iterations per epoch / 2
    lrs = []
    for _ in range(4 * half + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[half] == pytest.approx(1e-3)  # first peak
    assert lrs[2 * half] == pytest.approx(1e-5)
    assert lrs[3 * half] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)  # triangular2: each cycle's amplitude halves
    assert lrs[4 * half] == pytest.approx(1e-5)
    assert min(lrs) >= 1e-5 - 1e-12 and max(lrs) <= 1e-3 + 1e-12


def test_metrics_on_a_known_confusion_matrix():
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p1 = [0.9, 0.8, 0.7, 0.4, 0.1, 0.2, 0.3, 0.4, 0.45, 0.6]
    m = classification_metrics(labels, [[1 - p, p] for p in p1])
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 1, 5, 1)
    assert m["accuracy"] == pytest.approx(0.8) and m["tpr"] == pytest.approx(0.75)
    assert m["tnr"] == pytest.approx(5 / 6) and m["balanced_accuracy"] == pytest.approx((0.75 + 5 / 6) / 2)
    assert m["auc"] == pytest.approx(21.5 / 24)  # 24 pairs, 21 won, one tie (0.4 vs 0.4)
    with pytest.raises(ValueError, match="labels must be 0"):
        classification_metrics([2, 0], [[0.5, 0.5], [0.5, 0.5]])


def test_subject_table_and_misclassified_birth_ages():
    items = [{"subject": "a", "label": 1, "birth_age": 30.0, "scan_age": 40.0},
             {"subject": "b", "label": 1, "birth_age": 36.5, "scan_age": 41.0},
             {"subject": "c", "label": 0, "birth_age": 39.0, "scan_age": 40.0},
             {"subject": "d", "label": 0, "birth_age": 41.0, "scan_age": 42.0}]
    probs = {"a": [0.1, 0.9], "b": [0.7, 0.3], "c": [0.8, 0.2], "d": [0.6, 0.4]}
    rows = subject_table(items, probs)
    assert [r["correct"] for r in rows] == [1, 0, 1, 1]
    mis = {r["class"]: r for r in misclassification_table(rows)}
    assert mis["preterm"]["misclassified"] == 1 and mis["preterm"]["birth_age_misclassified"] == "36.5"
    assert mis["term"]["birth_age_correct_mean"] == pytest.approx(40.0)
    with pytest.raises(KeyError, match="no prediction for subject e"):
        subject_table(items + [{"subject": "e", "label": 0}], probs)


def test_group_averaging_and_tissue_shares_on_tiny_volumes(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    a = np.zeros((4, 3, 2), np.float32)
    b = np.ones((4, 3, 2), np.float32)
    b[0, 0, 0] = 5.0
    for name, data in (("a", a), ("b", b)):
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"{name}.nii.gz")
    mean, aff = mean_volume([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])
    assert np.allclose(mean, (a + b) / 2) and np.allclose(aff, affine)
    nib.save(nib.Nifti1Image(np.zeros((4, 3, 3), np.float32), affine), tmp_path / "c.nii.gz")
    with pytest.raises(ValueError, match="c.nii.gz: grid"):
        mean_volume([tmp_path / "a.nii.gz", tmp_path / "c.nii.gz"])

    # the anatomy table: per (class, preset, region) the median over subjects of the localisation measure
    tissue = np.array([0, 0, 1, 1, 3, 3, 3, 3])  # brain: 6 of the 8 voxels; CSF a third of it, white matter 2/3
    relevance = np.array([1.0, -5.0, 2.0, 1.0, 0.5, 0.5, -1.0, 0.0])  # positive total 5, 1 of it outside the brain
    first = localisation(relevance, tissue)
    assert first["csf"]["share"] == pytest.approx(0.6) and first["csf"]["brain_share"] == pytest.approx(1 / 3)
    assert first["csf"]["enrichment"] == pytest.approx(1.8)  # against the brain; the grid's 1/4 would say 2.4
    assert first["outside_brain"]["share"] == pytest.approx(0.2)  # in the denominator of every share
    others = [localisation(np.array([0, 0, c, c, 1.0, 1, 1, 1]), tissue) for c in (0.0, 1.0, 4.0)]
    rows = tissue_shares_table({("preterm", "a2b1"): [first, *others]})
    csf = next(r for r in rows if r["region"] == "csf")
    # CSF shares 0.6, 0, 1/3, 2/3 (enrichment 1.8, 0, 1, 2): medians 0.467 and 1.4 over the 4 subjects
    assert csf["share"] == pytest.approx((0.6 + 1 / 3) / 2) and csf["enrichment"] == pytest.approx(1.4)
    assert csf["subjects"] == 4 and csf["brain_share"] == pytest.approx(1 / 3)
    assert csf["enrichment_low"] <= csf["enrichment"] <= csf["enrichment_high"]
    assert csf["enrichment_low"] >= 0 and csf["enrichment_high"] <= 2
    assert rows[-1]["region"] == "outside_brain" and rows[-1]["share"] == 0.0 and np.isnan(rows[-1]["brain_share"])
    assert [r["region"] for r in rows if r["region"] in ("csf", "csf_ventricles")] == ["csf", "csf_ventricles"]
    again = next(r for r in tissue_shares_table({("preterm", "a2b1"): [first, *others]}) if r["region"] == "csf")
    assert again == csf  # the same interval every time (a fixed seed)
    # a map without positive relevance (a1b0 of a negative logit) has no shares: left out of the median, counted
    negative = localisation(-np.ones(8), tissue)
    assert np.isnan(negative["csf"]["share"]) and negative["csf"]["brain_share"] == pytest.approx(1 / 3)
    rows = tissue_shares_table({("preterm", "a1b0"): [first, negative], ("term", "a1b0"): [negative]})
    csf = {r["class"]: r for r in rows if r["region"] == "csf"}
    assert csf["preterm"]["share"] == pytest.approx(0.6) and csf["preterm"]["subjects"] == 1
    assert np.isnan(csf["preterm"]["enrichment_low"])  # one subject: no interval
    assert np.isnan(csf["term"]["share"]) and csf["term"]["subjects"] == 0
    assert csf["term"]["brain_share"] == pytest.approx(1 / 3)
    # a region that only some subjects have (the phenotype of the preterm ones) is summarised over those
    phenotype = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)  # two voxels outside the brain: only its CSF voxel counts
    with_phenotype = localisation(relevance, tissue, tissue_regions(tissue, {"phenotype": phenotype}))
    rows = tissue_shares_table({("preterm", "a2b1"): [with_phenotype, first]})
    mine = next(r for r in rows if r["region"] == "phenotype")
    assert mine["subjects"] == 1 and mine["share"] == pytest.approx(0.4) and mine["brain_share"] == pytest.approx(1 / 6)
    assert mine["enrichment"] == pytest.approx(2.4)


def test_grid_and_selection():
    settings = expand_grid({"learning_rate": [1e-3, 3e-4], "class_weight_factor": [1, 2]})
    assert len(settings) == 4 and settings[0] == {"class_weight_factor": 1, "learning_rate": 1e-3}
    with pytest.raises(ValueError, match="grid key 'num_epochs'"):
        expand_grid({"num_epochs": 3})
    rows = [{"setting": s, "fold": f, "val_balanced_accuracy": v, "val_auc": a, "val_accuracy": v}
            for s, f, v, a in [("learning_rate-0.001", 0, 0.8, 0.9), ("learning_rate-0.001", 1, 0.6, 0.7),
                               ("learning_rate-0.0003", 0, 0.7, 0.95), ("learning_rate-0.0003", 1, 0.7, 0.95)]]
    summary = summarise_cv(rows, [{"learning_rate": 0.001}, {"learning_rate": 0.0003}])
    assert summary[0]["val_balanced_accuracy_mean"] == pytest.approx(0.7)
    assert summary[0]["val_balanced_accuracy_sd"] == pytest.approx(np.std([0.8, 0.6], ddof=1))
    assert select_best(summary)["setting"] == "learning_rate-0.0003"  # equal balanced accuracy, higher AUC


def _study(cohort, work, *extra):
    cmd = [sys.executable, "-m", "scripts.evaluation.study", "--dataset_dir", str(cohort),
           "--work_dir", str(work / "w"),
           "--output", str(work / "out"), "--override", json.dumps(TINY_STUDY),
           "--grid", json.dumps({"learning_rate": [1e-3, 3e-4]}), *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def _open_in_browser(study_html: Path, subjects: int, tmp_path: Path) -> None:
    """study.html in headless Chromium (tests/browser.py): its figure loads, every subject link leads to a page of
    the copied run report whose mosaic loads, no console error or failed request; skipped without Chromium."""
    try:
        with browser_page("study.html") as (page, problems):
            open_pages(page, [study_html])
            assert page.evaluate("document.images.length") >= 1
            links = page.evaluate("[...document.querySelectorAll('td a')].map(a => a.href)")
            assert len(links) == subjects
            for link in links:
                page.goto(link)
                page.wait_for_load_state("load")
                assert page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length") == 1
            page.goto(study_html.as_uri())
            page.screenshot(path=str(tmp_path / "study_html.png"), full_page=True)
            assert not problems, problems
    except pytest.skip.Exception as skipped:
        warnings.warn(f"study.html not opened in a browser: {skipped}", stacklevel=1)  # the rest still counts


def test_study_command_end_to_end_and_resume(tmp_path, cohort):
    proc = _study(cohort, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out, work = tmp_path / "out", tmp_path / "w"
    folds = list(csv.DictReader((out / "study_cv_folds.csv").open()))
    assert len(folds) == 2 * 4 and {r["fold"] for r in folds} == {"0", "1", "2", "3"}
    summary = list(csv.DictReader((out / "study_cv.csv").open()))
    assert [r["setting"] for r in summary] == ["learning_rate-0.001", "learning_rate-0.0003"]

    test = load_split(str(cohort / "datalist.json"), "test", -1)
    rows = list(csv.DictReader((out / "study_test_subjects.csv").open()))
    assert sorted(r["subject"] for r in rows) == sorted(it["subject"] for it in test)
    by_subject = {it["subject"]: it for it in test}
    predictions = {r["subject"]: float(r["prob_preterm"])
                   for r in csv.DictReader((work / "final" / "test" / "predictions.csv").open())}
    for r in rows:
        assert int(r["label"]) == by_subject[r["subject"]]["label"]
        assert float(r["birth_age"]) == by_subject[r["subject"]]["birth_age"]
        assert float(r["prob_preterm"]) == pytest.approx(predictions[r["subject"]], abs=1e-6)
        assert int(r["correct"]) == int((float(r["prob_preterm"]) > 0.5) == (int(r["label"]) == 1))
    metrics = next(csv.DictReader((out / "study_test_metrics.csv").open()))
    assert float(metrics["accuracy"]) == pytest.approx(np.mean([int(r["correct"]) for r in rows]), abs=1e-6)

    # group maps: the mean of the correctly classified subjects' maps, one per class present
    for cls, label in (("preterm", "1"), ("term", "0")):
        correct = [r["subject"] for r in rows if r["label"] == label and r["correct"] == "1"]
        group = work / "group" / f"{cls}_mean_relevance_a2b1.nii.gz"
        assert group.exists() == bool(correct)
        if correct:
            expected = np.mean([nib.load(work / "final" / "test" / s / f"{s}_relevance_a2b1.nii.gz").get_fdata()
                                for s in correct], axis=0)
            assert np.allclose(nib.load(group).get_fdata(), expected, atol=1e-5)
    anatomy = list(csv.DictReader((out / "study_anatomy.csv").open()))
    tissues = ["csf", "cortical_gm", "white_matter", "background", "ventricles", "cerebellum", "deep_gm", "brainstem",
               "hippocampus_amygdala"]
    for key in {(r["class"], r["preset"]) for r in anatomy}:
        mine = {r["region"]: r for r in anatomy if (r["class"], r["preset"]) == key}
        assert list(mine)[-1] == "outside_brain" and set(tissues + ["csf_ventricles"]) <= set(mine)
        assert sum(float(mine[t]["brain_share"]) for t in tissues) == pytest.approx(1.0, abs=0.05)  # medians
        for r in mine.values():
            if int(r["subjects"]) > 1 and r["region"] != "outside_brain":
                assert float(r["enrichment_low"]) <= float(r["enrichment"]) <= float(r["enrichment_high"])
                assert float(r["enrichment"]) == pytest.approx(float(r["share"]) / float(r["brain_share"]), rel=0.5)
    if any(r["class"] == "preterm" for r in anatomy):  # a correctly classified preterm baby
        assert "phenotype" in {r["region"] for r in anatomy if r["class"] == "preterm"}
    assert "phenotype" not in {r["region"] for r in anatomy if r["class"] == "term"}  # no phenotype voxel
    assert (out / "study_group_relevance.png").stat().st_size > 10_000
    assert "## Held-out test split" in (out / "study.md").read_text()
    # study.html: the same with its figure, and every test subject linked to its page of the run report
    page = (out / "study.html").read_text()
    assert "<h2>Held-out test split (preterm = positive)</h2>" in page and 'src="study_group_relevance.png"' in page
    # (to the copy of that report in the output folder, which is complete without the work folder)
    for r in rows:
        link = re.search(rf'<a href="([^"]+)">{re.escape(r["subject"])}</a>', page)
        assert link and link.group(1) == f"test_report/{r['subject']}/index.html"
        original = (work / "final" / "test" / "report" / r["subject"] / f"{r['subject']}_mosaic_a1b0.png").read_bytes()
        assert (out / "test_report" / r["subject"] / f"{r['subject']}_mosaic_a1b0.png").read_bytes() == original
    assert 'href="test_report/index.html"' in page
    _open_in_browser(out / "study.html", len(rows), tmp_path)

    # resume: a fold whose result is gone is the only one trained again; the final model is reused
    (work / "cv" / "learning_rate-0.0003" / "fold2" / "result.json").unlink()
    model = (work / "final" / "models" / "model.pt").stat().st_mtime_ns
    proc = _study(cohort, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("already finished (") == 7  # the fold messages (inference says "finished with this model")
    assert (work / "cv" / "learning_rate-0.0003" / "fold2" / "result.json").exists()
    assert "final model already trained" in log
    assert (work / "final" / "models" / "model.pt").stat().st_mtime_ns == model
    assert list(csv.DictReader((out / "study_cv_folds.csv").open()))[:5] == folds[:5]


@pytest.mark.parametrize("case", ["no_folds", "class_missing_in_fold", "empty_test"])
def test_study_rejects_datalists_it_cannot_use(tmp_path, cohort, case):
    data = json.loads((cohort / "datalist.json").read_text())
    for it in data["training"] + data["test"]:
        it["image"] = str(cohort / it["image"])
    if case == "no_folds":
        for it in data["training"]:
            del it["fold"]
        message = "lack a 'fold' field; add stratified folds with: python -m scripts.data.splits"
    elif case == "class_missing_in_fold":
        for it in data["training"]:
            if it["label"] == 1 and it["fold"] == 2:
                it["fold"] = 1
        message = "fold 2 has no preterm subject"
    else:
        data["test"] = []
        message = "the test split is empty"
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "scripts.evaluation.study", "--datalist", str(datalist), "--work_dir",
                           str(tmp_path / "w"), "--output", str(tmp_path / "o")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr and str(datalist) in proc.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()


def test_fold_out_of_range_names_the_key(cohort):
    with pytest.raises(ValueError, match="config key 'fold': fold=7 is out of range"):
        load_split(str(cohort / "datalist.json"), "validation", 7)
