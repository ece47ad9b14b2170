"""The SimpleITK registration the preprocessing runs: a scan onto the template beside the weights.

``affine_to_template`` is what ``CentredGridd(preprocess="on" | "auto")`` (scripts/runtime/transforms.py) calls for a
native scan at inference: rigid -> affine by Mattes mutual information (``affine_registration``), returning the 4x4
matrix from template world to scan world. ``from_array`` turns a numpy array and its affine into a SimpleITK image.
The file-based registration backends of the ``preprocess`` command (SimpleITK with an optional B-spline, ANTs) are
in scripts/data/registration.py and build on these.
"""

from __future__ import annotations

import numpy as np

__all__ = ["affine_registration", "affine_to_template", "from_array", "registration_method", "simpleitk"]


def simpleitk():
    """The SimpleITK module (imported only where a scan is registered)."""
    import SimpleITK as sitk  # noqa: PLC0415 (only where a scan is registered)

    return sitk


def from_array(array, affine):
    """A SimpleITK image of a (x, y, z) array with a 4x4 voxel-to-world ``affine`` (any world convention: the
    images registered together must share it). The affine's columns must be orthogonal."""
    sitk = simpleitk()
    affine = np.asarray(affine, dtype=np.float64)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    return image


def registration_method(seed: int = 0, shrink=(4, 2, 1), sampling: float = 0.05):
    """A ``sitk.ImageRegistrationMethod``: Mattes mutual information (32 bins) on a random ``sampling`` share of
    the voxels (``seed``: the same points each run), linear interpolation, multi-resolution ``shrink`` levels
    smoothed by 2, 1, 0 mm."""
    sitk = simpleitk()
    r = sitk.ImageRegistrationMethod()
    r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    r.SetMetricSamplingStrategy(r.RANDOM)
    r.SetMetricSamplingPercentage(sampling, seed)
    r.SetInterpolator(sitk.sitkLinear)
    r.SetShrinkFactorsPerLevel(list(shrink))
    r.SetSmoothingSigmasPerLevel([{4: 2.0, 2: 1.0, 1: 0.0}[f] for f in shrink])
    r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return r


def affine_registration(fixed, moving, fixed_mask=None, initial=None, rigid_only: bool = False,
                        iterations: int = 100, seed: int = 0):
    """Rigid (moments-initialised) then affine registration of two SimpleITK images; returns the
    ``sitk.AffineTransform`` mapping fixed points to moving points. ``fixed_mask`` limits the metric to a
    region of the fixed image (the template's brain); ``initial`` (an ``AffineTransform``) replaces the
    rigid stage; ``rigid_only`` stops after the rigid stage."""
    sitk = simpleitk()
    # the fraction of all voxels sampled; a mask keeps only its share of them (a third for a brain), and
    # 5 % of the whole image left the rigid stage short of converging on rotated scans
    sampling = 0.05 if fixed_mask is None else 0.25
    if initial is None:
        rigid = sitk.CenteredTransformInitializer(fixed, moving, sitk.VersorRigid3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
        r = registration_method(seed, shrink=(4, 2), sampling=sampling)
        _optimise(r, fixed, moving, fixed_mask, rigid, learning_rate=1.0, min_step=1e-4, iterations=iterations)
    else:
        rigid = initial
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    affine.SetCenter(rigid.GetCenter())
    if rigid_only:
        return affine
    r = registration_method(seed, sampling=sampling)
    _optimise(r, fixed, moving, fixed_mask, affine, learning_rate=0.5, min_step=1e-5, iterations=iterations)
    return affine


def _optimise(r, fixed, moving, fixed_mask, transform, learning_rate: float, min_step: float, iterations: int) -> None:
    """One stage of ``affine_registration``: ``transform`` optimised in place by regular-step gradient descent
    (scales from physical shift) with the metric of ``r`` (``registration_method``), over ``fixed_mask`` if given."""
    if fixed_mask is not None:
        r.SetMetricFixedMask(fixed_mask)
    r.SetOptimizerAsRegularStepGradientDescent(learningRate=learning_rate, minStep=min_step,
                                               numberOfIterations=iterations, gradientMagnitudeTolerance=1e-8)
    r.SetOptimizerScalesFromPhysicalShift()
    r.SetInitialTransform(transform, inPlace=True)
    r.Execute(fixed, moving)


def affine_to_template(template, template_affine, template_mask, scan, scan_affine, margin_mm: float = 4.0,
                       iterations: int = 100, seed: int = 1):
    """The 4x4 matrix that maps template world points onto the scan's world points, by SimpleITK registration
    (Mattes mutual information). Arrays are (x, y, z) with 4x4 affines in one world convention (MONAI's RAS
    here); a fixed ``seed`` samples the same metric points on every run (not 0: SimpleITK's seed 0 is
    ``sitkWallClock``, other points each run). Two stages, so that a scan with scalp
    and neck registers too: rigid (moments-initialised, the metric over the template's brain: no scaling, so the
    scalp cannot pull the brain outwards), then, from it, affine on the scan stripped by the template's brain
    mapped onto it and dilated by ``margin_mm``, with the metric over that dilated brain."""
    sitk = simpleitk()
    fixed = from_array(template, template_affine)
    brain = sitk.Cast(from_array(np.asarray(template_mask) > 0, template_affine) > 0, sitk.sitkUInt8)
    dilated = sitk.BinaryDilate(brain, [max(1, int(round(margin_mm / s))) for s in brain.GetSpacing()])
    moving = from_array(scan, scan_affine)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # the metric's sums in one order: the same result each run
    try:
        first = affine_registration(fixed, moving, brain, rigid_only=True, iterations=iterations, seed=seed)
        on_scan = sitk.Resample(dilated, moving, first.GetInverse(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        stripped = sitk.Mask(moving, on_scan)
        transform = affine_registration(fixed, stripped, dilated, initial=first, iterations=iterations, seed=seed)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    matrix = np.array(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.array(transform.GetCenter(), dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = np.array(transform.GetTranslation()) + centre - matrix @ centre
    return out
