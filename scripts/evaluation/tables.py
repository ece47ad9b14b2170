"""Report outputs written atomically: CSV and markdown tables from lists of dicts, matplotlib figures, and the
HTML form of the markdown reports."""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence

from scripts.runtime.outputs import atomic_target_for

__all__ = ["fmt", "fmt_ci", "markdown_table", "markdown_to_html", "save_figure"]


def fmt(value, digits: int = 3) -> str:
    """Table cell: floats rounded, NaN/None as '-'."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


def fmt_ci(value: float, low: float, high: float, digits: int = 2) -> str:
    """Table cell of an estimate with its interval: ``1.32 [1.10, 1.51]``; the estimate alone when the interval is
    NaN (one subject), '-' when the estimate is NaN."""
    if value != value:
        return "-"
    if low != low or high != high:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


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


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)
    return re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", lambda m: f'<a href="{m.group(2)}">{m.group(1)}</a>', text)


def markdown_to_html(text: str) -> str:
    """The markdown that these reports write (``#`` headings, paragraphs, ``|`` tables, ``![alt](file)`` figures,
    inline code, bold, links) as an HTML fragment; not a general markdown converter."""
    out, paragraph = [], []

    def flush():
        if paragraph:
            out.append("<p>" + _inline(" ".join(paragraph)) + "</p>")
            paragraph.clear()

    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        heading = re.match(r"^(#{1,4}) (.*)$", line)
        figure = re.match(r"^!\[([^\]]*)\]\(([^)]+)\)$", line.strip())
        if not line.strip():
            flush()
        elif heading:
            flush()
            level = len(heading.group(1))
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif figure:
            flush()
            out.append(f'<figure><img src="{html.escape(figure.group(2))}" alt="{html.escape(figure.group(1))}">'
                       "</figure>")
        elif line.startswith("|"):
            flush()
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            rows = [r for r in block[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in block[0])
                       + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</tbody></table>")
            continue
        else:
            paragraph.append(line.strip())
        i += 1
    flush()
    return "\n".join(out)
