"""The MONAI Label inference tasks of the bundle, all stock ``BundleInferTask`` reading ``configs/inference.json``
and the weights in ``models/`` of the bundle folder (never a model-zoo download):

* ``PretermEvidence`` (type ``segmentation``, so 3D Slicer's plugin lists and runs it) -- a labelmap on the scan's
  own grid whose segments (``evidence.EVIDENCE_LABELS``, static names) show where the decision comes from: bands
  of the predicted class's positive LRP relevance and the strongest counter-evidence.
* ``PretermClassification`` (type ``classification``) -- term / preterm scores; the reply also carries them as a
  small JSON file, so that a client expecting a file (the Slicer plugin's) gets one.
* ``PretermRelevance`` (type ``others``) -- the float32 LRP relevance map on the scan's own grid (the map the
  bundle's ``LRPHandler`` writes as ``<subject>_relevance_<preset>_orig.nii.gz``), or on the network-input grid
  with ``{"grid": "network"}`` (``<subject>_relevance_<preset>.nii.gz``).

The explain step is ``scripts.runtime.explain`` (``explain``, ``to_original_grid``, ``labels_to_original_grid``);
these tasks add only what MONAI Label needs: label names, level sets, formats. Inputs may be NIfTI (read as by
``run inference``) or NRRD (ITK reader, e.g. a volume 3D Slicer uploads).

MONAI Label is imported here, so this module only runs in the Label environment (``nox -s label``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import ITKReader, MetaTensor
from monai.transforms import Compose, InvertibleTransform, LoadImaged
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.transform.pre import LoadImageTensord

from scripts.runtime.checks import EXPORT_COMMAND, TRAIN_COMMAND, check_volume

# imported while the app has the bundle folder on sys.path; BundleInferTask later drops the ``scripts`` modules from
# sys.modules (it reloads them for the config), which leaves these references working
from scripts.runtime.evidence import CLASS_NAMES, EVIDENCE_LABELS, evidence_labelmap, label_shares
from scripts.runtime.explain import APP_PRESET, explain, labels_to_original_grid, to_original_grid
from scripts.runtime.network import from_torchscript
from scripts.runtime.outputs import read_volume
from scripts.runtime.qc import check_policy, evaluate_input
from scripts.runtime.reference import QCReference

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd",)
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
PREPROCESSING_KEY = "label_app_preprocessing"  # where a request keeps its own preprocessing (for the inverse)


def require_weights(bundle: str) -> None:
    """Fail with the command that creates the weights when the bundle has neither models/model.pt nor model.ts."""
    models = os.path.join(bundle, "models")
    if not any(os.path.isfile(os.path.join(models, name)) for name in ("model.pt", "model.ts")):
        raise FileNotFoundError(
            f"{models}/model.pt not found (nor model.ts); create it with: {TRAIN_COMMAND} "
            f"(and model.ts from it with: {EXPORT_COMMAND})")


def read_image(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A 3D NIfTI (nibabel, as ``run inference``) or NRRD (ITK) as float32 with its RAS affine; errors name the file
    and say what is wrong with it."""
    name = str(path)
    if name.endswith(NIFTI_SUFFIXES):
        return read_volume(name)
    if not name.endswith(NRRD_SUFFIXES):
        raise ValueError(f"{name}: not a NIfTI (.nii, .nii.gz) or NRRD (.nrrd) file; only these are accepted")
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{name}: file not found")
    reader = ITKReader()
    try:
        data, meta = reader.get_data(reader.read(name))
        data = np.asarray(data, dtype=np.float32)
    except Exception as err:  # ITK raises RuntimeError for damaged files, others for odd content
        raise ValueError(f"{name}: not a readable NRRD image ({type(err).__name__}: {err})") from err
    data = np.squeeze(data) if data.ndim > 3 and all(s == 1 for s in data.shape[3:]) else data
    if data.ndim != 3:
        raise ValueError(f"{name}: expected a 3D image, got shape {data.shape}")
    return data, np.asarray(meta["affine"])


def check_input(path: str, spatial_shape=None, pixdim=None) -> None:
    """The bundle's input checks (``check_volume``) on a NIfTI or NRRD file."""
    data, affine = read_image(path)
    check_volume(path, data, affine, spatial_shape, pixdim)


class _StashImagePath:
    """MONAI Label stores the input file name under ``image_path``; MONAI 1.6's spatial transforms take every
    ``image_*`` key for a meta dict and fail on that string. Keep it under another key (and its extension as the
    result's, which is what MONAI Label's writer reads ``image_path`` for)."""

    def __call__(self, data):
        d = dict(data)
        path = d.pop("image_path", None)
        if isinstance(path, str):
            d["input_path"] = path
            d.setdefault("result_extension", next((s for s in RESULT_EXTENSIONS if path.endswith(s)), ".nii.gz"))
        return d


class _KeepPreprocessing:
    """Last pre-transform: keeps this request's invertible transforms in the data, so that the inverse (onto the
    scan's grid) uses the very instances that ran (MONAI checks the ids) without state on the shared task."""

    def __init__(self, transforms):
        self.transforms = Compose([t for t in transforms if isinstance(t, InvertibleTransform)])

    def __call__(self, data):
        return {**data, PREPROCESSING_KEY: self.transforms}


class _BundleTask(BundleInferTask):
    """BundleInferTask with the pitfalls of a classification bundle handled: explicit task type, no ``Restored``
    post-transform (it cannot restore a (2,) output), strict weights-only loading (torch's default loader), config
    overrides from the app (e.g. ``device`` or the shape of a smaller model), NRRD read by ITK beside NIfTI, and the
    input checked before the transforms so that a bad upload is an error naming what is wrong."""

    returns_image = False

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
        pre = [_StashImagePath(), *super().pre_transforms(data)]
        for t in pre:
            loader = t.load_image_d if isinstance(t, LoadImageTensord) else t
            if isinstance(loader, LoadImaged) and not any(isinstance(r, ITKReader) for r in loader._loader.readers):
                # the config's reader (NibabelReader) is tried first; ITK reads what it cannot (NRRD). The parsed
                # config is cached, so the same loader may come back: add ITK once
                loader._loader.readers.insert(0, ITKReader())
        return [*pre, _KeepPreprocessing(pre)]

    def _check_request(self, request) -> None:
        """Raise ValueError for request params this task cannot honour."""
        ext = request.get("result_extension")
        if self.returns_image and ext is not None and ext not in RESULT_EXTENSIONS:
            raise ValueError(f"result_extension must be one of {', '.join(RESULT_EXTENSIONS)}, got {ext!r}")

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
        try:
            self._check_request(request)
        except ValueError as err:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"bad request: {err}") from err
        image = request.get("image")
        if isinstance(image, str):
            try:
                check_input(image, self.spatial_shape, self.pixdim)
            except (OSError, ValueError) as err:
                raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"bad input image: {err}") from err
        return super().__call__(request, callbacks)


class PretermClassification(_BundleTask):
    """Scores for term (0) and preterm (1): ``{"prediction": [{"idx", "label", "score"}, ...]}``, as the JSON
    params and as a file ``scores_*.json`` holding the same object."""

    def __init__(self, bundle: str, conf: dict[str, str], overrides: dict[str, Any], **kwargs):
        super().__init__(bundle, conf, overrides, type=InferType.CLASSIFICATION, **kwargs)
        self.description = "Term / preterm birth scores from a registered neonatal T2w volume"

    def writer(self, data, extension=None, dtype=None):
        _, result = super().writer(data, extension, dtype)
        # a client that reads every reply as multipart (3D Slicer's MONAILabelClient.infer) needs a file part
        fd, path = tempfile.mkstemp(prefix="scores_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(result, f)
        return path, result


class _ExplainTask(_BundleTask):
    """A task that explains the decision with the bundle's LRP (``scripts.runtime.explain``)."""

    returns_image = True

    def __init__(self, bundle: str, conf: dict[str, str], overrides: dict[str, Any], type: str,
                 preset: str = APP_PRESET, **kwargs):
        super().__init__(bundle, conf, overrides, type=type, **kwargs)
        self.preset = preset
        self.class_labels = dict(self.labels)  # {"term": 0, "preterm": 1} from the bundle's metadata
        if {v: k for k, v in self.class_labels.items()} != CLASS_NAMES:
            raise RuntimeError(f"{bundle}: configs/metadata.json names the classes {self.class_labels}, "
                               f"the Label app expects {CLASS_NAMES}")

    def _explain(self, data: dict[str, Any], device, target):
        network = self._eager_network(device, data)
        self._check_input(data, network)
        image = data[self.input_key]
        explained = explain(network, image[None], [self.preset], target)
        summary = explained.summary(0, self.preset)
        params = {
            "preset": self.preset,
            "target": summary["target"],
            "probabilities": {name: float(explained.probabilities[0, idx]) for name, idx in self.class_labels.items()},
            "relevance_sum": summary["relevance_sum"],
            "conservation": summary["conservation"],
        }
        return image, explained.relevance(0, self.preset), params

    def post_transforms(self, data=None):
        return []  # the result is final: the bundle's softmax post-processing applies to scores, not to maps


class PretermRelevance(_ExplainTask):
    """LRP relevance of the decision (``preset`` composite, ``target`` class) as float32, on the scan's grid
    (bilinear, as the handler's ``_orig`` map) or, with the request param ``grid: network``, on the network grid."""

    GRIDS = ("original", "network")

    def __init__(self, bundle: str, conf: dict[str, str], overrides: dict[str, Any], preset: str = APP_PRESET,
                 target: str | int = "pred", **kwargs):
        super().__init__(bundle, conf, overrides, type=InferType.OTHERS, preset=preset, **kwargs)
        self.target = target
        self.description = (f"LRP relevance map ({preset}) of the term / preterm decision, float32 on the scan's "
                            "grid, to load as a volume overlay")

    def _check_request(self, request) -> None:
        super()._check_request(request)
        if request.get("grid", "original") not in self.GRIDS:
            raise ValueError(f"grid must be one of {', '.join(self.GRIDS)}, got {request.get('grid')!r}")

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda"):
        image, relevance, params = self._explain(data, device, self.target)
        grid = data.get("grid", "original")
        if grid == "original":
            relevance = to_original_grid(relevance, image, data[PREPROCESSING_KEY])
            data[self.output_label_key] = MetaTensor(relevance[0].float(), affine=relevance.affine)
        else:
            data[self.output_label_key] = MetaTensor(relevance[0], affine=image.affine)
        data["result_dtype"] = np.float32  # a relevance map, whatever dtype a labelmap client asks for
        data[self.output_json_key] = {**params, "grid": grid, "result_dtype": "float32"}
        return data


class PretermEvidence(_ExplainTask):
    """Where the decision comes from, as a labelmap on the scan's grid (``evidence.py`` has the rule): the bands of
    the predicted class's positive relevance (0-25 / 25-50 / 50-75 % of its mass) and the strongest counter-evidence,
    computed on the network grid and resampled by nearest neighbour. Segment names are static
    (``EVIDENCE_LABELS``); only the predicted class's bands are filled."""

    def __init__(self, bundle: str, conf: dict[str, str], overrides: dict[str, Any], preset: str = APP_PRESET,
                 **kwargs):
        super().__init__(bundle, conf, overrides, type=InferType.SEGMENTATION, preset=preset, **kwargs)
        self.labels = dict(EVIDENCE_LABELS)
        self.description = (f"Term / preterm decision and its LRP evidence ({preset}) on the scan: which class's "
                            "bands are filled is the decision; counter-evidence speaks against it")

    def _check_request(self, request) -> None:
        super()._check_request(request)
        try:
            dtype = np.dtype(request.get("result_dtype") or "uint8")
        except TypeError as err:
            raise ValueError(f"result_dtype {request.get('result_dtype')!r} is not a numpy dtype") from err
        if dtype.kind not in "iu":
            raise ValueError(f"result_dtype must be an integer type for a labelmap, got {dtype}")

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda"):
        image, relevance, params = self._explain(data, device, "pred")
        target = params["target"]
        labels = evidence_labelmap(relevance[0].numpy(), target)
        shares = label_shares(relevance[0].numpy(), labels)
        original = labels_to_original_grid(torch.from_numpy(labels[None].astype(np.float32)), image,
                                           data[PREPROCESSING_KEY])
        result = np.rint(original[0].cpu().numpy()).astype(np.uint8)
        data[self.output_label_key] = MetaTensor(torch.from_numpy(result), affine=original.affine)
        data["result_dtype"] = np.dtype(data.get("result_dtype") or "uint8")
        present = {int(v) for v in np.unique(result)}
        decision = CLASS_NAMES[target]
        data[self.output_json_key] = {
            **params,
            "decision": decision,
            "probability": params["probabilities"][decision],
            "filled": [name for name, value in EVIDENCE_LABELS.items() if value in present],
            "shares": shares,  # of the positive (counter-evidence: negative) relevance, on the network grid
            "grid": "original",
        }
        return data
