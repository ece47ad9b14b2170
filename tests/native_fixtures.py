"""Test data for the real-data path: synthetic subjects moved off the template by a known random affine into a
native-like scan (with scalp around the brain; ``scripts.data.native_like``), a template image, and fake dHCP
release trees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from scripts.data.native_like import random_affine, to_native
from scripts.data.synthetic_anatomy import procedural_labels, template_affine
from scripts.runtime.outputs import save_nifti

__all__ = ["EXCLUDED", "KEPT", "SESSIONS", "dice", "fake_release", "native_datalist", "native_input", "random_affine",
           "to_native", "write_template"]

T2 = {1: 2.0, 2: 1.1, 3: 1.4, 4: 0.6, 5: 2.1, 6: 1.2, 7: 1.0, 8: 0.9, 9: 1.1}


def write_template(folder: Path) -> tuple[Path, Path]:
    labels = procedural_labels()
    lut = np.zeros(256, np.float32)
    for k, v in T2.items():
        lut[k] = v * 1000
    image = ndimage.gaussian_filter(lut[labels], 0.6) * (labels > 0)
    folder.mkdir(parents=True, exist_ok=True)
    save_nifti(image, template_affine(), folder / "template_T2w.nii.gz")
    save_nifti(labels > 0, template_affine(), folder / "template_mask.nii.gz", dtype=np.uint8)
    return folder / "template_T2w.nii.gz", folder / "template_mask.nii.gz"


def native_input(cohort: Path, item: dict, root: Path, rng: np.random.Generator) -> tuple[Path, dict]:
    """A datalist ``item`` of the synthetic ``cohort`` as a native scan moved by ``random_affine(rng)``: the input
    a user gives, ``root/native/<subject>.nii.gz``, and the files :func:`to_native` wrote under ``root/work``
    (image, brain mask, tissue)."""
    subject = item["subject"]
    files = to_native(cohort / item["image"], cohort / item["tissue"], root / "work", random_affine(rng), subject)
    (root / "native").mkdir(parents=True, exist_ok=True)
    scan = root / "native" / f"{subject}.nii.gz"
    shutil.copy(files["image"], scan)
    return scan, files


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def native_datalist(cohort: Path, out: Path, subjects: list[str], seed: int = 0) -> Path:
    """A datalist of native-space versions of ``subjects`` of a synthetic cohort (known affines in 'move')."""
    rng = np.random.default_rng(seed)
    data = json.loads((cohort / "datalist.json").read_text())
    items = {it["subject"]: it for it in data["training"] + data["test"]}
    training = []
    for i, subject in enumerate(subjects):
        move = random_affine(rng)
        files = to_native(cohort / items[subject]["image"], cohort / items[subject]["tissue"], out / subject, move,
                          subject)
        training.append({"image": str(files["image"]), "mask": str(files["mask"]), "tissue": str(files["tissue"]),
                         "label": items[subject]["label"], "fold": i % 2, "subject": subject,
                         "move": move.tolist()})
    path = out / "native.json"
    path.write_text(json.dumps({"training": training, "test": []}))
    return path


def _tiny(path: Path, value: float = 1.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(np.full((4, 4, 4), value, np.float32), np.eye(4), path)


# (participant, session, birth_age, scan_age, radiology, files) -- files: which images the session has
SESSIONS = [
    ("A01", "1", "39.5", "38.0", "1", "derived"),     # two term-equivalent sessions: the later one is kept
    ("A01", "2", "39.5", "41.0", "2", "derived"),
    ("B02", "3", "30.0", "35.5", "1", "derived"),     # scanned before term-equivalent age
    ("C03", "4", "38.0", "39.0", "3Q", "derived"),    # poor quality (Q in the score)
    ("D04", "5", "29.0", "40.0", "Q", "derived"),
    ("E05", "6", "40.0", "41.0", "1", "none"),        # no T2w
    ("F06", "7", "33.0", "40.5", "2", "raw"),         # raw T2w only
    ("G07", "8", "40.5", "41.5", "1", "garbage"),     # unreadable image
    ("H08", "9", "n/a", "40.0", "1", "derived"),      # birth age missing
    ("I09", "10", "28.5", "39.0", "4", "derived"),
    ("J10", "11", "41.0", "42.0", "1", "derived"),
    ("K11", "12", "35.0", "40.0", "2", "derived"),
    ("L12", "13", "38.5", "39.5", "1", "derived"),
    ("M13", "14", "31.0", "38.5", "1", "derived"),
    ("N14", "15", "40.0", "40.5", "1", "derived"),
]
KEPT = {"sub-A01": ("ses-2", 0), "sub-F06": ("ses-7", 1), "sub-I09": ("ses-10", 1), "sub-J10": ("ses-11", 0),
        "sub-K11": ("ses-12", 1), "sub-L12": ("ses-13", 0), "sub-M13": ("ses-14", 1), "sub-N14": ("ses-15", 0)}
EXCLUDED = {("sub-A01", "ses-1"): "another session", ("sub-B02", "ses-3"): "scan_age 35.5 < 37",
            ("sub-C03", "ses-4"): "radiology_score '3Q'", ("sub-D04", "ses-5"): "radiology_score 'Q'",
            ("sub-E05", "ses-6"): "no T2w image", ("sub-G07", "ses-8"): "unreadable image",
            ("sub-H08", "ses-9"): "birth_age missing"}


def fake_release(root: Path, release: int | str) -> Path:
    """A dHCP-like tree: release 2 (sourcedata/, combined_rel02.tsv, ids without prefixes, 'gender') or
    release 3 (rawdata/, participants.tsv + per-subject sessions.tsv, 'sex'; ``"3-root"``: participants.tsv at
    the release root, the sessions tables under rawdata/), with the naming variants of masks and tissue labels of
    both releases."""
    raw_base = root / ("sourcedata" if release == 2 else "rawdata")
    deriv = root / "derivatives" / "dhcp_anat_pipeline"
    masks = (["_desc-bet_space-T2w_brainmask.nii.gz", "_brainmask_bet.nii.gz"] if release == 2
             else ["_desc-brain_mask.nii.gz", "_desc-drawem_space-T2w_brainmask.nii.gz"])
    tissues = (["_drawem_tissue_labels.nii.gz", "_desc-drawem9_space-T2w_dseg.nii.gz"] if release == 2
               else ["_desc-drawem9_dseg.nii.gz", "_desc-drawem9_space-T2w_dseg.nii.gz"])
    for i, (p, s, _birth, _scan, _radiology, files) in enumerate(SESSIONS):
        sub, ses = f"sub-{p}", f"ses-{s}"
        stem = f"{sub}_{ses}"
        raw = raw_base / sub / ses / "anat"
        der = deriv / sub / ses / "anat"
        if files in ("derived", "raw", "garbage"):
            _tiny(raw / f"{stem}_T2w.nii.gz", 2.0)
        if files == "derived":
            _tiny(der / f"{stem}_desc-restore_T2w.nii.gz", 3.0)
        if files == "garbage":
            (raw / f"{stem}_T2w.nii.gz").write_bytes(b"\x1f\x8b garbage")
        if files != "none":
            _tiny((der if files == "derived" else raw) / f"{stem}{masks[i % 2]}")
            _tiny((der if files == "derived" else raw) / f"{stem}{tissues[i % 2]}")
    if release == 2:
        lines = ["participant_id\tsession_id\tgender\tbirth_age\tbirth_weight\tsingleton\tscan_age\tscan_number\t"
                 "radiology_score\tsedation"]
        lines += [f"{p}\t{s}\t{'Male' if i % 2 else 'Female'}\t{b}\t3.1\tSingle\t{a}\t1\t{r}\t0"
                  for i, (p, s, b, a, r, _) in enumerate(SESSIONS)]
        (root / "combined_rel02.tsv").write_text("\n".join(lines) + "\n")
    else:
        people = {}
        for i, (p, s, b, a, r, _) in enumerate(SESSIONS):
            people.setdefault(p, (b, "male" if i % 2 else "female", []))[2].append((s, a, r))
        lines = ["participant_id\tsex\tbirth_age\tbirth_weight"]
        lines += [f"sub-{p}\t{sex}\t{b}\t3.0" for p, (b, sex, _) in people.items()]
        raw_base.mkdir(parents=True, exist_ok=True)
        (root if release == "3-root" else raw_base).joinpath("participants.tsv").write_text("\n".join(lines) + "\n")
        for p, (_, _, sessions) in people.items():
            rows = ["session_id\tscan_age\tradiology_score\tsedation"]
            rows += [f"ses-{s}\t{a}\t{r}\t0" for s, a, r in sessions]
            (raw_base / f"sub-{p}").mkdir(parents=True, exist_ok=True)
            (raw_base / f"sub-{p}" / f"sub-{p}_sessions.tsv").write_text("\n".join(rows) + "\n")
    return root
