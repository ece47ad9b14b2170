"""What training writes beside the weights to check and to register the inputs, and how it is read back.

``QCReference``    the input QC's picture of the training population (``qc_reference.json``, ``qc_mean_image.nii.gz``,
                   ``qc_brain_region.nii.gz``) and the six measures against it; the policy, the advice and the
                   handlers that apply it are in scripts/runtime/qc.py, which also documents the measures
``Template``       the registration target of native scans (``template_T2w.nii.gz``, ``template_mask.nii.gz``,
                   written by ``save_template``) with the QC reference whose ``similarity`` / ``outside_brain``
                   thresholds tell a registered scan; ``CentredGridd(preprocess=...)`` (scripts/runtime/transforms.py)
                   registers scans to it

Both the QC (qc.py) and the preprocessing (transforms.py) import this module; it imports neither.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

from scripts.runtime.outputs import atomic_write_text, save_nifti

__all__ = ["ADDED_MEASURES", "BRAIN_VOLUME", "INTENSITY_EROSION", "MARGINS", "MEAN_IMAGE", "MEASURES", "REDUCTION",
           "REFERENCE", "REGION", "REGISTRATION_SCALE", "SIMILARITY_REDUCTION", "TEMPLATE_IMAGE", "TEMPLATE_MASK",
           "UNRECORDED", "QCReference", "Template", "brain_ratio", "fingerprint", "intensity_stats",
           "missing_template", "network_features", "penultimate", "recorded_normalisation", "reduce", "save_template",
           "volume_fold", "weights_normalisation"]

logger = logging.getLogger(__name__)
MEASURES = ("similarity", "outside_brain", "missing_brain", "brain_volume", "intensity", "feature_distance")
# measures a reference written before them lacks: not applied with it (rebuild it: train.json's run id qc_reference)
ADDED_MEASURES = ("brain_volume",)
# threshold = training maximum x margin; documented in (docs/qc.md, thresholds)
MARGINS = {"similarity": 1.2, "outside_brain": 2.0, "missing_brain": 2.0, "brain_volume": 1.2, "intensity": 1.5,
           "feature_distance": 1.5}
# the intensity measure reads the brain's interior: the non-zero voxels at least this many voxels (6-connected) from the
# zero background. The edge's partial-volume voxels depend on the grid the scan was resampled to and on the skull
# stripping, not on its contrast: with them, a scan resampled to 1.2 mm and back moved the 1st percentile of a
# white-peak input by 6-9 training SDs (docs/qc.md, Thresholds)
INTENSITY_EROSION = 2
REDUCTION = 4  # voxels per side of the grid of the brain-region measures (4 mm at 1 mm)
SIMILARITY_REDUCTION = 8  # and of the similarity (8 mm: anatomy, not subject-specific detail)
REFERENCE = "qc_reference.json"
# meta keys of a network input (CentredGridd), for ``brain_volume``: a skull-stripped scan's brain volume in mL in its
# own world; a scan registered by the preprocessing: the volume scale of the registration (template -> scan)
BRAIN_VOLUME = "brain_volume_ml"
REGISTRATION_SCALE = "registration_volume_scale"
MEAN_IMAGE = "qc_mean_image.nii.gz"
REGION = "qc_brain_region.nii.gz"
TEMPLATE_IMAGE = "template_T2w.nii.gz"
TEMPLATE_MASK = "template_mask.nii.gz"
UNRECORDED = "zscore"  # the normalisation of weights whose QC reference has no ``normalisation`` field (before 0.9.0)
# added to the brain of each training input in the registration template, to lift it above the zero background:
# a z-scored brain reaches about -4, a brain divided by its white-matter peak is positive already
TEMPLATE_SHIFT = {"zscore": 4.0, "white_peak": 0.0}


def reduce(volume: np.ndarray, factor: int = REDUCTION) -> np.ndarray:
    """Average over blocks of factor^3 voxels (a (D, H, W) array; sides cut to multiples)."""
    t = torch.as_tensor(np.asarray(volume, dtype=np.float32))[None, None]
    return torch.nn.functional.avg_pool3d(t, factor)[0, 0].numpy()


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    denominator = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def intensity_stats(volume: np.ndarray, erosion: int = INTENSITY_EROSION) -> np.ndarray:
    """Skewness, 1st and 99th percentile of the brain's interior: the non-zero voxels of the (D, H, W) ``volume``
    after ``erosion`` 6-connected erosions of their mask (0: all of them); zeros when fewer than two voxels remain
    or they do not vary (an empty input)."""
    brain = volume != 0
    if erosion:
        brain = ndimage.binary_erosion(brain, iterations=erosion)
    values = volume[brain].astype(np.float64)
    if values.size < 2 or values.std() == 0:
        return np.zeros(3)
    z = (values - values.mean()) / values.std()
    return np.array([float((z ** 3).mean()), *np.percentile(values, [1, 99])])


def penultimate(network: torch.nn.Module) -> torch.nn.Module:
    """The last ``torch.nn.Linear`` layer, whose input QC reads as the network's features."""
    network = getattr(network, "module", network)
    linears = [m for m in network.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("QC needs a network whose last layer is a torch.nn.Linear")
    return linears[-1]


def network_features(network: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """Penultimate-layer features (the input of the last linear layer) and logits for a (B, 1, ...) batch."""
    captured = {}
    hook = penultimate(network).register_forward_pre_hook(lambda m, args: captured.setdefault("f", args[0]))
    try:
        with torch.no_grad():
            logits = network(images)
    finally:
        hook.remove()
    return captured["f"].detach().float().cpu().numpy().reshape(len(images), -1), logits


def volume_fold(ratio: float) -> float:
    """``brain_volume``: how many times larger or smaller a brain is than the reference, from the ratio of their
    volumes (>= 1: 0.6 and 1 / 0.6 both give 1.67); infinite for an empty brain."""
    ratio = float(ratio)
    return max(ratio, 1.0 / ratio) if ratio > 0 else math.inf


def brain_ratio(image, reference_ml: float | None) -> float | None:
    """A network input's brain volume over the training brains' median ``reference_ml``, from the metadata the
    preprocessing wrote (``REGISTRATION_SCALE`` as it is, or ``BRAIN_VOLUME`` / ``reference_ml``); None where
    either is unknown."""
    meta = getattr(image, "meta", None) or {}
    for key, over in ((REGISTRATION_SCALE, 1.0), (BRAIN_VOLUME, reference_ml)):
        if meta.get(key) is not None and over:
            return float(torch.as_tensor(meta[key]).reshape(-1)[0]) / over
    return None


def fingerprint(network: torch.nn.Module) -> str:
    """Short hash of the last layer's weights: tells which trained model a reference belongs to (``model.pt``
    and the ``model.ts`` exported from it share it)."""
    weight = penultimate(network).weight.detach().float().cpu().numpy()
    return hashlib.sha256(np.ascontiguousarray(weight).tobytes()).hexdigest()[:16]


@dataclass
class QCReference:
    """The training population as QC sees it, with the thresholds (see the module docstring)."""

    mean_image: np.ndarray  # SIMILARITY_REDUCTION grid
    region: np.ndarray  # REDUCTION grid, bool
    affine: np.ndarray  # of the network input
    intensity_mean: np.ndarray
    intensity_std: np.ndarray
    class_means: np.ndarray  # (C, F)
    precision: np.ndarray  # (F, F)
    training_max: dict
    margins: dict = field(default_factory=lambda: dict(MARGINS))
    thresholds: dict = field(default_factory=dict)  # training_max x margins, unless edited in the JSON
    fingerprint: str = ""
    subjects: int = 0
    normalisation: str = UNRECORDED  # of the network inputs (scripts/runtime/normalisation.py)
    intensity_erosion: int = INTENSITY_EROSION  # of intensity_stats; a reference without the field: 0 (before 0.9.0)
    brain_volume_ml: float | None = None  # the training brains' median volume (mL); None: a reference without it

    def fits(self, shape) -> bool:
        """Whether a network input of (D, H, W) ``shape`` is on the grid this reference was written for."""
        shape = [int(s) for s in shape]
        return (tuple(s // SIMILARITY_REDUCTION for s in shape) == tuple(self.mean_image.shape)
                and tuple(s // REDUCTION for s in shape) == tuple(self.region.shape))

    def registration_scores(self, volume: np.ndarray) -> dict:
        """``similarity`` and ``outside_brain`` of one (D, H, W) input: the measures that tell a registered,
        skull-stripped scan (the preprocessing's ``auto`` uses them before the intensity normalisation; both are
        unchanged by a linear intensity change)."""
        if not self.fits(volume.shape):
            raise ValueError(f"the QC reference (grid {self.region.shape} at {REDUCTION} voxels) does not fit an input "
                             f"of shape {volume.shape}; retrain with this spatial_shape to create its reference")
        reduced = reduce(volume, SIMILARITY_REDUCTION)
        occupancy = reduce((volume != 0).astype(np.float32))
        filled = float(occupancy.sum())
        return {"similarity": 1.0 - _ncc(reduced, self.mean_image),
                "outside_brain": float((occupancy * ~self.region).sum() / filled) if filled else 1.0}

    def measure(self, volume: np.ndarray, features: np.ndarray, brain_ratio: float | None = None) -> dict:
        """Every measure of one (D, H, W) network input and its (F,) features; ``brain_volume`` only with
        ``brain_ratio``, the scan's brain volume over the training brains' median (``brain_ratio``)."""
        scores = self.registration_scores(volume)
        if brain_ratio is not None:
            scores["brain_volume"] = volume_fold(brain_ratio)
        occupancy = reduce((volume != 0).astype(np.float32))
        z = np.abs(intensity_stats(volume, self.intensity_erosion) - self.intensity_mean) / self.intensity_std
        diff = features[None, :] - self.class_means
        distance = np.sqrt(np.maximum(np.einsum("cf,fg,cg->c", diff, self.precision, diff), 0)).min()
        return {**scores,
                "missing_brain": float(((1 - occupancy) * self.region).sum() / max(self.region.sum(), 1)),
                "intensity": float(z.max()),
                "feature_distance": float(distance)}

    def matches(self, network: torch.nn.Module) -> bool:
        """Whether the reference was computed for these weights (a retrained model needs its own)."""
        if self.fingerprint and self.fingerprint != fingerprint(network):
            logger.warning("the QC reference (fingerprint %s) belongs to other weights than the model's (%s): input "
                           "QC is off; retrain, or rebuild the reference with the training command",
                           self.fingerprint, fingerprint(network))
            return False
        return True

    def verdict(self, scores: dict) -> tuple[bool, list[str]]:
        # NaN fails; a measure without a score (brain_volume without the scan's volume) or threshold is not applied
        failed = [m for m in MEASURES if m in scores and m in self.thresholds and not scores[m] <= self.thresholds[m]]
        return not failed, failed

    # -- files next to the weights ------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        save_nifti(self.mean_image, self.affine @ np.diag([SIMILARITY_REDUCTION] * 3 + [1]), folder / MEAN_IMAGE)
        save_nifti(self.region.astype(np.uint8), self.affine @ np.diag([REDUCTION] * 3 + [1]), folder / REGION,
                   dtype=np.uint8)
        content = {
            "description": "Input QC reference of the weights beside it (scripts/runtime/reference.py; applied and "
                           "its measures documented in scripts/runtime/qc.py); a subject fails "
                           "a measure when it exceeds thresholds[measure]; thresholds = training_max x margins",
            "fingerprint": self.fingerprint, "subjects": self.subjects, "normalisation": self.normalisation,
            "intensity_erosion": self.intensity_erosion, "brain_volume_ml": self.brain_volume_ml,
            "input_affine": self.affine.tolist(),
            "margins": self.margins, "training_max": self.training_max, "thresholds": self.thresholds,
            "intensity_mean": self.intensity_mean.tolist(), "intensity_std": self.intensity_std.tolist(),
            "class_means": self.class_means.tolist(), "precision": self.precision.tolist(),
            "mean_image": MEAN_IMAGE, "brain_region": REGION,
        }
        return atomic_write_text(json.dumps(content, indent=1) + "\n", folder / REFERENCE)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> QCReference | None:
        """The reference saved in ``folder``; None when there is none (older weights)."""
        path = Path(folder) / REFERENCE
        if not path.is_file():
            return None
        try:
            content = json.loads(path.read_text())
            mean = nib.load(str(Path(folder) / content["mean_image"]))
            region = np.asarray(nib.load(str(Path(folder) / content["brain_region"])).dataobj) > 0
            applied = [m for m in MEASURES if m not in ADDED_MEASURES or m in content["thresholds"]]
            margins = {m: float(content["margins"][m]) for m in applied}
            training_max = {m: float(content["training_max"][m]) for m in applied}
            thresholds = {m: float(content["thresholds"][m]) for m in applied}
            brain = content.get("brain_volume_ml")
            return cls(np.asarray(mean.dataobj, dtype=np.float32), region, np.asarray(content["input_affine"]),
                       np.asarray(content["intensity_mean"]), np.asarray(content["intensity_std"]),
                       np.asarray(content["class_means"]), np.asarray(content["precision"]), training_max,
                       margins, thresholds, content.get("fingerprint", ""), int(content.get("subjects", 0)),
                       str(content.get("normalisation", UNRECORDED)), int(content.get("intensity_erosion", 0)),
                       float(brain) if brain is not None else None)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable QC reference ({type(err).__name__}: {err}); recreate it with "
                             "the training command or delete it (QC is then off)") from err


def recorded_normalisation(folder: str | os.PathLike) -> str | None:
    """The intensity normalisation the weights in ``folder`` were trained with, as their QC reference records it
    (its JSON only): ``UNRECORDED`` (``zscore``) for a reference without the field, None without a reference."""
    path = Path(folder) / REFERENCE
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text())
        return str(content.get("normalisation", UNRECORDED))
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path}: not a readable QC reference ({type(err).__name__}: {err}); recreate it with "
                         "the training command or delete it (QC is then off)") from err


def weights_normalisation(folder: str | os.PathLike) -> str:
    """The normalisation of the weights in ``folder``: the one their QC reference records
    (``recorded_normalisation``), else ``UNRECORDED`` (``zscore``: weights trained before the normalisation was a
    choice, or a user's own weights without a reference). The one home of that rule."""
    return recorded_normalisation(folder) or UNRECORDED


def missing_template(missing: Sequence[str]) -> str:
    return (f"native scans need the registration template {' and '.join(missing)}: it is written by training "
            "beside model.pt; write it (python -m scripts.data.preprocess template --ckpt_dir <folder of model.pt>), "
            "or set preprocess=off and register the scans first (python -m scripts.data.preprocess run)")


class Template:
    """The registration target beside the weights: the mean training input on the network grid, its brain mask
    (where most training brains are) and the QC reference whose ``similarity`` / ``outside_brain`` thresholds
    tell whether a scan is registered already."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        self.folder = folder
        self.reference = QCReference.load(folder)
        self.missing = [str(folder / n) for n in (TEMPLATE_IMAGE, TEMPLATE_MASK) if not (folder / n).is_file()]
        self.image = self.affine = self.mask = None
        if not self.missing:
            image = nib.load(str(folder / TEMPLATE_IMAGE))
            self.image = np.asarray(image.dataobj, dtype=np.float32)
            self.affine = np.asarray(image.affine, dtype=np.float64)
            self.mask = np.asarray(nib.load(str(folder / TEMPLATE_MASK)).dataobj) > 0

    def check_grid(self, spatial_size: Sequence[int]) -> Template:
        """Self, or a ValueError when the template or its QC reference was written for another network input size
        (e.g. the shipped models/ with a reduced ``spatial_shape``): they belong to the weights beside them."""
        wrong = {}
        if self.image is not None and tuple(self.image.shape) != tuple(int(s) for s in spatial_size):
            wrong[TEMPLATE_IMAGE] = list(self.image.shape)
        if self.reference is not None and not self.reference.fits(spatial_size):
            wrong["the QC reference"] = [int(s) * REDUCTION for s in self.reference.region.shape]
        if wrong:
            found = ", ".join(f"{name} is for {shape}" for name, shape in wrong.items())
            raise ValueError(f"the registration template in {self.folder} does not fit config key 'spatial_shape' "
                             f"{list(spatial_size)} ({found}): point ckpt_dir (template_dir) at the folder of the "
                             "weights trained with this spatial_shape, or set preprocess=off")
        return self

    def require(self) -> Template:
        """Self, or a FileNotFoundError naming the missing template files and what to do."""
        if self.missing:
            raise FileNotFoundError(missing_template(self.missing))
        return self

    def registered(self, volume: np.ndarray) -> tuple[bool, dict]:
        """Whether a centred network input already looks registered and skull-stripped (no QC reference:
        assumed so), with the scores."""
        if self.reference is None:
            return True, {}
        volume = np.asarray(volume, dtype=np.float64)
        brain = volume != 0
        # scored as the network sees it, in the reference's normalisation: the z-score inside the brain changes the
        # similarity; white_peak divides the whole volume by a positive constant, which changes neither score
        if self.reference.normalisation == "zscore" and brain.sum() > 1 and volume[brain].std() > 0:
            volume = np.where(brain, (volume - volume[brain].mean()) / volume[brain].std(), 0.0)
        scores = self.reference.registration_scores(volume)
        return all(scores[m] <= self.reference.thresholds[m] for m in scores), scores


def save_template(inputs: Sequence, folder: str | os.PathLike, normalisation: str = UNRECORDED) -> list[Path]:
    """The registration template of native scans (``CentredGridd(preprocess=...)``) from the training inputs
    (1, D, H, W) in ``normalisation``: their mean on the network grid, each brain lifted above the zero background
    (``TEMPLATE_SHIFT``: z-scores + 4; a white-peak brain is positive as it is), and the brain mask where at least
    half the training brains are."""
    if normalisation not in TEMPLATE_SHIFT:
        raise ValueError(f"no registration template rule for normalisation {normalisation!r}: one of "
                         f"{', '.join(map(repr, TEMPLATE_SHIFT))}")
    volumes = np.stack([torch.as_tensor(v).as_subclass(torch.Tensor)[0].cpu().numpy() for v in inputs])
    brains = volumes != 0
    mean = np.where(brains, volumes + TEMPLATE_SHIFT[normalisation], 0.0).mean(0).astype(np.float32)
    mask = brains.mean(0) > 0.5
    affine = np.asarray(getattr(inputs[0], "affine", np.eye(4)), dtype=float)
    folder = Path(folder)
    return [save_nifti(mean * mask, affine, folder / TEMPLATE_IMAGE),
            save_nifti(mask, affine, folder / TEMPLATE_MASK, dtype=np.uint8)]
