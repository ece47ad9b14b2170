"""Datalists for the configs: find or create the MONAI datalist, select a split/fold, and check every entry
(file present, readable 3D NIfTI, label in {0, 1}) with errors that name the file or key."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

__all__ = ["NIFTI_SUFFIXES", "ensure_datalist", "load_split", "subject_name"]

logger = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SPLITS = ("train", "validation", "test", "training", "all")


def subject_name(path: str | os.PathLike) -> str:
    """Input file name without NIfTI extensions: ``/x/sub-0001.nii.gz`` -> ``sub-0001``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def ensure_datalist(datalist: str | None, dataset_dir: str, synthetic_subjects: int = 160, seed: int = 0) -> str:
    """Return the datalist to use.

    - ``datalist`` exists -> it.
    - ``dataset_dir`` is missing or empty -> the built-in synthetic cohort is generated there once (reused later).
    - ``dataset_dir`` holds NIfTI files but no datalist -> ``dataset_dir`` itself (a folder of images, inference).
    """
    if datalist and Path(datalist).is_file():
        return str(datalist)
    folder = Path(dataset_dir)
    if not folder.exists() or not any(folder.iterdir()):
        if int(synthetic_subjects) < 2:
            raise ValueError(f"dataset_dir {folder} is empty and synthetic_subjects={synthetic_subjects} (< 2)")
        from scripts.synthetic import generate_cohort  # heavy import only when needed

        logger.warning("no datalist at %s: generating the synthetic cohort (%d subjects) into %s",
                       datalist, synthetic_subjects, folder)
        path = generate_cohort(folder, subjects=int(synthetic_subjects), seed=int(seed))
        if datalist and Path(datalist).resolve() != path.resolve():
            raise FileNotFoundError(f"datalist {datalist} not found (a synthetic cohort was written to {path})")
        return str(path)
    if datalist and folder.resolve() not in Path(datalist).resolve().parents:
        raise FileNotFoundError(f"datalist {datalist} not found")
    if (folder / "datalist.json").is_file():
        return str(folder / "datalist.json")
    if any(str(p).endswith(NIFTI_SUFFIXES) for p in folder.iterdir()):
        return str(folder)
    raise FileNotFoundError(f"datalist {datalist} not found and dataset_dir {folder} holds no NIfTI files")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"datalist {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"datalist {path} must be a JSON object with 'training'/'test' lists")
    return data


def _folder_items(folder: Path) -> list[dict]:
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
) -> list[dict]:
    """Items of one split with absolute paths.

    ``split``: ``train`` (training items not in ``fold``), ``validation`` (training items in ``fold``),
    ``training`` (all training items), ``test``, ``all`` (training + test). ``fold=-1``: no validation fold,
    so ``train`` is every training item. A folder instead of a JSON file lists its NIfTIs (no labels).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(fold, int) or isinstance(fold, bool):
        raise TypeError(f"config key 'fold' must be an integer, got {fold!r} ({type(fold).__name__})")
    path = Path(datalist)
    if path.is_dir():
        items = _folder_items(path)
        if require_label:
            raise ValueError(f"{path} is a folder of images without labels; training/evaluation need a datalist JSON")
        return items
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} not found")
    data = _read_json(path)
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
            raise ValueError(f"datalist {path}: training items lack a 'fold' field; set fold=-1 or add folds")
        if fold not in folds:
            raise ValueError(f"fold={fold} is out of range for datalist {path} (folds present: {sorted(folds)})")
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
    return items


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
    if require_label:
        if "label" not in out:
            raise ValueError(f"datalist {datalist}: item {out['subject']} ({image}) has no 'label'")
        label = out["label"]
        if isinstance(label, bool) or label not in (0, 1):
            raise ValueError(
                f"datalist {datalist}: item {out['subject']} ({image}) has label {label!r}; labels must be 0 (term) or 1 (preterm)"
            )
        out["label"] = int(label)
    return out
