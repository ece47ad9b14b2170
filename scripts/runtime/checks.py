"""Input checks used by the configs before any engine starts: each bad case gets an error naming the file,
and inference may skip bad cases and list them in a report instead of stopping."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np

from scripts.runtime.outputs import SKIPPED_COLUMNS, read_volume, write_csv

__all__ = ["EXPORT_COMMAND", "TRAIN_COMMAND", "check_bool", "check_choice", "check_image", "check_positive_int",
           "check_shape", "check_volume", "class_weights", "require_file", "validate_items"]

logger = logging.getLogger(__name__)


# the commands that create the weights, named by every message about missing ones
TRAIN_COMMAND = "python -m monai.bundle run training --config_file configs/train.json"
EXPORT_COMMAND = ("python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file "
                  "models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json")

EXTENT_TOLERANCE = 2.5  # physical size may differ from spatial_shape * pixdim by at most this factor per axis


def check_image(path: str, spatial_shape=None, pixdim=None, scan: bool = True) -> None:
    """Raise ValueError/FileNotFoundError naming ``path`` unless it is a readable, finite, non-empty 3D NIfTI
    (and, given the network's ``spatial_shape`` and ``pixdim``, covers about the same field of view); a ``scan``
    (not a mask or label map) must also vary."""
    data, affine = read_volume(path)
    check_volume(path, data, affine, spatial_shape, pixdim, scan)


def check_volume(path: str, data: np.ndarray, affine, spatial_shape=None, pixdim=None, scan: bool = True) -> None:
    """The checks of ``check_image`` on a volume already read (e.g. an NRRD read by ITK): finite, non-empty, a
    ``scan``'s non-zero voxels not all one value (no intensity normalisation is defined on a constant image) and,
    given ``spatial_shape`` and ``pixdim``, about the network's field of view. Errors name ``path``."""
    finite = np.isfinite(data)
    if not finite.all():
        bad = int((~finite).sum())
        raise ValueError(f"{path}: {bad} voxels are NaN or Inf")
    if not np.any(data):
        raise ValueError(f"{path}: every voxel is zero (empty image)")
    if scan:
        values = data[data != 0]
        if values.min() == values.max():
            raise ValueError(f"{path}: every non-zero voxel has the value {float(values[0]):g}: a constant image, "
                             "not a scan")
    if spatial_shape is not None:
        voxel = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
        extent = np.sort(np.asarray(data.shape) * voxel)
        expected = np.sort(np.asarray(spatial_shape, dtype=float) * np.asarray(pixdim or [1.0] * 3, dtype=float))
        ratio = extent / expected
        if np.any(ratio > EXTENT_TOLERANCE) or np.any(ratio < 1 / EXTENT_TOLERANCE):
            raise ValueError(
                f"{path}: the image covers {' x '.join(f'{e:.0f}' for e in np.asarray(data.shape) * voxel)} mm "
                f"({' x '.join(map(str, data.shape))} voxels), far from the network's field of view of "
                f"{' x '.join(f'{e:.0f}' for e in np.asarray(spatial_shape) * np.asarray(pixdim or [1.0] * 3))} mm; "
                "inputs must be skull-stripped and registered to the 40-week template (docs/README.md, data)")


def validate_items(items: list[dict], skip_bad: bool = False, report: str | None = None, keys=("image",),
                   spatial_shape=None, pixdim=None, allow_none: bool = False) -> list[dict]:
    """Check every item's images (``check_image``). With ``skip_bad`` the bad items are dropped and listed
    (subject, file, reason) in ``report`` (a CSV); otherwise the first bad item raises. An empty list stays empty
    (e.g. every subject already finished); when every item is bad, that is an error unless ``allow_none`` (the
    other subjects of a resumed inference were finished by an earlier run)."""
    good, bad = [], []
    for item in items:
        try:
            for key in keys:
                if key in item:
                    check_image(item[key], spatial_shape, pixdim, scan=key == "image")
        except (OSError, ValueError) as err:
            if not skip_bad:
                raise
            logger.error("skipping %s: %s", item.get("subject", item.get("image")), err)
            bad.append({"subject": item.get("subject", ""), "image": item.get("image", ""), "reason": str(err)})
            continue
        good.append(item)
    if report is not None and (bad or skip_bad):
        write_csv(bad, report, SKIPPED_COLUMNS)
    if items and not good and not allow_none:
        raise ValueError(f"no usable input: all {len(items)} items failed their checks"
                         + (f" (see {report})" if report else ""))
    return good


def class_weights(items: list[dict], factor: float = 1.0, num_classes: int = 2) -> list[float]:
    """Cross-entropy class weights from the training items' class counts: n / (k * n_c), the under-represented
    class weighted up; ``factor`` scales the preterm (class 1) weight further."""
    counts = [sum(1 for it in items if int(it["label"]) == c) for c in range(num_classes)]
    if min(counts) == 0:
        raise ValueError(f"class counts {counts}: every class needs at least one training subject")
    total = sum(counts)
    weights = [total / (num_classes * c) for c in counts]
    weights[1] *= float(factor)
    return weights


def check_positive_int(value, key: str) -> int:
    """Validate a config override: ``value`` must be a positive integer (config key ``key``)."""
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral or value < 1:
        raise ValueError(f"config key '{key}' must be a positive integer, got {value!r}")
    return int(value)


def check_choice(value, key: str, choices: Sequence[str]) -> str:
    """Validate a config value that must be one of ``choices`` (config key ``key``)."""
    if value not in choices:
        raise ValueError(f"config key '{key}' must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def require_file(path: str, how: str) -> str:
    """Return ``path`` if it is a file, else raise FileNotFoundError saying which command creates it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; create it with: {how}")
    return path


def check_bool_or_auto(value, key: str) -> bool | str:
    """A true/false/auto config value (``auto`` returned as the string)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return check_bool(value, key)
    except ValueError:
        raise ValueError(f"config key '{key}' must be true, false or auto, got {value!r}") from None


def check_bool(value, key: str) -> bool:
    """Validate a true/false config override (the CLI passes ``--resume true`` as the string 'true')."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"config key '{key}' must be true or false, got {value!r}")


def check_shape(value, key: str, ndim: int = 3) -> list[int]:
    """Validate a config override that must be ``ndim`` positive integers (e.g. ``spatial_shape``)."""
    ok = isinstance(value, (list, tuple)) and len(value) == ndim and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise ValueError(f"config key '{key}' must be a list of {ndim} positive integers, got {value!r}")
    return list(value)
