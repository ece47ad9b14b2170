"""The MONAI Deploy application: NIfTI or DICOM loader -> exported bundle model with LRP -> probabilities JSON,
relevance and evidence NIfTI writers, and for DICOM input a DICOM SEG and SR (docs/dicom.md).

    python scripts/deploy_app -i <NIfTI file, folder of NIfTIs, or folder of .dcm files> -o <output> -m models/model.ts

A folder holding ``.dcm`` files (at any depth) is DICOM input: the SDK's DICOMDataLoaderOperator and
DICOMSeriesSelectorOperator (rules: ``scripts/deploy_app/series_rules.json``, edit to taste) pick the series.

Environment variables (MONAI Deploy convention) ``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and
``HOLOSCAN_MODEL_PATH`` replace the options; ``PRETERM_LRP_PRESET`` picks the LRP composite (default
``scripts.runtime.explain.APP_PRESET``).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator

from scripts.deploy_app import dicom
from scripts.deploy_app.operators import (
    DicomSegWriter,
    DicomSrWriter,
    DicomStudyLoader,
    DicomVolumeLoader,
    EvidenceWriter,
    NiftiImageLoader,
    PretermInference,
    ProbabilitiesWriter,
    RelevanceWriter,
)
from scripts.runtime.checks import EXPORT_COMMAND, TRAIN_COMMAND
from scripts.runtime.errors import report_input_errors
from scripts.runtime.explain import APP_PRESET


class PretermDeployApp(Application):
    """Term / preterm birth classification with LRP relevance maps from neonatal T2w NIfTI volumes or DICOM
    series."""

    name = "preterm-lrp"
    description = __doc__

    def compose(self):
        context = Application.init_app_context(self.argv)
        output = Path(context.output_path)
        output.mkdir(parents=True, exist_ok=True)
        input_path = Path(context.input_path)
        infer = PretermInference(self, model_path=model_file(context.model_path),
                                 preset=os.environ.get("PRETERM_LRP_PRESET", APP_PRESET), name="inference")
        writers = [ProbabilitiesWriter, RelevanceWriter, EvidenceWriter]
        if dicom.is_dicom_folder(input_path):
            studies = DicomStudyLoader(self, CountCondition(self, 1), input_folder=input_path, name="dicom_loader")
            selector = DICOMSeriesSelectorOperator(self, rules=dicom.rules_text(), name="series_selector")
            loader = DicomVolumeLoader(self, input_path=input_path, name="dicom_volume")
            self.add_flow(studies, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(studies, loader, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, loader, {("study_selected_series_list", "study_selected_series_list")})
            writers += [DicomSegWriter, DicomSrWriter]
        else:
            loader = NiftiImageLoader(self, CountCondition(self, 1), input_path=input_path, name="loader")
        self.add_flow(loader, infer, {("images", "images")})
        for writer in writers:
            self.add_flow(infer, writer(self, output_folder=output, name=writer.__name__.lower()),
                          {("results", "results")})


def model_file(path) -> Path:
    """``-m`` names model.ts itself or the folder holding it, or (in a MAP) the models root where ``holoscan package
    --models <folder>`` puts each model in a folder of its own, ``/opt/holoscan/models/<folder name>/model.ts``: the
    one model folder there holding model.ts (with the template and QC reference staged beside it)."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / "model.ts").is_file():
        return path / "model.ts"
    found = sorted(p for p in path.glob("*/model.ts") if p.is_file())
    return found[0] if len(found) == 1 else path / "model.ts"


def _model_argument(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg in ("-m", "--model") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
    return os.environ.get("HOLOSCAN_MODEL_PATH", "models")


@report_input_errors
def main() -> int:
    """Check the model argument (a clear message naming the command that creates it), then run the app on
    ``sys.argv`` (Holoscan and the SDK parse it)."""
    model = model_file(_model_argument(sys.argv[1:]))
    if not model.is_file():
        print(f"error: {model}: model not found; export it with: {EXPORT_COMMAND} "
              f"(models/model.pt comes from: {TRAIN_COMMAND})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    PretermDeployApp().run()
    return 0
