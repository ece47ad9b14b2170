"""Robustness of p(preterm) to the grids and image quality real scans come with.

Each subject's scan is rewritten as a real scanner or another pipeline might deliver it -- resampled to 0.7, 0.8
and 1.2 mm and to 0.8x0.8x2 mm (NIfTI with the new affine, in RAS orientation, same field of view), blurred,
with a mild bias field, with more noise -- and read back through the deployed preprocessing
(``preprocessing`` of ``configs/inference.json``, parsed by ``monai.bundle.ConfigParser``): the change of
p(preterm) against the scan as it was is what a user would see.

    python -m scripts.evaluation.robustness --output docs/results        # test split of data/synthetic, models/
    python -m scripts.evaluation.robustness --cohort-seed 7 --subjects 32 --output runs/robustness_seed7
    python -m scripts.evaluation.robustness --ckpt_dir /tmp/m --override '{"spatial_shape": [64, 48, 48]}' ...

``--cohort-seed N --subjects K`` draws a fresh synthetic cohort (seed N, K subjects, every one used) for tuning
the augmentation: the default cohort's 16 test subjects must never be tuned on. ``--cohort-seed 7`` with the default
32 subjects is the robustness tuning cohort (``ROBUSTNESS`` of ``scripts/data/cohorts.py``); the evaluation cohort's
seed is refused, and so is any datalist marked as the evaluation cohort (this command tunes).

Writes ``robustness.csv`` (one row per subject and perturbation: p before/after, |delta p|, decision flip, the
shift of the network input's brain centroid in voxels, the input-QC verdict) and ``robustness.md`` (per
perturbation: median and max |delta p|, decision flips among the subjects with |p - 0.5| > 0.1, the largest
input shift), both naming the command, the weights (path + sha256 prefix) and the subjects.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from scipy import ndimage

from scripts import BUNDLE_ROOT
from scripts.data.cohorts import EVALUATION, ROBUSTNESS
from scripts.data.cohorts import generate as generate_named
from scripts.data.synthetic import generate_cohort
from scripts.evaluation.cli import add_model_options, add_output_option
from scripts.evaluation.tables import markdown_table
from scripts.runtime.datalist import ensure_datalist, load_split
from scripts.runtime.errors import report_input_errors
from scripts.runtime.outputs import atomic_write_text, file_sha256, save_nifti, subject_name, write_csv
from scripts.runtime.transforms import acquire_on_grid

__all__ = ["GOAL", "PERTURBATIONS", "RESAMPLING", "Measurer", "centroid", "evaluate", "perturb", "resample_scan",
           "summary"]

logger = logging.getLogger(__name__)

CONFIDENT = 0.1  # decision flips are counted among subjects with |p - 0.5| > CONFIDENT
GOAL = {"median": 0.02, "max": 0.1}  # issue 24 item 3: median / max |delta p|; no flip for the resampling rows
WRITE_AXCODES = "RAS"  # the resampled scans are written in this orientation (the bundle's own is ALS)
NOISE_FRACTION = 0.03  # Rician noise sigma, relative to the mean brain intensity
BIAS_AMPLITUDE = 0.1  # the bias field is exp(+-BIAS_AMPLITUDE) at the ends of the field of view


def _blur(sigma_mm: float) -> Callable:
    def blur(data, affine, rng):
        spacing = nib.affines.voxel_sizes(affine)
        blurred = ndimage.gaussian_filter(data, sigma=[sigma_mm / s for s in spacing], mode="constant")
        return np.where(data > 0, blurred, 0.0).astype(np.float32), affine  # skull-stripped again
    return blur


def _bias(data, affine, rng):
    """A linear log-ramp along a random direction: x exp(-a) at one end of the field of view, x exp(+a) at the
    other (a = BIAS_AMPLITUDE, 0.1: about +-10 %), over and above the synthetic scans' own bias field."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in data.shape], indexing="ij")
    ramp = sum(d * g for d, g in zip(direction, grid)) / np.abs(direction).sum()
    return (data * np.exp(BIAS_AMPLITUDE * ramp)).astype(np.float32), affine


def _noise(data, affine, rng):
    brain = data > 0
    sigma = NOISE_FRACTION * float(data[brain].mean())
    real = data + rng.normal(0.0, sigma, data.shape)
    noisy = np.sqrt(real ** 2 + rng.normal(0.0, sigma, data.shape) ** 2)  # Rician magnitude
    return np.where(brain, noisy, 0.0).astype(np.float32), affine


def resample_scan(data: np.ndarray, affine: np.ndarray, spacing_ras, axcodes: str = WRITE_AXCODES, strip: bool = True):
    """The scan as acquired on another grid: the same field of view (voxel corners to voxel corners) and centre,
    voxels of ``spacing_ras`` mm along R-L, A-P, S-I, written in ``axcodes`` orientation. Downsampled axes are
    low-passed first (Gaussian with the FWHM of the lost resolution, sqrt(new^2 - old^2)), the image is linearly
    interpolated and skull-stripped again with the linearly resampled brain mask (> 0.5), as a pipeline that
    skull-strips on the scan's own grid would; ``strip=False`` keeps the interpolated image as it is (the brain's
    edge blurred into a dim partial-volume rim, as MONAI ``Spacing`` or any resampling after skull-stripping writes
    it). Returns (array, affine)."""
    affine = np.asarray(affine, dtype=float)
    world_axis = np.abs(affine[:3, :3]).argmax(axis=0)  # the world axis (R, A, S) each array axis runs along
    new = np.asarray([float(spacing_ras[w]) for w in world_axis])
    image, new_affine = acquire_on_grid(data, affine, new, strip=strip)
    out = nib.Nifti1Image(image.astype(np.float32), new_affine)
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(new_affine),
                                                nib.orientations.axcodes2ornt(tuple(axcodes)))
    out = out.as_reoriented(transform)
    return np.asarray(out.dataobj, dtype=np.float32), out.affine


def _resampled(spacing_ras, strip: bool = True) -> Callable:
    def resample(data, affine, rng):
        return resample_scan(data, affine, spacing_ras, strip=strip)
    return resample


# name -> (what it is, function(data, affine, rng) -> (data, affine)); the order is the table's
PERTURBATIONS: dict[str, tuple[str, Callable]] = {
    "reoriented": (f"same 1 mm grid, written in {WRITE_AXCODES} orientation (control: no resampling)",
                   _resampled((1.0, 1.0, 1.0))),
    "resampled_0.7mm": ("0.7 mm isotropic", _resampled((0.7, 0.7, 0.7))),
    "resampled_0.8mm": ("0.8 mm isotropic", _resampled((0.8, 0.8, 0.8))),
    "resampled_1.2mm": ("1.2 mm isotropic", _resampled((1.2, 1.2, 1.2))),
    "resampled_0.8x0.8x2mm": ("0.8x0.8 mm in-plane, 2 mm axial slices (S-I)", _resampled((0.8, 0.8, 2.0))),
    "resampled_0.8mm_rim": ("0.8 mm isotropic, not skull-stripped again: the brain's edge interpolated into a dim "
                            "rim (as MONAI Spacing writes it; the issue's case)", _resampled((0.8, 0.8, 0.8), False)),
    "blur_0.5mm": ("Gaussian blur, sigma 0.5 mm", _blur(0.5)),
    "blur_1mm": ("Gaussian blur, sigma 1 mm", _blur(1.0)),
    "bias_field": (f"multiplicative bias field, linear log-ramp +-{BIAS_AMPLITUDE:g} in a random direction", _bias),
    "noise": (f"Rician noise, sigma {NOISE_FRACTION:g} x mean brain intensity", _noise),
}
RESAMPLING = tuple(name for name in PERTURBATIONS if name.startswith(("reoriented", "resampled")))


def perturb(name: str, data: np.ndarray, affine: np.ndarray, rng: np.random.Generator):
    """(array, affine) of ``data`` under perturbation ``name`` (a key of ``PERTURBATIONS``)."""
    return PERTURBATIONS[name][1](np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=float), rng)


def centroid(image) -> np.ndarray:
    """Voxel-index centroid of the brain (non-zero voxels) of a (1, D, H, W) network input."""
    array = np.asarray(torch.as_tensor(image).as_subclass(torch.Tensor).detach().cpu())[0]
    return np.asarray(ndimage.center_of_mass(array != 0))


class Measurer:
    """The deployed path from a NIfTI file to p(preterm): inference.json's ``preprocessing`` and ``network_def``
    with the weights of ``ckpt_dir/model.pt`` (or of the file ``ckpt``) and the input-QC reference and registration
    template beside them when present, on the CPU. The intensity normalisation is the one the weights record
    (``scripts.runtime.reference.weights_normalisation``; none recorded: ``zscore``) unless ``overrides`` names
    one, so weights trained with either are measured on their own input. ``parser``: the parsed config, for more of
    its content."""

    def __init__(self, ckpt_dir: str | Path, overrides: dict | None = None,
                 config: str | Path = BUNDLE_ROOT / "configs" / "inference.json", ckpt: str | Path | None = None):
        from scripts.runtime.reference import QCReference, weights_normalisation  # noqa: PLC0415 (optional)

        parser = ConfigParser()
        parser.read_config(str(config))
        parser.update({"bundle_root": str(BUNDLE_ROOT), "ckpt_dir": str(ckpt_dir),
                       "normalisation": weights_normalisation(ckpt_dir), **(overrides or {}),
                       "device": "$torch.device('cpu')"})
        self.parser = parser
        self.normalisation = parser.get_parsed_content("normalisation")
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.network = parser.get_parsed_content("network_def")
        self.ckpt = Path(ckpt) if ckpt is not None else Path(ckpt_dir) / "model.pt"
        self.network.load_state_dict(torch.load(self.ckpt, map_location="cpu", weights_only=True))
        self.network.eval()
        self.qc = QCReference.load(Path(ckpt_dir))

    def sha256(self) -> str:
        return file_sha256(self.ckpt)

    def input(self, path: str | Path):
        return self.preprocessing({"image": str(path)})["image"]

    @torch.no_grad()
    def probability(self, image) -> float:
        """p(preterm) of one network input (``input``)."""
        x = torch.as_tensor(image).as_subclass(torch.Tensor)[None].float()
        return torch.softmax(self.network(x), dim=1)[0, 1].item()

    @torch.no_grad()
    def __call__(self, path: str | Path) -> dict:
        from scripts.runtime.qc import evaluate_input  # noqa: PLC0415

        image = self.input(path)
        prob = self.probability(image)
        verdict = evaluate_input(self.qc, self.network, image) if self.qc is not None else None
        return {"prob": prob, "centroid": centroid(image), "affine": np.asarray(image.affine),
                "qc_pass": "" if verdict is None else str(verdict["pass"]).lower()}


def fresh_cohort(work_dir: Path, seed: int, subjects: int) -> str:
    """A synthetic tuning cohort of ``subjects`` drawn with ``seed`` (not the default cohort's, nor the evaluation
    cohort's) and the robustness cohort's other settings (``ROBUSTNESS``), generated once."""
    if seed == 0:
        raise ValueError("--cohort-seed 0 is the default cohort (its training and test subjects): draw another seed")
    if seed == EVALUATION.seed:
        raise ValueError(f"--cohort-seed {seed} is the evaluation cohort's seed (scripts/data/cohorts.py), which is "
                         f"read only to report; tune on another, e.g. --cohort-seed {ROBUSTNESS.seed}")
    folder = work_dir / f"cohort_seed{seed}_n{subjects}"
    if (folder / "datalist.json").is_file():
        return str(folder / "datalist.json")
    return str(generate_named(replace(ROBUSTNESS, name=folder.name, seed=seed, subjects=subjects), folder))


def evaluate(items: list[dict], measurer: Measurer, work_dir: Path, names=tuple(PERTURBATIONS),
             seed: int = 0) -> list[dict]:
    """One row per subject and perturbation: p(preterm) of the scan as given and as perturbed, through the
    deployed preprocessing; the perturbed scans are written under ``work_dir/inputs``."""
    folder = work_dir / "inputs"
    rows = []
    for index, item in enumerate(items):
        image = nib.load(item["image"])
        data = np.asarray(image.dataobj, dtype=np.float32)
        source = item.get("subject") or subject_name(item["image"])
        before = measurer(item["image"])
        for name in names:  # each perturbation's own random stream: the same draws whichever rows are chosen
            rng = np.random.default_rng([seed, index, zlib.crc32(name.encode())])
            array, affine = perturb(name, data, image.affine, rng)
            path = save_nifti(array, affine, folder / f"{source}__{name}.nii.gz")
            after = measurer(path)
            delta = after["prob"] - before["prob"]
            confident = abs(before["prob"] - 0.5) > CONFIDENT
            rows.append({
                "subject": source, "label": item.get("label", ""), "perturbation": name,
                "voxel_mm": "x".join(f"{v:g}" for v in nib.affines.voxel_sizes(affine)),
                "axcodes": "".join(nib.aff2axcodes(affine)), "shape": "x".join(map(str, array.shape)),
                "prob_before": before["prob"], "prob_after": after["prob"], "delta": delta, "abs_delta": abs(delta),
                "confident": confident, "flip": confident and (before["prob"] > 0.5) != (after["prob"] > 0.5),
                "shift_vox": float(np.linalg.norm(after["centroid"] - before["centroid"])),
                "grid_offset_mm": float(np.linalg.norm(after["affine"][:3, 3] - before["affine"][:3, 3])),
                "qc_pass_before": before["qc_pass"], "qc_pass_after": after["qc_pass"],
            })
        logger.info("%s: p(preterm) %.3f; max |delta p| %.3f", source, before["prob"],
                    max(r["abs_delta"] for r in rows if r["subject"] == source))
    return rows


def summary(rows: list[dict], names=tuple(PERTURBATIONS)) -> list[dict]:
    """Per perturbation: median / max |delta p|, flips among confident subjects, largest input shift, QC."""
    out = []
    for name in names:
        mine = [r for r in rows if r["perturbation"] == name]
        if not mine:
            continue
        deltas = np.asarray([r["abs_delta"] for r in mine])
        confident = [r for r in mine if r["confident"]]
        flips = sum(r["flip"] for r in confident)
        qc = [r for r in mine if r["qc_pass_after"] != ""]
        median, largest = float(np.median(deltas)), float(deltas.max())
        met = median <= GOAL["median"] and largest <= GOAL["max"] and flips == 0
        out.append({
            "perturbation": name, "what": PERTURBATIONS[name][0], "n": len(mine),
            "median_abs_delta": median, "max_abs_delta": largest, "flips": f"{flips}/{len(confident)}",
            "max_shift_vox": max(r["shift_vox"] for r in mine),
            "max_grid_offset_mm": max(r["grid_offset_mm"] for r in mine),
            "qc_pass": f"{sum(r['qc_pass_after'] == 'true' for r in qc)}/{len(qc)}" if qc else "-",
            "goal": ("yes" if met else "no") if name in RESAMPLING else ("(yes)" if met else "(no)"),
        })
    return out


COLUMNS = ["perturbation", "what", "n", "median_abs_delta", "max_abs_delta", "flips", "max_shift_vox",
           "max_grid_offset_mm", "qc_pass", "goal"]
HEADERS = ["perturbation", "what", "n", "median abs delta p", "max abs delta p", "flips", "max input shift (vox)",
           "max grid offset (mm)", "QC pass", "goal met"]
CSV_COLUMNS = ["subject", "label", "perturbation", "voxel_mm", "axcodes", "shape", "prob_before", "prob_after",
               "delta", "abs_delta", "confident", "flip", "shift_vox", "grid_offset_mm", "qc_pass_before",
               "qc_pass_after"]


def write_outputs(rows: list[dict], output: Path, command: str, weights: str, subjects: str) -> str:
    table = summary(rows)
    before = {r["subject"]: r["prob_before"] for r in rows}
    confident = sum(abs(p - 0.5) > CONFIDENT for p in before.values())
    text = [
        "# Robustness of p(preterm) to the grids and image quality of real scans", "",
        f"Command: `{command}`", "",
        f"Weights: {weights}", "",
        f"Subjects: {subjects}; {len(before)} scans, {confident} with |p - 0.5| > {CONFIDENT:g} (the ones whose "
        "decision flips are counted).", "",
        "Each scan is rewritten as a NIfTI (resampled ones with their new affine, in "
        f"{WRITE_AXCODES} orientation, covering the same field of view) and read back through the deployed "
        "preprocessing (`preprocessing` of `configs/inference.json`); |delta p| is the change of p(preterm) "
        "against the scan as generated. Input shift: distance between the brain centroids (non-zero voxels) of "
        "the two network inputs, in voxels; grid offset: distance between their first voxels in world "
        "coordinates.", "",
        markdown_table(table, COLUMNS, HEADERS),
        f"Goal (issue 24, item 3): median |delta p| <= {GOAL['median']:g}, max <= {GOAL['max']:g} and no decision "
        f"flip (among subjects with |p - 0.5| > {CONFIDENT:g}) for the resampling rows; the other rows show the "
        "same test in parentheses. Per-subject values: `robustness.csv`.", "",
    ]
    output.mkdir(parents=True, exist_ok=True)
    write_csv(rows, output / "robustness.csv", CSV_COLUMNS)
    atomic_write_text("\n".join(text), output / "robustness.md")
    return "\n".join(text)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.evaluation.robustness`` (every option's help states its default)."""
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluation.robustness", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_output_option(parser, "docs/results", "robustness.md and robustness.csv")
    parser.add_argument("--work_dir", default="runs/robustness",
                        help="perturbed scans and a fresh cohort (default: %(default)s, from the current folder)")
    add_model_options(parser, weights="ckpt_dir", config_file=False, weights_default=BUNDLE_ROOT / "models",
                      override_help="JSON object of inference.json overrides (default: {}, none)")
    parser.add_argument("--datalist", default=None,
                        help="datalist whose test split is used (default: data/synthetic, generated if absent)")
    parser.add_argument("--cohort-seed", type=int, default=None,
                        help=f"draw a fresh synthetic cohort with this seed (not 0, not the evaluation cohort's "
                             f"{EVALUATION.seed}; {ROBUSTNESS.seed}: the robustness tuning cohort) and use all of its "
                             "subjects (default: none, the test split)")
    parser.add_argument("--subjects", type=int, default=ROBUSTNESS.subjects,
                        help="size of the fresh cohort, with --cohort-seed (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N subjects (default: 0, all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random perturbations, bias and noise (default: %(default)s)")
    return parser


@report_input_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = args.override
    work = Path(args.work_dir)
    if args.cohort_seed is not None:
        datalist, split = fresh_cohort(work, args.cohort_seed, args.subjects), "all"
        where = f"a fresh synthetic cohort, seed {args.cohort_seed}, {args.subjects} subjects (all of them)"
    else:
        dataset = str(BUNDLE_ROOT / "data" / "synthetic")
        default = str(Path(dataset) / "datalist.json")  # generated there when absent, like the configs do
        datalist = args.datalist or ensure_datalist(default, dataset, synthetic_dir=dataset, generator=generate_cohort)
        split = "test"
        where = f"the test split of {os.path.relpath(Path(datalist).resolve(), BUNDLE_ROOT)}"
    items = load_split(datalist, split, -1, tuning=True)[: args.limit or None]
    measurer = Measurer(args.ckpt_dir, overrides)
    rows = evaluate(items, measurer, work, seed=args.seed)
    ckpt = measurer.ckpt.resolve()
    shown = ckpt.relative_to(BUNDLE_ROOT) if ckpt.is_relative_to(BUNDLE_ROOT) else ckpt
    weights = f"`{shown}` (sha256 `{measurer.sha256()[:12]}`)"
    subjects = f"{where}: {', '.join(r['subject'] for r in items)}"
    command = shlex.join(["python", "-m", "scripts.evaluation.robustness", *(sys.argv[1:] if argv is None else argv)])
    print(write_outputs(rows, Path(args.output), command, weights, subjects))
    return 0


if __name__ == "__main__":
    sys.exit(main())
