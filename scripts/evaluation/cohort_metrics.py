"""Classification metrics of one or more weights on one cohort, with bootstrap intervals and paired comparisons.

    python -m scripts.evaluation.cohort_metrics --datalist data/cohorts/evaluation/datalist.json --split all \\
        --weights shipped=models/model.pt --output docs/results --name evaluation_cohort

Each weights file goes through the deployed path (``preprocessing`` and ``network_def`` of
``configs/inference.json``, ``Measurer`` of ``scripts.evaluation.robustness``, on the CPU; the registration template
and QC reference beside the weights file are the ones used) on every subject of the split. Per weights: accuracy, ROC
AUC, sensitivity (TPR, preterm = positive) and specificity (TNR), each with a percentile-bootstrap 95 % interval over
the subjects (resamples stratified by class, fixed seed; ``scripts/evaluation/bootstrap.py``); and against the
reference weights (``--reference``, default the first ``--weights``) the paired difference of accuracy and of AUC
(the same resampled subjects for both) with its 95 % interval and a non-inferiority verdict: the lower bound is at
least ``-margin``.

This command only measures, so it may read the evaluation cohort (``scripts/data/cohorts.py``); its report names
the cohort and role it read. Nothing may be chosen from its numbers on the evaluation cohort.

Writes ``<output>/<name>.csv`` (subject, label, p(preterm) per weights) and ``<output>/<name>.md`` (the command, the
cohort, each weights file with its sha256, the tables).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
from pathlib import Path

from scripts import BUNDLE_ROOT
from scripts.data.cohorts import describe
from scripts.evaluation import bootstrap
from scripts.evaluation.cli import add_model_options, add_output_option
from scripts.evaluation.robustness import Measurer
from scripts.evaluation.tables import fmt_ci, markdown_table
from scripts.runtime.datalist import load_split
from scripts.runtime.errors import report_input_errors
from scripts.runtime.outputs import atomic_write_text, file_sha256, write_csv
from scripts.runtime.progress import progress

__all__ = ["build_parser", "main", "measure", "parse_weights", "report", "summarise"]

logger = logging.getLogger(__name__)
NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
METRIC_NAMES = {"accuracy": "accuracy", "auc": "ROC AUC", "sensitivity": "sensitivity (TPR)",
                "specificity": "specificity (TNR)"}
COMPARED = ("accuracy", "auc")  # the paired differences against the reference


def parse_weights(specs: list[str]) -> dict[str, Path]:
    """{name: weights file} of the ``--weights NAME=PATH`` options, in order; errors name the option."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not NAME.match(name) or not path:
            raise ValueError(f"--weights takes NAME=PATH (NAME: letters, digits, '_', '.', '-'), got {spec!r}")
        if name in out:
            raise ValueError(f"--weights {spec}: the name {name} is given twice; name each weights file once")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--weights {spec}: weights file {path} not found")
        out[name] = Path(path)
    return out


def _shown(path: Path) -> str:
    path = path.resolve()
    return (path.relative_to(BUNDLE_ROOT) if path.is_relative_to(BUNDLE_ROOT) else path).as_posix()


def measure(items: list[dict], weights: dict[str, Path], overrides: dict | None = None,
            config: str | Path = BUNDLE_ROOT / "configs" / "inference.json") -> list[dict]:
    """One row per subject: subject, label and ``p_<name>`` (p(preterm)) per weights. Weights in the same folder
    share the preprocessing (same template and QC reference), so each subject is preprocessed once per folder."""
    measurers = {name: Measurer(path.parent, overrides, config, ckpt=path) for name, path in weights.items()}
    rows = []
    for item in progress(items, len(items), "cohort metrics", "subject"):
        inputs: dict[Path, object] = {}
        row = {"subject": item["subject"], "label": int(item["label"])}
        for name, measurer in measurers.items():
            folder = weights[name].parent.resolve()
            if folder not in inputs:
                inputs[folder] = measurer.input(item["image"])
            row[f"p_{name}"] = measurer.probability(inputs[folder])
        rows.append(row)
    return rows


def summarise(rows: list[dict], names: list[str], reference: str, margin: float, resamples: int,
              seed: int) -> tuple[list[dict], list[dict]]:
    """(one row per weights: each metric with its interval; one row per other weights: the paired differences to
    ``reference`` with their intervals and verdicts), from one matrix of stratified resamples."""
    labels = [r["label"] for r in rows]
    indices = bootstrap.stratified_resamples(labels, resamples, seed)
    probs = {name: [r[f"p_{name}"] for r in rows] for name in names}
    metrics, comparisons = [], []
    for name in names:
        row = {"weights": name}
        for metric in METRIC_NAMES:
            found = bootstrap.interval(metric, labels, probs[name], indices)
            row[metric] = found["estimate"]
            row[f"{metric}_low"], row[f"{metric}_high"] = found["low"], found["high"]
        metrics.append(row)
        if name == reference:
            continue
        row = {"weights": name, "reference": reference}
        for metric in COMPARED:
            found = bootstrap.paired_difference(metric, labels, probs[name], probs[reference], indices)
            row[f"{metric}_difference"] = found["difference"]
            row[f"{metric}_low"], row[f"{metric}_high"] = found["low"], found["high"]
            row[f"{metric}_non_inferior"] = bootstrap.non_inferior(found["low"], margin)
        comparisons.append(row)
    return metrics, comparisons


def report(rows: list[dict], metrics: list[dict], comparisons: list[dict], *, name: str, command: str, cohort: str,
           weights: dict[str, Path], reference: str, margin: float, resamples: int, seed: int) -> str:
    """The markdown report ``<name>.md``."""
    preterm = sum(r["label"] for r in rows)
    table = [{"weights": m["weights"], **{k: fmt_ci(m[k], m[f"{k}_low"], m[f"{k}_high"], 3) for k in METRIC_NAMES}}
             for m in metrics]
    files = [{"weights": name, "file": f"`{_shown(path)}`", "sha256": f"`{file_sha256(path)}`"}
             for name, path in weights.items()]
    lines = [
        "# Classification metrics on one cohort", "",
        f"Command: `{command}`", "",
        f"Cohort: {cohort}; {len(rows)} subjects ({preterm} preterm, {len(rows) - preterm} term).", "",
        markdown_table(files, ["weights", "file", "sha256"]),
        "Each weights file through the deployed path (`preprocessing` and `network_def` of `configs/inference.json`, "
        "on the CPU); preterm is the positive class, a subject is called preterm when p(preterm) > 0.5. In brackets: "
        f"percentile-bootstrap 95 % intervals over {resamples} resamples of the subjects, stratified by class "
        f"(seed {seed}).", "",
        markdown_table(table, ["weights", *METRIC_NAMES], ["weights", *METRIC_NAMES.values()]),
    ]
    if comparisons:
        paired = [{"weights": c["weights"], **{
            f"{k}_difference": fmt_ci(c[f"{k}_difference"], c[f"{k}_low"], c[f"{k}_high"], 3) for k in COMPARED},
            **{f"{k}_verdict": "yes" if c[f"{k}_non_inferior"] else "no" for k in COMPARED}} for c in comparisons]
        lines += [
            f"Paired differences against `{reference}` (weights minus reference, on the same resampled subjects for "
            f"both; 95 % percentile interval). Non-inferior: the interval's lower bound is at least -{margin:g}.", "",
            markdown_table(paired, ["weights", "accuracy_difference", "accuracy_verdict", "auc_difference",
                                    "auc_verdict"],
                           ["weights", "accuracy difference", f"non-inferior (margin {margin:g})", "AUC difference",
                            f"non-inferior (margin {margin:g})"]),
        ]
    lines += [f"Per-subject p(preterm): `{name}.csv`.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.evaluation.cohort_metrics`` (every option's help states its
    default)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.evaluation.cohort_metrics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datalist", required=True, help="MONAI datalist JSON with labels (required)")
    ap.add_argument("--split", choices=("all", "test"), default="test",
                    help="subjects to measure: test, or all (training + test; the evaluation cohort has every "
                         "subject in test) (default: %(default)s)")
    ap.add_argument("--weights", action="append", required=True, metavar="NAME=PATH",
                    help="a weights file (model.pt) and its name in the tables, repeated per weights (required)")
    ap.add_argument("--name", required=True, help="file name of the outputs, <output>/<name>.md and .csv (required)")
    ap.add_argument("--reference", default=None,
                    help="the weights NAME the others are compared with (default: the first --weights)")
    ap.add_argument("--margin", type=float, default=0.02,
                    help="non-inferiority margin of the paired differences (default: %(default)s)")
    ap.add_argument("--resamples", type=int, default=bootstrap.RESAMPLES,
                    help="bootstrap resamples (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default: %(default)s)")
    add_model_options(ap, weights=None,
                      override_help="JSON object of inference.json overrides, e.g. '{\"preprocess\": \"off\"}' "
                                    "(default: {}, none)")
    add_output_option(ap, BUNDLE_ROOT / "docs" / "results", "<name>.md and <name>.csv")
    return ap


@report_input_errors
def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not NAME.match(args.name):
        ap.error(f"--name must be a plain file name (letters, digits, '_', '.', '-'), got {args.name!r}")
    if args.resamples < 1 or args.margin < 0:
        ap.error("--resamples must be >= 1 and --margin >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    weights = parse_weights(args.weights)
    reference = args.reference or next(iter(weights))
    if reference not in weights:
        raise ValueError(f"--reference {reference} is none of the --weights names ({', '.join(weights)})")
    # this command only measures: the evaluation cohort is allowed (tuning=False); the report says which cohort
    items = load_split(args.datalist, args.split, -1)
    data = json.loads(Path(args.datalist).read_text())
    cohort = f"{describe(data)}; datalist `{_shown(Path(args.datalist))}`, split `{args.split}`"
    if data.get("role") == "evaluation":
        cohort += "; the evaluation cohort is read only to report: nothing may be chosen from these numbers"
    rows = measure(items, weights, args.override, args.config_file)
    metrics, comparisons = summarise(rows, list(weights), reference, args.margin, args.resamples, args.seed)
    given = sys.argv[1:] if argv is None else list(argv)  # a path inside the bundle is shown relative to it
    command = shlex.join(["python", "-m", "scripts.evaluation.cohort_metrics",
                          *(_shown(Path(a)) if Path(a).is_absolute() else a for a in given)])
    text = report(rows, metrics, comparisons, name=args.name, command=command, cohort=cohort, weights=weights,
                  reference=reference, margin=args.margin, resamples=args.resamples, seed=args.seed)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    write_csv(rows, output / f"{args.name}.csv", ["subject", "label", *(f"p_{name}" for name in weights)])
    atomic_write_text(text, output / f"{args.name}.md")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
