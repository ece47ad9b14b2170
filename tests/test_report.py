"""The run report of ``run inference``: contents on a tiny cohort (rows, captions with the decision and probability,
images present, symmetric colour limits, failed subjects with their reason), a rerun and the switch, QC scores
beside their thresholds and what to do about a QC flag, the research-use notice, a map that could not be read,
counts in words, size for many subjects, and the report opened in a real browser (headless Chromium) at 1280 px."""

from __future__ import annotations

import csv
import hashlib
import html.parser
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from browser import browser_page, open_pages
from conftest import run_bundle, tiny_args

from scripts.evaluation.qc_eval import CORRUPTIONS
from scripts.runtime.outputs import input_path, relevance_path, report_image, report_index, report_page, write_csv
from scripts.runtime.reference import MEASURES, REFERENCE
from scripts.runtime.report import build_report, copy_report
from scripts.runtime.visual import brain_mask, symmetric_limit

# a subject name as long as real ones get (BIDS entities), on an input shifted off the template: QC flags it
LONG_NAME = "sub-CC00999XX99_ses-123456_acq-highres_rec-motioncorrected_desc-restore_run-01_T2w_shifted20mm"
NOTICE = "Research use only, not a clinical model"


class _Page(html.parser.HTMLParser):
    """Rows of ``table#predictions`` (cells as text, row class) and of other tables with an id (``tables``),
    images and figure captions of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self.images: list[dict] = []
        self.captions: list[str] = []
        self.links: list[str] = []
        self._table = self._row = self._cell = self._caption = None
        self._depth = 0
        self.feed(text)
        self.rows: list[dict] = self.tables.get("predictions", [])

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = {"class": attrs.get("class", "") or "", "cells": []}
        elif tag == "td" and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "figcaption":
            self._caption = []
        elif tag == "a":
            self.links.append(attrs.get("href", ""))

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "tr" and self._row is not None:
            if self._row["cells"]:
                self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "td" and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "figcaption":
            self.captions.append("".join(self._caption))
            self._caption = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._caption is not None:
            self._caption.append(data)


def _page(path: Path) -> _Page:
    return _Page(path.read_text())


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, cohort, trained):
    """``run inference`` with the report on, two presets, the test split plus one unreadable image (skip_bad) and
    one scan shifted 20 mm that QC flags (preprocess off: ``auto`` would register it, tests/test_native.py)."""
    work = tmp_path_factory.mktemp("report_run")
    data = json.loads((cohort / "datalist.json").read_text())
    for item in data["training"] + data["test"]:
        for key in ("image", "tissue", "phenotype"):
            item[key] = str(cohort / item[key])
    broken = work / "broken.nii.gz"
    raw = (cohort / "images" / "sub-0001.nii.gz").read_bytes()
    broken.write_bytes(raw[: len(raw) // 2])
    data["test"].append({"image": str(broken), "label": 0, "subject": "broken"})
    shifted = {}
    for key in ("image", "tissue"):  # the image and its tissue map moved 20 mm forward
        source = nib.load(data["test"][0][key])
        moved = CORRUPTIONS["shifted_20mm"](np.asarray(source.dataobj), source.affine, None)
        shifted[key] = str(work / f"{LONG_NAME}{'' if key == 'image' else '_dseg'}.nii.gz")  # subject: file name
        nib.save(nib.Nifti1Image(moved, source.affine, source.header), shifted[key])
    data["test"].append({**shifted, "label": 0, "subject": LONG_NAME})
    datalist = work / "datalist.json"
    datalist.write_text(json.dumps(data))
    out = work / "out"
    started = time.perf_counter()
    proc = run_bundle("inference", "configs/inference.json", "--datalist", str(datalist), "--dataset_dir", str(cohort),
                      "--ckpt_dir", str(trained[0]), "--output_dir", str(out), "--lrp_presets", "['a2b1','a1b0']",
                      "--skip_bad", "true", "--preprocess", "off", *tiny_args(report=True), check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]  # skip_bad: the broken image has no prediction
    return out, data["test"], proc, time.perf_counter() - started


def test_report_contents_on_a_tiny_cohort(report_run, trained):
    out, test_items, proc, _ = report_run
    index = report_index(out)
    assert index.is_file() and "run report:" in proc.stdout + proc.stderr
    page = _page(index)
    predictions = {r["subject"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    labels = {it["subject"]: it["label"] for it in test_items}
    rows = {r["cells"][0]: r for r in page.rows}
    assert len(page.rows) == len(test_items) == len(predictions) + 1  # one row per subject, the failed one too
    assert set(rows) == set(labels)

    failed = rows["broken"]
    assert "failed" in failed["class"] and "not a readable NIfTI" in failed["cells"][-1]
    assert not report_page(out, "broken").exists()
    for subject, row in predictions.items():
        wrong = int(row["prediction"]) != labels[subject]
        assert ("misclassified" in rows[subject]["class"]) == wrong
        assert rows[subject]["cells"][2] == f"{float(row['prob_preterm']):.3f}"

    text = index.read_text()
    digest = hashlib.sha256((trained[0] / "model.pt").read_bytes()).hexdigest()
    assert digest in text and "a2b1, a1b0 (mosaics: a2b1)" in text
    assert "http://" not in text and "https://" not in text and "<script" not in text  # offline, no CDN

    for subject, row in predictions.items():
        page_path = report_page(out, subject)
        subject_page = _page(page_path)
        decided = ["term", "preterm"][int(row["prediction"])]
        prob = float(row["prob_preterm"] if decided == "preterm" else row["prob_term"])
        assert len(subject_page.captions) == 1
        assert f"prediction {decided} (p({decided}) = {prob:.3f})" in subject_page.captions[0]
        (image,) = subject_page.images
        png = page_path.parent / image["src"]
        assert png == report_image(out, subject, "mosaic_a2b1") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 5000
        low, high = float(image["data-limit-low"]), float(image["data-limit-high"])
        assert high > 0 and low == -high  # symmetric colour limits
        relevance = nib.load(relevance_path(out, subject, "a2b1")).get_fdata()
        network_input = nib.load(input_path(out, subject)).get_fdata()
        assert high == pytest.approx(symmetric_limit(relevance, brain_mask(network_input)), rel=1e-5)
        assert not report_image(out, subject, "mosaic_a1b0").exists()  # mosaics for the first preset only
        hrefs = subject_page.links
        assert any(h.endswith(f"{subject}_relevance_a1b0.nii.gz") for h in hrefs)  # the others linked as files
        assert (page_path.parent / next(h for h in hrefs if h.endswith("_relevance_a1b0.nii.gz"))).is_file()
        assert "Positive relevance per tissue" in page_path.read_text()  # the datalist gives tissue maps
        start = next(r["start_relevance"] for r in csv.DictReader((out / "relevance.csv").open())
                     if r["subject"] == subject and r["preset"] == "a2b1")
        assert f"<td>a2b1</td><td class=\"num\">{start}</td>" in page_path.read_text()  # the explained logit
    assert not list(out.rglob("*.tmp*"))


def test_report_rerun_updates_it_and_the_switch_turns_it_off(report_run, cohort, trained, tmp_path):
    out, test_items, _, _ = report_run
    rerun = tmp_path / "rerun"
    shutil.copytree(out, rerun)
    index = report_index(rerun)
    written = re.search(r"<td>written</td><td[^>]*>([^<]+)</td>", index.read_text()).group(1)
    time.sleep(1.1)
    datalist = json.loads((out.parent / "datalist.json").read_text())
    datalist["test"] = [it for it in datalist["test"] if it["subject"] != "broken"]
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    common = ["--datalist", str(tmp_path / "datalist.json"), "--dataset_dir", str(cohort), "--ckpt_dir",
              str(trained[0]), "--lrp_presets", "['a2b1','a1b0']", "--skip_bad", "true"]
    proc = run_bundle("inference", "configs/inference.json", *common, "--output_dir", str(rerun),
                      *tiny_args(report=True))
    assert "nothing left to do" in proc.stdout + proc.stderr  # every subject finished: the report is rebuilt
    assert re.search(r"<td>written</td><td[^>]*>([^<]+)</td>", index.read_text()).group(1) != written
    assert len(_page(index).rows) == len(test_items) - 1  # this run's skipped.csv lists no failure

    off = tmp_path / "off"
    run_bundle("inference", "configs/inference.json", *common, "--output_dir", str(off), *tiny_args(report=False))
    assert (off / "predictions.csv").is_file() and not (off / "report").exists()


def test_a_copied_report_is_complete_on_its_own(report_run, tmp_path):
    """copy_report (the study's test_report/): pages and mosaics copied; every link left in the copy leads to a
    file inside it, the links to the run's NIfTIs and tables become their plain names; a second copy replaces the
    first."""
    out, _, _, _ = report_run
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "stale.html").write_text("from an earlier copy")
    index = copy_report(out, tmp_path / "copy")
    assert index == tmp_path / "copy" / "index.html" and not (tmp_path / "copy" / "stale.html").exists()
    source = sorted(p.relative_to(out / "report") for p in (out / "report").rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path / "copy") for p in (tmp_path / "copy").rglob("*") if p.is_file()) == source
    for page_path in (tmp_path / "copy").rglob("*.html"):
        page = _page(page_path)
        for target in page.links + [image["src"] for image in page.images]:
            resolved = (page_path.parent / target).resolve()
            assert resolved.is_file() and resolved.is_relative_to(tmp_path / "copy"), (page_path, target)
    subjects = sorted(p.parent.name for p in (tmp_path / "copy").glob("*/index.html"))
    assert {f"{s}/index.html" for s in subjects} <= set(_page(index).links)  # the report's own links are kept
    for page_path in (tmp_path / "copy").glob("*/index.html"):
        assert "../index.html" in _page(page_path).links  # "all subjects"
    subject = subjects[0]
    text = (tmp_path / "copy" / subject / "index.html").read_text()
    assert f'<span class="muted">{subject}_relevance_a1b0.nii.gz</span>' in text  # the file named, not linked
    assert (tmp_path / "copy" / subject / f"{subject}_mosaic_a2b1.png").read_bytes() == report_image(
        out, subject, "mosaic_a2b1").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-built copy left
    with pytest.raises(FileNotFoundError, match="no run report"):
        copy_report(tmp_path / "nothing", tmp_path / "copy2")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="a_file: it exists and is not a folder"):
        copy_report(out, tmp_path / "a_file")

    # the half-built copy of a killed run is removed by the next copy; that of a live process is kept
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale, live = tmp_path / f".copy.{gone.pid}.x1.tmp", tmp_path / f".copy.{os.getpid()}.x2.tmp"
    for folder in (stale, live):
        (folder / "sub").mkdir(parents=True)
    copy_report(out, tmp_path / "copy")
    assert not stale.exists() and live.exists()


def _tiny_run(folder: Path, subjects: list[str], qc: dict[str, tuple[str, str]] | None = None) -> None:
    """An inference output folder written by hand: predictions.csv (with QC columns), relevance.csv, maps."""
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    rows, relevance_rows = [], []
    for i, s in enumerate(subjects):
        image = np.zeros((24, 20, 18), np.float32)
        image[3:21, 3:17, 3:15] = rng.normal(size=(18, 14, 12))
        relevance = np.where(image != 0, rng.normal(scale=1e-3, size=image.shape), 0).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), _mkdir(input_path(folder, s)))
        nib.save(nib.Nifti1Image(relevance, affine), _mkdir(relevance_path(folder, s, "a2b1")))
        p = 0.2 + 0.6 * (i % 2)
        row = {"subject": s, "image": f"/data/{s}.nii.gz", "prob_term": f"{1 - p:.6f}", "prob_preterm": f"{p:.6f}",
               "prediction": int(p > 0.5), "label": (i + i // 4) % 2, "run_key": "k"}
        if qc is not None:
            row["qc_pass"], row["qc_failed"] = qc.get(s, ("true", ""))
            row["qc_snr"] = f"{10 + i:.1f}"
        rows.append(row)
        relevance_rows.append({"subject": s, "preset": "a2b1", "pred": row["prediction"], "target": row["prediction"],
                               "conservation": "0.5", "relevance_sum": "0.1"})
    write_csv(rows, folder / "predictions.csv")
    write_csv(relevance_rows, folder / "relevance.csv")


def _mkdir(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_report_shows_qc_columns_and_a_map_that_cannot_be_read(tmp_path):
    subjects = [f"s{i:02d}" for i in range(6)]
    _tiny_run(tmp_path, subjects, qc={"s01": ("false", "snr"), "s02": ("true", "")})
    relevance_path(tmp_path, "s03", "a2b1").write_bytes(b"\x1f\x8b broken")  # a map that was not written whole
    write_csv([{"subject": "s99", "image": "/data/s99.nii.gz", "reason": "/data/s99.nii.gz: every voxel is zero"}],
              tmp_path / "skipped.csv")
    index = build_report(tmp_path, presets=["a2b1"], target="pred")
    page = _page(index)
    rows = {r["cells"][0]: r for r in page.rows}
    assert sorted(rows) == [*subjects, "s99"]
    assert "qc-flagged" in rows["s01"]["class"] and "qc-flagged" not in rows["s02"]["class"]
    text = index.read_text()
    assert "<th>input QC</th>" in text and "1 flagged by input QC" in text
    assert rows["s01"]["cells"][7] == "flagged: snr 11" and rows["s02"]["cells"][7] == "passed"
    qc = {r["cells"][0]: r["cells"][1:] for r in _page(report_page(tmp_path, "s01")).tables["qc"]}
    assert qc == {"snr": ["11.0", "-"]}  # another qc_* column: its value, no threshold known
    assert "failed" in rows["s03"]["class"] and "not a readable NIfTI" in rows["s03"]["cells"][-1]
    assert "failed" in rows["s99"]["class"] and "every voxel is zero" in rows["s99"]["cells"][-1]
    s03 = _page(report_page(tmp_path, "s03"))
    assert not s03.images and "not a readable NIfTI" in report_page(tmp_path, "s03").read_text()
    assert not report_image(tmp_path, "s03", "mosaic_a2b1").exists()  # a failed map: no broken image
    assert report_image(tmp_path, "s00", "mosaic_a2b1").is_file()

    # a negative explained logit is said on the page (the whole alpha1-beta0 map is then negative)
    rows = list(csv.DictReader((tmp_path / "relevance.csv").open()))
    for r in rows:
        r["start_relevance"] = "-0.05" if r["subject"] == "s04" else "2.0"
    write_csv(rows, tmp_path / "relevance.csv")
    build_report(tmp_path, presets=["a2b1"])
    assert "explained logit is negative" in report_page(tmp_path, "s04").read_text()
    assert "explained logit is negative" not in report_page(tmp_path, "s05").read_text()

    # without QC columns (QC not installed): no QC column, no QC line
    plain = tmp_path / "plain"
    _tiny_run(plain, subjects[:2])
    text = build_report(plain).read_text()
    assert "qc_pass" not in text and "<th>input QC</th>" not in text


def test_tissue_panel_measures_relevance_against_the_brain(tmp_path):
    """The subject page's tissue panel is ``scripts.runtime.localisation``: shares of the positive relevance (the
    outside-brain part in the denominator and on its own row), enrichment against the brain, not the grid."""
    _tiny_run(tmp_path, ["s00", "s01", "s02"])
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    tissue = np.zeros((24, 20, 18), np.float32)  # brain: 18x14x12 = 3024 voxels, 35 % of the 8640-voxel grid
    tissue[3:21, 3:17, 3:15] = 3  # white matter
    tissue[3:9, 3:17, 3:15] = 1  # CSF: 1008 voxels, a third of the brain (11.7 % of the grid)
    tissue[9:12, 3:17, 3:15] = 5  # ventricles: 504 voxels, a sixth of the brain
    nib.save(nib.Nifti1Image(tissue, affine), tmp_path / "tissue.nii.gz")
    relevance = np.where(tissue == 1, 1.0, 0.0).astype(np.float32)  # 1008 in the CSF
    relevance[0] = 1008 / (20 * 18)  # as much outside the brain
    relevance[tissue == 3] = -1.0  # negative relevance does not count
    nib.save(nib.Nifti1Image(relevance, affine), relevance_path(tmp_path, "s00", "a2b1"))
    nib.save(nib.Nifti1Image(-np.abs(relevance), affine), relevance_path(tmp_path, "s01", "a2b1"))
    items = [{"subject": s, "tissue": str(tmp_path / "tissue.nii.gz")} for s in ("s00", "s01")]
    build_report(tmp_path, presets=["a2b1"], items=items,
                 label_transform=lambda d: {"tissue": nib.load(d["tissue"]).get_fdata()[None]})

    page = _page(report_page(tmp_path, "s00"))
    table = {r["cells"][0]: r["cells"][1:] for r in page.tables["tissue"]}
    assert table["csf"] == ["50.0", "33.3", "1.50"]  # the grid's denominator would have said 4.29
    assert table["ventricles"] == ["0.0", "16.7", "0.00"]
    assert table["csf_ventricles"] == ["50.0", "50.0", "1.00"]
    assert table["white_matter"] == ["0.0", "50.0", "0.00"]
    assert table["cerebellum"] == ["0.0", "0.0", "-"]  # no voxel of it: no enrichment
    assert table["outside_brain"] == ["50.0", "-", "-"]
    assert list(table)[-1] == "outside_brain" and "share of the brain (%)" in report_page(tmp_path, "s00").read_text()
    # a map without positive relevance has no shares, and says so
    negative = report_page(tmp_path, "s01").read_text()
    assert "no positive relevance, so it has no shares" in negative
    assert {r["cells"][0]: r["cells"][1:] for r in _page(report_page(tmp_path, "s01")).tables["tissue"]}[
        "csf"] == ["-", "33.3", "-"]
    assert "Positive relevance per tissue" not in report_page(tmp_path, "s02").read_text()  # no tissue map


def test_report_of_many_subjects_stays_light(tmp_path):
    """Per-subject pages keep the index small: its size grows by a few hundred bytes per subject."""
    subjects = [f"sub-{i:04d}" for i in range(40)]
    _tiny_run(tmp_path, subjects)
    started = time.perf_counter()
    index = build_report(tmp_path, presets=["a2b1"])
    seconds = time.perf_counter() - started
    assert len(_page(index).rows) == 40 and seconds < 60
    per_row = index.stat().st_size / 40
    assert per_row < 1500, per_row
    assert all(report_page(tmp_path, s).stat().st_size < 20_000 for s in subjects)


def test_report_in_a_headless_browser(report_run, tmp_path):
    """Opened from disk in Debian's Chromium (headless, through Playwright's Python package; no browser download):
    every image loads, no console error, one table row per subject, the research-use notice visible and no page
    wider than a 1280 px window (a long subject name, long failure reasons, QC scores); screenshots saved under
    tmp_path."""
    out, test_items, _, _ = report_run
    pages = [report_index(out)] + [report_page(out, s) for s in sorted(
        r["subject"] for r in csv.DictReader((out / "predictions.csv").open()))]
    assert report_page(out, LONG_NAME) in pages

    def check(n: int, path: Path) -> None:
        width = page.evaluate("Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)")
        assert width <= 1280, f"{path}: {width} px wide in a 1280 px window"
        assert page.get_by_text(NOTICE).is_visible()
        if n == 0:
            assert page.locator("table#predictions tbody tr").count() == len(test_items)
            page.screenshot(path=str(tmp_path / "report_index.png"), full_page=True)
        else:
            assert page.evaluate("document.images.length") == 1
            assert page.evaluate("document.images[0].naturalWidth") >= 600  # readable at its natural size
            if n == 1:
                page.screenshot(path=str(tmp_path / "report_subject.png"), full_page=True)

    with browser_page("the run report") as (page, problems):
        open_pages(page, pages, check)
        assert not problems, problems
    assert (tmp_path / "report_index.png").stat().st_size > 10_000
    assert (tmp_path / "report_subject.png").stat().st_size > 10_000


def test_a_long_subject_name_is_not_cut_off_in_its_mosaic(report_run):
    """The mosaic's title (subject, preset, decision) wraps or widens the picture: the margins stay white."""
    from matplotlib.image import imread

    out, _, _, _ = report_run
    png = imread(report_image(out, LONG_NAME, "mosaic_a2b1"))[..., :3]
    assert png[:, :6].min() == 1.0 and png[:, -6:].min() == 1.0  # nothing drawn into the 8-pixel margins
    assert png[:40].min() < 0.5  # the title is there


def _text(path: Path) -> str:
    """A page's text without tags, whitespace collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", path.read_text())))


def test_report_shows_qc_scores_beside_thresholds_and_what_to_do(report_run, trained):
    """Every page says research use only; each subject page lists every QC score beside its threshold (max, from
    the QC reference next to the model); the index gives the failed measures of a flagged subject with their
    thresholds, and what to do (the preprocessing command, as code)."""
    out, _, _, _ = report_run
    thresholds = json.loads((trained[0] / REFERENCE).read_text())["thresholds"]
    pages = sorted((out / "report").rglob("*.html"))
    assert len(pages) > 2 and all(NOTICE in _text(p) for p in pages)
    predictions = {r["subject"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    for subject, row in predictions.items():
        qc = {r["cells"][0]: r["cells"][1:] for r in _page(report_page(out, subject)).tables["qc"]}
        for m in MEASURES:
            expected = "failed" if m in row["qc_failed"].split(";") else "passed"
            assert qc[m] == [f"{float(row[f'qc_{m}']):.3g} (max {thresholds[m]:.3g})", expected], (subject, m, qc)
    flagged = predictions[LONG_NAME]
    failed = flagged["qc_failed"].split(";")
    assert flagged["qc_pass"] == "false" and failed and "preprocess" in flagged["qc_advice"]
    rows = {r["cells"][0]: r for r in _page(report_index(out)).rows}
    cell = rows[LONG_NAME]["cells"][7]
    scores = ", ".join(f"{m} {float(flagged[f'qc_{m}']):.3g} (max {thresholds[m]:.3g})" for m in failed)
    assert cell == f"flagged: {scores}", cell
    passed = next(s for s, r in predictions.items() if r["qc_pass"] == "true")
    assert rows[passed]["cells"][7] == "passed"
    index = report_index(out).read_text()
    assert "<code>python -m scripts.data.preprocess run --datalist native.json" in index  # needs attention
    assert "input QC thresholds (max)" in index and f"similarity {thresholds['similarity']:.3g}" in index
    assert "<code>python -m scripts.data.preprocess run" in report_page(out, LONG_NAME).read_text()
    assert f'"image": "{flagged["image"]}"' in _text(report_page(out, LONG_NAME))  # with the scan's own path
    advised = _text(report_index(out)).split("What to do about input QC", 1)[1]  # each kind of advice once
    assert LONG_NAME in advised and advised.count("scripts.data.preprocess run") == 1


def test_counts_are_in_words_of_the_right_number(tmp_path, caplog):
    """1 subject, 2 subjects: never "1 subjects" on a page or in the log."""
    caplog.set_level("INFO", logger="scripts.runtime.report")
    for count in (1, 2):
        folder = tmp_path / str(count)
        _tiny_run(folder, [f"s{i}" for i in range(count)])
        index = build_report(folder, presets=["a2b1"])
        noun = "subject" if count == 1 else "subjects"
        assert f"{count} {noun} predicted" in _text(index)
        assert f"({count} {noun}, 0 failed)" in caplog.text
    pages = [p.read_text() for p in tmp_path.rglob("*.html")]
    assert not [m for p in pages for m in re.findall(r"\b1 (?:subjects|maps|presets|failures)\b", p)]
    assert "1 subjects" not in caplog.text
