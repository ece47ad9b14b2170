"""Progress of long loops: a tqdm bar in a terminal, a log line every 10 % elsewhere (logs, CI), so that a log
file never fills with bar redraws. Light (tqdm and logging only): the data tools use it too."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

__all__ = ["progress", "wants_bar"]

logger = logging.getLogger(__name__)


def wants_bar(bar: bool | str | None = "auto") -> bool:
    """Whether to draw progress bars: ``True``/``False`` (or ``"true"``/``"false"``), or ``"auto"``/None: when stderr
    is a terminal."""
    if isinstance(bar, str) and bar.strip().lower() in ("true", "false"):
        return bar.strip().lower() == "true"
    if bar is None or (isinstance(bar, str) and bar.strip().lower() == "auto"):
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    if isinstance(bar, bool):
        return bar
    raise ValueError(f"config key 'progress_bar' must be true, false or \"auto\", got {bar!r}")


def progress(iterable: Iterable, total: int | None = None, desc: str = "", unit: str = "item",
             bar: bool | str | None = "auto") -> Iterator:
    """Yield from ``iterable`` with a tqdm bar in a terminal; elsewhere log ``desc: i/total units (s)`` at every
    10 % (and at the end)."""
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    if wants_bar(bar):
        yield from tqdm(iterable, total=total, desc=desc, unit=unit)
        return
    step = max(1, (total or 10) // 10)
    start = time.perf_counter()
    for count, value in enumerate(iterable, 1):
        yield value
        if count % step == 0 or count == total:
            logger.info("%s: %d/%s %ss done (%.0f s)", desc, count, total if total is not None else "?", unit,
                        time.perf_counter() - start)
