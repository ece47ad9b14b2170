"""The named synthetic cohorts (issue 38): three kinds of data, never mixed.

- **Tuning cohorts** (role ``tuning``): every choice is made on them. ``robustness``: seed 7, 32 subjects, preterm
  fraction 0.22 (the robustness baseline, ``python -m scripts.evaluation.robustness --cohort-seed 7``);
  ``tuning``: seed 38, 64 subjects, preterm fraction 0.5 (26 preterm), for evidence and map choices.
- **The evaluation cohort** (role ``evaluation``): seed 3801, 96 subjects, preterm fraction 0.45 (42 preterm),
  every subject in the datalist's ``test`` split and the datalist marked ``"role": "evaluation"``. It is read only to
  report (``python -m scripts.evaluation.cohort_metrics``); the tuning commands refuse it before opening any of its
  files (``scripts.runtime.datalist.load_split(..., tuning=True)``).
- The test split of the default cohort (``data/synthetic``, seed 0) keeps its role: the held-out split of training.

    python -m scripts.data.cohorts --cohort evaluation         # -> data/cohorts/evaluation/datalist.json
    python -m scripts.data.cohorts --cohort tuning --output /tmp/tuning
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from scripts import BUNDLE_ROOT
from scripts.data.synthetic import generate_cohort
from scripts.runtime.errors import report_input_errors

__all__ = ["COHORTS", "EVALUATION", "ROBUSTNESS", "ROLES", "TUNING", "Cohort", "build_parser", "default_output",
           "describe", "generate", "main"]

ROLES = ("tuning", "evaluation")


@dataclass(frozen=True)
class Cohort:
    """A synthetic cohort by its generator settings and its role: ``tuning`` (choices are made on it) or
    ``evaluation`` (read only to report). ``folds`` and ``test_fraction``: the splits of a tuning cohort's datalist
    (an evaluation cohort has every subject in ``test``)."""

    name: str
    seed: int
    subjects: int
    preterm_fraction: float
    role: str
    folds: int = 10
    test_fraction: float = 0.1

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"cohort {self.name}: role must be one of {ROLES}, got {self.role!r}")
        if self.seed == 0:
            raise ValueError(f"cohort {self.name}: seed 0 is the default cohort (data/synthetic), not a named one")


# the robustness baseline: the splits are those scripts.evaluation.robustness has always drawn (it reads them all)
ROBUSTNESS = Cohort("robustness", seed=7, subjects=32, preterm_fraction=0.22, role="tuning", folds=2,
                    test_fraction=0.25)
TUNING = Cohort("tuning", seed=38, subjects=64, preterm_fraction=0.5, role="tuning")
EVALUATION = Cohort("evaluation", seed=3801, subjects=96, preterm_fraction=0.45, role="evaluation")
COHORTS = {c.name: c for c in (ROBUSTNESS, TUNING, EVALUATION)}


def default_output(cohort: Cohort) -> Path:
    """``data/cohorts/<name>`` in the bundle folder (``data/`` is not tracked)."""
    return BUNDLE_ROOT / "data" / "cohorts" / cohort.name


def generate(cohort: Cohort, output: str | os.PathLike | None = None, workers: int | None = None) -> Path:
    """Write ``cohort`` into ``output`` (default ``default_output``) and return its ``datalist.json``; a folder that
    already holds this cohort's datalist (same seed, role and number of subjects) is reused as it is, one holding
    another datalist is an error (cohorts are never mixed in one folder)."""
    out = Path(output) if output is not None else default_output(cohort)
    path = out / "datalist.json"
    if path.is_file():
        data = json.loads(path.read_text())
        found = (data.get("seed"), data.get("role"), len(data.get("training") or []) + len(data.get("test") or []))
        if found == (cohort.seed, cohort.role, cohort.subjects):
            return path
        raise ValueError(f"{path} holds another cohort (seed, role, subjects = {found}), not {cohort.name} "
                         f"({cohort.seed}, {cohort.role}, {cohort.subjects}); choose another --output or delete it")
    return Path(generate_cohort(out, subjects=cohort.subjects, seed=cohort.seed,
                                preterm_fraction=cohort.preterm_fraction, workers=workers,
                                test_fraction=cohort.test_fraction, folds=cohort.folds, role=cohort.role))


def describe(data: dict) -> str:
    """What a datalist (its JSON) is, in words: the named cohort it matches, its role and seed."""
    role = data.get("role")
    count = len(data.get("training") or []) + len(data.get("test") or [])
    named = next((c for c in COHORTS.values()
                  if (c.seed, c.role, c.subjects) == (data.get("seed"), role, count)), None)
    if named is not None:
        return (f"the {named.name} cohort (role {named.role}; seed {named.seed}, {named.subjects} subjects, preterm "
                f"fraction {named.preterm_fraction:g})")
    seed = f", seed {data['seed']}" if "seed" in data else ""
    return f"not a named cohort (role {role or 'none'}{seed}, {count} subjects)"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.data.cohorts`` (every option's help states its default)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.data.cohorts", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", required=True, choices=sorted(COHORTS),
                    help="which named cohort: " + "; ".join(
                        f"{c.name}: seed {c.seed}, {c.subjects} subjects, preterm fraction {c.preterm_fraction:g}, "
                        f"role {c.role}" for c in COHORTS.values()) + " (required)")
    ap.add_argument("--output", default=None,
                    help="folder to write it into (default: data/cohorts/<cohort> in the bundle folder)")
    ap.add_argument("--workers", type=int, default=None,
                    help="generator processes (default: one per CPU core, at most one per subject)")
    return ap


@report_input_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    print(generate(COHORTS[args.cohort], args.output, args.workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
