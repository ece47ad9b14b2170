"""Clear command-line errors for bad input.

``python -m monai.bundle run`` reports an error raised while a config expression is evaluated as a long
traceback wrapped in MONAI's "Failed to evaluate ConfigExpression" errors. The configs call
``install_excepthook()`` first: when the root cause is an input error raised by this bundle's own checks
(``scripts/``: missing or damaged file, bad label, bad config value), the process ends with one line
``error: <message naming the file or key>`` (exit status 1); set ``PRETERM_TRACEBACK=1`` to see the whole
traceback. Every other error keeps Python's usual traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

__all__ = ["bundle_input_error", "install_excepthook", "report_input_errors", "root_cause"]

_SCRIPTS = str(Path(__file__).resolve().parent.parent)  # the whole scripts package
INPUT_ERRORS = (ValueError, FileNotFoundError, TypeError, KeyError, NotADirectoryError)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a ``raise ... from`` / implicit context chain."""
    return _chain(exc)[-1]


def _raised_by_the_bundle(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_SCRIPTS)


def _chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def bundle_input_error(exc: BaseException) -> BaseException | None:
    """The innermost input error raised by this bundle's checks in the chain of ``exc`` (it may wrap a library's
    error, e.g. nibabel's, that it explains), else None."""
    for cause in reversed(_chain(exc)):
        if isinstance(cause, INPUT_ERRORS) and _raised_by_the_bundle(cause):
            return cause
    return None


def _message(cause: BaseException) -> str:
    return str(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause)


def _hook(exc_type, exc, tb, default=sys.excepthook):
    cause = bundle_input_error(exc) if exc is not None else None
    if cause is not None and not os.environ.get("PRETERM_TRACEBACK"):
        sys.stderr.write(f"error: {_message(cause)}\n(set PRETERM_TRACEBACK=1 for the full traceback)\n")
        sys.stderr.flush()
        return
    default(exc_type, exc, tb)


def report_input_errors(main):
    """Decorator for the ``python -m scripts.<tool>`` entry points: an input error ends the command with
    ``error: <message>`` on stderr and exit status 2 (``PRETERM_TRACEBACK=1``: re-raised)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as exc:
            cause = bundle_input_error(exc)
            if cause is None or os.environ.get("PRETERM_TRACEBACK"):
                raise
            print(f"error: {_message(cause)}", file=sys.stderr)
            return 2

    return wrapper


def install_excepthook() -> None:
    """Make uncaught input errors of this bundle end the command with a one-line message (idempotent)."""
    if getattr(sys.excepthook, "__name__", "") != "_hook":
        sys.excepthook = _hook
