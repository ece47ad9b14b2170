"""Progress output: a training run without a terminal logs one summary line per epoch (no bar redraws, no
per-iteration lines), TensorBoard gets the relevance map of one validation subject per validation epoch, and long
loops (synthetic cohort, preprocessing) log their progress."""

from __future__ import annotations

import io
import logging
import re

import pytest

from scripts.runtime.progress import progress, wants_bar


def test_training_without_a_terminal_logs_epoch_lines_only(trained):
    _, work = trained
    log = (work / "training.log").read_text()
    summaries = re.findall(r"scripts\.runtime\.monitor - INFO - (epoch (\d+)/(\d+): loss [0-9.]+ \|.*)", log)
    assert [(e, n) for _, e, n in summaries] == [("1", "2"), ("2", "2")]  # one summary line per epoch
    for line, _, _ in summaries:
        assert "train_accuracy" in line and "val_auc" in line and "(best " in line and " s" in line
    assert "Iter:" not in log  # no per-iteration lines
    assert "\r" not in log and "it/s" not in log and "%|" not in log  # no progress bar in a log


def test_tensorboard_shows_the_relevance_of_one_validation_subject_per_epoch(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, work = trained
    events = EventAccumulator(str(work / "train_out" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (tag,) = [t for t in events.Tags()["images"] if t.startswith("relevance/")]
    images = events.Images(tag)
    assert [e.step for e in images] == [1, 2]  # one per validation epoch, the same subject
    assert all(e.width >= 100 and e.height >= 100 and len(e.encoded_image_string) > 1000 for e in images)
    assert f"{tag}/colour_limit" in events.Tags()["scalars"]


def test_progress_is_a_bar_in_a_terminal_and_log_lines_elsewhere(caplog, monkeypatch):
    with caplog.at_level(logging.INFO, logger="scripts.runtime.progress"):
        assert list(progress(range(25), desc="things", unit="thing", bar=False)) == list(range(25))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 13  # every 10 % (2 of 25) and the end
    assert lines[0].startswith("things: 2/25 things done") and lines[-1].startswith("things: 25/25")
    assert wants_bar("true") and not wants_bar(False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not wants_bar("auto")  # not a terminal
    with pytest.raises(ValueError, match="progress_bar"):
        wants_bar("sometimes")


def test_synthetic_cohort_generation_shows_progress(tmp_path, caplog):
    from scripts.data.synthetic import generate_cohort

    with caplog.at_level(logging.INFO, logger="scripts.runtime.progress"):
        generate_cohort(tmp_path, subjects=3, seed=1, preterm_fraction=0.4, workers=1, folds=2, test_fraction=0.34)
    lines = [r.getMessage() for r in caplog.records if r.name == "scripts.runtime.progress"]
    assert [line.split(" done")[0] for line in lines] == [f"synthetic cohort: {i}/3 subjects" for i in (1, 2, 3)]
