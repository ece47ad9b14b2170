"""Small NIfTI helpers shared by the generator, the handlers and the reports: atomic writes and checked reads."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["atomic_target_for", "atomic_write_text", "read_volume", "remove_stale_temporaries", "save_nifti"]


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
    """Delete temporaries of ``atomic_target_for`` left in ``folder`` (and ``depth`` levels below) by a writer that
    no longer runs (killed); those of live processes (other ranks, other jobs) are kept. Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    patterns = [("*/" * level) + ".*.tmp*" for level in range(depth + 1)]
    for pattern in patterns:
        for tmp in folder.glob(pattern):
            parts = tmp.name.split(".")
            pid = next((int(p) for p in parts[2:3] if p.isdigit()), None)
            if pid is not None and not _alive(pid) and tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed
