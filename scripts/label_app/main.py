"""MONAI Label app for this bundle: ``monailabel start_server --app scripts/label_app --studies <folder of NIfTIs>``.

It serves the bundle folder it lives in (two levels up; ``--conf bundle <path>`` serves another copy) with
two inference tasks: ``classification`` (term / preterm scores as JSON) and ``relevance`` (the LRP relevance map
as a NIfTI image to overlay on the scan). Nothing is downloaded: weights come from ``<bundle>/models``.

``--conf`` options:
    bundle            the bundle folder (default: this repository)
    bundle_overrides  JSON object of ``configs/inference.json`` overrides, e.g. ``{"device": "cpu"}``
    lrp_preset        LRP composite of the relevance task (default ``a2b1``)
    lrp_target        ``pred`` (predicted class, default), ``0``/``1`` or ``difference``

Errors (an unknown task, an unreadable or unregistered upload) are answered with an HTTP error that says what is
wrong; the server stays up.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException

logger = logging.getLogger(__name__)
DEFAULT_BUNDLE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
        self.preset = conf.get("lrp_preset", "a2b1")
        target = conf.get("lrp_target", "pred")
        self.target = int(target) if target.isdigit() else target
        with open(os.path.join(self.bundle, "configs", "metadata.json")) as f:
            metadata = json.load(f)
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="preterm-lrp",
                         description=metadata["name"], version=metadata["version"],
                         labels={"term": 0, "preterm": 1})

    def init_infers(self):
        sys.path.insert(0, self.bundle)
        try:
            from scripts.label_app.tasks import PretermClassification, PretermRelevance  # noqa: PLC0415
        finally:
            sys.path.remove(self.bundle)
        return {
            "classification": PretermClassification(self.bundle, self.conf, self.overrides),
            "relevance": PretermRelevance(self.bundle, self.conf, self.overrides, preset=self.preset,
                                          target=self.target),
        }

    def init_trainers(self):
        return {}  # training runs through the bundle (python -m monai.bundle run training ...)

    def infer(self, request, datastore=None):
        """MONAI Label's inference, with errors turned into HTTP errors that carry the message."""
        try:
            return super().infer(request, datastore)
        except MONAILabelException as err:
            status = 404 if request.get("model") not in self._infers else 422
            if err.error not in (MONAILabelError.INVALID_INPUT, MONAILabelError.APP_ERROR):
                status = 500
            raise HTTPException(status_code=status, detail=err.msg) from err
