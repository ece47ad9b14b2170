"""MONAI's CheckpointSaver and MetricsSaver with crash-safe files.

MONAI writes checkpoints (its DiskSaver runs with ``atomic=False``) and metric reports in place, so a job killed
while writing leaves a truncated ``model.pt`` or ``metrics.csv`` under the final name. These subclasses keep
MONAI's behaviour and arguments and only route each file through a temporary name and an atomic rename.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver, MetricsSaver

from scripts.nifti_io import atomic_target_for

__all__ = ["AtomicCheckpointSaver", "AtomicMetricsSaver"]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


class _AtomicSave(BaseSaveHandler):
    """Save handler for ignite's Checkpoint: torch.save to a temporary file, then rename. With a fixed file name
    (``model.pt``) the old file is only ever replaced, never removed first."""

    def __init__(self, dirname: str, filename: str | None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if _rank() != 0:  # one writer under torch.distributed (ignite's DiskSaver default: rank 0)
            return
        self.dirname.mkdir(parents=True, exist_ok=True)
        with atomic_target_for(self.dirname / (self.filename or filename)) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)  # via a file object: the archive's inner name does not vary with tmp

    def remove(self, filename: str) -> None:
        if self.filename is None:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) whose files are written atomically."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicSave(save_dir, getattr(checkpoint.save_handler, "filename", None))


class AtomicMetricsSaver(MetricsSaver):
    """``monai.handlers.MetricsSaver`` (same arguments): the reports are written into a temporary folder next to
    ``save_dir`` and each is renamed into place."""

    def __call__(self, engine) -> None:
        final = Path(self.save_dir)
        final.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".metrics.{os.getpid()}.", suffix=".tmp", dir=final))
        self.save_dir = str(tmp)
        try:
            super().__call__(engine)
            for path in tmp.iterdir():
                os.replace(path, final / path.name)
        finally:
            self.save_dir = str(final)
            shutil.rmtree(tmp, ignore_errors=True)
