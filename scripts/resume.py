"""Resuming inference: which subjects a previous run with the same model and settings already finished.

A subject counts as finished when ``predictions.csv`` lists it with the current ``run_key`` (the table is written
after the subject's maps) and every map file it should have exists. Abandoned temporaries of a killed run are
removed first.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from scripts.datalist import subject_name
from scripts.engine_outputs import read_rows
from scripts.nifti_io import remove_stale_temporaries

__all__ = ["pending_items", "run_if_pending", "run_key"]

logger = logging.getLogger(__name__)


def run_key(ckpt_path: str, **settings) -> str:
    """Short hash of the checkpoint's bytes and the settings that change the outputs."""
    digest = hashlib.sha256()
    with open(ckpt_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def expected_outputs(output_dir: Path, subject: str, presets, save_input: bool, save_original_space: bool = False):
    folder = output_dir / subject
    files = [folder / f"{subject}_relevance_{p}.nii.gz" for p in presets]
    if save_original_space:
        files += [folder / f"{subject}_relevance_{p}_orig.nii.gz" for p in presets]
    if save_input:
        files.append(folder / f"{subject}_input.nii.gz")
    return files


def pending_items(items: list[dict], output_dir: str, key: str | None, presets=(), save_input: bool = True,
                  save_original_space: bool = False, table: str = "predictions.csv") -> list[dict]:
    """The items still to do. ``key=None`` (resume off): all of them."""
    from scripts.checks import check_bool

    save_input = check_bool(save_input, "save_input")
    save_original_space = check_bool(save_original_space, "save_original_space")
    output = Path(output_dir)
    removed = remove_stale_temporaries(output)
    if removed:
        logger.warning("removed %d unfinished temporary files of an interrupted run in %s", len(removed), output)
    if key is None:
        return list(items)
    done = {row["subject"] for path in [output / table, *sorted(output.glob(f".{table}.rank*"))]
            for row in read_rows(path) if row.get("run_key") == key}  # rank parts: a killed distributed run
    pending = [it for it in items if not (
        subject_name(it["image"]) in done
        and all(p.is_file() for p in expected_outputs(output, subject_name(it["image"]), presets, save_input,
                                                      save_original_space)))]
    if len(pending) < len(items):
        logger.info("%d of %d subjects already finished with this model and settings (%s): skipped; "
                    "set resume=false to redo them", len(items) - len(pending), len(items), output / table)
    return pending


def run_if_pending(engine, data) -> None:
    """Run ``engine`` unless there is nothing left to do."""
    if len(data):
        engine.run()
    else:
        logger.info("nothing left to do: every subject is finished")
