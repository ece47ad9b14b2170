"""Helpers for handlers that read MONAI's decollated engine output and write per-subject tables."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from scripts.datalist import subject_name
from scripts.nifti_io import atomic_write_text

__all__ = ["CrashSafeTable", "dist_rank_world", "read_rows", "scores_and_labels", "source_file"]


def scores_and_labels(output, pred_key: str = "pred", label_key: str = "label"):
    """(B, C) class scores and (B,) integer labels from a list of per-item dicts (labels may be one-hot)."""
    items = output if isinstance(output, list) else [output]
    scores = torch.stack([torch.as_tensor(o[pred_key]).reshape(-1).float() for o in items])
    labels = []
    for o in items:
        label = torch.as_tensor(o[label_key]).reshape(-1)
        labels.append(label.argmax() if label.numel() > 1 else label[0])
    return scores, torch.stack(labels).long()


def source_file(item: dict, image_key: str = "image") -> tuple[str, str]:
    """(subject, source file) of a decollated batch item, from the image's ``filename_or_obj`` metadata."""
    image = item[image_key]
    meta = getattr(image, "meta", None) or item.get(f"{image_key}_meta_dict", {})
    name = meta.get("filename_or_obj") if meta else None
    if not name:
        raise ValueError(f"the '{image_key}' of a batch item has no filename_or_obj metadata")
    return subject_name(str(name)), str(name)


def dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def read_rows(path: Path, columns: Sequence[str] | None = None) -> list[dict]:
    """Rows of a CSV table (none when it is missing or has other columns)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if columns is not None and reader.fieldnames != list(columns):
            return []
        return list(reader)


class CrashSafeTable:
    """A CSV table of rows keyed by some columns, rewritten atomically after every change, so that a killed
    run leaves the table of everything finished before the kill. Under torch.distributed every rank keeps its
    own hidden part file and ``finish()`` merges them into the table on rank 0."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str], key: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.key = list(key)
        self.rows: dict[tuple, dict] = {}

    def load(self, keep: Callable[[dict], bool] = lambda row: True) -> int:
        """Take over the rows of an existing table and of the rank parts a killed distributed run left (those
        ``keep`` accepts); returns how many."""
        for path in [self.path, *sorted(self.path.parent.glob(f".{self.path.name}.rank*"))]:
            for row in read_rows(path, self.columns):
                if keep(row):
                    self.rows[tuple(row[k] for k in self.key)] = row
        return len(self.rows)

    def add(self, row: dict) -> None:
        row = {c: ("" if row.get(c) is None else str(row.get(c))) for c in self.columns}
        self.rows[tuple(row[k] for k in self.key)] = row

    def _part(self) -> Path:
        rank, world = dist_rank_world()
        return self.path if world == 1 else self.path.with_name(f".{self.path.name}.rank{rank}")

    def _write(self, rows, path: Path) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: tuple(r[k] for k in self.key)))
        atomic_write_text(buf.getvalue(), path)

    def save(self) -> None:
        self._write(self.rows.values(), self._part())

    def finish(self) -> None:
        """Write the final table (rank 0 merges every rank's rows; each key once)."""
        rank, world = dist_rank_world()
        if world == 1:
            self.save()
            return
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, self.rows)
        if rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            self._write(merged.values(), self.path)
        self._part().unlink(missing_ok=True)
