"""Registration of a skull-stripped native T2w scan to the template grid, and back.

Two backends with one interface: ``SimpleITKRegistration`` (rigid -> affine, the registration the inference's
preprocessing runs, ``scripts/runtime/registration.py``, optionally + B-spline free-form deformation as in the
seed paper; installed with the bundle) and ``AntsRegistration`` (antspyx: affine + SyN;
optional extra ``pip install antspyx``). Each writes its transforms into the subject folder and returns their
file names; ``to_template`` resamples any native image (linear or nearest) onto the template grid and
``to_native`` sends a template-space map (e.g. a relevance map) onto the native scan's grid.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from scripts.runtime.outputs import atomic_target_for
from scripts.runtime.registration import affine_registration, registration_method, simpleitk

__all__ = ["BACKENDS", "AntsRegistration", "SimpleITKRegistration", "get_backend", "write_image"]


def write_image(image, path: Path) -> None:
    """Write a SimpleITK image through a temporary file and an atomic rename."""
    with atomic_target_for(path) as tmp:
        simpleitk().WriteImage(image, str(tmp))


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

    def affine(self, fixed, moving, fixed_mask=None, initial=None, rigid_only: bool = False):
        """Rigid -> affine (``scripts.runtime.registration.affine_registration``) with this backend's iterations
        and seed; returns the ``sitk.AffineTransform`` mapping fixed points to moving points."""
        return affine_registration(fixed, moving, fixed_mask, initial, rigid_only, self.iterations, self.seed)

    def register(self, fixed_path: str, moving_path: str, folder: Path, stem: str) -> dict:
        sitk = simpleitk()
        fixed = sitk.ReadImage(str(fixed_path), sitk.sitkFloat32)
        moving = sitk.ReadImage(str(moving_path), sitk.sitkFloat32)
        affine = self.affine(fixed, moving)
        files = {"affine": f"{stem}_template_to_native_affine.tfm"}
        sitk.WriteTransform(affine, str(folder / files["affine"]))
        if self.bspline:
            bspline = sitk.BSplineTransformInitializer(fixed, [self.mesh] * 3)
            r = registration_method(self.seed, shrink=(4, 2))  # the FFD refines the affine: full resolution adds little
            r.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=self.bspline_iterations)
            r.SetMovingInitialTransform(affine)
            r.SetInitialTransform(bspline, inPlace=True)
            r.Execute(fixed, moving)
            files["bspline"] = f"{stem}_template_to_native_bspline.tfm"
            sitk.WriteTransform(bspline, str(folder / files["bspline"]))
        return files

    def _forward(self, folder: Path, files: dict):
        sitk = simpleitk()
        composite = sitk.CompositeTransform(sitk.ReadTransform(str(folder / files["affine"])))
        if "bspline" in files:
            composite.AddTransform(sitk.ReadTransform(str(folder / files["bspline"])))  # applied first
        return composite

    def to_template(self, image_path: str, reference_path: str, out: Path, folder: Path, files: dict,
                    nearest: bool = False) -> None:
        sitk = simpleitk()
        image = sitk.ReadImage(str(image_path))
        reference = sitk.ReadImage(str(reference_path))
        interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        pixel = image.GetPixelID() if nearest else sitk.sitkFloat32
        write_image(sitk.Resample(image, reference, self._forward(folder, files), interp, 0.0, pixel), out)

    def to_native(self, map_path: str, native_path: str, out: Path, folder: Path, files: dict,
                  nearest: bool = False) -> None:
        sitk = simpleitk()
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
        import ants  # noqa: F401, PLC0415 - fail early with ImportError when the extra is not installed

        self.type_of_transform, self.seed = type_of_transform, seed

    def register(self, fixed_path: str, moving_path: str, folder: Path, stem: str) -> dict:

        import ants  # noqa: PLC0415 (antspyx is an optional extra)

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
        import ants  # noqa: PLC0415 (antspyx is an optional extra)

        moved = ants.apply_transforms(ants.image_read(str(reference_path)), ants.image_read(str(image_path)),
                                      [str(folder / f) for f in files["forward"]],
                                      interpolator="nearestNeighbor" if nearest else "linear")
        _ants_write(moved, out)

    def to_native(self, map_path, native_path, out: Path, folder: Path, files: dict, nearest=False) -> None:
        import ants  # noqa: PLC0415 (antspyx is an optional extra)

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
