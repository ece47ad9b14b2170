"""Report outputs written atomically: CSV and markdown tables from lists of dicts, and matplotlib figures."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence

from scripts.nifti_io import atomic_target_for, atomic_write_text

__all__ = ["fmt", "markdown_table", "save_figure", "write_csv"]


def fmt(value, digits: int = 3) -> str:
    """Table cell: floats rounded, NaN/None as '-'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


def write_csv(rows: Sequence[dict], path: str | os.PathLike, columns: Sequence[str] | None = None) -> None:
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), path)


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None,
                   digits: int = 3) -> str:
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(row.get(c), digits) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG through a temporary file and an atomic rename."""
    with atomic_target_for(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
