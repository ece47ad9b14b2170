"""The corruption battery of input QC (issue 39): for each corruption at each strength, how far it moves p(preterm)
and how often QC flags it, with every QC score and every image-quality measure of the corrupted scan.

    python -m scripts.evaluation.qc_battery --datalist "$(python -m scripts.data.cohorts --cohort robustness)" \\
        --output docs/experiments/qc_battery
    python -m scripts.evaluation.qc_battery --datalist ... --subjects 2 --corruptions noise ghost --strengths 1

Each subject's scan (a tuning cohort's: the command refuses the evaluation cohort, ``load_split(..., tuning=True)``)
is corrupted as a scanner or a pipeline might (``CORRUPTIONS``, each at its strengths, weakest first) and read
through the deployed path (``scripts.evaluation.robustness.Measurer``: inference.json's preprocessing, ``preprocess``
as configured, the weights and the QC reference beside them). Per scan: p(preterm) as given and corrupted, |delta p|,
a decision flip (p on the other side of 0.5, counted where the clean scan's p is more than ``CONFIDENT``, 0.1, from
it, as in scripts/evaluation/robustness.py: a subject at 0.49 changes side under any change), the QC verdict and
every QC score (``qc_<measure>``) and the image-quality measures of the corrupted scan before any normalisation
(``iqm_<measure>``, scripts/runtime/iqm.py; ``--no-iqm`` leaves them out, about 6 s per scan). The clean scan is
measured too (corruption ``none``).

Writes ``battery.csv`` (one row per subject, corruption and strength; rewritten after every subject, so a killed run
resumes where it stopped: rows already there are kept and not measured again) and ``battery.md`` (per corruption
and strength: n, median and max |delta p|, flips, share flagged by QC, and whether it meets issue 39's goal:
a strength whose median |delta p| exceeds ``MOVES`` is flagged in at least ``FLAGGED`` of its scans, and no flip
passes unflagged). The thresholds that meet the goals are chosen from this table in the next stage of issue 39.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts import BUNDLE_ROOT
from scripts.evaluation.cli import add_model_options, add_output_option
from scripts.evaluation.robustness import CONFIDENT, Measurer
from scripts.evaluation.tables import markdown_table
from scripts.runtime import iqm
from scripts.runtime.datalist import load_split
from scripts.runtime.errors import report_input_errors
from scripts.runtime.outputs import CrashSafeTable, atomic_write_text, save_nifti, subject_name
from scripts.runtime.qc import evaluate_input
from scripts.runtime.reference import MEASURES

__all__ = ["CORRUPTIONS", "FLAGGED", "MOVES", "corrupt", "flipped", "measure_subject", "summary"]

logger = logging.getLogger(__name__)

MOVES = 0.1  # issue 39: a corruption strength whose median |delta p| exceeds this must be flagged ...
FLAGGED = 0.9  # ... in at least this share of its scans


def _brain(data: np.ndarray) -> np.ndarray:
    return data > 0


def _noise(data, affine, strength, rng):
    """Rician noise of sigma = ``strength`` x the mean brain intensity, in the brain (the scan stays stripped)."""
    brain = _brain(data)
    sigma = strength * float(data[brain].mean())
    noisy = np.sqrt((data + rng.normal(0.0, sigma, data.shape)) ** 2 + rng.normal(0.0, sigma, data.shape) ** 2)
    return np.where(brain, noisy, 0.0), affine


def _bias(data, affine, strength, rng):
    """A multiplicative bias field: a linear log-ramp in a random direction, exp(-a) at one end of the field of view
    and exp(+a) at the other (a = ``strength``)."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in data.shape], indexing="ij")
    ramp = sum(d * g for d, g in zip(direction, grid, strict=True)) / np.abs(direction).sum()
    return data * np.exp(strength * ramp), affine


def _blur(data, affine, strength, rng):
    """Gaussian blur of sigma ``strength`` mm, skull-stripped again."""
    spacing = nib.affines.voxel_sizes(affine)
    blurred = ndimage.gaussian_filter(data, sigma=[strength / s for s in spacing], mode="constant")
    return np.where(_brain(data), blurred, 0.0), affine


def _phase_axis(data: np.ndarray) -> int:
    return int(np.argsort(data.shape)[1])  # the middle-sized axis (A-P on the 128x96x96 template grid)


def _ghost(data, affine, strength, rng):
    """N/2 ghosting (odd and even k-space lines that disagree, as with EPI or a phase error): every other line along
    the phase axis scaled by 1 - 2g (g = ``strength``), so the magnitude image holds the scan at 1 - g and a replica
    shifted by half the field of view at g; skull-stripped again (the replica inside the brain stays)."""
    axis = _phase_axis(data)
    k = np.fft.fftn(data)
    odd = [slice(None)] * 3
    odd[axis] = slice(1, None, 2)
    k[tuple(odd)] *= 1.0 - 2.0 * strength
    return np.where(_brain(data), np.abs(np.fft.ifftn(k)), 0.0), affine


def _motion(data, affine, strength, rng):
    """Motion during the acquisition: the k-space lines along the phase axis after a random 60-80 % of the scan are
    those of the brain translated by ``strength`` mm in a random direction (a shift is a phase ramp in k-space);
    magnitude, skull-stripped again."""
    axis = _phase_axis(data)
    spacing = nib.affines.voxel_sizes(affine)
    direction = rng.normal(size=3)
    shift = strength * direction / np.linalg.norm(direction) / spacing  # voxels
    k = np.fft.fftn(data)
    frequencies = np.meshgrid(*[np.fft.fftfreq(n) for n in data.shape], indexing="ij")
    moved = k * np.exp(-2j * np.pi * sum(f * s for f, s in zip(frequencies, shift, strict=True)))
    order = np.argsort(np.abs(np.fft.fftfreq(data.shape[axis])))  # centre of k-space first, as acquired centre-out
    later = order[int(rng.uniform(0.6, 0.8) * len(order)):]
    index = [slice(None)] * 3
    index[axis] = later
    k[tuple(index)] = moved[tuple(index)]
    return np.where(_brain(data), np.abs(np.fft.ifftn(k)), 0.0), affine


def _zoom(data, affine, strength, rng):
    """The brain scaled by ``strength`` about the field of view's centre on the same grid and header (a smaller or
    larger baby's brain, or a wrong voxel size once resampled)."""
    centre = (np.asarray(data.shape) - 1) / 2.0
    matrix = np.eye(3) / strength
    zoomed = ndimage.affine_transform(data, matrix, offset=centre - matrix @ centre, order=1, mode="constant")
    small = data[_brain(data)].min() * 0.5
    return np.where(zoomed > small, zoomed, 0.0), affine


def _partial_fov(data, affine, strength, rng):
    """Partial field of view: the top ``strength`` of the brain's extent along the slice axis (the first axis of the
    grid) cut off."""
    axis = 0
    extent = np.flatnonzero(_brain(data).any(axis=tuple(a for a in range(3) if a != axis)))
    cut = int(round(extent[-1] - strength * (extent[-1] - extent[0] + 1))) + 1
    out = data.copy()
    index = [slice(None)] * 3
    index[axis] = slice(cut, None)
    out[tuple(index)] = 0.0
    return out, affine


# name -> (what it is, strengths weakest first, function(data, affine, strength, rng) -> (data, affine))
CORRUPTIONS: dict[str, tuple[str, tuple[float, ...], Callable]] = {
    "noise": ("Rician noise, sigma = strength x mean brain intensity", (0.02, 0.05, 0.1, 0.2), _noise),
    "bias": ("bias field, log-ramp +-strength across the field of view", (0.1, 0.2, 0.4, 0.8), _bias),
    "blur": ("Gaussian blur, sigma = strength mm", (0.5, 1.0, 2.0, 3.0), _blur),
    "ghost": ("N/2 ghost (k-space), replica at strength x the intensity", (0.05, 0.1, 0.2, 0.4), _ghost),
    "motion": ("k-space motion: late lines of the brain moved by strength mm", (1.0, 2.0, 4.0, 8.0), _motion),
    "zoom": ("brain scaled by strength on the same grid", (1.1, 0.9, 1.2, 0.8), _zoom),
    "partial_fov": ("top strength of the brain cut off (slice axis)", (0.1, 0.2, 0.3), _partial_fov),
}


def corrupt(name: str, strength: float, data: np.ndarray, affine: np.ndarray, rng: np.random.Generator):
    """(array, affine) of ``data`` under corruption ``name`` (a key of ``CORRUPTIONS``) at ``strength``."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: one of {', '.join(CORRUPTIONS)}")
    out, affine = CORRUPTIONS[name][2](np.asarray(data, dtype=np.float64), np.asarray(affine, dtype=float),
                                       float(strength), rng)
    return np.asarray(out, dtype=np.float32), affine


IQMS = tuple(m for m in iqm.MEASURES)
COLUMNS = ["subject", "label", "corruption", "strength", "prob_before", "prob_after", "abs_delta", "flip", "qc_pass",
           "qc_failed", *(f"qc_{m}" for m in MEASURES), *(f"iqm_{m}" for m in IQMS), "iqm_error"]


def _measure(measurer: Measurer, path: Path, with_iqm: bool) -> dict:
    """p(preterm), QC verdict and scores, and the image-quality measures of one scan."""
    image = measurer.input(path)
    prob = measurer.probability(image)
    verdict = evaluate_input(measurer.qc, measurer.network, image) if measurer.qc is not None else None
    row = {"prob_after": prob, "qc_pass": "" if verdict is None else str(verdict["pass"]).lower(),
           "qc_failed": "" if verdict is None else ";".join(verdict["failed"]),
           **{f"qc_{m}": f"{verdict['scores'][m]:.6g}" if verdict and m in verdict["scores"] else "" for m in MEASURES}}
    if with_iqm:
        try:
            values = iqm.measure_file(path)
            row.update({f"iqm_{m}": f"{values[m]:.6g}" for m in IQMS})
        except ValueError as err:  # a scan the measures cannot read (e.g. a class too small): said, not fatal
            row["iqm_error"] = str(err)
    return row


def measure_subject(item: dict, index: int, measurer: Measurer, work: Path, grid: list[tuple[str, float]],
                    with_iqm: bool = True, seed: int = 0) -> list[dict]:
    """The battery's rows of one subject: the clean scan (``none``) and each (corruption, strength) of ``grid``; each
    corrupted scan is written under ``work/inputs`` while it is measured. Each corruption and strength draws from its
    own random stream, so a row does not depend on which others are measured."""
    image = nib.load(item["image"])
    data = np.asarray(image.dataobj, dtype=np.float32)
    subject = item.get("subject") or subject_name(item["image"])
    clean = _measure(measurer, Path(item["image"]), with_iqm)
    base = {"subject": subject, "label": item.get("label", ""), "prob_before": clean["prob_after"]}
    rows = [{**base, **clean, "corruption": "none", "strength": 0, "abs_delta": 0.0, "flip": False}]
    for name, strength in grid:
        rng = np.random.default_rng([seed, index, zlib.crc32(f"{name}:{strength:g}".encode())])
        array, affine = corrupt(name, strength, data, image.affine, rng)
        path = save_nifti(array, affine, work / "inputs" / f"{name}_{strength:g}__{subject}.nii.gz")
        after = _measure(measurer, path, with_iqm)
        rows.append({**base, **after, "corruption": name, "strength": f"{strength:g}",
                     "abs_delta": abs(after["prob_after"] - clean["prob_after"]),
                     "flip": flipped(clean["prob_after"], after["prob_after"])})
        path.unlink()  # the inputs are rewritten from the seed on a rerun; only the table is kept
    return rows


def flipped(before: float, after: float) -> bool:
    """A decision flip: p on the other side of 0.5, for a clean scan more than ``CONFIDENT`` from it."""
    return abs(float(before) - 0.5) > CONFIDENT and (float(before) > 0.5) != (float(after) > 0.5)


def summary(rows: list[dict]) -> list[dict]:
    """Per corruption and strength (the table's order): n, median and max |delta p|, flips, flips QC missed, share
    flagged, and whether the strength meets the goals (``MOVES``, ``FLAGGED``; no unflagged flip)."""
    out = []
    keys = list(dict.fromkeys((r["corruption"], str(r["strength"])) for r in rows))
    for name, strength in keys:
        mine = [r for r in rows if r["corruption"] == name and str(r["strength"]) == strength]
        deltas = np.asarray([float(r["abs_delta"]) for r in mine])
        flagged = [r["qc_pass"] == "false" for r in mine]
        flips = [flipped(r["prob_before"], r["prob_after"]) for r in mine]
        missed = sum(f and not g for f, g in zip(flips, flagged, strict=True))
        rate = float(np.mean(flagged)) if mine else 0.0
        moves = float(np.median(deltas)) > MOVES
        meets = (rate >= FLAGGED or not moves) and missed == 0
        out.append({"corruption": name, "strength": strength, "n": len(mine),
                    "median_abs_delta": f"{np.median(deltas):.3f}", "max_abs_delta": f"{deltas.max():.3f}",
                    "flips": sum(flips), "unflagged_flips": missed, "flagged": f"{100 * rate:.0f} %",
                    "goal": "met" if meets else "NOT met"})
    return out


def write_outputs(rows: list[dict], output: Path, command: str, weights: str, subjects: str) -> str:
    table = summary(rows)
    text = "\n".join([
        "# Input QC: the corruption battery", "", f"Command: `{command}`", "", f"Weights: {weights}", "",
        f"Subjects: {subjects}", "",
        f"Goal (issue 39): a strength whose median |delta p| exceeds {MOVES:g} is flagged in at least "
        f"{100 * FLAGGED:.0f} % of its scans, and no decision flip passes unflagged; clean scans (`none`) flagged "
        "in at most 1 of 20.", "",
        markdown_table(table, list(table[0]) if table else ["corruption"]),
        "Corruptions: " + "; ".join(f"`{k}`: {v[0]}" for k, v in CORRUPTIONS.items()) + ".", ""])
    atomic_write_text(text, output / "battery.md")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.evaluation.qc_battery`` (every option's help states its default)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluation.qc_battery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_option(parser, "runs/qc_battery", "battery.csv and battery.md")
    parser.add_argument("--work_dir", default="runs/qc_battery",
                        help="the corrupted scans while they are measured (default: %(default)s, from the current "
                             "folder; each is removed once measured)")
    parser.add_argument("--datalist", required=True,
                        help="a tuning cohort's datalist (python -m scripts.data.cohorts --cohort robustness)")
    parser.add_argument("--split", default="all", help="its split to use (default: %(default)s)")
    parser.add_argument("--subjects", type=int, default=0, help="the first N subjects only (default: 0, all)")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS), choices=list(CORRUPTIONS),
                        help="corruptions to apply (default: all)")
    parser.add_argument("--strengths", type=int, default=0,
                        help="the first N strengths of each corruption only, weakest first (default: 0, all)")
    parser.add_argument("--no-iqm", dest="iqm", action="store_false", help="leave the image-quality measures out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random corruptions (default: %(default)s)")
    add_model_options(parser, weights="ckpt_dir", config_file=False, weights_default=BUNDLE_ROOT / "models",
                      override_help="JSON object of inference.json overrides (default: {}, none)")
    return parser


@report_input_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    items = load_split(args.datalist, args.split, -1, tuning=True)[: args.subjects or None]
    grid = [(name, s) for name in args.corruptions for s in CORRUPTIONS[name][1][: args.strengths or None]]
    output = Path(args.output)
    table = CrashSafeTable(output / "battery.csv", COLUMNS, ("subject", "corruption", "strength"))
    table.load()
    measurer = Measurer(args.ckpt_dir, args.override)
    for index, item in enumerate(items):
        subject = item.get("subject") or subject_name(item["image"])
        missing = [(name, s) for name, s in grid if (subject, name, f"{s:g}") not in table.rows]
        if not missing and (subject, "none", "0") in table.rows:
            logger.info("%s: in %s already", subject, table.path)
            continue
        for row in measure_subject(item, index, measurer, Path(args.work_dir), missing, args.iqm, args.seed):
            table.add({**row, "strength": str(row["strength"])})
        table.save()
        logger.info("%s: %d scans measured", subject, len(missing) + 1)
    for row in table.rows.values():  # the flip rule as this version counts it, also for rows of an earlier run
        row["flip"] = str(flipped(row["prob_before"], row["prob_after"]))
    table.save()
    rows = [table.rows[key] for key in sorted(table.rows)]
    order = {name: i for i, name in enumerate(["none", *CORRUPTIONS])}
    rows.sort(key=lambda r: (order.get(r["corruption"], 99), float(r["strength"] or 0), r["subject"]))
    ckpt = measurer.ckpt.resolve()
    shown = ckpt.relative_to(BUNDLE_ROOT) if ckpt.is_relative_to(BUNDLE_ROOT) else ckpt
    weights = f"`{shown}` (sha256 `{measurer.sha256()[:12]}`)"
    datalist = Path(args.datalist).resolve()
    shown_list = datalist.relative_to(BUNDLE_ROOT) if datalist.is_relative_to(BUNDLE_ROOT) else datalist
    subjects = f"{len(items)} of the {args.split} split of `{shown_list}`"
    given = [str(shown_list) if a == args.datalist else a for a in (sys.argv[1:] if argv is None else argv)]
    command = shlex.join(["python", "-m", "scripts.evaluation.qc_battery", *given])
    print(write_outputs(rows, output, command, weights, subjects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
