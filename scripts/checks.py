"""Input checks used by the configs before any engine starts: each bad case gets an error naming the file,
and inference may skip bad cases and list them in a report instead of stopping."""

from __future__ import annotations

import csv
import io
import logging
import os

import numpy as np

from scripts.nifti_io import atomic_write_text, read_volume

__all__ = ["check_image", "check_positive_int", "class_weights", "require_file", "validate_items"]

logger = logging.getLogger(__name__)


def check_image(path: str) -> None:
    """Raise ValueError/FileNotFoundError naming ``path`` unless it is a readable, finite, non-empty 3D NIfTI."""
    data, _ = read_volume(path)
    finite = np.isfinite(data)
    if not finite.all():
        bad = int((~finite).sum())
        raise ValueError(f"{path}: {bad} voxels are NaN or Inf")
    if not np.any(data):
        raise ValueError(f"{path}: every voxel is zero (empty image)")


def validate_items(items: list[dict], skip_bad: bool = False, report: str | None = None, keys=("image",)) -> list[dict]:
    """Check every item's images. With ``skip_bad`` the bad items are dropped and listed (subject, file, reason)
    in ``report`` (a CSV); otherwise the first bad item raises."""
    good, bad = [], []
    for item in items:
        try:
            for key in keys:
                if key in item:
                    check_image(item[key])
        except (OSError, ValueError) as err:
            if not skip_bad:
                raise
            logger.error("skipping %s: %s", item.get("subject", item.get("image")), err)
            bad.append((item.get("subject", ""), item.get("image", ""), str(err)))
            continue
        good.append(item)
    if report is not None and (bad or skip_bad):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["subject", "image", "reason"])
        writer.writerows(bad)
        atomic_write_text(buf.getvalue(), report)
    if not good:
        raise ValueError(f"no usable input: all {len(items)} items failed their checks" + (f" (see {report})" if report else ""))
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()) or value < 1:
        raise ValueError(f"config key '{key}' must be a positive integer, got {value!r}")
    return int(value)


def require_file(path: str, how: str) -> str:
    """Return ``path`` if it is a file, else raise FileNotFoundError saying which command creates it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; create it with: {how}")
    return path
