"""Report outputs written atomically: CSV and markdown tables from lists of dicts, and matplotlib figures."""

from __future__ import annotations

import os
from collections.abc import Sequence

from scripts.runtime.outputs import atomic_target_for

__all__ = ["fmt", "markdown_table", "save_figure"]


def fmt(value, digits: int = 3) -> str:
    """Table cell: floats rounded, NaN/None as '-'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


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
