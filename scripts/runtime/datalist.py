"""Datalists for the configs: find or create the MONAI datalist, select a split/fold, and check every entry
(file present, readable 3D NIfTI, label in {0, 1}) with errors that name the file or key; refuse the evaluation
cohort (a datalist marked ``"role": "evaluation"``) to the commands that tune (``load_split(..., tuning=True)``)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from scripts.runtime.checks import check_bool, check_bool_or_auto, validate_items
from scripts.runtime.outputs import NIFTI_SUFFIXES, pending_subjects, subject_name

__all__ = ["EVALUATION_ROLE", "EvaluationCohortError", "check_study_datalist", "checked_split", "ensure_datalist",
           "folder_items", "inference_items", "load_split", "read_datalist_json", "refuse_evaluation"]

logger = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test", "training", "all")
EVALUATION_ROLE = "evaluation"  # the datalist "role" tuning commands may not read (scripts/data/cohorts.py)
TUNING_COMMANDS = "training, the study, explain_eval, sanity, composite_search, robustness, qc_eval"


class EvaluationCohortError(ValueError):
    """A tuning command (one whose results choose something: training, the study, the evaluation commands that pick
    settings) was pointed at the evaluation cohort, which is read only to report."""


def refuse_evaluation(datalist: str | os.PathLike, data: dict, subject: str | None = None) -> None:
    """Raise ``EvaluationCohortError`` when ``data`` (the JSON of ``datalist``) is marked ``"role": "evaluation"``;
    ``subject``: the file of another datalist that led here (an item resolving into the evaluation cohort)."""
    if not isinstance(data, dict) or data.get("role") != EVALUATION_ROLE:
        return
    via = f"{subject} is a subject of " if subject else ""
    raise EvaluationCohortError(
        f"{via}datalist {datalist}, the evaluation cohort (\"role\": \"{EVALUATION_ROLE}\"): tuning commands "
        f"({TUNING_COMMANDS}) may not read it; it is read only to report (python -m scripts.evaluation.cohort_metrics, "
        "configs/evaluate.json). Tune on a tuning cohort: python -m scripts.data.cohorts --cohort tuning")


def _refuse_evaluation_homes(items: list[dict], checked: Path, datalist: Path) -> None:
    """Defence in depth for tuning commands: no item may lie in a cohort folder (its image's folder or the one
    above, where ``scripts.data.synthetic`` writes ``datalist.json``) whose own datalist is the evaluation cohort.
    Only those datalist.json files are read; ``checked`` (the given datalist) is not read twice."""
    seen = {checked.resolve()}
    for item in items:
        image = Path(item["image"])
        for folder in (image.parent, image.parent.parent):
            home = (folder / "datalist.json").resolve()
            if home in seen:
                continue
            seen.add(home)
            if not home.is_file():
                continue
            try:
                data = json.loads(home.read_text())
            except (OSError, ValueError):  # not a datalist this check can read: not the evaluation cohort's
                continue
            refuse_evaluation(home, data, subject=f"{item['image']} (listed in {datalist})")


def ensure_datalist(datalist: str | None, dataset_dir: str, synthetic_subjects: int = 160, seed: int = 0,
                    generate="auto", synthetic_dir: str | None = None,
                    generator: Callable[..., str | os.PathLike] | None = None) -> str:
    """Return the datalist to use.

    - ``datalist`` exists (a JSON file, or a folder of NIfTIs) -> it.
    - ``datalist`` named by the user (not ``<dataset_dir>/datalist.json``) but missing -> error naming the key.
    - ``dataset_dir`` is missing or empty -> the built-in synthetic cohort is generated there once (reused later),
      but only where the user asked for it: ``generate`` ``"auto"`` (the configs' ``generate_synthetic``) generates
      only into the default folder ``synthetic_dir``; ``True`` into any ``dataset_dir``; ``False`` never. Any other
      missing ``dataset_dir`` is an error naming the key, the path and the fix, and nothing is created.
      ``generator`` makes the cohort: ``generator(folder, subjects=..., seed=...)`` returning its datalist (the
      configs pass ``scripts.data.synthetic.generate_cohort`` as their ``synthetic_cohort`` item; this module imports
      nothing from scripts/data/).
    - ``dataset_dir`` holds NIfTI files but no datalist -> ``dataset_dir`` itself (a folder of images, inference).
    """
    generate = _check_generate(generate)
    if datalist and Path(datalist).exists():
        return str(datalist)
    folder = Path(dataset_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"config key 'dataset_dir': {folder} is a file, not a folder; pass a folder of NIfTI "
                                 "files or one holding datalist.json (--dataset_dir <folder>)")
    if datalist and Path(datalist).resolve() != (folder / "datalist.json").resolve():
        raise FileNotFoundError(f"config key 'datalist': {datalist} does not exist; pass an existing MONAI datalist "
                                "JSON (--datalist <file>) or leave 'datalist' out to use dataset_dir")
    if not folder.exists() or not any(folder.iterdir()):
        default = synthetic_dir is not None and folder.resolve() == Path(synthetic_dir).resolve()
        state = "is empty" if folder.exists() else "does not exist"
        if not (generate is True or (generate == "auto" and default)):
            raise FileNotFoundError(
                f"config key 'dataset_dir': {folder} {state}; pass a folder of NIfTI files or one holding "
                "datalist.json (--dataset_dir <folder>), or add --generate_synthetic true to generate the synthetic "
                "cohort there")
        if int(synthetic_subjects) < 2:
            raise ValueError(f"dataset_dir {folder} is empty and synthetic_subjects={synthetic_subjects} (< 2)")
        if generator is None:
            raise ValueError(f"config key 'dataset_dir': {folder} {state} and generate_synthetic={generate} asks "
                             "for the synthetic cohort there, but no generator was given: pass generator="
                             "scripts.data.synthetic.generate_cohort (in a config: \"generator\": "
                             "\"@synthetic_cohort\"), or set dataset_dir to a folder with data")
        logger.warning("no data in %s: generating the synthetic cohort (%d subjects) there", folder,
                       synthetic_subjects)
        return str(generator(folder, subjects=int(synthetic_subjects), seed=int(seed)))
    if (folder / "datalist.json").is_file():
        return str(folder / "datalist.json")
    if any(str(p).endswith(NIFTI_SUFFIXES) for p in folder.iterdir()):
        return str(folder)
    raise FileNotFoundError(f"config key 'dataset_dir': {folder} holds neither datalist.json nor NIfTI files "
                            "(*.nii, *.nii.gz)")


def _check_generate(value):
    if value in ("auto", True, False):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"config key 'generate_synthetic' must be auto, true or false, got {value!r}")


def read_datalist_json(path: Path) -> dict:
    """The datalist JSON at ``path`` as a dict, or a ValueError naming the file (not JSON, not an object)."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"datalist {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"datalist {path} must be a JSON object with 'training'/'test' lists")
    return data


def folder_items(folder: Path) -> list[dict]:
    """One item (image, subject) per NIfTI file in ``folder``, sorted; hidden files (temporaries) are left out."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"{folder} holds no NIfTI files (*.nii, *.nii.gz)")
    return [{"image": str(p), "subject": subject_name(p)} for p in files]


def load_split(
    datalist: str,
    split: str = "train",
    fold: int = 0,
    require_label: bool = True,
    check_files: bool = True,
    tuning: bool = False,
) -> list[dict]:
    """Items of one split with absolute paths.

    ``split``: ``train`` (training items not in ``fold``), ``validation`` (training items in ``fold``),
    ``training`` (all training items), ``test``, ``all`` (training + test). ``fold=-1``: no validation fold,
    so ``train`` is every training item. A folder instead of a JSON file lists its NIfTIs (no labels).

    ``tuning``: the caller chooses something from what it reads (training, the study, the evaluation commands that
    pick settings): a datalist marked ``"role": "evaluation"`` (the evaluation cohort, ``scripts/data/cohorts.py``),
    a folder holding one, or items lying in such a cohort's folder are refused with ``EvaluationCohortError``
    before any image is opened. Commands that only measure (``configs/evaluate.json``, inference,
    ``scripts.evaluation.cohort_metrics``) leave it False.

    Paths are resolved here rather than by ``monai.data.load_decathlon_datalist``: that one joins every value
    naming an existing path, so the ``subject`` of a preprocessed datalist (a folder of that name beside it)
    would turn into a path.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(fold, int) or isinstance(fold, bool):
        raise TypeError(f"config key 'fold' must be an integer, got {fold!r} ({type(fold).__name__})")
    path = Path(datalist)
    if path.is_dir():
        if tuning and (path / "datalist.json").is_file():
            refuse_evaluation(path / "datalist.json", read_datalist_json(path / "datalist.json"))
        items = folder_items(path)
        if tuning:
            _refuse_evaluation_homes(items, path / "datalist.json", path)
        if require_label:
            raise ValueError(f"{path} is a folder of images without labels; training/evaluation need a datalist JSON")
        return items
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} not found")
    data = read_datalist_json(path)
    if tuning:
        refuse_evaluation(path, data)
    base = path.parent
    training = data.get("training")
    test = data.get("test", [])
    if not isinstance(training, list) and split != "test":
        raise ValueError(f"datalist {path} has no 'training' list")
    if not isinstance(test, list):
        raise ValueError(f"datalist {path}: 'test' must be a list")
    if split in ("train", "validation") and fold >= 0:
        folds = {item.get("fold") for item in training if isinstance(item, dict)}
        if None in folds:
            raise ValueError(f"datalist {path}: training items lack a 'fold' field; set fold=-1 (no validation) or "
                             f"add folds with: python -m scripts.data.splits --datalist {path}")
        if fold not in folds:
            raise ValueError(f"config key 'fold': fold={fold} is out of range for datalist {path} "
                             f"(folds present: {sorted(folds)}; fold=-1 trains on all training items)")
    if split == "train":
        chosen = [it for it in training if fold < 0 or it.get("fold") != fold]
    elif split == "validation":
        chosen = [it for it in training if fold >= 0 and it.get("fold") == fold]
    elif split == "training":
        chosen = list(training)
    elif split == "test":
        chosen = list(test)
    else:
        chosen = list(training or []) + list(test)
    items = [_check_item(it, base, path, require_label, check_files) for it in chosen]
    if not items:
        raise ValueError(f"datalist {path}: split {split!r} (fold={fold}) is empty")
    if tuning:
        _refuse_evaluation_homes(items, path, path)
    return items


def checked_split(datalist: str, split: str, fold: int = -1, spatial_shape=None, pixdim=None,
                  tuning: bool = False) -> list[dict]:
    """``load_split`` with every image checked (``check_image``): the training and evaluation data of the configs.
    ``tuning``: refuse the evaluation cohort (train.json's training and validation data; evaluate.json measures)."""
    return validate_items(load_split(datalist, split, fold, tuning=tuning), spatial_shape=spatial_shape,
                          pixdim=pixdim)


def inference_items(datalist: str, split: str, output_dir: str, run_key: str, resume=True, presets=(),
                    save_input=True, save_original_space=False, skip_bad=False, spatial_shape=None,
                    pixdim=None) -> list[dict]:
    """The items ``run inference`` still has to do: ``split`` of the datalist (or every NIfTI of a folder), less
    the subjects an earlier run with the same ``run_key`` finished (``resume``), each checked (``check_image``);
    with ``skip_bad`` bad ones are left out and listed in ``<output_dir>/skipped.csv``."""
    items = load_split(datalist, split, -1, require_label=False)
    key = run_key if check_bool(resume, "resume") else None
    pending = pending_subjects(items, output_dir, key, presets, check_bool(save_input, "save_input"),
                               check_bool_or_auto(save_original_space, "save_original_space") is True)
    return validate_items(pending, skip_bad=check_bool(skip_bad, "skip_bad"),
                          report=os.path.join(output_dir, "skipped.csv"), spatial_shape=spatial_shape, pixdim=pixdim,
                          allow_none=len(pending) < len(items))


def _check_item(item, base: Path, datalist: Path, require_label: bool, check_files: bool) -> dict:
    if not isinstance(item, dict) or "image" not in item:
        raise ValueError(f"datalist {datalist}: every item needs an 'image' key, got {item!r}")
    out = dict(item)
    for key in ("image", "tissue", "phenotype", "mask"):
        if key in out and isinstance(out[key], str):
            p = Path(out[key])
            out[key] = str(p if p.is_absolute() else (base / p))
    image = Path(out["image"])
    if check_files and not image.is_file():
        raise FileNotFoundError(f"datalist {datalist}: image file {image} not found")
    out.setdefault("subject", subject_name(image))
    if require_label and "label" not in out:
        raise ValueError(f"datalist {datalist}: item {out['subject']} ({image}) has no 'label'")
    if "label" in out:  # checked whenever present: outputs copy it
        label = out["label"]
        if isinstance(label, bool) or label not in (0, 1):
            raise ValueError(
                f"datalist {datalist}: item {out['subject']} ({image}) has label {label!r}; "
                "labels must be 0 (term) or 1 (preterm)"
            )
        out["label"] = int(label)
    return out


def check_study_datalist(datalist: str) -> dict:
    """Check that a datalist can carry the cross-validated study: every training item has a fold, every fold
    holds both classes, and the test split is not empty. Returns the folds and class counts; errors say how
    to fix the datalist (``python -m scripts.data.splits``). The study tunes (it trains and chooses a setting): the
    evaluation cohort is refused (``refuse_evaluation``)."""
    path = Path(datalist)
    if path.is_dir():
        raise ValueError(f"{path} is a folder of images; the study needs a datalist JSON with labels and folds")
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} not found")
    data = read_datalist_json(path)
    refuse_evaluation(path, data)
    fix = f"python -m scripts.data.splits --datalist {path}"
    training, test = data.get("training"), data.get("test")
    if not isinstance(training, list) or not training:
        raise ValueError(f"datalist {path} has no 'training' items")
    items = [_check_item(it, path.parent, path, True, False) for it in training]
    if any("fold" not in it for it in items):
        raise ValueError(f"datalist {path}: training items lack a 'fold' field; add stratified folds with: {fix}")
    folds = sorted({it["fold"] for it in items})
    if any(isinstance(f, bool) or not isinstance(f, int) or f < 0 for f in folds):
        raise ValueError(f"datalist {path}: 'fold' values must be integers >= 0, got {folds}; redo them with: {fix}")
    if len(folds) < 2:
        raise ValueError(f"datalist {path}: cross-validation needs at least 2 folds, found {folds}; "
                         f"redo them with: {fix}")
    for fold in folds:
        counts = [sum(1 for it in items if it["fold"] == fold and it["label"] == c) for c in (0, 1)]
        for c, name in ((0, "term"), (1, "preterm")):
            if counts[c] == 0:
                raise ValueError(f"datalist {path}: fold {fold} has no {name} subject (term/preterm: {counts}); "
                                 f"use fewer folds: {fix} --folds {max(2, len(folds) // 2)}")
    if not isinstance(test, list) or not test:
        raise ValueError(f"datalist {path}: the test split is empty; hold out a stratified test split with: "
                         f"{fix} --test-fraction 0.1")
    test_items = [_check_item(it, path.parent, path, True, False) for it in test]
    test_counts = [sum(1 for it in test_items if it["label"] == c) for c in (0, 1)]
    if 0 in test_counts:
        raise ValueError(f"datalist {path}: the test split holds only one class (term/preterm: {test_counts}); "
                         f"redo the split with: {fix} --test-fraction 0.1")
    return {"folds": folds, "training": [sum(1 for it in items if it["label"] == c) for c in (0, 1)],
            "test": test_counts}
