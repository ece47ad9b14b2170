"""Test data for the real-data path: synthetic subjects moved off the template by a known random affine into a
native-like scan (with scalp around the brain), a template image, and fake dHCP release trees."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts.data.synthetic_anatomy import procedural_labels, template_affine
from scripts.runtime.outputs import save_nifti

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


def random_affine(rng: np.random.Generator, degrees=10.0, shift_mm=8.0, scale=0.05) -> np.ndarray:
    """4x4 world-to-world matrix: rotations about the three axes, scaling and a translation."""
    a, b, c = np.deg2rad(rng.uniform(-degrees, degrees, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rx @ ry @ rz @ np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    out[:3, 3] = rng.uniform(-shift_mm, shift_mm, 3)
    return out


def to_native(image_path: Path, labels_path: Path, out_dir: Path, move: np.ndarray, stem: str) -> dict:
    """Resample a template-space subject into a native RAS grid of 0.9 mm voxels after moving it by ``move``
    (world coordinates); adds a bright scalp shell around the brain. Returns the written files."""
    img = nib.load(image_path)
    data = img.get_fdata().astype(np.float32)
    labels = np.asarray(nib.load(labels_path).dataobj).astype(np.uint8)
    shape = (120, 150, 120)
    spacing = 0.9
    native_affine = np.diag([spacing, spacing, spacing, 1.0])
    native_affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    # native voxel -> world -> (inverse move) -> template world -> template voxel
    vox = native_affine
    m = np.linalg.inv(img.affine) @ np.linalg.inv(move) @ vox
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = (m[:3, :3] @ grid + m[:3, 3:4]).reshape(3, *shape)
    moved = ndimage.map_coordinates(data, coords, order=1, cval=0.0)
    moved_labels = ndimage.map_coordinates(labels, coords, order=0, cval=0)
    brain = moved_labels > 0
    scalp = ndimage.binary_dilation(brain, iterations=6) & ~ndimage.binary_dilation(brain, iterations=3)
    moved = np.where(scalp, 2600.0, moved).astype(np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"image": out_dir / f"{stem}_T2w.nii.gz", "mask": out_dir / f"{stem}_desc-brain_mask.nii.gz",
             "tissue": out_dir / f"{stem}_desc-drawem9_dseg.nii.gz"}
    save_nifti(moved, native_affine, files["image"])
    save_nifti(brain, native_affine, files["mask"], dtype=np.uint8)
    save_nifti(moved_labels, native_affine, files["tissue"], dtype=np.uint8)
    return files


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
