"""DICOM in and out for the MONAI Deploy app (pydicom + highdicom; no Holoscan here, so it is tested directly).

In:  the series the SDK's ``DICOMSeriesSelectorOperator`` picked (rules: ``series_rules.json`` next to this file)
     -> ``series_volume``: the voxel array and an affine that this module computes from ImageOrientationPatient,
     ImagePositionPatient and PixelSpacing, slices sorted along the slice normal. The SDK 4.0.0
     ``DICOMSeriesToVolumeOperator`` is not used: its affine swaps the row and column spacings and its slice
     spacing is wrong for oblique series (docs/dicom.md, Finding: the SDK 4.0.0 volume affine),
     which ``tests/deploy/sdk_affine_repro.py`` reproduces.
Out: ``write_seg`` -- the evidence labelmap (``scripts.runtime.evidence``) as a binary DICOM SEG on the input
     series' grid; ``write_sr`` -- a Comprehensive 3D SR (TID 1500 measurement report) with the decision, both
     probabilities, the LRP preset, the QC verdict and the model version. Both are written atomically (temporary
     file + rename) as ``<output>/<subject>/<subject>_evidence_seg.dcm`` and ``..._sr.dcm``, where ``subject``
     is the input's SeriesInstanceUID.

Geometry. For one slice, pydicom's ``PixelSpacing`` is ``[row spacing, column spacing]``: the distance between
the centres of adjacent *rows* (a step along the column direction, the second ImageOrientationPatient triplet)
and between adjacent *columns* (a step along the row direction, the first triplet). The volume is indexed
``[column, row, slice]`` (the NIfTI / ITK order), so its LPS affine has the columns ``row_cosine * column
spacing``, ``column_cosine * row spacing``, ``slice step`` and ``first position``; the returned affine is RAS
(MONAI's and nibabel's convention): ``diag(-1, -1, 1, 1) @ LPS``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from scripts.runtime.evidence import EVIDENCE_LABELS
from scripts.runtime.outputs import atomic_target_for

logger = logging.getLogger(__name__)

__all__ = ["LPS_TO_RAS", "PRIVATE_SCHEME", "RULES_FILE", "is_dicom_folder", "series_volume", "series_subject",
           "write_seg", "write_sr"]

RULES_FILE = Path(__file__).resolve().parent / "series_rules.json"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# the coding scheme of concepts that neither SNOMED CT nor DICOM (DCM) has (docs/dicom.md)
PRIVATE_SCHEME = "99PRETERMLRP"
MANUFACTURER = "preterm-lrp bundle contributors"
# segment colours (RGB), in EVIDENCE_LABELS order: preterm bands red (strongest darkest), term bands blue,
# counter-evidence green
_COLOURS = ((200, 0, 0), (240, 90, 60), (250, 170, 130), (0, 60, 200), (60, 130, 240), (140, 190, 250), (0, 170, 0))
_TOLERANCE_MM = 1e-3  # geometry checks, in mm (and unit-vector components)


def is_dicom_folder(path: str | Path) -> bool:
    """``path`` is a folder holding ``.dcm`` files (at any depth): the app's DICOM input."""
    path = Path(path)
    return path.is_dir() and any(p.is_file() for p in path.rglob("*") if p.suffix.lower() == ".dcm")


def series_subject(dataset) -> str:
    """The subject name (output folder and file prefix) of a DICOM series: its SeriesInstanceUID (unique, and
    only digits and dots; PatientID and SeriesNumber are neither)."""
    return str(dataset.SeriesInstanceUID)


def _floats(dataset, keyword: str, count: int, where: str) -> np.ndarray:
    value = dataset.get(keyword)
    if value is None or len(value) != count:
        raise ValueError(f"{where}: {keyword} missing or not {count} numbers: cannot place the series in space")
    return np.asarray([float(v) for v in value], dtype=np.float64)


def series_volume(datasets: Sequence, name: str = "DICOM series") -> tuple[np.ndarray, np.ndarray, list]:
    """The single-frame slices ``datasets`` of one series as ``(volume, affine, sorted_datasets)``: a float32
    array indexed ``[column, row, slice]`` (RescaleSlope/Intercept applied), its RAS affine computed from
    ImageOrientationPatient / ImagePositionPatient / PixelSpacing (see the module docstring), and the slices in
    the volume's order (ascending position along the normal ``row cosine x column cosine``). Refuses, naming
    ``name`` and what is wrong: multi-frame instances, slices with different orientation, spacing or size,
    two slices at one position, and uneven slice steps."""
    datasets = [d for d in datasets if "PixelData" in d]
    if len(datasets) < 2:
        raise ValueError(f"{name}: {len(datasets)} image slice(s): a 3D series needs at least 2")
    first = datasets[0]
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{name}: multi-frame (enhanced) instances are not supported: export the series as "
                         "single-frame MR images")
    orientation = _floats(first, "ImageOrientationPatient", 6, name)
    spacing = _floats(first, "PixelSpacing", 2, name)  # [row spacing, column spacing]
    shape = (int(first.Rows), int(first.Columns))
    for d in datasets[1:]:
        if not np.allclose(_floats(d, "ImageOrientationPatient", 6, name), orientation, atol=_TOLERANCE_MM):
            raise ValueError(f"{name}: slices with different ImageOrientationPatient: not one 3D volume")
        if not np.allclose(_floats(d, "PixelSpacing", 2, name), spacing, atol=_TOLERANCE_MM):
            raise ValueError(f"{name}: slices with different PixelSpacing: not one 3D volume")
        if (int(d.Rows), int(d.Columns)) != shape:
            raise ValueError(f"{name}: slices of different size: not one 3D volume")
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    positions = np.stack([_floats(d, "ImagePositionPatient", 3, name) for d in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    datasets = [datasets[i] for i in order]
    steps = np.diff(positions, axis=0)
    distances = steps @ normal
    if np.any(distances < _TOLERANCE_MM):
        raise ValueError(f"{name}: two slices at the same position: not one 3D volume")
    step = (positions[-1] - positions[0]) / (len(positions) - 1)
    if np.abs(steps - step).max() > max(_TOLERANCE_MM, 0.01 * float(np.linalg.norm(step))):
        raise ValueError(f"{name}: uneven slice positions (missing slices?): not one regular 3D volume")
    affine = np.eye(4)
    affine[:3, 0] = row_cosine * spacing[1]  # next column: along the row direction, column spacing
    affine[:3, 1] = column_cosine * spacing[0]  # next row: along the column direction, row spacing
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    volume = np.empty((shape[1], shape[0], len(datasets)), dtype=np.float32)
    for k, d in enumerate(datasets):
        pixels = d.pixel_array.astype(np.float32)
        slope, intercept = float(d.get("RescaleSlope", 1) or 1), float(d.get("RescaleIntercept", 0) or 0)
        volume[:, :, k] = (pixels * slope + intercept).T  # (rows, columns) -> [column, row]
    return volume, LPS_TO_RAS @ affine, datasets


def _bundle_algorithm(metadata: dict) -> tuple[str, str]:
    """The bundle's name and version (``configs/metadata.json`` as stored in model.ts). AlgorithmName and
    ManufacturerModelName are LO (at most 64 characters): a longer name is cut at the last word that fits."""
    name = " ".join(str(metadata.get("name") or "preterm-lrp").split())
    if len(name) > 64:
        name = name[:65].rsplit(" ", 1)[0][:64]
    return name, str(metadata.get("version") or "0")


def _write_dataset(dataset, path: Path) -> Path:
    """Declare the private coding scheme (SOP Common module), then write ``dataset`` atomically."""
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "preterm-lrp bundle concepts (docs/dicom.md)"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    dataset.CodingSchemeIdentificationSequence = [scheme]
    with atomic_target_for(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path


def write_seg(path: str | Path, labels: np.ndarray, datasets: Sequence, metadata: dict) -> Path:
    """The ``[column, row, slice]`` labelmap ``labels`` (values of ``EVIDENCE_LABELS``, on the grid of the
    sorted ``datasets``) as a binary DICOM SEG of those slices: one segment per evidence name (all seven,
    static, as Slicer's MONAI Label task), every frame kept, the bundle as the algorithm."""
    labels = np.asarray(labels)
    if labels.shape != (int(datasets[0].Columns), int(datasets[0].Rows), len(datasets)):
        raise ValueError(f"labelmap shape {labels.shape} is not the series' grid")
    name, version = _bundle_algorithm(metadata)
    algorithm = hd.AlgorithmIdentificationSequence(name=name, version=version,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=value, segment_label=label,
            segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
            segmented_property_type=hd.sr.CodedConcept(f"E{value}", PRIVATE_SCHEME, label),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Brain], display_color=hd.color.CIELabColor.from_rgb(*_COLOURS[value - 1]))
        for label, value in sorted(EVIDENCE_LABELS.items(), key=lambda item: item[1])]
    frames = np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8)  # (slice, row, column)
    seg = hd.seg.Segmentation(
        source_images=list(datasets), pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=9001, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name=name, software_versions=version,
        device_serial_number="0", omit_empty_frames=False, series_description="LRP evidence (research use only)",
        content_label="EVIDENCE", content_description="LRP relevance bands of the decision")
    return _write_dataset(seg, Path(path))


def _private(value: str, meaning: str | None = None):
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, meaning or value)


def write_sr(path: str | Path, result: dict, datasets: Sequence, metadata: dict) -> Path:
    """The decision of ``result`` (``PretermInference``) as a Comprehensive 3D SR measurement report (TID 1500)
    about the sorted ``datasets``: decision, both probabilities, LRP preset, QC verdict and failed measures,
    model name/version; the source series in the evidence and the measurement group's source images."""
    name, version = _bundle_algorithm(metadata)
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version,
                                              parameters=[f"lrp_preset={result['preset']}"])
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=name, manufacturer_name=MANUFACTURER,
                                                       model_name=version)
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    unit = hd.sr.CodedConcept("1", "UCUM", "no units")
    measurements = [hd.sr.Measurement(name=_private(f"P-{cls}", f"Probability of {cls} birth"), value=float(p),
                                      unit=unit, algorithm_id=algorithm)
                    for cls, p in result["probabilities"].items()]
    evaluations = [
        hd.sr.QualitativeEvaluation(name=_private("DECISION", "Predicted birth class"),
                                    value=_private(result["prediction"].upper(), result["prediction"])),
        hd.sr.QualitativeEvaluation(name=_private("LRP-PRESET", "LRP preset"), value=_private(result["preset"])),
    ]
    qc = result.get("qc")
    if qc is None:
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.DCM.QualityControl,
                                                       value=_private("QC-OFF", "Input QC not evaluated")))
    else:
        verdict = (codes.DCM.UsableMeetsTheQualityControlStandard if qc["pass"]
                   else codes.DCM.UsableDoesNotMeetTheQualityControlStandard)
        evaluations.append(hd.sr.QualitativeEvaluation(name=codes.DCM.QualityControl, value=verdict))
        evaluations += [hd.sr.QualitativeEvaluation(name=_private("QC-FAILED", "Failed input QC measure"),
                                                    value=_private(measure)) for measure in qc["failed"]]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="preterm-lrp decision"),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=evaluations,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(d) for d in datasets])
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.LN.BrainMRI,
                                     imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(datasets), content=report, series_instance_uid=hd.UID(), series_number=9002,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        series_description="preterm-lrp decision (research use only)")
    return _write_dataset(sr, Path(path))


def rules_text() -> str:
    """The selection rules (``series_rules.json``), checked to be JSON with ``selections``."""
    try:
        rules = json.loads(RULES_FILE.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{RULES_FILE}: not readable JSON series selection rules ({err})") from err
    if not isinstance(rules, dict) or not rules.get("selections"):
        raise ValueError(f"{RULES_FILE}: no \"selections\" in the series selection rules")
    return json.dumps(rules)
