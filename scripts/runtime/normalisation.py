"""Intensity normalisation of the network input, in one home (issue 38, stage 2).

``Normalisedd(keys, method, record_dir)`` is the last step of every config's preprocessing (inference.json
``preprocessing``, train.json ``intensity_transforms`` and ``train#random_transforms``); config key
``normalisation`` picks the method, one of ``NORMALISATIONS``:

``zscore``      the z-score inside the brain (``ZScoreNormalised``): exactly MONAI's
                ``NormalizeIntensityd(nonzero=True)``, what every weights file before this choice was trained with
``white_peak``  the brain divided by its white-matter peak (``WhitePeakNormalised``)

Training records its normalisation in the QC reference beside the weights (``qc_reference.json``, field
``normalisation``; a reference without the field is from before the choice: ``zscore``). With ``record_dir`` (the
folder of the weights: inference.json passes ``ckpt_dir``) ``Normalisedd`` refuses a method other than the recorded
one, so weights never silently get another normalisation than the one they were trained with.

``WhitePeakNormalised``: divide a skull-stripped T2w scan by the white-matter peak of its
brain, the mode of the brain's intensity histogram (the largest tissue of the neonatal brain in T2w), as WhiteStripe
and KDE normalisation do; the background stays 0. Why not the z-score inside the brain
(``NormalizeIntensityd(nonzero=True)``): the preterm phenotype (more bright CSF) raises the brain's mean and SD, so
the z-score moves every tissue, also far from any phenotype voxel (white matter by about -0.2 SD), and a network
can decide from that brain-wide shift instead of from the anatomy (docs/results/evidence.md). The white-matter
peak does not move with the CSF: the tissues the phenotype does not touch keep their values.

Why a transform of our own: MONAI has no tissue-mode normaliser (``HistogramNormalize`` equalises, which spreads the
phenotype like the z-score); TorchIO's ``HistogramStandardization`` maps percentile landmarks, which the CSF moves;
intensity-normalization 3.0.1's ``KDENormalizer`` (T2: the largest KDE mode) passes ``max / 80`` as scipy's
``bw_method`` factor, a bandwidth proportional to the intensity scale times the SD, so its peak depends on the
scanner's intensity scale. Here the histogram's range is the brain's own 99.5th percentile, so multiplying a scan by
any positive constant gives the same output (tests/test_normalisation.py).

Each normaliser exposes ``statistics(image)`` and ``apply(image, statistics)``: the twin counterfactuals
(``scripts.evaluation.evidence``) normalise one image with another's statistics.

``RandBrainStatisticsd`` (training only): each key's brain as if normalised with statistics that are off, drawn
independently per key: ``(x - shift * SD) / scale`` on the brain, shift ~ U(-0.5, 0.5) brain SDs, scale ~ U(0.8, 1.3).
On a z-scored input that is exactly the z-score with the mean moved by ``shift`` SDs and the SD times ``scale``. In
the two views of consistency training it makes the brain-wide statistics a cue that changes between two views of the
same scan, which the consistency term penalises (issue 38's second lever).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, NormalizeIntensity, RandomizableTransform, Transform
from scipy import ndimage

from scripts.runtime.checks import check_choice
from scripts.runtime.reference import REFERENCE, recorded_normalisation, weights_normalisation

__all__ = ["BINS", "MIN_BRAIN_VOXELS", "NORMALISATIONS", "Normalisedd", "RandBrainStatisticsd", "WhitePeakNormalised",
           "ZScoreNormalised", "check_normalisation", "check_recorded", "white_matter_peak"]

logger = logging.getLogger(__name__)
NORMALISATIONS = ("zscore", "white_peak")  # the choices of config key ``normalisation``; the first is the default

BINS = 256  # histogram bins over [0, the brain's 99.5th percentile]
SMOOTH_BINS = 2.0  # Gaussian smoothing of the histogram (bins): one peak per tissue, not per noise spike
MIN_BRAIN_VOXELS = 1000  # fewer non-zero voxels than this is no brain to normalise by


def white_matter_peak(values) -> float:
    """The mode of the positive ``values`` (the brain's voxels): the centre of the highest bin of their smoothed
    histogram over [0, 99.5th percentile], refined to sub-bin precision by a parabola through it and its neighbours.
    Fewer than ``MIN_BRAIN_VOXELS`` positive values, or no spread of intensities, is a ``ValueError``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    if v.size < MIN_BRAIN_VOXELS:
        raise ValueError(f"the image has {v.size} brain (non-zero) voxels, fewer than {MIN_BRAIN_VOXELS}: no "
                         "white-matter peak to normalise by (is it empty, or not skull-stripped onto a zero "
                         "background?)")
    low, high = np.percentile(v, [0.5, 99.5])
    if not high > low:
        raise ValueError(f"the brain's intensities do not vary (0.5-99.5th percentile {low:g}-{high:g}): a constant "
                         "image has no white-matter peak")
    counts, edges = np.histogram(v, bins=BINS, range=(0.0, high))
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), SMOOTH_BINS, mode="constant")
    k = int(np.argmax(smooth))
    offset = 0.0
    if 0 < k < BINS - 1:
        left, centre, right = smooth[k - 1], smooth[k], smooth[k + 1]
        curvature = left - 2 * centre + right
        if curvature < 0:
            offset = 0.5 * (left - right) / curvature
    width = edges[1] - edges[0]
    return float(edges[0] + (k + 0.5 + offset) * width)


class WhitePeakNormalised(Transform):
    """``image / white_matter_peak(brain)`` on the brain (the non-zero voxels), 0 elsewhere; a (C, ...) image is
    normalised by the peak of all its channels' brain voxels. float32 out, MetaTensor meta kept."""

    def statistics(self, image) -> dict[str, float]:
        x = torch.as_tensor(image).as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else \
            torch.as_tensor(np.asarray(image))
        return {"peak": white_matter_peak(x.detach().cpu().numpy())}

    def apply(self, image, statistics: Mapping[str, float]):
        x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        x = x.to(torch.float32)
        out = torch.where(x != 0, x / float(statistics["peak"]), torch.zeros_like(x))
        if isinstance(image, MetaTensor):
            return MetaTensor(out, meta=image.meta, applied_operations=image.applied_operations)
        return out

    def __call__(self, image):
        return self.apply(image, self.statistics(image))


class ZScoreNormalised(Transform):
    """The z-score inside the brain, exactly MONAI's ``NormalizeIntensity(nonzero=True)``: the non-zero voxels (of
    all channels together) minus their mean, divided by their population SD (an SD of 0 divides by 1), the
    background stays 0; an image without non-zero voxels is returned as it is. float32 out, MetaTensor meta kept,
    the input untouched (MONAI's transform writes into its input: it gets a copy)."""

    def statistics(self, image) -> dict[str, float]:
        x = image.as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
        inside = x[x != 0].float()
        if inside.numel() == 0:
            return {"mean": 0.0, "std": 1.0}  # nothing to normalise: the image stays as it is
        # as MONAI's NormalizeIntensity._mean / _std: float32 statistics, the population SD
        return {"mean": torch.mean(inside).item(), "std": torch.std(inside, unbiased=False).item()}

    def apply(self, image, statistics: Mapping[str, float]):
        x = image.clone() if isinstance(image, torch.Tensor) else torch.as_tensor(np.array(image))
        return NormalizeIntensity(subtrahend=float(statistics["mean"]), divisor=float(statistics["std"]),
                                  nonzero=True)(x)

    def __call__(self, image):
        return self.apply(image, self.statistics(image))


def check_normalisation(method) -> str:
    """``method`` when it is one of ``NORMALISATIONS``, else a ValueError naming config key ``normalisation``."""
    return check_choice(method, "normalisation", NORMALISATIONS)


def check_recorded(record_dir: str | os.PathLike, method: str) -> str:
    """``method`` when the weights in ``record_dir`` were trained with it, else a one-line ValueError naming the
    record, both normalisations and the fix. The record is the ``normalisation`` field of ``qc_reference.json``
    beside the weights; a reference without the field, or no reference at all, means z-score weights (trained
    before the normalisation was a choice, or a user's own weights without a reference)."""
    own = weights_normalisation(record_dir)
    if own == method:
        return method
    path, recorded = Path(record_dir) / REFERENCE, recorded_normalisation(record_dir)  # for the message
    fix = (f"set it to the weights' own, {own!r} (run with --normalisation {own}), or point ckpt_dir at weights "
           f"trained with {method!r}")
    if recorded is None:
        raise ValueError(f"{path} not found: the weights in {record_dir} do not record their normalisation, so they "
                         f"are taken as z-score weights ('zscore'), but config key 'normalisation' is {method!r}: "
                         f"{fix}")
    raise ValueError(f"{path} records normalisation {recorded!r} for the weights beside it, but config key "
                     f"'normalisation' is {method!r}: {fix}")


class Normalisedd(MapTransform):
    """The intensity normalisation of every config (module docstring): ``method`` ``zscore``
    (``ZScoreNormalised``) or ``white_peak`` (``WhitePeakNormalised``), each key normalised by its own statistics.

    ``record_dir``: the folder of the weights this input is for (inference, evaluation); at construction, once, the
    method must match the normalisation recorded there (``check_recorded``). Weights without a record -- no
    ``qc_reference.json``, or one without a ``normalisation`` field -- are z-score weights: only ``zscore`` runs on
    them. None (training, which writes the record) checks nothing.

    A scan without a white-matter peak (fewer than ``MIN_BRAIN_VOXELS`` brain voxels, e.g. what registration made of
    something that is no head, or a brain of one value) is an error naming the file in training (``record_dir``
    None); in inference and evaluation it is divided by the median of its non-zero voxels instead, with one warning
    naming the file, so that input QC judges it and the other subjects of the run go on, as a scan whose
    registration fails is used as it is.

    ``statistics(image)`` / ``apply(image, statistics)``: the method's, for normalising one image with another's
    statistics (``scripts.evaluation.evidence.normalise_with``). The input is never changed in place."""

    def __init__(self, keys: KeysCollection, method: str = "zscore", record_dir: str | os.PathLike | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.method = check_normalisation(method)
        if record_dir is not None:
            check_recorded(record_dir, self.method)
        self.normaliser = ZScoreNormalised() if self.method == "zscore" else WhitePeakNormalised()
        self.fallback = record_dir is not None  # inference and evaluation: see the class docstring

    def statistics(self, image) -> dict[str, float]:
        return self.normaliser.statistics(image)

    def apply(self, image, statistics: Mapping[str, float]):
        return self.normaliser.apply(image, statistics)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.normaliser(d[key])
            except ValueError as err:  # name the file (a MetaTensor read from disk knows it)
                source = getattr(d[key], "meta", {}).get("filename_or_obj") or f"'{key}'"
                if not self.fallback:
                    raise ValueError(f"{source}: {err}") from err
                image = d[key]
                values = torch.as_tensor(image).as_subclass(torch.Tensor)
                values = values[values != 0].float()
                scale = float(values.abs().median()) if values.numel() else 1.0
                logger.warning("%s: %s; divided by the median of its non-zero voxels (%g) instead, for input QC to "
                               "judge", source, err, scale)
                d[key] = self.normaliser.apply(image, {"peak": scale})  # only the white peak raises
        return d


class RandBrainStatisticsd(RandomizableTransform, MapTransform):
    """With probability ``prob``, each key's brain (its non-zero voxels) becomes ``(x - a * s) / b``, where ``s`` is
    that brain's SD (population, all channels), ``a ~ U(-shift, shift)`` and ``b ~ U(*scale)``, drawn independently
    for each key; the background stays 0 (MONAI's ``RandShiftIntensityd`` would shift it too). Put it after
    ``Normalisedd``: on a z-scored brain this is the z-score with a mean ``a`` SDs off and an SD ``b`` times the
    true one. Meta data kept, the input untouched."""

    def __init__(self, keys: KeysCollection, shift: float = 0.5, scale: tuple[float, float] = (0.8, 1.3),
                 prob: float = 1.0, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not float(shift) >= 0:
            raise ValueError(f"RandBrainStatisticsd: shift must be >= 0 (brain SDs), got {shift!r}")
        low, high = (float(v) for v in scale)
        if not 0 < low <= high:
            raise ValueError(f"RandBrainStatisticsd: scale must be (low, high) with 0 < low <= high, got {scale!r}")
        self.shift, self.scale = float(shift), (low, high)
        self.draws: dict[Hashable, tuple[float, float]] = {}

    def randomize(self, keys) -> None:
        super().randomize(None)
        self.draws = {key: (float(self.R.uniform(-self.shift, self.shift)), float(self.R.uniform(*self.scale)))
                      for key in keys}

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        self.randomize(keys)
        if not self._do_transform:
            return d
        for key in keys:
            a, b = self.draws[key]
            image = d[key]
            x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            brain = x != 0
            if not bool(brain.any()):
                continue
            sd = torch.std(x[brain].float(), unbiased=False)
            out = torch.where(brain, (x - a * sd) / b, torch.zeros_like(x))
            d[key] = MetaTensor(out, meta=image.meta, applied_operations=image.applied_operations) \
                if isinstance(image, MetaTensor) else out
        return d
