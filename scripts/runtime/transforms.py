"""The transform of the configs that MONAI lacks.

``CentredGridd``   the preprocessing's resampling (inference.json ``preprocessing`` and ``label_preprocessing``,
                   train.json ``spatial_transforms``): straight onto the network grid -- ``pixdim`` voxels,
                   ``spatial_size`` of them, centred on the scan's field of view -- in one invertible step, with
                   the brain mask kept crisp. It replaces ``Spacingd`` + ``ResizeWithPadOrCropd``, which anchor the
                   1 mm grid at the scan's first voxel and then cut or pad whole voxels: a scan on another grid
                   landed 0.1-0.5 mm off (0.8 mm in-plane with 2 mm slices: the brain 0.8 voxel lower), and the
                   linear interpolation left a dim rim of partial-volume voxels around the brain that the
                   normalisation (``Normalisedd``: its statistics are the non-zero voxels') counted as brain (3-7 %
                   more "brain" voxels, a lower mean).
                   On a scan already on the network grid (the template grid at 1 mm) it changes nothing: same
                   voxels, same values; a scan with the same voxel size but another array size is cut or padded by
                   whole voxels exactly as ``ResizeWithPadOrCropd`` did (tests/test_robustness.py).
                   With ``preprocess`` (``auto`` | ``on`` | ``off``) and the template beside the weights
                   (``template_dir``: ``template_T2w.nii.gz``, ``template_mask.nii.gz``, written by training) it
                   also takes native scans: ``on`` registers every scan to the template (SimpleITK rigid ->
                   affine, ``scripts.runtime.registration.affine_to_template``), resamples it onto the template grid
                   through that affine in the same single invertible step and keeps the template's brain mask
                   (skull stripping); ``auto`` does so only for a scan that is not registered already -- one whose
                   centred input fails the QC reference's ``similarity`` or ``outside_brain`` threshold (the
                   measures that tell an unregistered or unstripped scan, scripts/runtime/qc.py); ``off`` never.
                   Because the step stays one ``SpatialResample``, MONAI's ``Invertd`` sends relevance and evidence
                   maps back onto the native scan's grid (``save_original_space``, the Label app's evidence).
``RandMaskJitterd`` a training augmentation (an experiment, docs/experiments/augment_mask_jitter.json): moves the
                   skull-stripped brain's edge by up to one voxel in random places, as the nearest-neighbour brain
                   mask of a scan on another grid does.
``RandAcquiredGridd`` a training augmentation (an experiment, docs/experiments/augment_acquired_grid.json): the
                   scan as acquired on a random other grid (``acquire_on_grid``: isotropic, or thick slices along
                   a random axis; low-passed, linearly interpolated, skull-stripped on that grid) and read back
                   onto the network grid by ``CentredGridd``, exactly as the deployed preprocessing reads it.
``MaskedGaussianSmoothd`` Gaussian smoothing inside the brain only (normalised convolution): an experiment
                   (docs/experiments/harmonise_masked.json), a fixed low-pass that scans of any resolution share.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import GaussianSmooth, InvertibleTransform, MapTransform, RandomizableTransform, SpatialResample
from scipy import ndimage

from scripts.runtime.reference import BRAIN_VOLUME, REGISTRATION_SCALE, Template, missing_template
from scripts.runtime.registration import affine_to_template

__all__ = ["PREPROCESS", "REGISTERED", "CentredGridd", "MaskedGaussianSmoothd", "RandAcquiredGridd", "RandMaskJitterd",
           "acquire_on_grid", "centred_grid_affine", "check_preprocess"]

logger = logging.getLogger(__name__)
PREPROCESS = ("auto", "on", "off")
REGISTERED = "registered_to_template"  # meta key of a network input: the scan was registered (native scan)
EDGE_SHARE = 0.05  # normalised interpolation at the brain edge: smallest brain share an output voxel is divided by


def check_preprocess(value) -> str:
    """The ``preprocess`` config value, or a ValueError naming the key."""
    if str(value) not in PREPROCESS:
        raise ValueError(f"config key 'preprocess' must be one of {', '.join(PREPROCESS)}, got {value!r}")
    return str(value)


def centred_grid_affine(affine, in_shape: Sequence[int], pixdim: Sequence[float], out_shape: Sequence[int],
                        tol: float = 1e-3) -> np.ndarray:
    """Affine of a grid of ``out_shape`` voxels of ``pixdim`` mm, along the axes of ``affine`` (the image's, after
    ``Orientationd``), whose centre is the centre of the image's field of view. Along an axis whose voxel size is
    already ``pixdim`` the grid stays on the image's voxels, cut or padded where ``ResizeWithPadOrCropd`` cuts or
    pads (no interpolation there; float64 sampling positions keep the values exact)."""
    affine = np.asarray(affine, dtype=np.float64)
    in_shape = np.asarray(in_shape, dtype=np.float64)
    out_shape = np.asarray(out_shape, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    pixdim = np.asarray(pixdim, dtype=np.float64)
    zoom = pixdim / spacing  # image voxels per grid voxel
    first = (in_shape - 1) / 2.0 - zoom * (out_shape - 1) / 2.0  # the grid's first voxel in image voxel indices
    n_in, n_out = in_shape.astype(int), out_shape.astype(int)
    cut = np.where(n_in >= n_out, n_in // 2 - n_out // 2, -((n_out - n_in) // 2))  # ResizeWithPadOrCropd's start
    same = np.abs(spacing - pixdim) <= tol
    first[same] = cut[same]
    out = np.eye(4)
    out[:3, :3] = affine[:3, :3] * zoom
    out[:3, 3] = affine[:3, :3] @ first + affine[:3, 3]
    return out


class CentredGridd(MapTransform, InvertibleTransform):
    """Resample ``keys`` onto the network grid centred on each image's field of view (``centred_grid_affine``),
    invertibly (MONAI ``SpatialResample``). ``mask_nonzero``: the image's non-zero region (the skull-stripped brain)
    is resampled by nearest neighbour and the image set to zero outside it, so that interpolation adds no dim rim
    around the brain, and inside it the interpolation is normalised (divided by the interpolated brain share), so
    that the zeros around the brain do not darken its edge; use it for intensity images, not for label maps."""

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], spatial_size: Sequence[int],
                 mode: str = "bilinear", mask_nonzero: bool = False, preprocess: str = "off",
                 template_dir: str | os.PathLike | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.preprocess = check_preprocess(preprocess)
        self.template_dir = template_dir
        self._template: Template | None = None
        if self.preprocess != "off" and template_dir is None:
            raise ValueError("CentredGridd: preprocess needs template_dir (the folder of model.pt)")
        if self.preprocess == "on":
            self._template = Template(template_dir).require()  # fail at start, naming the missing files
        self.pixdim = [float(p) for p in pixdim]
        self.spatial_size = [int(s) for s in spatial_size]
        if len(self.pixdim) != 3 or len(self.spatial_size) != 3:
            raise ValueError(f"CentredGridd: pixdim and spatial_size need 3 values, got {pixdim}, {spatial_size}")
        if self._template is not None:
            self._template.check_grid(self.spatial_size)
        self.mask_nonzero = bool(mask_nonzero)
        self.resampler = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float64)
        self.mask_resampler = SpatialResample(mode="nearest", padding_mode="zeros", dtype=torch.float32)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise TypeError(f"CentredGridd: '{key}' must be a MetaTensor with an affine (LoadImaged output)")
            dst = torch.as_tensor(centred_grid_affine(image.affine, image.shape[1:], self.pixdim, self.spatial_size))
            template = self._register_to(image, dst)
            if template is not None:
                dst = template
            out = self.resampler(image, dst_affine=dst, spatial_size=self.spatial_size)
            if self.mask_nonzero:
                brain = MetaTensor((image.as_tensor() != 0).float(), affine=image.affine)
                mask = self.mask_resampler(brain, dst_affine=dst, spatial_size=self.spatial_size).as_tensor()
                # normalised interpolation: each output voxel is the interpolation of the brain voxels only (divided
                # by their interpolated share), so the brain's edge is not darkened by the zeros around it
                share = self.resampler(MetaTensor(brain.as_tensor().clone(), affine=image.affine), dst_affine=dst,
                                       spatial_size=self.spatial_size).as_tensor().to(out.device, out.dtype)
                mask = mask.to(out.device, out.dtype)
                out = out * mask / torch.where(mask > 0, share.clamp_min(EDGE_SHARE), torch.ones_like(share))
            if template is not None:  # skull stripping by the template's brain mask
                # (the input keeps its affine in the scan's world: maps saved with it overlay the native scan)
                out = out * torch.as_tensor(self._template.mask[None], device=out.device).to(out.dtype)
            out.meta[REGISTERED] = template is not None
            out.meta[REGISTRATION_SCALE if template is not None else BRAIN_VOLUME] = self._brain_volume(image, template)
            d[key] = out
        return d

    def _brain_volume(self, image: MetaTensor, template: torch.Tensor | None) -> float:
        """For input QC's ``brain_volume``, how large the scan's brain is in its own world: for a skull-stripped scan,
        its volume in mL (non-zero voxels times their volume from the header: ``BRAIN_VOLUME``); for a scan
        registered here, the registration's volume scale, the determinant of its affine (``REGISTRATION_SCALE``: the
        template is the training brains' mean, so this is the scan's brain over theirs). Registration scales every
        brain to the template's size, so only this says how large the scan's brain was."""
        if template is not None:
            scale = float(np.linalg.det(np.asarray(template, dtype=np.float64)[:3, :3]))
            return abs(scale / float(np.linalg.det(np.asarray(self._template.affine, dtype=np.float64)[:3, :3])))
        voxels = float((image.as_tensor()[0] != 0).sum())
        return voxels * abs(float(np.linalg.det(np.asarray(image.affine, dtype=np.float64)[:3, :3]))) / 1000.0

    def _register_to(self, image: MetaTensor, centred: torch.Tensor) -> torch.Tensor | None:
        """The network grid's affine in the scan's world when the scan is to be registered, else None."""
        if self.preprocess == "off":
            return None
        if self._template is None:
            self._template = Template(self.template_dir).check_grid(self.spatial_size)
        name = image.meta.get("filename_or_obj", "the scan")
        if self.preprocess == "auto":
            quick = self.resampler(image, dst_affine=centred, spatial_size=self.spatial_size)
            registered, scores = self._template.registered(quick.as_tensor()[0].cpu().numpy())
            if registered:
                return None
            failed = ", ".join(f"{m} {v:.3g} > {self._template.reference.thresholds[m]:.3g}"
                               for m, v in scores.items() if v > self._template.reference.thresholds[m])
            if self._template.missing:  # weights from before the template: the scan goes on as it is, QC judges it
                logger.warning("%s: not registered to the template (%s), but %s: used as it is", name, failed,
                               missing_template(self._template.missing))
                return None
            logger.info("%s: not registered to the template (%s): registering it", name, failed)
        scan = image.as_tensor()[0].detach().cpu().numpy()
        try:
            template_to_scan = affine_to_template(self._template.image, self._template.affine, self._template.mask,
                                                  scan, image.affine.cpu().numpy())
        except RuntimeError as err:  # SimpleITK: e.g. a constant image, or no overlap left ("outside ... buffer")
            reason = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
            logger.warning("%s: registration to the template failed (%s): the scan is used as it is, and input QC "
                           "judges it", name, reason)
            return None
        return torch.as_tensor(template_to_scan @ self._template.affine, dtype=torch.float64)

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler.inverse(d[key])
        return d


class RandMaskJitterd(RandomizableTransform, MapTransform):
    """Randomly move the edge of a skull-stripped image's brain (its non-zero region) by one voxel, in places: with
    probability ``prob`` the image is eroded or dilated (either, equally likely); each voxel of the inner edge (brain
    voxels with a background face neighbour) or of the outer edge (background voxels with a brain face neighbour)
    flips with a probability drawn from ``[0, max_fraction]`` (outside the volume counts as background). Eroded
    voxels become 0; dilated ones take the mean of their brain neighbours (3x3x3 box), the idea of ``CentredGridd``'s
    normalised edge. This is what re-drawing the brain mask by nearest neighbour on another grid does to a scan,
    which the clean training scans (all on the template grid) never show. It works on raw or normalised float images
    (the background must be exactly 0); follow it with the normalisation (``Normalisedd``), as it changes which
    voxels are brain. Each key gets its own draw: use it on intensity images, not on a mask that must stay paired."""

    def __init__(self, keys: KeysCollection, prob: float = 0.3, max_fraction: float = 0.5,
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0.0 < float(max_fraction) <= 1.0:
            raise ValueError(f"RandMaskJitterd: max_fraction must be in (0, 1], got {max_fraction!r}")
        self.max_fraction = float(max_fraction)
        self._dilate = False
        self._fraction = 0.0

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            self._dilate = bool(self.R.rand() < 0.5)
            self._fraction = float(self.R.uniform(0.0, self.max_fraction))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self._jitter(d[key])
        return d

    def _jitter(self, image: torch.Tensor) -> torch.Tensor:
        x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        if x.ndim != 4:
            raise ValueError(f"RandMaskJitterd: expects a channel-first 3D image, got shape {tuple(x.shape)}")
        brain = (x != 0).any(dim=0, keepdim=True).to(torch.float32)[None]  # (1, 1, D, H, W)
        faces = torch.zeros((1, 1, 3, 3, 3), dtype=torch.float32, device=x.device)
        faces[0, 0, 1, 1, :] = faces[0, 0, 1, :, 1] = faces[0, 0, :, 1, 1] = 1.0
        faces[0, 0, 1, 1, 1] = 0.0
        brain_faces = torch.nn.functional.conv3d(brain, faces, padding=1)
        if self._dilate:
            edge = (brain == 0) & (brain_faces > 0)
        else:
            edge = (brain == 1) & (brain_faces < 6)
        # the random draw is made with numpy's RandomState (MONAI's set_determinism / set_random_state seed it)
        draw = torch.as_tensor(self.R.random_sample(tuple(edge.shape[2:])) < self._fraction, device=x.device)
        flip = (edge & draw[None, None])[0]  # (1, D, H, W)
        out = x.clone()
        if self._dilate:
            box = torch.ones((1, 1, 3, 3, 3), dtype=torch.float32, device=x.device)
            share = torch.nn.functional.conv3d(brain, box, padding=1)[0]
            for c in range(x.shape[0]):
                total = torch.nn.functional.conv3d((x[c] * brain[0, 0]).to(torch.float32)[None, None], box, padding=1)
                fill = (total[0] / share.clamp_min(1.0)).to(x.dtype)
                out[c][flip[0]] = fill[0][flip[0]]
        else:
            out[:, flip[0]] = 0
        if isinstance(image, MetaTensor):
            return MetaTensor(out, meta=image.meta, applied_operations=image.applied_operations)
        return out


def acquire_on_grid(data: np.ndarray, affine: np.ndarray, new_spacing: Sequence[float], strip: bool = True):
    """The scan ``data`` with its voxel-to-world ``affine`` as acquired with voxels of ``new_spacing`` mm (per array
    axis): the same field of view (voxel corners to voxel corners) and centre. Downsampled axes are low-passed first
    (Gaussian with the FWHM of the lost resolution, sqrt(new^2 - old^2)), the image is linearly interpolated and
    skull-stripped again with the linearly resampled brain mask (non-zero voxels, > 0.5), as a pipeline that
    skull-strips on the scan's own grid would; ``strip=False`` keeps the interpolated image as it is (the brain's
    edge blurred into a dim partial-volume rim). Returns (array, affine of the new grid)."""
    affine = np.asarray(affine, dtype=np.float64)
    old = np.linalg.norm(affine[:3, :3], axis=0)
    new = np.asarray(new_spacing, dtype=float)
    shape = np.asarray(data.shape)
    new_shape = np.maximum(np.rint(shape * old / new).astype(int), 1)
    zoom = new / old  # input voxels per output voxel
    centre = (shape - 1) / 2.0
    offset = centre - zoom * (new_shape - 1) / 2.0  # same centre: output voxel j <- input voxel zoom * j + offset
    sigma = np.sqrt(np.maximum(new ** 2 - old ** 2, 0.0)) / (2.0 * np.sqrt(2.0 * np.log(2.0))) / old
    data = np.asarray(data, dtype=np.float32)
    smooth = ndimage.gaussian_filter(data, sigma=sigma, mode="constant") if sigma.any() else data
    matrix = np.diag(zoom)
    image = ndimage.affine_transform(smooth, matrix, offset, output_shape=tuple(new_shape), order=1, mode="constant")
    if strip:
        mask = ndimage.affine_transform((data != 0).astype(np.float32), matrix, offset, output_shape=tuple(new_shape),
                                        order=1, mode="constant") > 0.5
        image = np.where(mask, image, 0.0)
    acquired = affine.copy()  # output voxel j lies at input voxel zoom * j + offset
    acquired[:3, :3] = affine[:3, :3] * zoom
    acquired[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return image.astype(np.float32), acquired


class RandAcquiredGridd(RandomizableTransform, MapTransform):
    """With probability ``prob``, the image as acquired on another grid and read back onto the network grid:
    ``acquire_on_grid`` to voxels drawn per scan -- isotropic ``iso_range`` mm, or (with probability
    ``thick_prob``) ``inplane_range`` mm in-plane with ``thick_range`` mm slices along one of ``thick_axes`` (array
    axes after ``Orientationd``, drawn at random) -- then
    ``CentredGridd(pixdim, spatial_size, mask_nonzero=True)``, the deployed preprocessing's step. The image must be a
    MetaTensor with its affine (after ``CentredGridd``), skull-stripped (background exactly 0) and in raw intensities,
    before the normalisation (``Normalisedd``): interpolation mixes the background into the brain's edge as it does
    for a scan. The draw uses the transform's RandomState (MONAI's set_determinism / set_random_state seed it)."""

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], spatial_size: Sequence[int], prob: float = 0.5,
                 iso_range: Sequence[float] = (0.6, 1.4), thick_prob: float = 0.5,
                 inplane_range: Sequence[float] = (0.6, 1.1), thick_range: Sequence[float] = (1.5, 3.0),
                 thick_axes: Sequence[int] = (0, 1, 2), allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        for name, value in (("iso_range", iso_range), ("inplane_range", inplane_range), ("thick_range", thick_range)):
            if len(value) != 2 or not 0.0 < float(value[0]) <= float(value[1]):
                raise ValueError(f"RandAcquiredGridd: {name} must be (low, high) in mm with 0 < low <= high, "
                                 f"got {value!r}")
        if not 0.0 <= float(thick_prob) <= 1.0:
            raise ValueError(f"RandAcquiredGridd: thick_prob must be in [0, 1], got {thick_prob!r}")
        self.iso_range, self.inplane_range, self.thick_range = (tuple(float(v) for v in r)
                                                                for r in (iso_range, inplane_range, thick_range))
        self.thick_prob = float(thick_prob)
        self.thick_axes = tuple(int(a) for a in thick_axes)
        if not self.thick_axes or any(a not in (0, 1, 2) for a in self.thick_axes):
            raise ValueError(f"RandAcquiredGridd: thick_axes must name array axes 0, 1 or 2, got {thick_axes!r}")
        self.grid = CentredGridd("image", pixdim, spatial_size, mode="bilinear", mask_nonzero=True)
        self._spacing = (1.0, 1.0, 1.0)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        if self.R.rand() < self.thick_prob:
            spacing = [self.R.uniform(*self.inplane_range)] * 3
            spacing[self.thick_axes[self.R.randint(len(self.thick_axes))]] = self.R.uniform(*self.thick_range)
        else:
            spacing = [self.R.uniform(*self.iso_range)] * 3
        self._spacing = tuple(float(s) for s in spacing)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor) or image.ndim != 4 or image.shape[0] != 1:
                raise ValueError(f"RandAcquiredGridd: '{key}' must be a one-channel 3D MetaTensor with its affine")
            affine = image.affine.detach().cpu().numpy().astype(np.float64)
            array, acquired = acquire_on_grid(image.as_tensor()[0].detach().cpu().numpy(), affine, self._spacing)
            scan = MetaTensor(torch.as_tensor(array[None]), affine=torch.as_tensor(acquired))
            out = self.grid({"image": scan})["image"]
            d[key] = MetaTensor(out.as_tensor().to(device=image.device, dtype=image.dtype), meta=image.meta)
        return d


class MaskedGaussianSmoothd(MapTransform):
    """Gaussian smoothing (``sigma`` in voxels) of a skull-stripped image inside its brain (the non-zero voxels)
    only: normalised convolution, ``G(x) / G(brain)`` on the brain and 0 outside it, so that the zeros around the
    brain do not darken its edge (MONAI ``GaussianSmoothd`` would) and a brain of one intensity keeps it."""

    def __init__(self, keys: KeysCollection, sigma: float | Sequence[float] = 1.0, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.smooth = GaussianSmooth(sigma=sigma)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            x = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            brain = (x != 0).to(x.dtype)
            share = torch.as_tensor(self.smooth(brain))
            out = torch.as_tensor(self.smooth(x)) * brain / torch.where(brain > 0, share.clamp_min(EDGE_SHARE),
                                                                         torch.ones_like(share))
            d[key] = MetaTensor(out, meta=image.meta, applied_operations=image.applied_operations) \
                if isinstance(image, MetaTensor) else out
        return d
