"""Image-quality measures (IQMs) of a skull-stripped T2-weighted scan, as MRIQC defines them (issue 39), computed on
the input scan before any intensity normalisation, inside its brain (the non-zero voxels, or a given mask).

MRIQC (Esteban et al. 2017, PLoS ONE 12(9):e0184661; ``mriqc/qc/anatomical.py`` of nipreps/mriqc 24.0.2) defines the
structural IQMs. Its metric functions do not install here: mriqc pins numpy 1.x and MarkupSafe 2.0, pulls a second
torch, and importing ``mriqc.qc.anatomical`` loads its ``config``, which clears the handlers of every logger already
set up (docs/qc.md, Image-quality measures). So these are this bundle's own code, with MRIQC's definitions:

- ``snr_wm``: MRIQC ``snr`` in white matter, mu / (sigma * sqrt(n / (n - 1))), mu the median, sigma the standard
  deviation, n the voxel count of the class (MRIQC feeds the same statistics).
- ``cnr``: MRIQC ``cnr`` = |mu_WM - mu_GM| / sqrt(sigma_air^2 + sigma_WM^2 + sigma_GM^2) (Magnotta & Friedman 2006,
  J Digit Imaging 19(2):140) with no air term: the scan is skull-stripped, there is no air to measure.
- ``cjv``: MRIQC ``cjv`` = (MAD_WM + MAD_GM) / |mu_WM - mu_GM| (Ganzetti et al. 2016, Front Neuroinform 10:10),
  the MADs scaled to a normal SD (scipy's ``median_abs_deviation(scale="normal")``, as MRIQC's statsmodels ``mad``).
- ``efc``: MRIQC ``efc``, the entropy focus criterion (Atkinson et al. 1997, IEEE TMI 16(6):903) normalised by its
  maximum, over the brain's voxels (MRIQC's is over the whole field of view, which on a skull-stripped scan makes it
  depend on the grid's size).
- ``inu``: MRIQC ``inu_range`` (|P95 - P5| of the N4 bias field in the brain; Tustison et al. 2010, IEEE TMI
  29(6):1310) on the log field, which is scale-free: N4's field has an arbitrary overall scale.
- ``artefact``: structured artefacts inside the brain (ghost replicas, stripes): the peak of the autocorrelation of
  the high-passed brain at lags of at least ``ARTEFACT_MIN_LAG`` voxels, each lag normalised by its overlap; the lag
  of the peak is ``artefact_lag``. Not an MRIQC measure: MRIQC's ghost and artefact measures (GSR, Giannelli et al.
  2010; QI1, Mortamet et al. 2009) read the air around the head, which skull stripping removes. Why this one:
  (docs/qc.md, Image-quality measures).
- ``brain_volume_ml``: the brain's volume (voxel count x voxel volume).

MRIQC computes SNR, CNR, CJV and EFC on the N4-corrected image, and so does ``measure``. The three tissue classes
are a k-means split of the corrected brain's intensities (no atlas; MRIQC uses ANTs Atropos with priors), ordered
by intensity: on neonatal T2w grey matter is the darkest class, unmyelinated white matter the middle one and CSF the
brightest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["ARTEFACT_MIN_LAG", "MEASURES", "artefact", "cjv", "cnr", "efc", "inu", "measure", "measure_file",
           "n4_log_field", "snr", "tissue_classes", "tissues"]

MEASURES = ("snr_wm", "cnr", "cjv", "efc", "inu", "artefact", "brain_volume_ml")
CLASSES = ("gm", "wm", "csf")  # neonatal T2w, darkest to brightest
ARTEFACT_MIN_LAG = 6  # voxels: shorter lags are the anatomy's and the high-pass filter's own correlation
ARTEFACT_MIN_OVERLAP = 0.2  # a lag counts where the brain overlaps its shifted copy by this share of its voxels
ARTEFACT_SIGMA = 2.0  # voxels: the high-pass filter's Gaussian (keeps replicas and stripes, removes shading)
N4_SHRINK = 2  # N4 on a 2x coarser grid: the field is smooth (4 control points per axis)
N4_ITERATIONS = (50, 50, 50, 50)  # MRIQC's (and SimpleITK's default)
MIN_CLASS_VOXELS = 50


def _brain(image: np.ndarray, mask: np.ndarray | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3:
        raise ValueError(f"{name}: image quality needs a 3D volume, got shape {image.shape}")
    brain = image != 0 if mask is None else np.asarray(mask) > 0
    if brain.shape != image.shape:
        raise ValueError(f"{name}: mask shape {brain.shape} differs from the image's {image.shape}")
    if not brain.any():
        raise ValueError(f"{name}: the brain mask is empty (no non-zero voxel): no image quality to measure")
    values = image[brain]
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name}: the brain holds non-finite values")
    if np.all(values == values[0]):
        raise ValueError(f"{name}: every brain voxel is {values[0]:g}: a constant image has no tissue contrast "
                         "to measure")
    return image, brain


def snr(values: np.ndarray) -> float:
    """MRIQC ``snr``: median / (std * sqrt(n / (n - 1)))."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    return float(np.median(values) / (values.std() * math.sqrt(n / (n - 1))))


def cnr(wm: np.ndarray, gm: np.ndarray) -> float:
    """MRIQC ``cnr`` without the air term: |median_WM - median_GM| / sqrt(std_WM^2 + std_GM^2)."""
    return float(abs(np.median(wm) - np.median(gm)) / math.sqrt(np.var(wm) + np.var(gm)))


def cjv(wm: np.ndarray, gm: np.ndarray) -> float:
    """MRIQC ``cjv``: (MAD_WM + MAD_GM) / |median_WM - median_GM| (lower is better)."""
    from scipy.stats import median_abs_deviation  # noqa: PLC0415

    mad_wm, mad_gm = (float(median_abs_deviation(v, scale="normal")) for v in (wm, gm))
    return float((mad_wm + mad_gm) / abs(np.median(wm) - np.median(gm)))


def efc(values: np.ndarray) -> float:
    """MRIQC ``efc`` over ``values`` (the brain's): sum (x / x_max) ln(x / x_max), x_max = sqrt(sum x^2), divided by
    the same sum for equal values (1: every voxel equal, the most blurred; lower: more focused)."""
    values = np.abs(np.asarray(values, dtype=np.float64))
    n = values.size
    efc_max = n * (1.0 / math.sqrt(n)) * math.log(1.0 / math.sqrt(n))
    ratio = values / math.sqrt(float(np.sum(values**2)))
    return float(np.sum(ratio * np.log(ratio + 1e-16)) / efc_max)


def tissue_classes(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """0 outside ``brain``, 1 / 2 / 3 for the darkest / middle / brightest of three k-means classes of the brain's
    intensities (neonatal T2w: grey matter, white matter, CSF). Deterministic: Lloyd's iterations in one dimension
    from the 1/6, 1/2 and 5/6 quantiles."""
    values = image[brain]
    centres = np.quantile(values, [1 / 6, 1 / 2, 5 / 6])
    for _ in range(100):
        edges = (centres[:-1] + centres[1:]) / 2
        labels = np.searchsorted(edges, values)
        new = np.array([values[labels == k].mean() if np.any(labels == k) else centres[k] for k in range(3)])
        if np.allclose(new, centres, rtol=0, atol=1e-9 * max(1.0, float(np.abs(values).max()))):
            break
        centres = new
    out = np.zeros(image.shape, dtype=np.uint8)
    out[brain] = np.searchsorted((centres[:-1] + centres[1:]) / 2, values) + 1
    return out


def tissues(image: np.ndarray, brain: np.ndarray, name: str = "image") -> dict[str, np.ndarray]:
    """The brain's intensities per class of ``tissue_classes`` (``gm``, ``wm``, ``csf``); a class with fewer than
    ``MIN_CLASS_VOXELS`` voxels is an error naming ``name``."""
    classes = tissue_classes(image, brain)
    out = {c: image[classes == k + 1] for k, c in enumerate(CLASSES)}
    small = [f"{c} ({v.size})" for c, v in out.items() if v.size < MIN_CLASS_VOXELS]
    if small:
        raise ValueError(f"{name}: too few voxels in tissue class {', '.join(small)} (at least {MIN_CLASS_VOXELS}): "
                         "not a brain with grey matter, white matter and CSF")
    return out


def n4_log_field(image: np.ndarray, brain: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """N4's log bias field (SimpleITK ``N4BiasFieldCorrectionImageFilter``, MRIQC's iterations, the brain as mask,
    estimated on a ``N4_SHRINK``-times coarser grid, one thread: the same field each run) on the image's grid; the
    corrected image is ``image / exp(field)``."""
    from scripts.runtime.registration import from_array, simpleitk  # noqa: PLC0415 (SimpleITK only where N4 runs)

    sitk = simpleitk()
    affine = np.diag([*(float(s) for s in spacing), 1.0])
    itk = from_array(image, affine)
    mask = sitk.Cast(from_array(brain, affine) > 0, sitk.sitkUInt8)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(N4_ITERATIONS))
    n4.SetNumberOfThreads(1)
    n4.Execute(sitk.Shrink(itk, [N4_SHRINK] * 3), sitk.Shrink(mask, [N4_SHRINK] * 3))
    field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(itk))
    return np.transpose(field, (2, 1, 0)).astype(np.float64)


def inu(log_field: np.ndarray, brain: np.ndarray) -> float:
    """MRIQC ``inu_range`` on the log field: P95 - P5 of the log bias field in the brain (0: no shading; 0.2: the
    gain varies by about 22 % across the brain)."""
    values = log_field[brain]
    return float(np.percentile(values, 95) - np.percentile(values, 5))


def artefact(image: np.ndarray, brain: np.ndarray) -> tuple[float, tuple[int, int, int]]:
    """(peak, lag) of the autocorrelation of the high-passed brain over lags of at least ``ARTEFACT_MIN_LAG`` voxels
    where the brain overlaps its shifted copy by at least ``ARTEFACT_MIN_OVERLAP`` of its voxels. The high-pass is
    the brain minus its Gaussian blur (``ARTEFACT_SIGMA``, the blur normalised by the blurred mask so that the edge is
    not an edge), centred in the brain; each lag's correlation is normalised by its overlap (the Wiener-Khinchin form
    of correlating the brain with its shifted copy). A ghost replica shifted by s gives a peak at lag s; stripes a
    peak at their period; a clean brain a low value (anatomy decorrelates beyond a few voxels)."""
    from scipy import ndimage  # noqa: PLC0415

    weight = brain.astype(np.float64)
    blurred = ndimage.gaussian_filter(image * weight, ARTEFACT_SIGMA, mode="constant")
    support = ndimage.gaussian_filter(weight, ARTEFACT_SIGMA, mode="constant")
    high = np.where(brain, image - blurred / np.maximum(support, 1e-6), 0.0)
    high[brain] -= high[brain].mean()
    padded = [2 * n for n in image.shape]  # no wrap-around: every lag sees the true overlap
    spectrum = np.fft.rfftn(high, padded)
    correlation = np.fft.irfftn(np.abs(spectrum) ** 2, padded)
    mask_spectrum = np.fft.rfftn(weight, padded)
    overlap = np.fft.irfftn(np.abs(mask_spectrum) ** 2, padded)
    count = float(weight.sum())
    valid = overlap > ARTEFACT_MIN_OVERLAP * count
    steps = [np.fft.fftfreq(n, 1.0 / n) for n in padded]  # the lag of each FFT index: 0, 1, ..., -1
    lags = np.meshgrid(*steps, indexing="ij", sparse=True)
    valid &= sum(lag**2 for lag in lags) >= ARTEFACT_MIN_LAG**2
    normalised = np.where(valid, correlation / np.maximum(overlap, 1.0), 0.0) / (correlation.flat[0] / count)
    index = np.unravel_index(int(np.argmax(np.abs(normalised))), normalised.shape)
    lag = tuple(int(step[i]) for step, i in zip(steps, index))
    return float(abs(normalised[index])), lag


def measure(image: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), mask: np.ndarray | None = None,
            name: str = "image") -> dict:
    """Every IQM of ``MEASURES`` (and ``artefact_lag``) of a skull-stripped scan with voxel size ``spacing`` (mm):
    N4 on the brain, then SNR, CNR, CJV and EFC on the corrected image, INU from the field, the artefact measure,
    the brain's volume. Errors (an empty mask, a constant brain, a class too small to measure) name ``name``."""
    image, brain = _brain(image, mask, name)
    field = n4_log_field(image, brain, spacing)
    corrected = np.where(brain, image / np.exp(field), 0.0)
    tissue = tissues(corrected, brain, name)
    peak, lag = artefact(corrected, brain)
    return {"snr_wm": snr(tissue["wm"]), "cnr": cnr(tissue["wm"], tissue["gm"]), "cjv": cjv(tissue["wm"], tissue["gm"]),
            "efc": efc(corrected[brain]), "inu": inu(field, brain), "artefact": peak, "artefact_lag": lag,
            "brain_volume_ml": float(brain.sum() * np.prod(np.asarray(spacing, dtype=np.float64)) / 1000.0)}


def measure_file(path) -> dict:
    """``measure`` of a NIfTI file: its voxel size from the affine's column lengths, errors naming ``path``."""
    from scripts.runtime.outputs import read_volume  # noqa: PLC0415

    image, affine = read_volume(str(path))
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return measure(image, spacing, name=str(path))
