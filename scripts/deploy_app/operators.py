"""Operators of the MONAI Deploy app (MONAI Deploy App SDK 4.0, Holoscan operators).

``NiftiImageLoader``     NIfTI file(s) -> MetaTensors that keep the affine (the SDK's NiftiDataLoader drops it)
``DicomStudyLoader``     the SDK's DICOMDataLoaderOperator (no readable study: one input error)
``DicomVolumeLoader``    the series picked by the SDK's DICOMSeriesSelectorOperator (``series_rules.json``) ->
                         a MetaTensor whose affine ``dicom.series_volume`` computes (not the SDK's
                         DICOMSeriesToVolumeOperator: docs/dicom.md), read as a NIfTI of that volume would be
``PretermInference``     the exported bundle model (``model.ts``): the bundle's own preprocessing (read from the
                         config ``ckpt_export`` stored in model.ts), probabilities from the TorchScript model and the
                         LRP relevance map of the decision
``ProbabilitiesWriter``  ``<output>/<subject>/<subject>_probabilities.json``
``RelevanceWriter``      ``<output>/<subject>/<subject>_relevance_<preset>.nii.gz`` (network-input grid, as the
                         bundle's LRPHandler writes it) and ``..._orig.nii.gz`` (the input's grid and affine)
``EvidenceWriter``       ``<output>/<subject>/<subject>_evidence_orig.nii.gz``: the evidence labelmap of
                         ``scripts.runtime.evidence`` on the input's grid (uint8)
``DicomSegWriter``       DICOM input only: ``<subject>_evidence_seg.dcm``, that labelmap as a DICOM SEG
``DicomSrWriter``        DICOM input only: ``<subject>_sr.dcm``, the decision as a Comprehensive 3D SR

The stock MonaiBundleInferenceOperator is not used: it labels probabilities with ``int(prob)``, keeps only the
first network output and strips the batch dimension.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor, NibabelReader
from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from monai.deploy.exceptions import ItemNotExistsError
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.transforms import Compose, LoadImage, LoadImaged

from scripts.deploy_app import dicom
from scripts.runtime.checks import check_image
from scripts.runtime.datalist import folder_items
from scripts.runtime.evidence import evidence_labelmap
from scripts.runtime.explain import (
    APP_PRESET,
    affine_of,
    check_presets,
    explain,
    labels_to_original_grid,
    write_explanation,
)
from scripts.runtime.network import from_torchscript
from scripts.runtime.outputs import atomic_write_text, output_path, save_nifti, subject_name
from scripts.runtime.qc import evaluate_input
from scripts.runtime.reference import QCReference

logger = logging.getLogger(__name__)


def nifti_files(path: Path) -> list[Path]:
    """The NIfTI file ``path`` or the NIfTIs directly inside the folder ``path`` (the bundle's folder listing)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return [Path(item["image"]) for item in folder_items(path)]


class NiftiImageLoader(Operator):
    """Load every input NIfTI as a channel-less MetaTensor (MONAI's NibabelReader, as ``configs/inference.json``),
    with the file's affine and name in its meta data. Each file is checked first (readable, 3D, finite, not empty);
    a bad file stops the app with its name and what is wrong."""

    def __init__(self, fragment: Fragment, *args, input_path: Path, **kwargs) -> None:
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("images")

    def compute(self, op_input, op_output, context):
        loader = LoadImage(reader="NibabelReader", image_only=True)
        images = []
        for path in nifti_files(self.input_path):
            check_image(str(path))
            images.append(loader(str(path)))
            logger.info("loaded %s %s", path, tuple(images[-1].shape))
        op_output.emit(images, "images")


def volume_image(volume: np.ndarray, affine: np.ndarray, name: str) -> MetaTensor:
    """The MetaTensor that ``LoadImage(reader="NibabelReader")`` gives for a NIfTI file of ``volume`` and
    ``affine`` written by ``save_nifti`` (float32, sform/qform code 1): the image goes through NIfTI bytes in
    memory (so the affine is stored as a file stores it) and the same reader steps as LoadImage."""
    image = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), np.asarray(affine, dtype=float))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    image = nib.Nifti1Image.from_bytes(image.to_bytes())
    reader = NibabelReader()
    reader.filenames = (name,)  # what NibabelReader.read records; get_data pairs it with the image (CPU: unread)
    array, meta = reader.get_data(image)
    meta["filename_or_obj"] = name
    loader = LoadImage(reader="NibabelReader", image_only=True)
    return MetaTensor.ensure_torch_and_prune_meta(torch.as_tensor(np.asarray(array, dtype=np.float32)), meta,
                                                  loader.simple_keys, pattern=loader.pattern, sep=loader.sep)


class DicomStudyLoader(DICOMDataLoaderOperator):
    """The SDK's DICOMDataLoaderOperator; a folder whose files hold no readable DICOM study is one input error
    naming the folder (the SDK raises its own ItemNotExistsError, a traceback)."""

    def load_data_to_studies(self, input_path: Path):
        try:
            return super().load_data_to_studies(input_path)
        except ItemNotExistsError as err:
            raise ValueError(f"{input_path}: no readable DICOM study in its files ({err})") from err


class DicomVolumeLoader(Operator):
    """The first series each study's selection found (``DICOMSeriesSelectorOperator`` with ``series_rules.json``)
    as a MetaTensor (``volume_image``) with its sorted slices for the DICOM writers. No matching series stops
    the app with one line naming the rules file and the series it saw."""

    def __init__(self, fragment: Fragment, *args, input_path: Path, **kwargs) -> None:
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("study_selected_series_list")
        spec.input("dicom_study_list")
        spec.output("images")

    def compute(self, op_input, op_output, context):
        selected = op_input.receive("study_selected_series_list") or []
        studies = op_input.receive("dicom_study_list") or []
        images = []
        for study in selected:
            for chosen in study.selected_series[:1]:
                series = chosen.series
                datasets = [sop.get_native_sop_instance() for sop in series.get_sop_instances()]
                name = f"{self.input_path} series {series.SeriesInstanceUID}"
                volume, affine, ordered = dicom.series_volume(datasets, name)
                subject = dicom.series_subject(ordered[0])
                images.append({"image": volume_image(volume, affine, subject), "subject": subject,
                               "source": str(self.input_path), "dicom": ordered})
                logger.info("loaded %s %s", name, volume.shape)
        if not images:
            seen = "; ".join(f"{s.Modality} '{getattr(s, 'SeriesDescription', '') or ''}'"
                             for study in studies for s in study.get_all_series()) or "none"
            raise ValueError(f"{self.input_path}: no DICOM series matches the selection rules in {dicom.RULES_FILE} "
                             f"(series found: {seen})")
        op_output.emit(images, "images")


class PretermInference(Operator):
    """Classify and explain each image with the exported model."""

    def __init__(self, fragment: Fragment, *args, model_path: Path, preset: str = APP_PRESET,
                 target: str | int = "pred", device: str | None = None, **kwargs) -> None:
        check_presets([preset])  # a bad preset name fails before anything runs
        self.model_path = Path(model_path)
        self.preset = preset
        self.target = target
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("images")
        spec.output("results")

    def _load(self):
        extra = {"inference.json": "", "metadata.json": ""}
        scripted = torch.jit.load(str(self.model_path), map_location=self.device, _extra_files=extra).eval()
        if not extra["inference.json"]:
            raise ValueError(f"{self.model_path}: no inference config inside; export it with ckpt_export "
                             "--config_file configs/inference.json")
        parser = ConfigParser(json.loads(extra["inference.json"]))
        parser["spatial_shape"] = [int(s) for s in scripted._expected]  # the shape the exported model was built for
        parser["ckpt_dir"] = str(self.model_path.parent)  # the registration template of native scans lies beside it
        steps = parser.get_parsed_content("preprocessing", instantiate=True).transforms
        preprocessing = Compose([t for t in steps if not isinstance(t, LoadImaged)])
        metadata = json.loads(extra["metadata.json"] or "{}")
        channels = metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("channel_def", {})
        names = [channels.get(str(i), str(i)) for i in range(2)]
        return scripted, from_torchscript(scripted).to(self.device), preprocessing, names, metadata

    def compute(self, op_input, op_output, context):
        images = op_input.receive("images")
        scripted, eager, preprocessing, names, metadata = self._load()
        reference = QCReference.load(self.model_path.parent)  # the sidecar next to model.ts
        if reference is None:
            logger.warning("no QC reference next to %s: input QC is off", self.model_path)
        results = []
        for item in images:
            item = item if isinstance(item, dict) else {"image": item}
            image = item["image"]
            source = item.get("source") or image.meta["filename_or_obj"]
            net_input = preprocessing({"image": image})["image"]
            x = net_input.as_tensor()[None].to(self.device, torch.float32)
            with torch.no_grad():
                logits = scripted(x).float()
            explained = explain(eager, x, [self.preset], self.target, torch.softmax(logits, dim=1))
            if not torch.allclose(explained.logits, logits.cpu(), rtol=1e-4, atol=1e-4):
                raise RuntimeError(f"{self.model_path}: the rebuilt network does not reproduce the exported model")
            probs = explained.probabilities[0]
            qc = evaluate_input(reference, eager, net_input)
            if qc is not None and not qc["pass"]:
                logger.warning("%s: input QC failed (%s): not like a registered neonatal T2w", source,
                               ", ".join(qc["failed"]))
            target = int(explained.maps[self.preset].target[0])
            labels = evidence_labelmap(explained.relevance(0, self.preset)[0].numpy(), target)
            evidence = labels_to_original_grid(torch.from_numpy(labels[None].astype(np.float32)), net_input,
                                               preprocessing)
            results.append({
                "subject": item.get("subject") or subject_name(source), "image": str(source),
                "probabilities": {names[i]: float(probs[i]) for i in range(len(names))},
                "prediction": names[int(probs.argmax())], "prediction_index": int(probs.argmax()),
                "preset": self.preset, "target": explained.summary(0, self.preset)["target"],
                "model": str(self.model_path), "qc": qc,
                "network_input": net_input, "explained": explained, "preprocessing": preprocessing,
                "evidence": evidence, "dicom": item.get("dicom"), "metadata": metadata,
            })
            logger.info("%s: %s (p=%.4f)", results[-1]["subject"], results[-1]["prediction"], float(probs.max()))
        op_output.emit(results, "results")


class _ResultWriter(Operator):
    """Receives the inference results and writes one output per image (``write``) under ``output_folder``."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("results").condition(ConditionType.MESSAGE_AVAILABLE)

    def compute(self, op_input, op_output, context):
        for result in op_input.receive("results"):
            self.write(result)

    def write(self, result: dict) -> None:
        raise NotImplementedError


class ProbabilitiesWriter(_ResultWriter):
    """``<output>/<subject>/<subject>_probabilities.json`` per image, written atomically."""

    KEYS = ("subject", "image", "probabilities", "prediction", "prediction_index", "model", "qc")

    def write(self, result: dict) -> None:
        atomic_write_text(json.dumps({k: result[k] for k in self.KEYS}, indent=2) + "\n",
                          output_path(self.output_folder, result["subject"], "probabilities", ".json"))


class RelevanceWriter(_ResultWriter):
    """The relevance map per image, on the network-input grid and on the input's own grid (``_orig``): the
    bundle's explain-and-write step, as ``run inference`` with ``save_original_space`` writes them."""

    def write(self, result: dict) -> None:
        write_explanation(self.output_folder, result["subject"], result["network_input"], result["explained"], 0,
                          transform=result["preprocessing"])


class EvidenceWriter(_ResultWriter):
    """``<subject>_evidence_orig.nii.gz``: the evidence labelmap (``scripts.runtime.evidence``, the bands of the
    explained class and counter-evidence) on the input's grid and affine (nearest-neighbour inverse transforms)."""

    def write(self, result: dict) -> None:
        save_nifti(evidence_array(result), affine_of(result["evidence"]),
                   output_path(self.output_folder, result["subject"], "evidence_orig"), dtype=np.uint8)


def evidence_array(result: dict) -> np.ndarray:
    return np.rint(result["evidence"][0].cpu().numpy()).astype(np.uint8)


class DicomSegWriter(_ResultWriter):
    """``<subject>_evidence_seg.dcm``: the evidence labelmap as a binary DICOM SEG of the input series."""

    def write(self, result: dict) -> None:
        if result.get("dicom"):
            dicom.write_seg(output_path(self.output_folder, result["subject"], "evidence_seg", ".dcm"),
                            evidence_array(result), result["dicom"], result["metadata"])


class DicomSrWriter(_ResultWriter):
    """``<subject>_sr.dcm``: decision, probabilities, preset, QC and model as a Comprehensive 3D SR."""

    def write(self, result: dict) -> None:
        if result.get("dicom"):
            dicom.write_sr(output_path(self.output_folder, result["subject"], "sr", ".dcm"), result, result["dicom"],
                           result["metadata"])
