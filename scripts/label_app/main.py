"""MONAI Label app for this bundle: ``monailabel start_server --app scripts/label_app --studies <folder of scans>``.

It serves the bundle folder it lives in (two levels up; ``--conf bundle <path>`` serves another copy) with three
inference tasks (``tasks.py``):

* ``preterm_evidence`` (segmentation) -- what 3D Slicer's MONAI Label plugin lists under *Auto Segmentation* and
  runs after *Next Sample*: a labelmap on the scan's grid whose segments show the decision and its evidence;
* ``classification`` -- term / preterm scores (JSON, and the same JSON as a file);
* ``relevance`` (others) -- the float32 LRP relevance map on the scan's grid, to load as a volume overlay.

The app's labels (``/info``) are the evidence task's seven static segment names, so the plugin's *Next Sample*
creates exactly the segments a result fills and its auto-run rule finds the evidence task. Nothing is downloaded:
weights come from ``<bundle>/models``.

``--studies`` may also be a DICOMweb server (e.g. Orthanc's ``http://<host>:8042/dicom-web``): MONAI Label's
DICOMweb datastore lists its MR series (``{"Modality": "MR"}``; MONAI Label's own default is CT; set
``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` to narrow it, e.g. ``{"Modality": "MR", "SeriesDescription": "*T2*"}``),
fetches and converts a series when a task runs on it (the task then registers the native scan per request), and
stores a label saved with tag ``final`` back as a DICOM SEG, written by dcmqi's ``itkimage2segimage`` (installed by
requirements-label.txt; MONAI Label would otherwise download dcmqi from GitHub at start).

``--conf`` options:
    bundle            the bundle folder (default: this repository)
    bundle_overrides  JSON object of ``configs/inference.json`` overrides, e.g. ``{"device": "cpu"}``
    lrp_preset        LRP composite of the relevance and evidence tasks (default: ``APP_PRESET`` of the served
                      bundle's ``scripts/runtime/explain.py``)
    lrp_target        class the relevance task explains: ``pred`` (predicted, default), ``0``/``1`` or ``difference``
                      (the evidence task always explains the predicted class)

Errors are answered with an HTTP error that says what is wrong (404 unknown task, 422 bad input or params); an
upload to the datastore that is not a readable NIfTI/NRRD scan is refused at upload time (422); the server stays up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import numpy as np
from fastapi import HTTPException
from monai.transforms import LoadImage
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

logger = logging.getLogger(__name__)
DEFAULT_BUNDLE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bundle_tasks(bundle: str):
    """The bundle's ``scripts.label_app.tasks`` module (imported with the bundle folder on sys.path)."""
    sys.path.insert(0, bundle)
    try:
        from scripts.label_app import tasks  # noqa: PLC0415 (the bundle is known only at run time)
    finally:
        sys.path.remove(bundle)
    return tasks


class CheckedDatastore(LocalDatastore):
    """MONAI Label's local datastore that refuses, at upload time, a file that is not a readable NIfTI/NRRD scan
    the network can take (the bundle's input checks), with HTTP 422 and the reason."""

    def __init__(self, *args, check=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._check = check

    def add_image(self, image_id, image_filename, image_info):
        if self._check is not None:
            try:
                self._check(image_filename)
            except (OSError, ValueError) as err:
                base = os.path.basename(image_filename)  # a server-side temporary: name the upload instead
                name = f"{image_id}{base[base.find('.'):] if '.' in base else ''}" if image_id else base
                raise HTTPException(status_code=422,
                                    detail=f"upload refused: {str(err).replace(image_filename, name)}") from err
        return super().add_image(image_id, image_filename, image_info)


class SegNamesDICOMWebDatastore(DICOMWebDatastore):
    """MONAI Label's DICOMweb datastore with the DICOM SEG's segment names right. MONAI Label 0.8.5's
    ``nifti_to_dicom_seg`` pairs the i-th label value present in the file with the i-th ``label_info`` entry, but
    3D Slicer's plugin sends one entry per segment (``{"name", "idx"}``), empty ones included -- and an evidence
    labelmap always has empty segments (the other class's bands): every name after the first empty one went to the
    wrong segment. Here ``label_info`` keeps only the entries whose value is present, in value order."""

    def save_label(self, image_id, label_filename, label_tag, label_info, label_id=""):
        entries = label_info.get("label_info") if isinstance(label_info, dict) else None
        if entries and label_tag == DefaultLabelTag.FINAL:
            present = _label_values(label_filename)
            # one entry per present value, in value order; ``idx`` is taken for the label value (as the plugin's
            # entries for this app's segments are numbered), a value without an entry gets a neutral name
            by_value = {int(entry.get("idx", i + 1)): entry for i, entry in enumerate(entries)}
            label_info = {**label_info, "label_info": [by_value.get(v, {"name": f"segment {v}"})
                                                       for v in sorted(present)]}
        return super().save_label(image_id, label_filename, label_tag, label_info, label_id)


def _label_values(path: str) -> set[int]:
    """The non-zero values of a label file as MONAI Label's datastore reads it (raw uint8 ``.bin`` or an image)."""
    if path.endswith(".bin"):
        data = np.fromfile(path, dtype=np.uint8)
    else:
        data = np.asarray(LoadImage(image_only=True)(path))
    return {int(v) for v in np.unique(data) if v != 0}


DICOMWEB_SEARCH_FILTER = {"Modality": "MR"}
MONAI_LABEL_DEFAULT_FILTER = {"Modality": "CT"}  # monailabel.config.Settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER
SEG_WRITER = "itkimage2segimage"  # dcmqi's converter, which MONAI Label's DICOMweb datastore runs from PATH


def _prepare_dicomweb() -> None:
    """Before MONAI Label's DICOMweb datastore starts: search MR series unless the user chose a filter (MONAI
    Label's default finds CT only), and find dcmqi's ``itkimage2segimage`` beside this Python (a pip-installed
    dcmqi in a venv that is not activated) or fail with the install command, instead of MONAI Label's download
    from GitHub."""
    # start_server exports every setting to the environment, so a user's choice shows only as a value other than
    # MONAI Label's default
    if settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER == MONAI_LABEL_DEFAULT_FILTER:
        settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER = dict(DICOMWEB_SEARCH_FILTER)
    if shutil.which(SEG_WRITER) is None:
        here = os.path.dirname(sys.executable)
        if not os.path.isfile(os.path.join(here, SEG_WRITER)):
            raise FileNotFoundError(f"{SEG_WRITER} (dcmqi) not found on PATH nor in {here}: a DICOMweb --studies "
                                    f"needs it to store labels as DICOM SEG; install it with: "
                                    f"{sys.executable} -m pip install dcmqi")
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


class PretermLabelApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = conf or {}
        self.bundle = os.path.abspath(conf.get("bundle", DEFAULT_BUNDLE))
        try:
            self.overrides = json.loads(conf.get("bundle_overrides", "{}"))
        except json.JSONDecodeError as err:
            raise ValueError(f"--conf bundle_overrides must be a JSON object: {err}") from err
        if not isinstance(self.overrides, dict):
            raise ValueError("--conf bundle_overrides must be a JSON object")
        self.tasks = _bundle_tasks(self.bundle)
        self.preset = conf.get("lrp_preset", self.tasks.APP_PRESET)
        target = conf.get("lrp_target", "pred")
        self.target = int(target) if target.isdigit() else target
        self.spatial = None  # (spatial_shape, pixdim) of the network, known once the tasks are built
        with open(os.path.join(self.bundle, "configs", "metadata.json")) as f:
            metadata = json.load(f)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="preterm-lrp",
                         description=metadata["name"], version=metadata["version"],
                         labels=dict(self.tasks.EVIDENCE_LABELS))

    def init_infers(self):
        evidence = self.tasks.PretermEvidence(self.bundle, self.conf, self.overrides, preset=self.preset)
        self.spatial = (evidence.spatial_shape, evidence.pixdim)
        return {  # the evidence task first: the plugin's selector and auto-run take models in this order
            "preterm_evidence": evidence,
            "classification": self.tasks.PretermClassification(self.bundle, self.conf, self.overrides),
            "relevance": self.tasks.PretermRelevance(self.bundle, self.conf, self.overrides, preset=self.preset,
                                                     target=self.target),
        }

    def init_trainers(self):
        return {}  # training runs through the bundle (python -m monai.bundle run training ...)

    def _check_upload(self, path: str) -> None:
        spatial_shape, pixdim = self.spatial if self.spatial else (None, None)
        self.tasks.check_input(path, spatial_shape, pixdim)

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            if settings.MONAI_LABEL_DATASTORE.lower() not in ("xnat", "dsa"):  # MONAI Label's DICOMweb datastore
                _prepare_dicomweb()
            datastore = super().init_datastore()
            if isinstance(datastore, DICOMWebDatastore):
                # MONAI Label builds the datastore inside MONAILabelApp._init_dicomweb_datastore: same object and
                # state, one method changed (SegNamesDICOMWebDatastore)
                datastore.__class__ = SegNamesDICOMWebDatastore
            return datastore
        return CheckedDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY, check=self._check_upload)

    def infer(self, request, datastore=None):
        """MONAI Label's inference, with errors turned into HTTP errors that carry the message."""
        try:
            return super().infer(request, datastore)
        except MONAILabelException as err:
            status = 404 if request.get("model") not in self._infers else 422
            if err.error not in (MONAILabelError.INVALID_INPUT, MONAILabelError.APP_ERROR):
                status = 500
            raise HTTPException(status_code=status, detail=err.msg) from err
