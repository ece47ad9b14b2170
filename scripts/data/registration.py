"""Registration of a skull-stripped native T2w scan to the template grid, and back.

Two backends with one interface: ``SimpleITKRegistration`` (rigid -> affine, optionally + B-spline free-form
deformation as in the seed paper; installed with the bundle) and ``AntsRegistration`` (antspyx: affine + SyN;
optional extra ``pip install antspyx``). Each writes its transforms into the subject folder and returns their
file names; ``to_template`` resamples any native image (linear or nearest) onto the template grid and
``to_native`` sends a template-space map (e.g. a relevance map) onto the native scan's grid.
"""

from __future__ import annotations

from pathlib import Path

from scripts.runtime.outputs import atomic_target_for

__all__ = ["BACKENDS", "AntsRegistration", "SimpleITKRegistration", "affine_to_template", "from_array", "get_backend",
           "write_image"]


def _sitk():
    import SimpleITK as sitk

    return sitk


def write_image(image, path: Path) -> None:
    """Write a SimpleITK image through a temporary file and an atomic rename."""
    with atomic_target_for(path) as tmp:
        _sitk().WriteImage(image, str(tmp))


def from_array(array, affine):
    """A SimpleITK image of a (x, y, z) array with a 4x4 voxel-to-world ``affine`` (any world convention: the
    images registered together must share it). The affine's columns must be orthogonal."""
    import numpy as np

    sitk = _sitk()
    affine = np.asarray(affine, dtype=np.float64)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array, dtype=np.float32).transpose(2, 1, 0)))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection([float(v) for v in (affine[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    return image


def affine_to_template(template, template_affine, template_mask, scan, scan_affine, margin_mm: float = 4.0,
                       iterations: int = 100, seed: int = 1):
    """The 4x4 matrix that maps template world points onto the scan's world points, by SimpleITK registration
    (Mattes mutual information). Arrays are (x, y, z) with 4x4 affines in one world convention (MONAI's RAS
    here); a fixed ``seed`` samples the same metric points on every run (not 0: SimpleITK's seed 0 is
    ``sitkWallClock``, other points each run). Two stages, so that a scan with scalp
    and neck registers too: rigid (moments-initialised, the metric over the template's brain: no scaling, so the
    scalp cannot pull the brain outwards), then, from it, affine on the scan stripped by the template's brain
    mapped onto it and dilated by ``margin_mm``, with the metric over that dilated brain."""
    import numpy as np

    sitk = _sitk()
    fixed = from_array(template, template_affine)
    brain = sitk.Cast(from_array(np.asarray(template_mask) > 0, template_affine) > 0, sitk.sitkUInt8)
    dilated = sitk.BinaryDilate(brain, [max(1, int(round(margin_mm / s))) for s in brain.GetSpacing()])
    moving = from_array(scan, scan_affine)
    method = SimpleITKRegistration(iterations=iterations, seed=seed)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # the metric's sums in one order: the same result each run
    try:
        first = method.affine(fixed, moving, brain, rigid_only=True)
        on_scan = sitk.Resample(dilated, moving, first.GetInverse(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        stripped = sitk.Mask(moving, on_scan)
        transform = method.affine(fixed, stripped, dilated, initial=first)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    matrix = np.array(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    centre = np.array(transform.GetCenter(), dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = np.array(transform.GetTranslation()) + centre - matrix @ centre
    return out


class SimpleITKRegistration:
    """Rigid (moments-initialised) -> affine by Mattes mutual information, multi-resolution; with ``bspline``
    a B-spline FFD (control grid ``mesh`` per axis) on top. The forward transform maps template points to
    native points (ITK's convention), so ``to_template`` resamples natives with it; ``to_native`` uses the exact
    affine inverse and, for the B-spline part, the inverted displacement field."""

    name = "sitk"

    def __init__(self, bspline: bool = False, mesh: int = 6, iterations: int = 100, bspline_iterations: int = 30,
                 seed: int = 0) -> None:
        self.bspline, self.mesh, self.iterations, self.seed = bspline, mesh, iterations, seed
        self.bspline_iterations = bspline_iterations

    def _method(self, sitk, shrink=(4, 2, 1), sampling: float = 0.05):
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(sampling, self.seed)
        r.SetInterpolator(sitk.sitkLinear)
        r.SetShrinkFactorsPerLevel(list(shrink))
        r.SetSmoothingSigmasPerLevel([{4: 2.0, 2: 1.0, 1: 0.0}[f] for f in shrink])
        r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        return r

    def affine(self, fixed, moving, fixed_mask=None, initial=None, rigid_only: bool = False):
        """Rigid (moments-initialised) then affine registration of two SimpleITK images; returns the
        ``sitk.AffineTransform`` mapping fixed points to moving points. ``fixed_mask`` limits the metric to a
        region of the fixed image (the template's brain); ``initial`` (an ``AffineTransform``) replaces the
        rigid stage; ``rigid_only`` stops after the rigid stage."""
        sitk = _sitk()
        # the fraction of all voxels sampled; a mask keeps only its share of them (a third for a brain), and
        # 5 % of the whole image left the rigid stage short of converging on rotated scans
        sampling = 0.05 if fixed_mask is None else 0.25
        if initial is None:
            rigid = sitk.CenteredTransformInitializer(fixed, moving, sitk.VersorRigid3DTransform(),
                                                      sitk.CenteredTransformInitializerFilter.MOMENTS)
            r = self._method(sitk, shrink=(4, 2), sampling=sampling)
            if fixed_mask is not None:
                r.SetMetricFixedMask(fixed_mask)
            r.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4,
                                                       numberOfIterations=self.iterations,
                                                       gradientMagnitudeTolerance=1e-8)
            r.SetOptimizerScalesFromPhysicalShift()
            r.SetInitialTransform(rigid, inPlace=True)
            r.Execute(fixed, moving)
        else:
            rigid = initial
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(rigid.GetMatrix())
        affine.SetTranslation(rigid.GetTranslation())
        affine.SetCenter(rigid.GetCenter())
        if rigid_only:
            return affine
        r = self._method(sitk, sampling=sampling)
        if fixed_mask is not None:
            r.SetMetricFixedMask(fixed_mask)
        r.SetOptimizerAsRegularStepGradientDescent(learningRate=0.5, minStep=1e-5, numberOfIterations=self.iterations,
                                                   gradientMagnitudeTolerance=1e-8)
        r.SetOptimizerScalesFromPhysicalShift()
        r.SetInitialTransform(affine, inPlace=True)
        r.Execute(fixed, moving)
        return affine

    def register(self, fixed_path: str, moving_path: str, folder: Path, stem: str) -> dict:
        sitk = _sitk()
        fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
        moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
        affine = self.affine(fixed, moving)
        files = {"affine": f"{stem}_template_to_native_affine.tfm"}
        sitk.WriteTransform(affine, str(folder / files["affine"]))
        if self.bspline:
            bspline = sitk.BSplineTransformInitializer(fixed, [self.mesh] * 3)
            r = self._method(sitk, shrink=(4, 2))  # the FFD refines the affine; full resolution adds little
            r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=self.bspline_iterations)
            r.SetMovingInitialTransform(affine)
            r.SetInitialTransform(bspline, inPlace=True)
            r.Execute(fixed, moving)
            files["bspline"] = f"{stem}_template_to_native_bspline.tfm"
            sitk.WriteTransform(bspline, str(folder / files["bspline"]))
        return files

    def _forward(self, folder: Path, files: dict):
        sitk = _sitk()
        composite = sitk.CompositeTransform(sitk.ReadTransform(str(folder / files["affine"])))
        if "bspline" in files:
            composite.AddTransform(sitk.ReadTransform(str(folder / files["bspline"])))  # applied first
        return composite

    def to_template(self, image_path: str, reference_path: str, out: Path, folder: Path, files: dict,
                    nearest: bool = False) -> None:
        sitk = _sitk()
        image = sitk.ReadImage(str(image_path))
        reference = sitk.ReadImage(str(reference_path))
        interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        pixel = image.GetPixelID() if nearest else sitk.sitkFloat32
        write_image(sitk.Resample(image, reference, self._forward(folder, files), interp, 0.0, pixel), out)

    def to_native(self, map_path: str, native_path: str, out: Path, folder: Path, files: dict,
                  nearest: bool = False) -> None:
        sitk = _sitk()
        image = sitk.ReadImage(str(map_path), sitk.sitkFloat32)
        native = sitk.ReadImage(str(native_path))
        affine = sitk.ReadTransform(str(folder / files["affine"]))
        inverse = sitk.CompositeTransform(affine.GetInverse())
        if "bspline" in files:
            field = sitk.TransformToDisplacementField(sitk.ReadTransform(str(folder / files["bspline"])),
                                                      sitk.sitkVectorFloat64, image.GetSize(), image.GetOrigin(),
                                                      image.GetSpacing(), image.GetDirection())
            inverse = sitk.CompositeTransform(sitk.DisplacementFieldTransform(sitk.InvertDisplacementField(field)))
            inverse.AddTransform(affine.GetInverse())  # applied first: native -> affine-template space
        interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        write_image(sitk.Resample(image, native, inverse, interp, 0.0, sitk.sitkFloat32), out)


class AntsRegistration:
    """antspyx ``ants.registration`` (affine + SyN by default; ``type_of_transform`` any ANTs preset)."""

    name = "ants"

    def __init__(self, type_of_transform: str = "SyN", seed: int = 0) -> None:
        import ants  # noqa: F401 - fail early with ImportError when the extra is not installed

        self.type_of_transform, self.seed = type_of_transform, seed

    def register(self, fixed_path: str, moving_path: str, folder: Path, stem: str) -> dict:
        import shutil

        import ants

        fixed, moving = ants.image_read(str(fixed_path)), ants.image_read(str(moving_path))
        reg = ants.registration(fixed, moving, type_of_transform=self.type_of_transform, random_seed=self.seed)
        files = {}
        for kind, paths in (("forward", reg["fwdtransforms"]), ("inverse", reg["invtransforms"])):
            for i, path in enumerate(paths):
                name = f"{stem}_{kind}{i}" + (".mat" if path.endswith(".mat") else ".nii.gz")
                shutil.copy(path, folder / name)
                files.setdefault(kind, []).append(name)
        return files

    def to_template(self, image_path, reference_path, out: Path, folder: Path, files: dict, nearest=False) -> None:
        import ants

        moved = ants.apply_transforms(ants.image_read(str(reference_path)), ants.image_read(str(image_path)),
                                      [str(folder / f) for f in files["forward"]],
                                      interpolator="nearestNeighbor" if nearest else "linear")
        _ants_write(moved, out)

    def to_native(self, map_path, native_path, out: Path, folder: Path, files: dict, nearest=False) -> None:
        import ants

        inverse = [str(folder / f) for f in files["inverse"]]
        which = [f.endswith(".mat") for f in files["inverse"]]  # affines are inverted, warps are inverse warps
        moved = ants.apply_transforms(ants.image_read(str(native_path)), ants.image_read(str(map_path)), inverse,
                                      whichtoinvert=which, interpolator="nearestNeighbor" if nearest else "linear")
        _ants_write(moved, out)


def _ants_write(image, out: Path) -> None:
    with atomic_target_for(out) as tmp:
        image.to_file(str(tmp))


BACKENDS = {"sitk": SimpleITKRegistration, "ants": AntsRegistration}


def get_backend(name: str, **kwargs):
    if name not in BACKENDS:
        raise ValueError(f"registration method must be one of {sorted(BACKENDS)}, got {name!r}")
    try:
        return BACKENDS[name](**kwargs)
    except ImportError as err:
        raise ValueError(f"registration method {name!r} needs antspyx: pip install antspyx ({err})") from err
