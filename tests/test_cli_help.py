"""Every option of the bundle's own command-line tools has a help text that states its default.

For each tool (and each subcommand of ``scripts.data.preprocess``) ``--help`` is run through the tool's ``main`` and
must exit 0 naming every option; then every option of the parser (``build_parser()``, ``parser._actions``) must
have help text that says ``(required)`` for a required option, and otherwise contains the word ``default`` and,
where the default is a value (not None or an off switch), that value as written (a list as its items separated by
spaces, a path inside the bundle folder relative to it).
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["scripts.data.dhcp_datalist", "scripts.data.preprocess", "scripts.evaluation.study",
         "scripts.evaluation.explain_eval", "scripts.evaluation.sanity", "scripts.evaluation.qc_eval",
         "scripts.evaluation.composite_search", "scripts.evaluation.robustness", "scripts.data.cohorts",
         "scripts.evaluation.cohort_metrics", "scripts.evaluation.evidence"]


def _parsers(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(subcommand words, parser) of ``parser`` and of every subcommand below it."""
    yield words, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*words, name))


def _written(default) -> list[str]:
    """How a default may appear in a help text."""
    if isinstance(default, list | tuple):
        return [" ".join(map(str, default))]
    if isinstance(default, str) and Path(default).is_absolute():
        try:
            return [Path(default).relative_to(ROOT).as_posix()]
        except ValueError:
            return [default]
    return [str(default)]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_has_help_with_its_default(tool, capsys):
    module = importlib.import_module(tool)
    for words, parser in _parsers(module.build_parser()):
        with pytest.raises(SystemExit) as done:
            module.main([*words, "--help"])
        assert done.value.code == 0
        text = capsys.readouterr().out
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            name = f"{tool} {' '.join(words)} {action.option_strings[0]}".replace("  ", " ")
            assert action.option_strings[0] in text, f"{name} is missing from --help"
            assert action.help and action.help != argparse.SUPPRESS, f"{name} has no help text"
            shown = formatter._expand_help(action)
            if action.required:
                assert "(required)" in shown, f"{name}: a required option's help says so: {shown!r}"
                continue
            assert "default" in shown, f"{name}: the help does not state the default: {shown!r}"
            if action.default not in (None, False):
                assert any(w in shown for w in _written(action.default)), \
                    f"{name}: the help does not show the default {action.default!r}: {shown!r}"


def test_study_help_says_where_outputs_go_and_how_long_it_takes(capsys):
    from scripts.evaluation.study import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "eval/study/results/" in text and "eval/study/" in text
    assert "9-10 hours on 2 CPU cores" in text and "--reduced --jobs 2 takes about 16 min" in text


@pytest.mark.parametrize("tool", [t for t in TOOLS if t.startswith("scripts.evaluation.")])
@pytest.mark.parametrize("value", ["[1, 2]", "{fold: 0}"])
def test_override_must_be_a_json_object(tool, value, capsys):
    """The evaluation commands share one ``--override`` (scripts/evaluation/cli.py): what is not a JSON object is a
    usage error naming the option and the value, before anything runs."""
    module = importlib.import_module(tool)
    with pytest.raises(SystemExit) as done:
        module.build_parser().parse_args(["--override", value])
    assert done.value.code == 2
    text = capsys.readouterr().err
    assert "--override" in text and value in text
