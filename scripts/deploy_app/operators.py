"""Operators of the MONAI Deploy app (MONAI Deploy App SDK 4.0, Holoscan operators).

``NiftiImageLoader``     NIfTI file(s) -> MetaTensors that keep the affine (the SDK's NiftiDataLoader drops it)
``PretermInference``     the exported bundle model (``model.ts``): the bundle's own preprocessing (read from the
                         config ``ckpt_export`` stored in model.ts), probabilities from the TorchScript model and the
                         LRP relevance map of the decision
``ProbabilitiesWriter``  ``<output>/<subject>/<subject>_probabilities.json``
``RelevanceWriter``      ``<output>/<subject>/<subject>_relevance_<preset>.nii.gz`` (network-input grid, as the
                         bundle's LRPHandler writes it) and ``..._orig.nii.gz`` (the input's grid and affine)

The stock MonaiBundleInferenceOperator is not used: it labels probabilities with ``int(prob)``, keeps only the
first network output and strips the batch dimension.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec
from monai.transforms import Compose, LoadImage, LoadImaged

from scripts.runtime.checks import check_image
from scripts.runtime.datalist import folder_items
from scripts.runtime.explain import APP_PRESET, check_presets, explain, write_explanation
from scripts.runtime.network import from_torchscript
from scripts.runtime.outputs import atomic_write_text, output_path, subject_name
from scripts.runtime.qc import QCReference, evaluate_input

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
        steps = parser.get_parsed_content("preprocessing", instantiate=True).transforms
        preprocessing = Compose([t for t in steps if not isinstance(t, LoadImaged)])
        metadata = json.loads(extra["metadata.json"] or "{}")
        channels = metadata.get("network_data_format", {}).get("outputs", {}).get("pred", {}).get("channel_def", {})
        names = [channels.get(str(i), str(i)) for i in range(2)]
        return scripted, from_torchscript(scripted).to(self.device), preprocessing, names

    def compute(self, op_input, op_output, context):
        images = op_input.receive("images")
        scripted, eager, preprocessing, names = self._load()
        reference = QCReference.load(self.model_path.parent)  # the sidecar next to model.ts
        if reference is None:
            logger.warning("no QC reference next to %s: input QC is off", self.model_path)
        results = []
        for image in images:
            source = image.meta["filename_or_obj"]
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
            results.append({
                "subject": subject_name(source), "image": str(source),
                "probabilities": {names[i]: float(probs[i]) for i in range(len(names))},
                "prediction": names[int(probs.argmax())], "prediction_index": int(probs.argmax()),
                "preset": self.preset, "target": explained.summary(0, self.preset)["target"],
                "model": str(self.model_path), "qc": qc,
                "network_input": net_input, "explained": explained, "preprocessing": preprocessing,
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
