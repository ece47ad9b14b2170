"""The tests' browser: Debian's Chromium (``apt-get install chromium``, installed by ``bash run.sh test`` where
possible; ``CHROMIUM`` names another binary) driven headless through Playwright's Python package, which is pointed
at that binary with ``executable_path`` (no browser download). Tests skip with the reason where either is
missing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def browser_page(what: str, width: int = 1280, height: int = 900) -> Iterator[tuple[object, list[str]]]:
    """A fresh page of headless Chromium and the list its console errors, page errors and failed requests are
    appended to; skips the test (naming ``what``) where Chromium or Playwright is missing."""
    path = chromium()
    if path is None:
        message = (f"Chromium is not installed and could not be installed (bash run.sh test installs the Debian "
                   f"package 'chromium' where apt-get is allowed): the browser test of {what} is skipped")
        if os.environ.get("REQUIRE_SYSTEM_TESTS") == "1":  # set by .ci/run: on CI's machine it must run
            pytest.fail(message)
        pytest.skip(message)
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (requirements-dev.txt) is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            problems: list[str] = []
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            yield page, problems
        finally:
            browser.close()


def open_pages(page, paths: Sequence[Path], check: Callable[[int, Path], None] | None = None) -> None:
    """Open each file in ``page``, assert that every image on it loads, then call ``check(n, path)``."""
    for n, path in enumerate(paths):
        page.goto(Path(path).as_uri())
        page.wait_for_load_state("load")
        broken = page.evaluate("[...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
        assert not broken, f"{path}: images that do not load: {broken}"
        if check is not None:
            check(n, Path(path))
