"""Build the MONAI datalist of the configs from a dHCP release (or any BIDS-like neonatal T2w cohort).

    python -m scripts.data.dhcp_datalist --root /data/dhcp_rel3 --output /data/dhcp_rel3/datalist_native.json

Finds the tables (release 2: ``combined_rel02.tsv`` with ids without ``sub-``/``ses-``; release 3:
``participants.tsv`` plus per-subject ``sub-*_sessions.tsv``, or ``combined.tsv``), keeps sessions scanned at
term-equivalent age (scan_age >= 37 weeks), one per subject (the latest by default), labels preterm birth
(birth_age < 37 weeks), finds the T2w image (bias-corrected derivative first, else raw), brain mask and drawem9
tissue labels under any of the naming variants of the releases, and writes the datalist with a stratified test
split and folds (``scripts.data.splits``). Every excluded session is listed with its reason in
``<output stem>_exclusions.csv``. The images are native-space scans: run ``python -m scripts.data.preprocess`` next.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib

from scripts.data.splits import assign_splits
from scripts.runtime.errors import report_input_errors
from scripts.runtime.outputs import atomic_write_text, write_csv

__all__ = ["build_datalist", "find_files", "read_sessions"]

logger = logging.getLogger(__name__)
TERM_WEEKS = 37.0
IMAGE_ROOTS = ("derivatives/dhcp_anat_pipeline", "derivatives", "rawdata", "sourcedata", ".")
T2W = ("*_desc-restore_T2w.nii.gz", "*_T2w_restore.nii.gz", "*_T2w.nii.gz")  # preference order
MASKS = ("*_desc-brain_mask.nii.gz", "*_desc-bet_space-T2w_brainmask.nii.gz",
         "*_desc-drawem_space-T2w_brainmask.nii.gz", "*_brainmask_bet.nii.gz", "*_brainmask_drawem.nii.gz")
TISSUES = ("*_desc-drawem9_dseg.nii.gz", "*_desc-drawem9_space-T2w_dseg.nii.gz", "*_drawem_tissue_labels.nii.gz")


def _id(value: str, prefix: str) -> str:
    value = str(value).strip()
    return value if value.startswith(prefix) else prefix + value


def _float(value) -> float:
    try:
        out = float(str(value).strip())
    except ValueError:
        return math.nan
    return out


def _read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"table {path} is empty")
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in rows]


def _require(rows: list[dict], path: Path, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"table {path} lacks the column(s) {missing} (has {sorted(rows[0])})")


def _sex(row: dict) -> str:
    return row.get("sex", row.get("gender", ""))


def read_sessions(root: Path, table: Path | None = None) -> tuple[list[dict], str]:
    """One dict per session: subject, session, birth_age, scan_age, sex, radiology_score (strings kept as
    strings). Returns the sessions and a description of the tables read."""
    root = Path(root)
    if table is None:
        combined = sorted(root.glob("combined*.tsv")) + sorted(root.glob("*/combined*.tsv"))
        table = combined[0] if combined else None
    if table is not None:
        table = Path(table)
        if not table.is_file():
            raise FileNotFoundError(f"table {table} not found")
        rows = _read_tsv(table)
        _require(rows, table, ["participant_id", "session_id", "birth_age", "scan_age"])
        if "sex" not in rows[0] and "gender" not in rows[0]:
            raise ValueError(f"table {table} lacks a 'sex' or 'gender' column")
        return [{"subject": _id(r["participant_id"], "sub-"), "session": _id(r["session_id"], "ses-"),
                 "birth_age": _float(r["birth_age"]), "scan_age": _float(r["scan_age"]), "sex": _sex(r),
                 "radiology_score": r.get("radiology_score", "")} for r in rows], str(table)
    participants = next((p for p in (root / "participants.tsv", root / "rawdata" / "participants.tsv") if p.is_file()),
                        None)
    if participants is None:
        raise FileNotFoundError(f"{root}: no combined*.tsv and no participants.tsv (looked in {root} and "
                                f"{root / 'rawdata'}); pass the table with --table")
    people = _read_tsv(participants)
    _require(people, participants, ["participant_id", "birth_age"])
    sessions = []
    for person in people:
        subject = _id(person["participant_id"], "sub-")
        # the per-subject tables lie beside participants.tsv, or under rawdata/ when it sits at the release root
        places = list(dict.fromkeys([participants.parent, root, root / "rawdata"]))
        found = [t for place in places for t in sorted(place.glob(f"{subject}/{subject}_sessions.tsv"))]
        if not found:
            sessions.append({"subject": subject, "session": "", "birth_age": _float(person["birth_age"]),
                             "scan_age": math.nan, "sex": _sex(person), "radiology_score": "",
                             "error": "no " + " or ".join(str(place / subject / f"{subject}_sessions.tsv")
                                                          for place in places)})
            continue
        rows = _read_tsv(found[0])
        _require(rows, found[0], ["session_id", "scan_age"])
        for r in rows:
            sessions.append({"subject": subject, "session": _id(r["session_id"], "ses-"),
                             "birth_age": _float(person["birth_age"]), "scan_age": _float(r["scan_age"]),
                             "sex": _sex(person), "radiology_score": r.get("radiology_score", "")})
    return sessions, f"{participants} + per-subject sessions.tsv"


def find_files(root: Path, subject: str, session: str) -> dict:
    """T2w image (derivative preferred), brain mask and tissue labels of one session; missing ones are absent."""
    folders = [Path(root) / base / subject / session / "anat" for base in IMAGE_ROOTS]
    found = {}
    for key, patterns in (("image", T2W), ("mask", MASKS), ("tissue", TISSUES)):
        for pattern in patterns:  # pattern order first: the bias-corrected derivative beats the raw scan
            hits = [p for folder in folders if folder.is_dir() for p in sorted(folder.glob(pattern))
                    if not (key == "image" and pattern == "*_T2w.nii.gz" and "desc-" in p.name)]
            if hits:
                found[key] = str(hits[0])
                break
    return found


def _radiology_excluded(score: str, exclude: Sequence[str]) -> bool:
    score = str(score).strip().upper()
    for token in exclude:
        token = str(token).strip().upper()
        if score == token or (token.isalpha() and token in score):
            return True
    return False


def build_datalist(root, output, table=None, min_scan_age: float = TERM_WEEKS, session: str = "latest",
                   exclude_radiology: Sequence[str] = ("Q",), test_fraction: float = 0.1, folds: int = 10,
                   seed: int = 0) -> dict:
    """Write the datalist JSON and the exclusions CSV; return a summary (counts per class, exclusions)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"release root {root} not found")
    if session not in ("latest", "earliest"):
        raise ValueError(f"session must be 'latest' or 'earliest', got {session!r}")
    sessions, source = read_sessions(root, Path(table) if table else None)
    excluded, candidates = [], {}
    for s in sessions:
        reason = s.get("error")
        if reason is None and math.isnan(s["birth_age"]):
            reason = "birth_age missing"
        elif reason is None and math.isnan(s["scan_age"]):
            reason = "scan_age missing"
        elif reason is None and s["scan_age"] < min_scan_age:
            reason = f"scan_age {s['scan_age']:.1f} < {min_scan_age:g} weeks (not term-equivalent)"
        elif reason is None and _radiology_excluded(s["radiology_score"], exclude_radiology):
            reason = f"radiology_score {s['radiology_score']!r} excluded"
        if reason is None:
            files = find_files(root, s["subject"], s["session"])
            if "image" not in files:
                reason = "no T2w image"
            else:
                try:
                    nib.load(files["image"]).header  # noqa: B018 - reads the header: truncated/garbage files fail
                except Exception as err:
                    reason = f"unreadable image {files['image']} ({type(err).__name__}: {err})"
        if reason is not None:
            excluded.append({"subject": s["subject"], "session": s["session"], "reason": reason})
            continue
        candidates.setdefault(s["subject"], []).append({**s, **files})
    items = []
    for subject, options in sorted(candidates.items()):
        options.sort(key=lambda s: s["scan_age"], reverse=session == "latest")
        chosen = options[0]
        for other in options[1:]:
            excluded.append({"subject": subject, "session": other["session"],
                             "reason": f"another session of the subject was kept ({session} scan)"})
        item = {k: chosen[k] for k in ("image", "mask", "tissue") if k in chosen}
        item.update(label=int(chosen["birth_age"] < TERM_WEEKS), birth_age=chosen["birth_age"],
                    scan_age=chosen["scan_age"], sex=chosen["sex"], subject=subject, session=chosen["session"])
        items.append(item)
    counts = {"term": sum(1 for it in items if it["label"] == 0), "preterm": sum(1 for it in items if it["label"] == 1)}
    output = Path(output)
    exclusions = output.with_name(output.name.split(".")[0] + "_exclusions.csv")
    if not items or min(counts.values()) < 2:
        write_csv(excluded, exclusions, ["subject", "session", "reason"])  # the reasons, before failing
        for row in excluded:
            logger.error("excluded %s %s: %s", row["subject"], row["session"], row["reason"])
        if not items:
            raise ValueError(f"{root}: no session is left after the exclusions (all {len(excluded)} listed above "
                             f"and in {exclusions})")
        raise ValueError(f"{root}: too few subjects per class to split ({counts}); exclusions in {exclusions}")
    training, test = assign_splits(items, test_fraction=test_fraction, folds=folds, seed=seed)
    datalist = {"description": f"dHCP T2w datalist built by scripts.data.dhcp_datalist from {root} ({source}); "
                               "native space: run scripts.data.preprocess before training",
                "labels": {"0": "term (birth >= 37 weeks)", "1": "preterm"}, "training": training, "test": test}
    atomic_write_text(json.dumps(datalist, indent=2), output)
    write_csv(excluded, exclusions, ["subject", "session", "reason"])
    summary = {"subjects": len(items), **counts, "test": len(test), "excluded": excluded, "tables": source}
    logger.info("%s: %d subjects (term %d, preterm %d), %d excluded sessions", output, len(items), counts["term"],
                counts["preterm"], len(excluded))
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.data.dhcp_datalist`` (every option's help states its default)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.data.dhcp_datalist", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True,
                    help="release root, holding sourcedata/ (release 2) or rawdata/ (release 3) and derivatives/ "
                         "(required)")
    ap.add_argument("--output", required=True,
                    help="datalist JSON to write; the exclusions go to <output stem>_exclusions.csv beside it "
                         "(required)")
    ap.add_argument("--table", default=None,
                    help="one combined table (participant_id, session_id, birth_age, scan_age, sex or gender) "
                         "(default: the first combined*.tsv in --root or one folder below, else participants.tsv "
                         "+ sub-*_sessions.tsv in --root or --root/rawdata)")
    ap.add_argument("--min-scan-age", type=float, default=TERM_WEEKS,
                    help="keep sessions scanned at this post-menstrual age in weeks or later (default: %(default)s)")
    ap.add_argument("--session", choices=("latest", "earliest"), default="latest",
                    help="which session of a baby with several to keep (default: %(default)s)")
    ap.add_argument("--exclude-radiology", nargs="*", default=["Q"],
                    help="radiology scores to exclude: exact values, and letters matched anywhere (default: Q, "
                         "i.e. Q, Q3, 3Q = poor image quality)")
    ap.add_argument("--test-fraction", type=float, default=0.1,
                    help="share of the babies in the stratified test split (default: %(default)s)")
    ap.add_argument("--folds", type=int, default=10,
                    help="stratified cross-validation folds of the training split (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the test split and folds (default: %(default)s)")
    return ap


@report_input_errors
def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = build_datalist(args.root, args.output, args.table, args.min_scan_age, args.session,
                             args.exclude_radiology, args.test_fraction, args.folds, args.seed)
    print(f"{args.output}: {summary['subjects']} subjects (term {summary['term']}, preterm {summary['preterm']}; "
          f"{summary['test']} in the test split); {len(summary['excluded'])} sessions excluded")
    for row in summary["excluded"]:
        print(f"  excluded {row['subject']} {row['session']}: {row['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
