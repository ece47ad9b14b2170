"""Three kinds of data, never mixed (issue 38): the named cohorts, the evaluation cohort's datalist, the guard that
keeps every tuning command away from it (asserted on the files each command opened), and the command that measures
on it (``cohort_metrics``) with its bootstrap helpers.

File opens are recorded with an audit hook (``sys.addaudithook``, event ``open``): hooks cannot be removed, so this
one records only while a test holds ``recording()``. A command pointed at the evaluation cohort must stop with the
one-line error before opening anything of that cohort but its ``datalist.json``; pointed at a tuning cohort, the same
command is stopped at the first image it opens, and everything it opened of that cohort must be its datalist and its
subjects' files.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT
from monai.bundle import ConfigParser
from monai.metrics import compute_roc_auc

from scripts.data import cohorts
from scripts.data.synthetic import draw_phenotype, generate_cohort
from scripts.evaluation import bootstrap, cohort_metrics, composite_search, explain_eval, qc_eval, robustness, sanity
from scripts.evaluation import study as study_command
from scripts.evaluation.clinical_metrics import classification_metrics
from scripts.runtime.datalist import EvaluationCohortError, check_study_datalist, load_split

SEED, PRETERM = 12, 0.5  # 8 subjects: both classes in the test split and in each of 2 folds (the study's check)
WEIGHTS = ROOT / "models" / "model.pt"
REFUSED = re.compile(r"the evaluation cohort .*tuning commands .* may not read it")


# -- recording the files a command opens ----------------------------------------------------------------------------
class _Stopped(BaseException):  # not an Exception: no command's error handling swallows it
    """Raised by the audit hook at the first image opened under the folder it watches."""


_RECORD: dict = {"opened": None, "stop_under": None}


def _audit(event: str, args: tuple) -> None:
    if event != "open" or _RECORD["opened"] is None:
        return
    path = args[0] if args else None
    if not isinstance(path, (str, bytes, os.PathLike)):
        return  # a file descriptor
    path = os.path.abspath(os.fsdecode(path))
    _RECORD["opened"].append(path)
    stop = _RECORD["stop_under"]
    if stop and any(path.startswith(s) for s in stop):
        raise _Stopped(path)


sys.addaudithook(_audit)


def _prefixes(folder: Path) -> tuple[str, ...]:
    return tuple({os.path.abspath(folder) + os.sep, os.path.realpath(folder) + os.sep})


@contextlib.contextmanager
def recording(stop_at_images_of: Path | None = None):
    """The paths opened inside the block (absolute); with ``stop_at_images_of``, the first open of a file in that
    cohort's ``images/`` raises ``_Stopped``."""
    opened: list[str] = []
    _RECORD["opened"], _RECORD["stop_under"] = opened, _prefixes(stop_at_images_of / "images") \
        if stop_at_images_of else None
    try:
        yield opened
    finally:
        _RECORD["opened"], _RECORD["stop_under"] = None, None


def _inside(opened: list[str], folder: Path) -> list[str]:
    prefixes = _prefixes(folder)
    return sorted({p for p in opened if p.startswith(prefixes)})


def _subject_files(folder: Path) -> set[str]:
    data = json.loads((folder / "datalist.json").read_text())
    files = {str(folder / it[k]) for it in data["training"] + data["test"] for k in ("image", "tissue", "phenotype")}
    return {os.path.abspath(f) for f in files} | {os.path.realpath(f) for f in files}


# -- the cohorts ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> Path:
    """An evaluation-role cohort: 6 subjects (3 preterm), every one in the test split."""
    out = tmp_path_factory.mktemp("evaluation_cohort")
    generate_cohort(out, subjects=6, seed=SEED, preterm_fraction=PRETERM, role="evaluation")
    return out


@pytest.fixture(scope="module")
def tuning(tmp_path_factory) -> Path:
    """A normal cohort with the same seed (8 subjects, 2 folds, 2 test subjects): what the tuning commands read."""
    out = tmp_path_factory.mktemp("tuning_cohort")
    generate_cohort(out, subjects=8, seed=SEED, preterm_fraction=PRETERM, folds=2, test_fraction=0.25)
    return out


def test_the_named_cohorts():
    assert cohorts.ROBUSTNESS == cohorts.Cohort("robustness", 7, 32, 0.22, "tuning", folds=2, test_fraction=0.25)
    assert cohorts.TUNING == cohorts.Cohort("tuning", 38, 64, 0.5, "tuning")
    assert cohorts.EVALUATION == cohorts.Cohort("evaluation", 3801, 96, 0.45, "evaluation")
    assert [c.role for c in cohorts.COHORTS.values()] == ["tuning", "tuning", "evaluation"]
    # the counts, from the phenotypes alone (the generator's first draw per subject)
    preterm = {name: sum(draw_phenotype(np.random.default_rng([c.seed, i]), c.preterm_fraction).label
                         for i in range(c.subjects)) for name, c in cohorts.COHORTS.items()}
    assert preterm == {"robustness": 9, "tuning": 26, "evaluation": 42}
    assert robustness.build_parser().parse_args([]).subjects == cohorts.ROBUSTNESS.subjects
    with pytest.raises(ValueError, match="role"):
        cohorts.Cohort("x", 5, 8, 0.5, "testing")
    with pytest.raises(ValueError, match="evaluation cohort's seed"):
        robustness.fresh_cohort(Path("unused"), cohorts.EVALUATION.seed, 8)


def test_evaluation_cohort_has_every_subject_in_test_and_the_same_subjects(evaluation, tuning):
    data = json.loads((evaluation / "datalist.json").read_text())
    assert data["role"] == "evaluation" and data["training"] == [] and data["seed"] == SEED
    assert [it["subject"] for it in data["test"]] == [f"sub-{i:04d}" for i in range(1, 7)]
    assert sum(it["label"] for it in data["test"]) == 3
    normal = json.loads((tuning / "datalist.json").read_text())
    assert "role" not in normal and len(normal["training"]) == 6 and len(normal["test"]) == 2
    listed = {it["subject"]: it for it in normal["training"] + normal["test"]}
    for item in data["test"][:2]:  # the same subjects, bit for bit, as the normal cohort with that seed
        assert {k: v for k, v in listed[item["subject"]].items() if k != "fold"} == item
        for key in ("image", "tissue", "phenotype"):
            mine, theirs = nib.load(evaluation / item[key]), nib.load(tuning / item[key])
            assert np.asarray(mine.dataobj).tobytes() == np.asarray(theirs.dataobj).tobytes()
            assert np.array_equal(mine.affine, theirs.affine)


def test_generate_reuses_its_own_folder_and_refuses_another_cohort(tmp_path, evaluation):
    tiny = replace(cohorts.EVALUATION, name="tiny", seed=SEED, subjects=6, preterm_fraction=PRETERM)
    folder = tmp_path / "tiny"
    shutil.copytree(evaluation, folder)
    before = (folder / "datalist.json").stat().st_mtime_ns
    assert cohorts.generate(tiny, folder) == folder / "datalist.json"  # already there: nothing written
    assert (folder / "datalist.json").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="holds another cohort"):
        cohorts.generate(replace(tiny, subjects=7), folder)
    assert cohorts.describe(json.loads((folder / "datalist.json").read_text())).startswith("not a named cohort")
    assert cohorts.describe({"seed": 3801, "role": "evaluation", "training": [], "test": [{}] * 96}).startswith(
        "the evaluation cohort")


# -- the guard ------------------------------------------------------------------------------------------------------
def test_load_split_refuses_the_evaluation_cohort_to_tuning(evaluation, tmp_path):
    datalist = evaluation / "datalist.json"
    with recording() as opened:
        with pytest.raises(EvaluationCohortError, match=REFUSED) as err:
            load_split(str(datalist), "test", -1, tuning=True)
    assert str(datalist) in str(err.value)
    assert _inside(opened, evaluation) == [os.path.abspath(datalist)]
    with pytest.raises(EvaluationCohortError, match=REFUSED):
        load_split(str(evaluation), "test", -1, require_label=False, tuning=True)  # the folder of the cohort
    with pytest.raises(EvaluationCohortError, match=REFUSED):
        check_study_datalist(str(datalist))  # the study always tunes
    assert len(load_split(str(datalist), "test", -1)) == 6  # measuring is allowed
    # defence in depth: a copy of its datalist without the role, pointing at its files, or its images folder
    data = json.loads(datalist.read_text())
    data.pop("role")
    for item in data["test"]:
        for key in ("image", "tissue", "phenotype"):
            item[key] = str(evaluation / item[key])
    copy = tmp_path / "copy.json"
    copy.write_text(json.dumps(data))
    with recording() as opened:
        with pytest.raises(EvaluationCohortError, match=f"is a subject of datalist {re.escape(str(datalist))}"):
            load_split(str(copy), "test", -1, tuning=True)
    assert _inside(opened, evaluation) == [os.path.abspath(datalist)]
    with pytest.raises(EvaluationCohortError):
        load_split(str(evaluation / "images"), "test", -1, require_label=False, tuning=True)
    assert len(load_split(str(copy), "test", -1)) == 6


def _overrides(datalist: Path) -> str:
    return json.dumps({"datalist": str(datalist), "dataset_dir": str(datalist.parent)})


# every tuning command, as (name, argv of its main given a datalist and a scratch folder)
COMMANDS = {
    "explain_eval": (explain_eval.main, lambda d, w: [
        "--override", _overrides(d), "--split", "test", "--subjects", "1", "--methods", "gradient", "--reduced",
        "--output", str(w / "out")]),
    "sanity": (sanity.main, lambda d, w: [
        "--override", _overrides(d), "--split", "test", "--subjects", "1", "--methods", "gradient",
        "--output", str(w / "out")]),
    "composite_search": (composite_search.main, lambda d, w: [
        "--fold-model", f"0={WEIGHTS}", "--override", _overrides(d), "--reduced", "--plan",
        "--output", str(w / "out")]),
    "study": (study_command.main, lambda d, w: [
        "--datalist", str(d), "--reduced", "--work_dir", str(w / "work"), "--output", str(w / "out")]),
    "robustness": (robustness.main, lambda d, w: [
        "--datalist", str(d), "--limit", "1", "--work_dir", str(w / "work"), "--output", str(w / "out")]),
    "qc_eval": (qc_eval.main, lambda d, w: [
        "--override", json.dumps({"datalist": str(d)}), "--subjects", "1", "--work_dir", str(w / "work"),
        "--output", str(w / "out")]),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_tuning_command_refuses_the_evaluation_cohort_and_opens_none_of_it(name, evaluation, tuning, tmp_path,
                                                                           capsys):
    main, argv = COMMANDS[name]
    datalist = evaluation / "datalist.json"
    with recording() as opened:
        status = main(argv(datalist, tmp_path / "evaluation"))
    error = capsys.readouterr().err
    assert status == 2, error
    assert REFUSED.search(error) and str(datalist) in error, error
    assert _inside(opened, evaluation) == [os.path.abspath(datalist)], f"{name} opened files of the evaluation cohort"
    # the same command on a tuning cohort opens its subjects: stopped at the first image
    with recording(stop_at_images_of=tuning) as opened:
        with pytest.raises(_Stopped) as stopped:
            main(argv(tuning / "datalist.json", tmp_path / "tuning"))
    subjects = _subject_files(tuning)
    assert str(stopped.value) in subjects
    assert set(_inside(opened, tuning)) <= subjects | {os.path.abspath(tuning / "datalist.json")}


def _train_parser(datalist: Path, *configs: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / c) for c in ("train.json", *configs)])
    parser.update({"bundle_root": str(ROOT), "dataset_dir": str(datalist.parent), "datalist": str(datalist)})
    return parser


@pytest.mark.parametrize("key", ["train#data", "validate#data"])
def test_training_refuses_the_evaluation_cohort(key, evaluation, tuning):
    """configs/train.json's training and validation data (checked_split with tuning true); evaluate.json, which
    only measures, reads the evaluation cohort."""
    datalist = evaluation / "datalist.json"
    with recording() as opened:
        with pytest.raises(Exception) as err:
            _train_parser(datalist).get_parsed_content(key)
    chain, cause = [], err.value
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    assert any(isinstance(c, EvaluationCohortError) and str(datalist) in str(c) for c in chain), err.value
    assert _inside(opened, evaluation) == [os.path.abspath(datalist)]
    with recording(stop_at_images_of=tuning) as opened:
        with pytest.raises(_Stopped) as stopped:
            _train_parser(tuning / "datalist.json").get_parsed_content(key)
    assert str(stopped.value) in _subject_files(tuning)
    measured = _train_parser(datalist, "evaluate.json").get_parsed_content("validate#data")
    assert [it["subject"] for it in measured] == [f"sub-{i:04d}" for i in range(1, 7)]


# -- measuring on a cohort: cohort_metrics and its bootstrap --------------------------------------------------------
def test_cohort_metrics_compares_weights_on_the_evaluation_cohort(evaluation, tmp_path, capsys):
    datalist = evaluation / "datalist.json"
    argv = ["--datalist", str(datalist), "--split", "all", "--weights", f"a={WEIGHTS}", "--weights", f"b={WEIGHTS}",
            "--output", str(tmp_path), "--name", "six", "--resamples", "500"]
    assert cohort_metrics.main(argv) == 0
    md, table = (tmp_path / "six.md").read_text(), tmp_path / "six.csv"
    rows = list(csv.DictReader(table.open()))
    assert [r["subject"] for r in rows] == [f"sub-{i:04d}" for i in range(1, 7)]
    assert all(r["p_a"] == r["p_b"] for r in rows)
    assert "python -m scripts.evaluation.cohort_metrics --datalist" in md and "--name six" in md
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() in md
    assert "role evaluation" in md and "read only to report" in md
    labels = [int(r["label"]) for r in rows]
    probs = [float(r["p_a"]) for r in rows]
    recomputed = np.mean([(p > 0.5) == bool(y) for p, y in zip(probs, labels)])
    metrics, comparisons = cohort_metrics.summarise(
        [{"subject": r["subject"], "label": y, "p_a": p, "p_b": p} for r, y, p in zip(rows, labels, probs)],
        ["a", "b"], "a", 0.02, 500, 0)
    assert metrics[0]["accuracy"] == pytest.approx(recomputed)
    assert f"| a | {recomputed:.3f} [" in md
    assert [(c[f"{m}_difference"], c[f"{m}_low"], c[f"{m}_high"]) for c in comparisons for m in ("accuracy", "auc")] \
        == [(0.0, 0.0, 0.0)] * 2
    assert "| b | 0.000 [0.000, 0.000] | yes | 0.000 [0.000, 0.000] | yes |" in md
    capsys.readouterr()
    for weights, error in ((f"a={WEIGHTS}", "given twice"), ("c=missing.pt", "missing.pt not found")):
        assert cohort_metrics.main([*argv, "--weights", weights]) == 2
        assert error in capsys.readouterr().err


def test_bootstrap_metrics_on_known_data():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.1, 0.6, 0.4, 0.9, 0.4, 0.7])  # one false positive, one false negative, one tie across classes
    assert bootstrap.accuracy(labels, probs) == pytest.approx(4 / 6)
    assert bootstrap.sensitivity(labels, probs) == pytest.approx(2 / 3)
    assert bootstrap.specificity(labels, probs) == pytest.approx(2 / 3)
    pairs = [(p, n) for p in probs[labels == 1] for n in probs[labels == 0]]
    by_definition = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert bootstrap.roc_auc(labels, probs) == pytest.approx(by_definition) == pytest.approx(7.5 / 9)
    mine = classification_metrics(labels, np.stack([1 - probs, probs], 1))
    assert (mine["accuracy"], mine["tpr"], mine["tnr"]) == pytest.approx(
        (bootstrap.accuracy(labels, probs), bootstrap.sensitivity(labels, probs), bootstrap.specificity(labels, probs)))
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, size=(5, 40)), rng.random((5, 40))  # vectorised over rows, as the resamples are
    for row in range(5):
        assert bootstrap.roc_auc(y, p)[row] == pytest.approx(float(compute_roc_auc(torch.tensor(p[row]),
                                                                                   torch.tensor(y[row]))))
    assert np.isnan(bootstrap.roc_auc([1, 1], [0.2, 0.3])) and np.isnan(bootstrap.specificity([1, 1], [0.2, 0.3]))


def test_stratified_resamples_keep_the_classes():
    labels = np.array([1, 0, 0, 1, 0, 0, 0])
    indices = bootstrap.stratified_resamples(labels, 300, seed=4)
    assert indices.shape == (300, 7)
    assert (labels[indices].sum(axis=1) == 2).all()  # every resample: 2 preterm, 5 term
    assert set(indices[:, 5:].ravel()) == {0, 3} and set(indices[:, :5].ravel()) == {1, 2, 4, 5, 6}
    assert np.array_equal(indices, bootstrap.stratified_resamples(labels, 300, seed=4))
    assert not np.array_equal(indices, bootstrap.stratified_resamples(labels, 300, seed=5))


def test_bootstrap_intervals_and_paired_differences():
    labels = np.array([0] * 10 + [1] * 10)
    perfect = np.where(labels == 1, 0.9, 0.1)
    indices = bootstrap.stratified_resamples(labels, 1000, seed=0)
    for metric in bootstrap.METRICS:
        assert bootstrap.interval(metric, labels, perfect, indices) == {"estimate": 1.0, "low": 1.0, "high": 1.0}
    worse = perfect.copy()
    worse[0] = 0.8  # one term subject called preterm; still ranked below every preterm one (0.9): same AUC
    found = bootstrap.paired_difference("accuracy", labels, worse, perfect, indices)
    assert found["difference"] == pytest.approx(-1 / 20)
    # the same resampled subjects for both: each resample's difference is -(draws of subject 0) / 20 <= 0
    draws = (indices == 0).sum(axis=1)
    assert found["low"] == pytest.approx(np.percentile(-draws / 20, 2.5))
    assert found["high"] == pytest.approx(np.percentile(-draws / 20, 97.5)) and found["high"] <= 0
    assert bootstrap.paired_difference("auc", labels, worse, perfect, indices) == {"difference": 0.0, "low": 0.0,
                                                                                   "high": 0.0}
    same = bootstrap.paired_difference("auc", labels, worse, worse, indices)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    spread = bootstrap.interval("accuracy", labels, worse, indices)
    assert spread["low"] < spread["estimate"] <= spread["high"] == 1.0
    assert bootstrap.non_inferior(-0.02, 0.02) and not bootstrap.non_inferior(-0.021, 0.02)
