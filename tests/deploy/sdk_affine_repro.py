"""Minimal reproduction: the affine and slice spacing of MONAI Deploy App SDK 4.0.0's DICOMSeriesToVolumeOperator
against the geometry a test series was written with (docs/dicom.md). Run in the Deploy environment:

    .nox/deploy/bin/python tests/deploy/sdk_affine_repro.py

A 4x3-pixel, 5-slice MR series (PixelSpacing [1.1, 0.8] = row spacing 1.1 mm, column spacing 0.8 mm; 2.5 mm
slices), axial and tilted 20 degrees about the x axis, is written with pydicom and read by the SDK's own
DICOMDataLoaderOperator and DICOMSeriesToVolumeOperator.prepare_series (which computes the affine).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: dicom_series
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dicom_series import SLICE_SPACING, write_series  # noqa: E402


def sdk_geometry(folder: Path) -> tuple[np.ndarray, float]:
    """(the SDK's RAS "nifti" affine, its depth_pixel_spacing) for the one series in ``folder``."""
    from monai.deploy.core import Fragment
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator

    fragment = Fragment()
    loader = DICOMDataLoaderOperator(fragment, input_folder=folder, name="loader")
    to_volume = DICOMSeriesToVolumeOperator(fragment, name="to_volume")
    series = loader.load_data_to_studies(folder)[0].get_all_series()[0]
    to_volume.prepare_series(series)
    return np.asarray(getattr(series, to_volume.ATTRIBUTE_NIFTI_AFFINE)), float(series.depth_pixel_spacing)


def main() -> int:
    from dicom_series import read_series

    from scripts.deploy_app.dicom import series_volume

    volume = np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5)  # [column, row, slice]
    np.set_printoptions(precision=4, suppress=True)
    with tempfile.TemporaryDirectory() as tmp:
        for tilt in (0.0, 20.0):
            folder = Path(tmp) / f"tilt{tilt:g}"
            truth = write_series(volume, folder, tilt_degrees=tilt)["affine"]
            sdk, depth = sdk_geometry(folder)
            ours = series_volume(read_series(folder))[1]
            print(f"--- tilt {tilt:g} degrees")
            print("written (RAS):\n", truth)
            print("SDK 4.0.0 nifti affine:\n", sdk)
            print("ours:\n", ours)
            print("column lengths (spacing along column, row, slice index): written",
                  np.linalg.norm(truth[:3, :3], axis=0), "SDK", np.linalg.norm(sdk[:3, :3], axis=0))
            print(f"SDK depth_pixel_spacing {depth:.4f} mm, written slice spacing {SLICE_SPACING} mm")
            print("max |ours - written|", np.abs(ours - truth).max(), " max |SDK - written|", np.abs(sdk - truth).max())
    return 0


if __name__ == "__main__":
    sys.exit(main())
