"""What ``python -m monai.bundle run inference`` prints and the status it exits with: one line per subject (decision,
probability, QC verdict), the summary line ``N predicted, F flagged, R refused/skipped -> <path>``, exit status 0
when every input has a prediction (an earlier, resumed run's included) and 3 when some or all inputs were refused;
and the default LRP presets, the apps' recommended one first, which the run report pictures."""

from __future__ import annotations

import csv
import re
import shutil

from conftest import ROOT, TINY, run_bundle, tiny_args
from monai.bundle import ConfigParser

from scripts.evaluation.qc_eval import write_variants
from scripts.runtime.datalist import load_split
from scripts.runtime.explain import APP_PRESET
from scripts.runtime.outputs import report_image, report_index

LINE = re.compile(r"^(?P<subject>\S+): (?P<decision>term|preterm) \(p = (?P<p>[01]\.\d{3})\), "
                  r"(?P<qc>QC passed|QC flagged: [a-z_, ]+|QC off)(?P<earlier> \(earlier run\))?$")


def _rows(path):
    return {r["subject"]: r for r in csv.DictReader(path.open())} if path.is_file() else {}


def _lines(proc) -> dict[str, str]:
    """The per-subject lines of stdout, by subject (every line that starts with ``<subject>: ``)."""
    return {m.group(1): line for line in proc.stdout.splitlines() if (m := re.match(r"^(\S+): ", line))}


def _check_lines(lines: dict[str, str], predictions: dict, earlier: bool) -> None:
    """Each predicted subject's line gives the decision and probability of its predictions.csv row and its QC."""
    for subject, row in predictions.items():
        match = LINE.match(lines[subject])
        assert match, lines[subject]
        decision = ["term", "preterm"][int(row["prediction"])]
        assert match["decision"] == decision
        assert match["p"] == f"{float(row['prob_' + decision]):.3f}"
        assert match["qc"] == ("QC passed" if row["qc_pass"] == "true" else
                               "QC flagged: " + row["qc_failed"].replace(";", ", "))
        assert bool(match["earlier"]) == earlier


def test_default_presets_start_with_the_apps_preset():
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT)})
    presets = parser.get_parsed_content("lrp_presets")
    assert presets == [APP_PRESET, "a1b0", "a2b1", "a3b2"]  # the recommended one first, the seed paper's after it


def test_all_predicted_exits_0_with_one_line_per_subject_and_a_summary(tmp_path, cohort, trained):
    """Default presets, report on: the summary points to the report, whose mosaics show the apps' preset; a
    rerun with nothing left to do counts the earlier run's subjects as predicted and still exits 0."""
    out = tmp_path / "out"
    args = ["inference", "configs/inference.json", "--dataset_dir", str(cohort), "--ckpt_dir", str(trained[0]),
            "--output_dir", str(out), *tiny_args(report=True)]
    proc = run_bundle(*args, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    predictions = _rows(out / "predictions.csv")
    subjects = {item["subject"] for item in load_split(str(cohort / "datalist.json"), "test", -1)}
    assert set(predictions) == subjects
    lines = _lines(proc)
    assert set(lines) == subjects, proc.stdout[-3000:]
    _check_lines(lines, predictions, earlier=False)
    flagged = sum(r["qc_pass"] == "false" for r in predictions.values())
    summary = f"{len(subjects)} predicted, {flagged} flagged, 0 refused/skipped -> {report_index(out)}"
    assert proc.stdout.strip().splitlines()[-1] == summary
    assert "Orientationd" not in proc.stderr  # its FutureWarning: the configs set `labels` explicitly
    for subject in subjects:  # the report pictures the first preset: the apps' recommended one
        assert report_image(out, subject, f"mosaic_{APP_PRESET}").is_file()
        assert not report_image(out, subject, "mosaic_a1b0").exists()

    again = run_bundle(*args, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing left to do" in again.stdout + again.stderr
    lines = _lines(again)
    assert set(lines) == subjects, again.stdout[-3000:]
    _check_lines(lines, predictions, earlier=True)
    assert again.stdout.strip().splitlines()[-1] == summary


def test_refused_inputs_exit_3_after_the_outputs_are_written(tmp_path, cohort, trained):
    """qc=refuse with two good and two noise inputs: 2 predicted, 2 refused, status 3; with only the noise inputs
    nothing is predicted: status 3 too. The tables are complete when the process has ended."""
    items = load_split(str(cohort / "datalist.json"), "test", -1)[:2]
    records = write_variants(items, tmp_path / "variants", corruptions=("noise",))
    bad = {r["subject"] for r in records if r["corruption"] == "noise"}
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    for record in records:
        if record["subject"] in bad:
            shutil.copy(record["image"], only_bad)

    out = tmp_path / "out"
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(tmp_path / "variants"),
                      "--ckpt_dir", str(trained[0]), "--output_dir", str(out), "--lrp_presets", "['a2b1']",
                      "--qc", "refuse", *TINY, check=False)  # report off: the summary names the table
    assert proc.returncode == 3, proc.stderr[-3000:]
    predictions = _rows(out / "predictions.csv")
    assert set(predictions) == {r["subject"] for r in records} - bad
    assert set(_rows(out / "skipped.csv")) == bad
    lines = _lines(proc)
    assert set(lines) == {r["subject"] for r in records}, proc.stdout[-3000:]
    _check_lines(lines, predictions, earlier=False)
    for subject in bad:
        assert re.fullmatch(rf"{subject}: refused by QC \([a-z_, ]+\), no prediction", lines[subject]), lines[subject]
    assert proc.stdout.strip().splitlines()[-1] == \
        f"2 predicted, 0 flagged, 2 refused/skipped -> {out / 'predictions.csv'}"

    none = tmp_path / "none"
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(only_bad), "--ckpt_dir",
                      str(trained[0]), "--output_dir", str(none), "--lrp_presets", "['a2b1']", "--qc", "refuse",
                      *TINY, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert _rows(none / "predictions.csv") == {} and set(_rows(none / "skipped.csv")) == bad
    assert proc.stdout.strip().splitlines()[-1] == \
        f"0 predicted, 0 flagged, 2 refused/skipped -> {none / 'predictions.csv'}"
