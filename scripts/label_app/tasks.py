"""The two MONAI Label inference tasks of the bundle, both stock ``BundleInferTask`` reading ``configs/inference.json``
and the weights in ``models/`` of the bundle folder (never a model-zoo download):

* ``PretermClassification`` -- JSON scores for term / preterm (the bundle's softmax post-processing).
* ``PretermRelevance`` -- the LRP relevance map of the decision as a NIfTI image on the network-input grid, with
  the input's world affine, so a viewer such as 3D Slicer overlays it on the scan. It equals the map the bundle's
  ``LRPHandler`` writes as ``<subject>_relevance_<preset>.nii.gz``.

MONAI Label is imported here, so this module only runs in the Label environment (``nox -s label``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

# imported while the app has the bundle folder on sys.path; BundleInferTask later drops the ``scripts`` modules from
# sys.modules (it reloads them for the config), which leaves these references working
from scripts.runtime.checks import EXPORT_COMMAND, TRAIN_COMMAND, check_image
from scripts.runtime.explain import explain
from scripts.runtime.network import from_torchscript
from scripts.runtime.qc import QCReference, check_policy, evaluate_input

logger = logging.getLogger(__name__)


def require_weights(bundle: str) -> None:
    """Fail with the command that creates the weights when the bundle has neither models/model.pt nor model.ts."""
    models = os.path.join(bundle, "models")
    if not any(os.path.isfile(os.path.join(models, name)) for name in ("model.pt", "model.ts")):
        raise FileNotFoundError(
            f"{models}/model.pt not found (nor model.ts); create it with: {TRAIN_COMMAND} "
            f"(and model.ts from it with: {EXPORT_COMMAND})")


class _StashImagePath:
    """MONAI Label stores the input file name under ``image_path``; MONAI 1.6's spatial transforms take every
    ``image_*`` key for a meta dict and fail on that string. Keep it under another key (and its extension as the
    result's, which is what MONAI Label's writer reads ``image_path`` for)."""

    def __call__(self, data):
        d = dict(data)
        path = d.pop("image_path", None)
        if isinstance(path, str):
            d["input_path"] = path
            d.setdefault("result_extension", ".nii.gz" if path.endswith(".nii.gz") else os.path.splitext(path)[1])
        return d


class _BundleTask(BundleInferTask):
    """BundleInferTask with the pitfalls of a classification bundle handled: explicit task type, no ``Restored``
    post-transform (it cannot restore a (2,) output), strict weights-only loading (torch's default loader), config
    overrides from the app (e.g. ``device`` or the shape of a smaller model), and the input checked before the
    transforms so that a bad upload is an error naming what is wrong."""

    def __init__(self, bundle: str, conf: dict[str, str], overrides: dict[str, Any], type: str, **kwargs):
        self.overrides = dict(overrides)
        require_weights(bundle)
        super().__init__(bundle, conf, type=type, add_post_restore=False, load_strict=True, **kwargs)
        if not self.is_valid():
            raise RuntimeError(f"{bundle}: MONAI Label could not load the bundle (configs/inference.json, models/)")
        self.spatial_shape = self.bundle_config.get_parsed_content("spatial_shape")
        self.pixdim = self.bundle_config.get_parsed_content("pixdim")
        self.qc_policy = check_policy(self.bundle_config.get_parsed_content("qc"))
        self.qc_reference = QCReference.load(os.path.join(bundle, "models")) if self.qc_policy != "off" else None
        if self.qc_policy != "off" and self.qc_reference is None:
            logger.warning("no QC reference in %s/models: input QC is off", bundle)

    def _load_bundle_config(self, path, config) -> ConfigParser:
        parser = super()._load_bundle_config(path, config)
        parser.update(self.overrides)
        return parser

    def pre_transforms(self, data=None):
        return [_StashImagePath(), *super().pre_transforms(data)]

    def _eager_network(self, device, data):
        network = self._get_network(device, data)
        return from_torchscript(network).to(device) if isinstance(network, torch.jit.ScriptModule) else network

    def _check_input(self, data: dict, network) -> None:
        """Input QC of the network input (``qc`` key of the bundle config: flag / refuse / off); the verdict goes
        into the result params, and ``refuse`` answers with an error naming the failed measures."""
        verdict = evaluate_input(self.qc_reference, network, data[self.input_key])
        data["qc"] = verdict if verdict is not None else {"pass": None, "failed": [], "scores": {}}
        if verdict is not None and not verdict["pass"]:
            reason = "input QC failed (" + ", ".join(verdict["failed"]) + "): not like a registered neonatal T2w"
            if self.qc_policy == "refuse":
                raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"{data.get('input_path', '')}: {reason}")
            logger.warning("%s: %s", data.get("input_path", ""), reason)

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda"):
        self._check_input(data, self._eager_network(device, data))
        return super().run_inferer(data, convert_to_batch, device)

    def writer(self, data: dict[str, Any], extension=None, dtype=None):
        result_file, result_json = super().writer(data, extension, dtype)
        result_json = dict(result_json or {})
        result_json["qc"] = data.get("qc")
        return result_file, result_json

    def __call__(self, request, callbacks=None):
        image = request.get("image")
        if isinstance(image, str):
            try:
                check_image(image, self.spatial_shape, self.pixdim)
            except (OSError, ValueError) as err:
                raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"bad input image: {err}") from err
        return super().__call__(request, callbacks)


class PretermClassification(_BundleTask):
    """Scores for term (0) and preterm (1): ``{"prediction": [{"idx", "label", "score"}, ...]}``."""

    def __init__(self, bundle: str, conf: dict[str, str], overrides: dict[str, Any], **kwargs):
        super().__init__(bundle, conf, overrides, type=InferType.CLASSIFICATION, **kwargs)
        self.description = "Term / preterm birth scores from a registered neonatal T2w volume"


class PretermRelevance(_BundleTask):
    """LRP relevance of the decision (``preset`` alpha-beta composite, ``target`` class) as a float32 NIfTI."""

    def __init__(self, bundle: str, conf: dict[str, str], overrides: dict[str, Any], preset: str = "a2b1",
                 target: str | int = "pred", **kwargs):
        super().__init__(bundle, conf, overrides, type=InferType.OTHERS, **kwargs)
        self.preset = preset
        self.target = target
        self.description = f"LRP relevance map ({preset}) of the term / preterm decision, overlaid on the scan"

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda"):
        network = self._eager_network(device, data)
        self._check_input(data, network)
        image = data[self.input_key]
        explained = explain(network, image[None], [self.preset], self.target)
        summary = explained.summary(0, self.preset)
        data[self.output_label_key] = MetaTensor(explained.relevance(0, self.preset)[0], affine=image.affine)
        data["result_dtype"] = np.float32
        data[self.output_json_key] = {
            "preset": self.preset,
            "target": summary["target"],
            "probabilities": {name: float(explained.probabilities[0, idx]) for name, idx in self.labels.items()},
            "relevance_sum": summary["relevance_sum"],
            "conservation": summary["conservation"],
        }
        return data

    def post_transforms(self, data=None):
        return []  # the map is final: the bundle's softmax post-processing applies to scores, not to relevance
