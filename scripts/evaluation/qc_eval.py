"""How well input QC tells registered neonatal T2w brains from what is not: corrupted variants of the test
subjects (voxel array changed, header unchanged) and the test subjects themselves, through ``run inference``
with ``qc=flag``, and the time QC adds to inference.

    python -m scripts.evaluation.qc_eval --output docs/results          # default cohort and models/model.pt
    python -m scripts.evaluation.qc_eval --ckpt_dir /tmp/m --override '{"spatial_shape": [64, 48, 48]}' ...

Writes ``qc.csv`` (one row per input: corruption, subject, QC scores, verdict, failed measures) and ``qc.md``
(false alarms on the test split, detection rate per corruption, the measures that caught each, added time).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts.data.synthetic import generate_cohort
from scripts.evaluation.cli import add_model_options, add_output_option
from scripts.evaluation.cross_validation import run_bundle_workflow
from scripts.evaluation.tables import markdown_table
from scripts.runtime.datalist import ensure_datalist, load_split
from scripts.runtime.errors import report_input_errors
from scripts.runtime.outputs import atomic_write_text, subject_name, write_csv
from scripts.runtime.qc import QCHandler
from scripts.runtime.reference import MEASURES

logger = logging.getLogger(__name__)


def _axis(affine: np.ndarray, codes: str) -> int:
    """The array axis that runs along one of ``codes`` (e.g. "AP": front to back)."""
    return next(i for i, c in enumerate(nib.aff2axcodes(affine)) if c in codes)


def _noise(data, affine, rng):
    brain = data[data > 0]
    return rng.normal(brain.mean(), brain.std(), data.shape).clip(min=0).astype(np.float32)


def _constant(data, affine, rng):
    return np.full(data.shape, data[data > 0].mean(), dtype=np.float32)


def _rotated(data, affine, rng):
    axes = (_axis(affine, "AP"), _axis(affine, "SI"))  # 90 degrees in the sagittal plane
    rotated = np.rot90(data, k=1, axes=axes)
    out = np.zeros_like(data)  # same array shape and header: the rotated volume centred in it
    src = [slice(max(0, (r - d) // 2), max(0, (r - d) // 2) + min(r, d)) for r, d in zip(rotated.shape, data.shape)]
    dst = [slice(max(0, (d - r) // 2), max(0, (d - r) // 2) + min(r, d)) for r, d in zip(rotated.shape, data.shape)]
    out[tuple(dst)] = rotated[tuple(src)]
    return out


def _flipped(data, affine, rng):
    return np.flip(data, axis=_axis(affine, "AP")).copy()


def _inverted(data, affine, rng):
    brain = data > 0
    out = np.zeros_like(data)
    out[brain] = data[brain].max() + data[brain].min() - data[brain]
    return out


def _shifted(data, affine, rng, mm: float = 20.0):
    axis = _axis(affine, "AP")
    steps = int(round(mm / float(np.linalg.norm(affine[:3, axis]))))
    out = np.zeros_like(data)
    index = [slice(None)] * 3
    index[axis] = slice(steps, None)
    source = [slice(None)] * 3
    source[axis] = slice(None, -steps)
    out[tuple(index)] = data[tuple(source)]
    return out


def _resolution(data, affine, rng):
    return ndimage.zoom(data, 2, order=1).astype(np.float32)  # 0.5 mm voxels, the header still says 1 mm


CORRUPTIONS = {"noise": _noise, "constant": _constant, "rotated_90": _rotated, "flipped_ap": _flipped,
               "inverted": _inverted, "shifted_20mm": _shifted, "upsampled_2x": _resolution}


def write_variants(items: list[dict], folder: Path, corruptions=tuple(CORRUPTIONS), seed: int = 0) -> list[dict]:
    """Every item as it is and in each corruption, as NIfTIs in ``folder`` with the original header; returns one
    record (image, subject, source subject, corruption) per file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for item in items:
        image = nib.load(item["image"])
        data = np.asarray(image.dataobj, dtype=np.float32)
        source = subject_name(item["image"])
        for name in ("none", *corruptions):
            array = data if name == "none" else CORRUPTIONS[name](data, image.affine, rng)
            out = folder / f"{source}__{name}.nii.gz"
            nib.save(nib.Nifti1Image(array, image.affine, image.header), str(out))
            records.append({"image": str(out), "subject": subject_name(out), "source": source, "corruption": name})
    return records


def evaluate(args) -> tuple[list[dict], dict]:
    # QC of what reaches the network unrepaired: the preprocessing's registration (preprocess=auto) would put
    # the shifted and some rotated scans right before QC sees them (tests/test_native.py)
    common = {"preprocess": "off", **args.override, "device": "$torch.device('cpu')", "skip_bad": True}
    if args.ckpt_dir:
        common["ckpt_dir"] = str(args.ckpt_dir)
    default = str(Path("data") / "synthetic")
    datalist = ensure_datalist(common.get("datalist"), common.get("dataset_dir", default), synthetic_dir=default,
                               generator=generate_cohort)
    items = load_split(datalist, "test", -1, tuning=True)[: args.subjects or None]
    work = Path(args.work_dir)
    records = write_variants(items, work / "inputs")
    timing = {}
    for policy in ("off", "flag"):
        out = work / f"out_{policy}"
        start = time.perf_counter()
        workflow = run_bundle_workflow(["inference.json"], "inference", {
            **common, "dataset_dir": str(work / "inputs"), "datalist": str(work / "inputs" / "datalist.json"),
            "output_dir": str(out), "qc": policy, "resume": False, "lrp_presets": ["a2b1"], "save_input": False})
        timing[policy] = time.perf_counter() - start
        qc = next((h for h in workflow.parser.get_parsed_content("handlers") if isinstance(h, QCHandler)), None)
        if policy == "flag" and qc is not None:
            timing["qc_seconds"], timing["qc_count"] = qc.seconds, qc.count
    rows = {r["subject"]: r for r in csv.DictReader((work / "out_flag" / "predictions.csv").open())}
    results = []
    for record in records:
        row = rows.get(record["subject"])
        if row is None:  # refused by the input checks before QC (skipped.csv)
            results.append({**record, "qc_pass": "refused by the input checks", "qc_failed": "check_image"})
            continue
        results.append({**record, "qc_pass": row["qc_pass"], "qc_failed": row["qc_failed"],
                        "prob_preterm": row["prob_preterm"], **{f"qc_{m}": row[f"qc_{m}"] for m in MEASURES}})
    timing["subjects"] = len(records)
    return results, timing


def summary(results: list[dict]) -> list[dict]:
    out = []
    for name in ("none", *CORRUPTIONS):
        mine = [r for r in results if r["corruption"] == name]
        caught = [r for r in mine if r["qc_pass"] != "true"]
        by = {}
        for r in caught:
            for m in r["qc_failed"].split(";"):
                by[m] = by.get(m, 0) + 1
        out.append({"input": "test subject as generated" if name == "none" else name, "n": len(mine),
                    "flagged": len(caught), "rate": len(caught) / max(len(mine), 1),
                    "caught_by": ", ".join(f"{m} {n}" for m, n in sorted(by.items(), key=lambda kv: -kv[1]))})
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.evaluation.qc_eval`` (every option's help states its default)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluation.qc_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_option(parser, "docs/results", "qc.csv and qc.md")
    parser.add_argument("--work_dir", default="runs/qc_eval",
                        help="corrupted inputs and inference outputs (default: %(default)s, from the current folder)")
    add_model_options(parser, weights="ckpt_dir", config_file=False,
                      override_help="JSON object of inference.json overrides (default: {}, none)")
    parser.add_argument("--subjects", type=int, default=0,
                        help="test subjects to use (default: %(default)s = all)")
    return parser


@report_input_errors
def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    results, timing = evaluate(args)
    output = Path(args.output)
    write_csv(results, output / "qc.csv", ["corruption", "source", "subject", "qc_pass", "qc_failed",
                                           "prob_preterm", *(f"qc_{m}" for m in MEASURES)])
    table = summary(results)
    per_subject = timing["qc_seconds"] / max(timing["qc_count"], 1)
    inference = timing["off"] / max(timing["subjects"], 1)
    text = ["# Input quality control: false alarms and detections", "",
            f"Command: `python -m scripts.evaluation.qc_eval {' '.join(sys.argv[1:] if argv is None else argv)}`",
            "", "Each test subject as generated and in each corruption (voxel array changed, header unchanged), "
            "through `run inference` with `qc=flag`:", "",
            markdown_table(table, ["input", "n", "flagged", "rate", "caught_by"]),
            f"QC took {per_subject:.3f} s per subject inside the inference run (its measures; the features come "
            f"from the evaluator's own forward pass), {100 * per_subject / inference:.1f} % of the "
            f"{inference:.2f} s per input of the same inference without QC (preset a2b1, {timing['subjects']} "
            f"inputs; whole runs: {timing['flag']:.1f} s with QC, {timing['off']:.1f} s without, one run each).", ""]
    atomic_write_text("\n".join(text), output / "qc.md")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
