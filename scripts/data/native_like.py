"""Native-like scans from template-space ones: a subject moved off the template by a known affine (rotation,
scaling, shift), resampled onto a 0.9 mm RAS grid of its own, with a bright scalp-like shell around the brain --
what a scanner gives before registration and skull stripping. Test data of the native-scan path
(``preprocess`` auto|on, ``scripts.data.preprocess run``) and of ``benchmarks/native_scan.py``."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts.runtime.outputs import save_nifti

__all__ = ["random_affine", "to_native"]

SCALP_VALUE = 2600.0  # brighter than every tissue of the synthetic T2w contrast


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


def to_native(image_path: Path, labels_path: Path, out_dir: Path, move: np.ndarray, stem: str,
              spacing: float = 0.9) -> dict:
    """Resample a template-space subject into a native RAS grid of ``spacing`` mm voxels (a 108 x 135 x 108 mm
    field of view centred on the world origin) after moving it by ``move`` (world coordinates); adds a bright
    scalp shell (3 mm thick at 0.9 mm) around the brain. Writes ``<stem>_T2w.nii.gz``, its brain mask
    and tissue labels into ``out_dir`` and returns their paths (keys image, mask, tissue)."""
    img = nib.load(image_path)
    data = img.get_fdata().astype(np.float32)
    labels = np.asarray(nib.load(labels_path).dataobj).astype(np.uint8)
    shape = tuple(int(round(n * 0.9 / spacing)) for n in (120, 150, 120))
    native_affine = np.diag([spacing, spacing, spacing, 1.0])
    native_affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    # native voxel -> world -> (inverse move) -> template world -> template voxel
    m = np.linalg.inv(img.affine) @ np.linalg.inv(move) @ native_affine
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = (m[:3, :3] @ grid + m[:3, 3:4]).reshape(3, *shape)
    moved = ndimage.map_coordinates(data, coords, order=1, cval=0.0)
    moved_labels = ndimage.map_coordinates(labels, coords, order=0, cval=0)
    brain = moved_labels > 0
    inner, outer = (int(round(mm / spacing)) for mm in (2.7, 5.4))
    scalp = ndimage.binary_dilation(brain, iterations=outer) & ~ndimage.binary_dilation(brain, iterations=inner)
    moved = np.where(scalp, SCALP_VALUE, moved).astype(np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"image": out_dir / f"{stem}_T2w.nii.gz", "mask": out_dir / f"{stem}_desc-brain_mask.nii.gz",
             "tissue": out_dir / f"{stem}_desc-drawem9_dseg.nii.gz"}
    save_nifti(moved, native_affine, files["image"])
    save_nifti(brain, native_affine, files["mask"], dtype=np.uint8)
    save_nifti(moved_labels, native_affine, files["tissue"], dtype=np.uint8)
    return files
