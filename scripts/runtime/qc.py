"""Input quality control: does the network input look like a registered neonatal T2w brain of the training
population, and do the network's own features say the same?

Six measures on the network input (after the config's preprocessing), the scan's brain volume and the
penultimate-layer features, each a *badness* (larger is worse):

``similarity``        1 - normalised cross-correlation with the mean training input (both at 8 mm)
``outside_brain``     share of the input's non-zero voxels that lie outside the training brain region (4 mm)
``missing_brain``     share of the training brain region the input leaves empty (4 mm)
``brain_volume``      how many times smaller or larger (>= 1) the scan's brain is than the training brains' median,
                      in the scan's own world (``reference.brain_ratio`` of what ``CentredGridd`` records: a
                      skull-stripped scan's voxels times their volume, or, for a scan it registers, the volume scale of
                      the registration to the template, the training brains' mean). Registration scales every brain
                      to the template, so the other measures cannot see a brain of the wrong size (not a
                      term-equivalent neonate) or a header with the wrong voxel size
``intensity``         largest |z| of the skewness, 1st and 99th percentile of the brain interior's intensities
                      (``reference.intensity_stats``: the non-zero voxels at least ``INTENSITY_EROSION`` voxels from
                      the background, whose partial-volume edge depends on the grid a scan was resampled to) against
                      the training subjects' values, in the units of the inputs' normalisation (not the mean and
                      spread: the z-score fixes them, and with the white-matter peak they follow the phenotype's
                      CSF, for which QC must not fail a subject)
``feature_distance``  Mahalanobis distance of the penultimate-layer features to the nearest training class mean
                      with one shared covariance (Lee et al. 2018, "A simple unified framework for detecting
                      out-of-distribution samples and adversarial attacks")

A subject fails a measure when it exceeds the threshold = (the training split's maximum) x (the measure's
margin), so no training subject fails by construction. Training writes the reference next to the weights
(``QCReferenceWriter``; train.json's run id ``qc_reference`` rebuilds it for weights already trained):
``qc_reference.json`` (statistics, thresholds, margins), ``qc_mean_image.nii.gz`` (8 mm) and
``qc_brain_region.nii.gz`` (4 mm); editing the margins or thresholds in the JSON changes the policy without
retraining. The JSON also records the inputs' intensity normalisation (``normalisation``, train.json's key of that
name), which inference checks (scripts/runtime/normalisation.py). Inference applies it with ``QCHandler`` (policy
``flag``, ``refuse`` or ``off``).

Every failure says what to do (``advice``): the registration measures point to the bundle's preprocessing
(``python -m scripts.data.preprocess run``, with the datalist it needs), ``intensity`` to the scan's contrast,
``feature_distance`` to a review of the case. The advice goes into the warning, ``skipped.csv``, the tables'
``qc_advice`` column and the run report.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from scripts.runtime.outputs import SKIPPED_COLUMNS, CrashSafeTable, source_file
from scripts.runtime.reference import (
    ADDED_MEASURES,
    BRAIN_VOLUME,
    MARGINS,
    MEASURES,
    REFERENCE,
    SIMILARITY_REDUCTION,
    UNRECORDED,
    QCReference,
    brain_ratio,
    fingerprint,
    intensity_stats,
    network_features,
    penultimate,
    reduce,
    save_template,
)
from scripts.runtime.visual import plural

__all__ = ["COLUMNS", "POLICIES", "QCHandler", "QCReferenceWriter", "advice", "build_reference",
           "check_policy",
           "evaluate_input", "failure_reason", "load_thresholds", "qc_row", "score_text"]

logger = logging.getLogger(__name__)
POLICIES = ("flag", "refuse", "off")
SHRINKAGE = 0.1  # share of the mean variance added to the feature covariance's diagonal
COLUMNS = ["qc_pass", "qc_failed", *(f"qc_{m}" for m in MEASURES), "qc_advice"]

# what to do when a measure fails (``advice``): placeholders in capitals, commands between backticks, run from the
# bundle folder; a scan's own path replaces SCAN_T2w.nii.gz where it is known
SCAN_PLACEHOLDER = "SCAN_T2w.nii.gz"
ADVICE_START = "What to do: "
NATIVE_DATALIST = json.dumps({"test": [{"image": SCAN_PLACEHOLDER, "mask": "BRAIN_MASK.nii.gz"}]})
PREPROCESS = ("python -m scripts.data.preprocess run --datalist native.json --template TEMPLATE_T2w.nii.gz "
              "--template-mask TEMPLATE_mask.nii.gz --output prep")
PREDICT = "python -m monai.bundle run inference --config_file configs/inference.json --dataset_dir prep"
_REGISTER = ("If this is a native scan (not skull-stripped, or not registered to the 40-week template), let the "
             "inference register it to the template beside the weights: run it again with the option --preprocess "
             "on (the default, auto, registers the scans that do not look registered). Or, with its own brain mask "
             "(a better skull stripping), run the bundle's preprocessing on it and the mask, from the bundle folder: "
             "write "
             f"native.json = `{NATIVE_DATALIST}`, run `{PREPROCESS}` (TEMPLATE: the 40-week T2w template the model "
             "was trained in and its brain mask, e.g. the dHCP atlas, TemplateFlow tpl-dhcpVol), then predict on "
             f"its output: `{PREDICT}`.")
_ORIENTATION = ("If it is registered already, check its orientation: the header must match the voxels (not "
                "flipped front to back or rotated).")
_COVERAGE = "Check also that the whole brain lies inside the scan's field of view."
_CONTRAST = ("Check the intensities: a T2w scan (not T1w or another sequence; CSF bright), contrast not "
             "inverted, not rescaled or quantised, bias-field corrected like the training data (dHCP "
             "*_desc-restore_T2w), not noise or a constant volume.")
_FEATURES = ("The network's own features are unlike every training subject's: check that this is a "
             "term-equivalent neonatal T2w from a scanner and protocol like the training data, and do not trust "
             "its prediction without review.")
_SIZE = ("Check the header's voxel size (the brain's volume is read through it). A brain of this size is not a "
         "term-equivalent neonate's (about 36-45 weeks), whom the model was trained on: do not trust its prediction.")
ADVICE = {"similarity": (_REGISTER, _ORIENTATION, _CONTRAST), "outside_brain": (_REGISTER,),
          "missing_brain": (_REGISTER, _COVERAGE), "brain_volume": (_SIZE,), "intensity": (_CONTRAST,),
          "feature_distance": (_FEATURES,)}
_ORDER = (_SIZE, _REGISTER, _ORIENTATION, _COVERAGE, _CONTRAST, _FEATURES)  # the order pieces of advice are given in


def advice(failed: Sequence[str], image: str | os.PathLike | None = None) -> str:
    """What to do about the ``failed`` measures (empty when none failed), each piece of advice once; ``image``, the
    scan's path, goes into the datalist the preprocessing command reads."""
    parts = sorted({part for m in MEASURES if m in failed for part in ADVICE[m]}, key=_ORDER.index)
    if not parts:
        return ""
    text = ADVICE_START + " ".join(parts)
    return text.replace(SCAN_PLACEHOLDER, json.dumps(str(image))[1:-1]) if image else text


def score_text(measure: str, score: float, threshold: float | None = None, ratio: float | None = None) -> str:
    """``similarity 0.412 (max 0.571)``: a score beside the threshold it must not exceed; ``brain_volume`` with the
    ratio of the scan's brain to the training median where known (``ratio``): ``brain volume 0.6x the training
    brains' median (allowed 0.79x-1.3x)``."""
    if measure == "brain_volume" and ratio is not None:  # the score is a fold (>= 1); the ratio says which way
        allowed = f" (allowed {1 / threshold:.2g}x-{threshold:.2g}x)" if threshold is not None else ""
        return f"brain volume {ratio:.2g}x the training brains' median{allowed}"
    return f"{measure} {score:.3g}" + (f" (max {threshold:.3g})" if threshold is not None else "")


def failure_reason(failed: Sequence[str], scores: dict, thresholds: dict,
                   image: str | os.PathLike | None = None, ratio: float | None = None) -> str:
    """The reason a subject fails QC, as the warning and ``skipped.csv`` give it: the failed measures beside their
    thresholds, then what to do."""
    return ("input QC failed: " + ", ".join(score_text(m, scores[m], thresholds.get(m), ratio) for m in failed)
            + ". " + advice(failed, image))



def load_thresholds(folder: str | os.PathLike) -> dict[str, float] | None:
    """The thresholds of the QC reference in ``folder`` (its JSON only); None without a readable one."""
    try:
        content = json.loads((Path(folder) / REFERENCE).read_text())
        return {m: float(content["thresholds"][m]) for m in MEASURES
                if m not in ADDED_MEASURES or m in content["thresholds"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_policy(value) -> str:
    if value not in POLICIES:
        raise ValueError(f"config key 'qc' must be one of {list(POLICIES)}, got {value!r}")
    return value


def build_reference(network: torch.nn.Module, inputs: Sequence, labels: Sequence[int],
                    margins: dict | None = None, normalisation: str = UNRECORDED) -> QCReference:
    """The reference from the training split: ``inputs`` are the preprocessed network inputs (1, D, H, W)
    MetaTensors in ``normalisation`` (recorded in the reference), ``labels`` their classes."""
    network = getattr(network, "module", network)
    was_training = network.training
    network.eval()
    device = next(network.parameters()).device
    volumes, feats = [], []
    brains = [getattr(image, "meta", {}).get(BRAIN_VOLUME) for image in inputs]  # the training scans' volumes (mL)
    brains = np.asarray(brains, dtype=np.float64) if all(b is not None for b in brains) else None
    try:
        for image in inputs:
            x = torch.as_tensor(image).as_subclass(torch.Tensor)[None].to(device=device, dtype=torch.float32)
            feats.append(network_features(network, x)[0][0])
            volumes.append(x[0, 0].cpu().numpy())
    finally:
        network.train(was_training)
    labels = np.asarray(labels)
    feats = np.stack(feats).astype(np.float64)
    reduced = np.stack([reduce(v, SIMILARITY_REDUCTION) for v in volumes])
    occupancy = np.stack([reduce((v != 0).astype(np.float32)) for v in volumes]).mean(0)
    stats = np.stack([intensity_stats(v) for v in volumes])
    affine = np.asarray(getattr(inputs[0], "affine", np.eye(4)), dtype=float)
    weights = fingerprint(network)

    def fit(keep: np.ndarray) -> QCReference:
        classes = sorted(set(labels[keep].tolist()))
        class_means = np.stack([feats[keep & (labels == c)].mean(0) for c in classes])
        centred = feats[keep] - class_means[np.searchsorted(classes, labels[keep])]
        cov = centred.T @ centred / max(int(keep.sum()), 1)
        shrink = SHRINKAGE * float(np.trace(cov)) / len(cov) + 1e-8  # a well-conditioned covariance estimate
        return QCReference(reduced[keep].mean(0), occupancy > 0.5, affine, stats[keep].mean(0),
                           stats[keep].std(0) + 1e-6, class_means, np.linalg.inv(cov + shrink * np.eye(len(cov))),
                           training_max={}, margins=dict(margins or MARGINS), fingerprint=weights,
                           subjects=int(keep.sum()), normalisation=normalisation,
                           brain_volume_ml=float(np.median(brains[keep])) if brains is not None else None)

    everyone = np.ones(len(volumes), dtype=bool)
    reference = fit(everyone)
    # each training subject measured against the reference of all the others (leave one out): in-sample scores
    # would be optimistic, and the thresholds must hold for subjects the reference has not seen
    scores = []
    for i in range(len(volumes)):
        others = everyone.copy()
        others[i] = False
        loo = fit(others)
        ratio = brains[i] / loo.brain_volume_ml if brains is not None else None
        scores.append(loo.measure(volumes[i], feats[i], ratio))
    measured = [m for m in MEASURES if m in scores[0]]  # brain_volume needs the inputs' BRAIN_VOLUME
    reference.training_max = {m: max(s[m] for s in scores) for m in measured}
    reference.thresholds = {m: reference.training_max[m] * reference.margins[m] for m in measured}
    return reference


def qc_row(verdict: dict | None) -> dict:
    """The QC columns of one subject's table row (empty when QC is off)."""
    if not verdict:
        return dict.fromkeys(COLUMNS, "")
    return {"qc_pass": str(verdict["pass"]).lower(), "qc_failed": ";".join(verdict["failed"]),
            **{f"qc_{m}": f"{verdict['scores'][m]:.6g}" if m in verdict["scores"] else "" for m in MEASURES},
            "qc_advice": verdict.get("advice") or advice(verdict["failed"])}


class QCReferenceWriter:
    """Trainer handler: when training completes, compute the QC reference of the saved best model
    (``ckpt_path``, loaded weights-only) on the training split through the deterministic preprocessing, and
    write it next to the weights (rank 0), with the registration template. ``normalisation``: the one
    ``transform`` ends with (train.json's key of that name), recorded in the reference for inference to check."""

    def __init__(self, data: Sequence[dict], transform, network: torch.nn.Module, ckpt_path: str,
                 output_dir: str | None = None, normalisation: str = UNRECORDED) -> None:
        self.data, self.transform, self.network = list(data), transform, network
        self.normalisation = normalisation
        self.ckpt_path = Path(ckpt_path)
        self.output_dir = Path(output_dir) if output_dir else self.ckpt_path.parent

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if idist.get_rank() != 0 or not self.ckpt_path.is_file():
            return
        network = copy.deepcopy(getattr(self.network, "module", self.network))
        network.load_state_dict(torch.load(self.ckpt_path, map_location="cpu", weights_only=True))
        from monai.data import Dataset  # noqa: PLC0415 (training only: the report imports this module)

        dataset = Dataset(self.data, self.transform)
        inputs = [dataset[i]["image"] for i in range(len(dataset))]
        reference = build_reference(network, inputs, [int(item["label"]) for item in self.data],
                                    normalisation=self.normalisation)
        reference.save(self.output_dir)
        save_template(inputs, self.output_dir, self.normalisation)
        logger.info("QC reference of %s from %s: %s", self.ckpt_path,
                    plural(reference.subjects, "training subject"), self.output_dir / REFERENCE)


class QCHandler:
    """Evaluator handler (attach it before the LRP handler and the prediction writer): input QC of every
    subject. Each verdict goes to ``engine.state.qc[subject]`` (``pass``, ``failed``, ``scores``), which the
    writers put into their tables. ``flag``: one warning per failing subject, naming the file and the measures;
    ``refuse``: the subject is listed in ``skipped.csv`` and the writers write nothing for it; ``off``: no QC.
    Weights without a reference (trained before QC existed) run with QC off and a one-line notice."""

    def __init__(self, reference_dir: str, policy: str = "flag", output_dir: str | None = None,
                 image_key: str = "image", network: torch.nn.Module | None = None) -> None:
        self.policy = check_policy(policy)
        self.reference_dir = Path(reference_dir)
        self.reference = QCReference.load(self.reference_dir) if self.policy != "off" else None
        if self.policy != "off" and self.reference is None:
            logger.warning("no QC reference (%s) next to the weights: input QC is off; retrain to create it",
                           self.reference_dir / REFERENCE)
        self.image_key = image_key
        self.network = network
        self.skipped = (CrashSafeTable(Path(output_dir) / "skipped.csv", SKIPPED_COLUMNS, ("subject",))
                        if output_dir else None)
        self._features: torch.Tensor | None = None
        self._hook = None
        self.seconds = 0.0  # time spent on QC in this run (the measures; the features come from the forward pass)
        self.count = 0

    def attach(self, engine: Engine) -> None:
        if self.reference is None:
            return
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _finish(self, engine: Engine) -> None:
        if self.skipped is not None:
            self.skipped.finish()
        if self.count:
            logger.info("input QC of %s took %.2f s (%.3f s per subject)", plural(self.count, "subject"),
                        self.seconds, self.seconds / self.count)

    def _capture(self, module, args) -> None:
        self._features = args[0].detach()

    def _start(self, engine: Engine) -> None:
        engine.state.qc = {}
        network = self.network if self.network is not None else engine.network
        if not self.reference.matches(network):
            self.reference = None
            return
        if self._hook is None:  # the evaluator's own forward pass gives the features (no extra forward)
            self._hook = penultimate(network).register_forward_pre_hook(self._capture)
        if self.skipped is not None:
            self.skipped.load()

    def __call__(self, engine: Engine) -> None:
        if self.reference is None:
            return
        start = time.perf_counter()
        items = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        features = self._features.float().cpu().numpy().reshape(len(items), -1)
        for i, item in enumerate(items):
            subject, source = source_file(item, self.image_key)
            volume = torch.as_tensor(item[self.image_key])[0].cpu().numpy()
            ratio = brain_ratio(item[self.image_key], self.reference.brain_volume_ml)
            verdict = _verdict(self.reference, volume, features[i], ratio, source)
            verdict["refused"] = not verdict["pass"] and self.policy == "refuse"
            passed, failed, scores = verdict["pass"], verdict["failed"], verdict["scores"]
            engine.state.qc[subject] = verdict
            if passed:
                if self.skipped is not None:
                    self.skipped.rows.pop((subject,), None)  # refused by an earlier run, passes now
                continue
            reason = failure_reason(failed, scores, self.reference.thresholds, source, verdict["brain_ratio"])
            logger.warning("%s%s: %s", source, " (refused)" if verdict["refused"] else "", reason)
            if verdict["refused"] and self.skipped is not None:
                self.skipped.add({"subject": subject, "image": source, "reason": reason})
        if self.skipped is not None:
            self.skipped.save()
        self.seconds += time.perf_counter() - start
        self.count += len(items)


def evaluate_input(reference: QCReference | None, network: torch.nn.Module, image: torch.Tensor) -> dict | None:
    """QC verdict of one (1, D, H, W) network input outside an engine (the Label and Deploy apps)."""
    if reference is None or not reference.matches(network):
        return None
    x = torch.as_tensor(image).as_subclass(torch.Tensor)[None].to(next(network.parameters()).device, torch.float32)
    features, _ = network_features(network, x)
    return _verdict(reference, x[0, 0].cpu().numpy(), features[0], brain_ratio(image, reference.brain_volume_ml))


def _verdict(reference: QCReference, volume: np.ndarray, features: np.ndarray, ratio: float | None,
             source: str | None = None) -> dict:
    """One input's verdict: ``pass``, ``failed``, ``scores``, ``thresholds``, ``advice`` and ``brain_ratio`` (its
    brain's volume over the training brains' median, ``reference.brain_ratio``; None where unknown)."""
    scores = reference.measure(volume, features, ratio if "brain_volume" in reference.thresholds else None)
    passed, failed = reference.verdict(scores)
    return {"pass": passed, "failed": failed, "scores": scores, "thresholds": dict(reference.thresholds),
            "advice": advice(failed, source), "brain_ratio": ratio}
