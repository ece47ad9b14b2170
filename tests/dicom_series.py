"""A synthetic scan written as a DICOM MR series with pydicom: one file per slice, in shuffled file order, with
a chosen orientation and non-square pixels (tests of the Deploy app's DICOM input and output, the Label app's
DICOMweb datastore, benchmarks/dicom_study.py). Works with pydicom 2 (Label environment) and 3 (Deploy)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROW_SPACING, COLUMN_SPACING, SLICE_SPACING = 1.1, 0.8, 2.5  # PixelSpacing = [row, column] spacing


def rotation_x(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])


def expected_affine(tilt_degrees: float = 0.0, origin=(-50.0, -60.0, -40.0), spacing=None) -> np.ndarray:
    """The RAS affine of the series ``write_series`` writes, built from the geometry it chose (not from the
    files): LPS columns row_cosine * column spacing, column_cosine * row spacing, normal * slice spacing
    (``spacing``: row, column, slice; default ROW_SPACING, COLUMN_SPACING, SLICE_SPACING)."""
    row_spacing, column_spacing, slice_spacing = spacing or (ROW_SPACING, COLUMN_SPACING, SLICE_SPACING)
    rot = rotation_x(tilt_degrees)
    row_cosine, column_cosine = rot @ [1.0, 0, 0], rot @ [0, 1.0, 0]
    lps = np.eye(4)
    lps[:3, 0] = row_cosine * column_spacing
    lps[:3, 1] = column_cosine * row_spacing
    lps[:3, 2] = np.cross(row_cosine, column_cosine) * slice_spacing
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_series(volume: np.ndarray, folder: Path, tilt_degrees: float = 0.0, modality: str = "MR",
                 description: str = "T2w TSE axial", seed: int = 0, study_uid: str | None = None,
                 origin=(-50.0, -60.0, -40.0), spacing=None) -> dict:
    """Write the ``[column, row, slice]`` ``volume`` (rounded to uint16) as one single-frame MR (or ``modality``)
    file per slice into ``folder``, files named in shuffled order, with ``spacing`` (row, column, slice in mm;
    default ROW_SPACING, COLUMN_SPACING, SLICE_SPACING). Returns the UIDs and the affine."""
    folder.mkdir(parents=True, exist_ok=True)
    row_spacing, column_spacing, slice_spacing = spacing or (ROW_SPACING, COLUMN_SPACING, SLICE_SPACING)
    affine = expected_affine(tilt_degrees, origin, spacing)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    row_cosine = lps[:3, 0] / column_spacing
    column_cosine = lps[:3, 1] / row_spacing
    pixels = np.clip(np.rint(volume), 0, 65535).astype(np.uint16)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    columns, rows, slices = pixels.shape
    names = list(range(slices))
    random.Random(seed).shuffle(names)
    sop_class = MRImageStorage if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Synthetic^Neonate", "SYN0001", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, "20260101", "120000"
        ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "1", ""
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = modality, series_uid, 3
        ds.SeriesDescription = description
        ds.PatientPosition, ds.BodyPartExamined = "HFS", "HEAD"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.Manufacturer = "Synthetic"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"] if modality == "MR" else ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_cosine, *column_cosine)]
        ds.PixelSpacing = [row_spacing, column_spacing]
        ds.SliceThickness = slice_spacing
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        if modality == "MR":
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "SE", "SK", ""
            ds.MRAcquisitionType, ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "2D", 12000, 160, 16
        else:
            ds.KVP, ds.AcquisitionNumber = 120, 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()  # (rows, columns)
        _save(ds, folder / f"IM{names[k]:04d}.dcm")
    return {"study": study_uid, "series": series_uid, "frame_of_reference": frame_uid, "affine": affine}


def _save(ds: FileDataset, path: Path) -> None:
    """Save as a DICOM file with its meta header (pydicom 3: ``enforce_file_format``; pydicom 2: the same as
    ``write_like_original=False``)."""
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, write_like_original=False)


def write_nifti_as_series(nifti_path: Path, folder: Path, **kwargs) -> dict:
    """The scan of an axis-aligned RAS NIfTI (diagonal positive affine, as ``scripts.data.native_like.to_native``
    writes) as an axial series with the same geometry: ``write_series`` declares LPS with row cosine +x and column
    cosine +y, so the volume flipped in i and j is the same anatomy in the same world. Returns ``write_series``'s
    dict plus ``shape``."""
    import nibabel as nib  # noqa: PLC0415

    nifti = nib.load(str(nifti_path))
    affine = np.asarray(nifti.affine, dtype=np.float64)
    spacing = np.diag(affine)[:3]
    if not np.allclose(affine[:3, :3], np.diag(spacing)) or (spacing <= 0).any():
        raise ValueError(f"{nifti_path}: not an axis-aligned RAS grid (affine {affine.tolist()})")
    volume = np.asarray(nifti.dataobj, dtype=np.float32)[::-1, ::-1, :]
    corner = affine @ [volume.shape[0] - 1, volume.shape[1] - 1, 0, 1]  # RAS of DICOM voxel (0, 0, 0)
    info = write_series(volume, folder, spacing=(spacing[1], spacing[0], spacing[2]),
                        origin=(-corner[0], -corner[1], corner[2]), **kwargs)
    return {**info, "shape": volume.shape}


def read_series(folder: Path) -> list:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
