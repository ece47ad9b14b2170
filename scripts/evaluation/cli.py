"""The evaluation commands' shared command-line options, in one place: which config, which weights, which config
overrides, which subjects and maps, where the results go. Every command spells and reads them the same way
(``--config_file``, ``--ckpt`` or ``--ckpt_dir``, ``--override``, ``--split``, ``--subjects``, ``--methods``,
``--output``); each help text states its default (tests/test_cli_help.py).

    ap = argparse.ArgumentParser(...)
    add_model_options(ap, weights="ckpt")          # --config_file --ckpt --override
    add_subject_options(ap, split_help=..., subjects=6, subjects_help=..., methods=METHODS, methods_help=...)
    add_output_option(ap, BUNDLE_ROOT / "docs" / "results", "sanity.md, the CSVs and the figures")
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from scripts import BUNDLE_ROOT

__all__ = ["add_model_options", "add_output_option", "add_subject_options", "json_object"]

INFERENCE_CONFIG = BUNDLE_ROOT / "configs" / "inference.json"
OVERRIDE_HELP = 'config overrides as JSON, e.g. \'{"fold": 0}\' (default: {}, none)'
WEIGHTS = {  # option: (what it names, its default when the command gives none)
    "ckpt": ("checkpoint", "the config's ckpt_path, models/model.pt"),
    "ckpt_dir": ("folder of model.pt and its QC reference", "the config's ckpt_dir, models/"),
}


def json_object(text: str) -> dict:
    """argparse ``type`` of ``--override``: a JSON object, or an error naming the option and what was given."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"fold\": 0}}', got {text!r}")
    return value


def add_model_options(ap: argparse.ArgumentParser, weights: str | None = "ckpt", config_file: bool = True,
                      weights_default: str | Path | None = None,
                      override_help: str = OVERRIDE_HELP) -> None:
    """``--config_file`` (the inference config), the weights (``weights``: ``"ckpt"`` a checkpoint file,
    ``"ckpt_dir"`` its folder, None: the command adds its own) and ``--override`` (a JSON object of config
    overrides, parsed by ``json_object``)."""
    if config_file:
        ap.add_argument("--config_file", default=str(INFERENCE_CONFIG),
                        help="the inference config giving the network, preprocessing and datalist (default: "
                             "configs/inference.json in the bundle folder)")
    if weights is not None:
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)} or None, got {weights!r}")
        what, shown = WEIGHTS[weights]
        if weights_default is not None:
            path = Path(weights_default)
            shown = (path.relative_to(BUNDLE_ROOT) if path.is_relative_to(BUNDLE_ROOT) else path).as_posix()
            weights_default = str(weights_default)
        ap.add_argument(f"--{weights}", default=weights_default, help=f"{what} (default: {shown})")
    ap.add_argument("--override", type=json_object, default={}, help=override_help)


def add_subject_options(ap: argparse.ArgumentParser, split_help: str, subjects: int, subjects_help: str,
                        methods: Sequence[str] | None = None, methods_help: str = "methods") -> None:
    """``--split`` (default test), ``--subjects`` (at most this many, preterm and term in turn) and, with
    ``methods``, ``--methods`` (default: all of them)."""
    ap.add_argument("--split", default="test", help=f"{split_help} (default: %(default)s)")
    ap.add_argument("--subjects", type=int, default=subjects,
                    help=f"at most this many subjects, preterm and term in turn {subjects_help}")
    if methods is not None:
        ap.add_argument("--methods", nargs="+", default=list(methods),
                        help=f"{methods_help} (default: all: {' '.join(methods)})")


def add_output_option(ap: argparse.ArgumentParser, default: str | Path, holds: str) -> None:
    """``--output``: the folder of the command's results (``holds``), by default ``default`` (a path inside the
    bundle is shown relative to it)."""
    default = Path(default)
    shown = (f"{default.relative_to(BUNDLE_ROOT).as_posix()} in the bundle folder"
             if default.is_absolute() and default.is_relative_to(BUNDLE_ROOT) else f"{default.as_posix()}, from the "
             "current folder")
    ap.add_argument("--output", default=str(default), help=f"folder for {holds} (default: {shown})")
