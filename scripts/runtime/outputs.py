"""Everything this bundle writes, in one place: the output-path contract, atomic writes (NIfTI, text, CSV),
crash-safe tables, and the bookkeeping that lets an interrupted inference resume.

Output contract (change it here only)::

    <output_dir>/predictions.csv
    <output_dir>/<subject>/<subject>_<what>.nii.gz     e.g. _relevance_a2b1, _relevance_a2b1_orig, _input
    <output_dir>/report/index.html                     the run report (``report_index``)
    <output_dir>/report/<subject>/index.html           a subject's page (``report_page``)
    <output_dir>/report/<subject>/<subject>_<what>.png its images (``report_image``)

``subject`` is the input file name without NIfTI extensions (``subject_name``). ``output_path`` is the only
function that builds those names; ``relevance_path`` / ``input_path`` name the two kinds of map, the
``report_*`` functions the files of the run report.

Every file goes through a temporary name in the same folder and an atomic rename, so a killed run never leaves a
partial file under a final name; temporaries of dead writers are removed by the next run. A stage that exactly one
of several processes must run (the study's final stage) is claimed with ``exclusive_lock``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

import ignite.distributed as idist
import nibabel as nib
import numpy as np
import torch

__all__ = [
    "NIFTI_SUFFIXES", "SKIPPED_COLUMNS", "CrashSafeTable", "atomic_target_for", "atomic_write_text", "claim_lock",
    "exclusive_lock", "expected_outputs", "file_sha256", "input_path", "release_lock",
    "output_path", "pending_subjects", "read_rows", "read_volume", "relevance_path", "remove_stale_temporaries",
    "report_image", "report_index", "report_page", "run_key", "save_nifti", "scores_and_labels", "source_file",
    "subject_name", "write_csv",
]

logger = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SKIPPED_COLUMNS = ["subject", "image", "reason"]  # skipped.csv: input checks and input QC


# ---------------------------------------------------------------------------------------------------------------
# the output-path contract


def subject_name(path: str | os.PathLike) -> str:
    """Input file name without NIfTI extensions: ``/x/sub-0001.nii.gz`` -> ``sub-0001``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def output_path(output_dir: str | os.PathLike, subject: str, what: str, suffix: str = ".nii.gz") -> Path:
    """``<output_dir>/<subject>/<subject>_<what><suffix>``: the one place that names per-subject outputs."""
    return Path(output_dir) / subject / f"{subject}_{what}{suffix}"


def relevance_path(output_dir: str | os.PathLike, subject: str, preset: str, original: bool = False) -> Path:
    """The relevance map of ``preset``: on the network-input grid, or (``original``) on the input image's grid."""
    return output_path(output_dir, subject, f"relevance_{preset}" + ("_orig" if original else ""))


def input_path(output_dir: str | os.PathLike, subject: str) -> Path:
    """The preprocessed network input."""
    return output_path(output_dir, subject, "input")


REPORT_FOLDER = "report"


def report_index(output_dir: str | os.PathLike, folder: str = REPORT_FOLDER) -> Path:
    """The run report's first page: ``<output_dir>/report/index.html`` (``folder``: a copy's folder instead)."""
    return Path(output_dir) / folder / "index.html"


def report_page(output_dir: str | os.PathLike, subject: str, folder: str = REPORT_FOLDER) -> Path:
    """A subject's page of the run report: ``<output_dir>/report/<subject>/index.html``."""
    return Path(output_dir) / folder / subject / "index.html"


def report_image(output_dir: str | os.PathLike, subject: str, what: str) -> Path:
    """An image of a subject's report page: ``<output_dir>/report/<subject>/<subject>_<what>.png``."""
    return output_path(Path(output_dir) / REPORT_FOLDER, subject, what, ".png")


def expected_outputs(output_dir: str | os.PathLike, subject: str, presets: Iterable[str], save_input: bool,
                     save_original_space: bool = False) -> list[Path]:
    """Every map file one subject's inference writes with these settings."""
    files = [relevance_path(output_dir, subject, p) for p in presets]
    if save_original_space:
        files += [relevance_path(output_dir, subject, p, original=True) for p in presets]
    if save_input:
        files.append(input_path(output_dir, subject))
    return files


def source_file(item: dict, image_key: str = "image") -> tuple[str, str]:
    """(subject, source file) of a decollated batch item, from the image's ``filename_or_obj`` metadata."""
    image = item[image_key]
    meta = getattr(image, "meta", None) or item.get(f"{image_key}_meta_dict", {})
    name = meta.get("filename_or_obj") if meta else None
    if not name:
        raise ValueError(f"the '{image_key}' of a batch item has no filename_or_obj metadata")
    return subject_name(str(name)), str(name)


# ---------------------------------------------------------------------------------------------------------------
# atomic writes and checked reads


def _atomic_target(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    # the writer's pid in the name lets a later run tell abandoned temporaries (writer killed) from live ones
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.{os.getpid()}.", suffix=".tmp" + suffix,
                               dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets the usual permissions
    return Path(tmp)


@contextmanager
def atomic_target_for(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, dtype=np.float32) -> Path:
    """Write ``array`` as NIfTI to ``path`` through a temporary file in the same folder and an atomic rename,
    so that a crash never leaves a partial file under the final name."""
    path = Path(path)
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), np.asarray(affine, dtype=float))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    with atomic_target_for(path) as tmp:
        nib.save(image, tmp)
    return path


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write text to ``path`` atomically (temporary file + rename)."""
    path = Path(path)
    with atomic_target_for(path) as tmp:
        tmp.write_text(text)
    return path


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI as float32 with its affine; errors name the file and say what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises many types for damaged files
        raise ValueError(f"{path}: not a readable NIfTI image ({type(err).__name__}: {err})") from err
    data = np.squeeze(data) if data.ndim > 3 and all(s == 1 for s in data.shape[3:]) else data
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D image, got shape {data.shape}")
    return data, image.affine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, depth: int = 2) -> list[Path]:
    """Delete temporaries of ``atomic_target_for`` (and the folders of ``report.copy_report``) left in ``folder``
    (and ``depth`` levels below) by a writer that no longer runs (killed); those of live processes (other ranks,
    other jobs) are kept. Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    patterns = [("*/" * level) + ".*.tmp*" for level in range(depth + 1)]
    for pattern in patterns:
        for tmp in folder.glob(pattern):
            parts = tmp.name.split(".")
            pid = next((int(p) for p in parts[2:3] if p.isdigit()), None)
            if pid is not None and not _alive(pid):
                if tmp.is_dir():  # a folder built whole before it is moved into place (report.copy_report)
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# an exclusive lock: one process of many runs a stage


def _lock_holder(path: Path) -> dict | None:
    """The lock's content ({"pid", "host", "since"}); {} while it is being written or when damaged; None if gone."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_gone(holder: dict) -> bool:
    """Only a holder on this host can be checked: its pid no longer runs."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _remove_stale_lock(path: Path, holder: dict) -> bool:
    """Remove the lock of ``holder`` (gone), not one a live process created meanwhile: the lock is first renamed
    aside (atomic), then deleted only if it still names that holder, else put back."""
    aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return False
    if _lock_holder(aside) == holder:
        aside.unlink()
        return True
    try:
        os.link(aside, path)  # a live process's fresh lock: back under its name (fails if another took the name)
    except FileExistsError:
        pass
    aside.unlink()
    return False


def claim_lock(path: str | os.PathLike) -> tuple[bool, dict]:
    """Create ``path`` exclusively (``O_CREAT | O_EXCL``) holding this process's pid and host. A lock whose holder
    is gone (same host, pid not alive: a crashed run) is removed first. Returns (claimed, holder): the holder is
    this process, or the live (or unverifiable: another host) process that holds the lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is None:
                continue  # released meanwhile
            if not _holder_gone(holder):
                return False, holder
            if _remove_stale_lock(path, holder):
                logger.warning("removed the stale lock %s of pid %s on %s (no longer running)", path,
                               holder.get("pid"), holder.get("host"))
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
            f.flush()
            os.fsync(f.fileno())
        return True, me
    return False, _lock_holder(path) or {}


def release_lock(path: str | os.PathLike) -> None:
    """Remove ``path`` if this process holds it."""
    path = Path(path)
    holder = _lock_holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextmanager
def exclusive_lock(path: str | os.PathLike):
    """``with exclusive_lock(path) as (claimed, holder):`` ``claim_lock``, released on exit when claimed."""
    claimed, holder = claim_lock(path)
    try:
        yield claimed, holder
    finally:
        if claimed:
            release_lock(path)


def write_csv(rows: Sequence[dict], path: str | os.PathLike, columns: Sequence[str] | None = None) -> None:
    """A CSV table from a list of dicts, written atomically (extra keys ignored)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def read_rows(path: Path, columns: Sequence[str] | None = None) -> list[dict]:
    """Rows of a CSV table (none when it is missing or has other columns)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if columns is not None and reader.fieldnames != list(columns):
            return []
        return list(reader)


# ---------------------------------------------------------------------------------------------------------------
# crash-safe tables written while an engine runs


def scores_and_labels(output, pred_key: str = "pred", label_key: str = "label"):
    """(B, C) class scores and (B,) integer labels from a list of per-item dicts (labels may be one-hot)."""
    items = output if isinstance(output, list) else [output]
    scores = torch.stack([torch.as_tensor(o[pred_key]).reshape(-1).float() for o in items])
    labels = []
    for o in items:
        label = torch.as_tensor(o[label_key]).reshape(-1)
        labels.append(label.argmax() if label.numel() > 1 else label[0])
    return scores, torch.stack(labels).long()


class CrashSafeTable:
    """A CSV table of rows keyed by some columns, rewritten atomically after every change, so that a killed
    run leaves the table of everything finished before the kill. Under torch.distributed every rank keeps its
    own hidden part file and ``finish()`` merges them into the table on rank 0.

    Ours, not MONAI's ``CSVSaver``: that one writes once at the end and in place, so a killed run has no table."""

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
        rank, world = idist.get_rank(), idist.get_world_size()
        return self.path if world == 1 else self.path.with_name(f".{self.path.name}.rank{rank}")

    def _write(self, rows, path: Path) -> None:
        write_csv(sorted(rows, key=lambda r: tuple(r[k] for k in self.key)), path, self.columns)

    def save(self) -> None:
        self._write(self.rows.values(), self._part())

    def finish(self) -> None:
        """Write the final table (rank 0 merges every rank's rows; each key once)."""
        rank, world = idist.get_rank(), idist.get_world_size()
        if world == 1:
            self.save()
            return
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, self.rows)
        if rank == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            self._write(merged.values(), self.path)
        self._part().unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# resuming an interrupted inference


def file_sha256(path: str | os.PathLike, digest=None) -> str:
    """The SHA-256 of a file's bytes (hex), read in blocks; ``digest`` (a ``hashlib`` object) is updated instead of a
    new one, for a hash of the file and more."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_key(ckpt_path: str, **settings) -> str:
    """Short hash of the checkpoint's bytes and the settings that change the outputs."""
    digest = hashlib.sha256()
    file_sha256(ckpt_path, digest)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def pending_subjects(items: list[dict], output_dir: str | os.PathLike, key: str | None, presets: Sequence[str] = (),
                     save_input: bool = True, save_original_space: bool = False,
                     table: str = "predictions.csv") -> list[dict]:
    """The items still to do. A subject counts as finished when ``table`` lists it with the current ``run_key``
    (the table is written after the subject's maps) and every map file it should have exists. ``key=None``
    (resume off): all of them. Abandoned temporaries of a killed run are removed first."""
    output = Path(output_dir)
    removed = remove_stale_temporaries(output)
    if removed:
        logger.warning("removed %d unfinished temporary files of an interrupted run in %s", len(removed), output)
    if key is None:
        return list(items)
    done = {row["subject"] for path in [output / table, *sorted(output.glob(f".{table}.rank*"))]
            for row in read_rows(path) if row.get("run_key") == key}  # rank parts: a killed distributed run
    pending = [it for it in items if not (
        subject_name(it["image"]) in done
        and all(p.is_file() for p in expected_outputs(output, subject_name(it["image"]), presets, save_input,
                                                      save_original_space)))]
    if len(pending) < len(items):
        logger.info("%d of %d subjects already finished with this model and settings (%s): skipped; "
                    "set resume=false to redo them", len(items) - len(pending), len(items), output / table)
    return pending
