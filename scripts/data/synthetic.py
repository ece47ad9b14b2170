"""Synthetic neonatal T2w cohort: the bundle's built-in dataset and the ground truth for judging relevance maps.

Each subject is drawn from a 40-week template (built-in procedural anatomy, or a user template image + drawem9
segmentation through the same code path) with the preterm phenotype of Grigorescu et al.: more CSF (larger
ventricles, more extra-axial CSF) and shallower cortical folding, growing with prematurity and varying between
subjects. Residual misregistration (small affine + smooth deformation), T2w contrast, bias field, partial volume
blur and Rician noise follow.

    python -m scripts.data.synthetic --output data/synthetic --subjects 160 --seed 0
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from scripts.data.splits import assign_splits
from scripts.data.synthetic_anatomy import Template, build_template, builtin_template
from scripts.runtime.outputs import atomic_write_text, read_volume, save_nifti
from scripts.runtime.progress import progress
from scripts.runtime.tissues import BACKGROUND, BRAINSTEM, CEREBELLUM, CGM, CSF, DGM, HIPPO, VENTRICLES, WM

__all__ = ["COMPONENTS", "Draw", "Phenotype", "draw_phenotype", "generate_cohort", "generate_subject", "main",
           "only_components", "without_components"]

logger = logging.getLogger(__name__)
TERM_WEEKS = 37.0

# T2w intensities of the neonatal brain (CSF brightest, unmyelinated WM brighter than cortex, deep GM darker)
T2_INTENSITY = {
    CSF: 1.00, VENTRICLES: 1.00, WM: 0.66, CGM: 0.42, DGM: 0.34,
    CEREBELLUM: 0.46, BRAINSTEM: 0.36, HIPPO: 0.48, BACKGROUND: 0.18,
}


@dataclass(frozen=True)
class Phenotype:
    """One subject's clinical variables and the anatomy they imply (sizes in mm).

    Each anatomical size is a baseline with natural between-subject variation (``*_natural``) plus the preterm
    effect (``*_effect``, zero for term babies, growing with prematurity and varying between subjects)."""

    birth_age: float
    scan_age: float
    sex: str
    ventricle_natural: float
    ventricle_effect: float
    csf_natural: float
    csf_effect: float
    sulcal_natural: float
    sulcal_effect: float

    @property
    def label(self) -> int:
        return int(self.birth_age < TERM_WEEKS)

    @property
    def ventricle_mm(self) -> float:  # growth of the ventricles into the surrounding white/deep grey matter
        return max(0.0, self.ventricle_natural + self.ventricle_effect)

    @property
    def extra_csf_mm(self) -> float:  # extra-axial (and sulcal) CSF widening into the cortex
        return max(0.0, self.csf_natural + self.csf_effect)

    @property
    def sulcal_limit_mm(self) -> float:  # sulci run at most this deep below the hull (lower = less folding)
        return self.sulcal_natural - self.sulcal_effect

    def term_equivalent(self) -> Phenotype:
        """The same baby without the preterm effect."""
        return replace(self, ventricle_effect=0.0, csf_effect=0.0, sulcal_effect=0.0)


def draw_phenotype(rng: np.random.Generator, preterm_fraction: float = 0.22) -> Phenotype:
    preterm = rng.random() < preterm_fraction
    if preterm:
        birth_age = 23.0 + 13.99 * rng.beta(1.6, 1.2)
        scan_age = rng.uniform(37.5, 45.0)
    else:
        birth_age = float(np.clip(rng.normal(39.6, 1.3), 37.0, 42.0))
        scan_age = float(np.clip(birth_age + rng.uniform(0.0, 3.0), 37.0, 45.0))
    prematurity = float(np.clip((TERM_WEEKS - birth_age) / 14.0, 0.0, 1.0))
    effect = prematurity * rng.lognormal(0.0, 0.35, size=3)  # the effect varies between subjects
    natural = rng.normal(0.0, 1.0, size=3)
    return Phenotype(
        birth_age=round(float(birth_age), 2),
        scan_age=round(float(scan_age), 2),
        sex=str(rng.choice(["female", "male"])),
        ventricle_natural=float(0.4 + 0.35 * natural[0]),
        ventricle_effect=float(5.0 * effect[0]),
        csf_natural=float(0.3 + 0.25 * natural[1]),
        csf_effect=float(2.4 * effect[1]),
        sulcal_natural=float(11.0 + 0.6 * (scan_age - 40.0) + 0.6 * natural[2]),
        sulcal_effect=float(6.0 * effect[2]),
    )


def _smooth_field(rng: np.random.Generator, shape, coarse=(5, 4, 4), sigma_mm: float = 0.9) -> np.ndarray:
    """Smooth random field: Gaussian-RBF interpolation of a coarse grid of N(0, sigma) values (separable)."""
    field = rng.normal(0.0, sigma_mm, size=coarse).astype(np.float32)
    for axis, (n, c) in enumerate(zip(shape, coarse)):
        pos = np.linspace(0, c - 1, n, dtype=np.float32)[:, None] - np.arange(c, dtype=np.float32)[None, :]
        weights = np.exp(-0.5 * (pos / 0.6) ** 2)
        weights /= weights.sum(1, keepdims=True)
        field = np.moveaxis(np.tensordot(weights, np.moveaxis(field, axis, 0), axes=1), 0, axis)
    return field


def _warp_coordinates(rng: np.random.Generator, shape) -> np.ndarray:
    """Voxel coordinates in template space for every subject voxel: small affine + smooth deformation."""
    angles = np.deg2rad(rng.uniform(-2.5, 2.5, size=3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rot = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    matrix = rot * rng.uniform(0.98, 1.02, size=3)[None, :]
    shift = rng.uniform(-1.5, 1.5, size=3)
    centre = (np.asarray(shape, dtype=np.float32) - 1) / 2
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) - c for n, c in zip(shape, centre)], indexing="ij")
    coords = np.einsum("ij,j...->i...", matrix.astype(np.float32), np.stack(grids))
    for axis in range(3):
        coords[axis] += _smooth_field(rng, shape) + centre[axis] + shift[axis]
    return coords


def _apply_phenotype(labels, ventricle_distance, surface_depth, hull_depth, ph: Phenotype) -> np.ndarray:
    out = labels.copy()
    # shallower folding: deep sulcal CSF becomes cortex, the cortex lining it white matter
    deep = hull_depth > ph.sulcal_limit_mm
    out[deep & (labels == CSF) & (hull_depth < 20)] = CGM
    out[(hull_depth > ph.sulcal_limit_mm + 2.5) & (labels == CGM) & (hull_depth < 22)] = WM
    # extra-axial / sulcal CSF widening into the cortex, cortex re-forming beneath it
    outer = hull_depth < 14
    out[outer & (surface_depth <= ph.extra_csf_mm) & np.isin(out, (CGM, WM))] = CSF
    out[outer & (surface_depth <= ph.extra_csf_mm + 1.6) & (out == WM)] = CGM
    # ventricular enlargement into white and deep grey matter
    out[(ventricle_distance <= ph.ventricle_mm) & np.isin(out, (WM, DGM))] = VENTRICLES
    return out


def generate_subject(template: Template, phenotype: Phenotype, rng: np.random.Generator):
    """Return (image, labels, phenotype_mask) float32/uint8/uint8 arrays in template space.

    ``phenotype_mask`` marks the voxels whose tissue differs from the same baby without any phenotype effect
    (the "term-equivalent" anatomy) -- the ground truth of where the preterm signal lives."""
    shape = template.labels.shape
    coords = _warp_coordinates(rng, shape)
    labels_w = ndimage.map_coordinates(template.labels, coords, order=0, mode="constant", cval=0)
    fields = [
        ndimage.map_coordinates(f, coords, order=1, mode="nearest")
        for f in (template.ventricle_distance, template.surface_depth, template.hull_depth)
    ]
    labels = _apply_phenotype(labels_w, *fields, phenotype)
    baseline = _apply_phenotype(labels_w, *fields, phenotype.term_equivalent())
    phenotype_mask = (labels != baseline).astype(np.uint8)

    lut = np.zeros(256, dtype=np.float32)
    for label, value in T2_INTENSITY.items():
        lut[label] = value * rng.uniform(0.96, 1.04)
    lut[WM] -= 0.012 * (phenotype.scan_age - 40.0)  # myelination darkens white matter with age
    image = lut[labels]
    if template.intensity is not None:  # user template: keep its texture within each tissue
        texture = ndimage.map_coordinates(template.intensity, coords, order=1, mode="constant", cval=0)
        means = ndimage.mean(texture, labels_w, index=np.arange(10))
        ratio = texture / np.maximum(np.asarray(means, dtype=np.float32)[labels_w], 1e-3)
        image *= np.where((labels == labels_w) & (labels_w > 0), np.clip(ratio, 0.5, 1.5), 1.0)
    image = ndimage.gaussian_filter(image, sigma=0.6)  # partial volume
    # low-frequency multiplicative bias field
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    log_bias = sum(
        rng.uniform(-0.08, 0.08) * axes[i][tuple(slice(None) if j == i else None for j in range(3))]
        + rng.uniform(-0.05, 0.05) * axes[i][tuple(slice(None) if j == i else None for j in range(3))] ** 2
        for i in range(3)
    )
    image *= np.exp(log_bias)
    sigma = rng.uniform(0.015, 0.03)
    noise = rng.normal(0.0, sigma, size=(2,) + shape).astype(np.float32)
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
    mask = labels > 0
    image = np.where(mask, image * 1000.0, 0.0).astype(np.float32)  # skull-stripped, scanner-like scale
    return image, labels.astype(np.uint8), phenotype_mask


# The preterm phenotype's three components and the Phenotype field holding each one's preterm effect
COMPONENTS = {"ventricles": "ventricle_effect", "extra_axial_csf": "csf_effect", "folding": "sulcal_effect"}


def _check_components(components) -> tuple[str, ...]:
    components = (components,) if isinstance(components, str) else tuple(components)
    for name in components:
        if name not in COMPONENTS:
            raise ValueError(f"unknown phenotype component {name!r}: choose from {', '.join(COMPONENTS)}")
    return components


def without_components(phenotype: Phenotype, components) -> Phenotype:
    """The subject with the preterm effect of ``components`` removed (its twin's anatomy there)."""
    return replace(phenotype, **{COMPONENTS[c]: 0.0 for c in _check_components(components)})


def only_components(phenotype: Phenotype, components) -> Phenotype:
    """The term-equivalent twin with the preterm effect of ``components`` pasted in."""
    keep = _check_components(components)
    return replace(phenotype.term_equivalent(), **{COMPONENTS[c]: getattr(phenotype, COMPONENTS[c]) for c in keep})


@dataclass(frozen=True)
class Draw:
    """Subject ``index`` of the cohort drawn with ``seed``: its phenotype and the random state that renders it.
    ``render`` of the phenotype gives the cohort's subject bit for bit; ``render`` of ``phenotype.term_equivalent()``
    (or of ``without_components`` / ``only_components``) gives its twin: the same baby (misregistration, contrast,
    bias field, noise) with the preterm effect changed, so the two differ only within the blurred footprint of the
    anatomy that changed."""

    seed: int
    index: int
    phenotype: Phenotype
    state: dict

    @classmethod
    def of(cls, seed: int, index: int, preterm_fraction: float = 0.22) -> Draw:
        rng = np.random.default_rng([seed, index])
        phenotype = draw_phenotype(rng, preterm_fraction)
        return cls(seed, index, phenotype, rng.bit_generator.state)

    @property
    def subject(self) -> str:
        return f"sub-{self.index + 1:04d}"

    def render(self, template: Template, phenotype: Phenotype | None = None):
        """``generate_subject`` of ``phenotype`` (default: the subject's own) with the subject's random stream."""
        rng = np.random.default_rng()
        rng.bit_generator.state = self.state
        return generate_subject(template, self.phenotype if phenotype is None else phenotype, rng)


def _subject_job(args):
    index, seed, output, template_paths, preterm_fraction = args
    template = _load_template(template_paths)
    draw = Draw.of(seed, index, preterm_fraction)
    phenotype = draw.phenotype
    image, labels, pmask = draw.render(template)
    subject = draw.subject
    out = Path(output)
    save_nifti(labels, template.affine, out / "labels" / f"{subject}.nii.gz", dtype=np.uint8)
    save_nifti(pmask, template.affine, out / "phenotype" / f"{subject}.nii.gz", dtype=np.uint8)
    save_nifti(image, template.affine, out / "images" / f"{subject}.nii.gz")  # last: marks the subject done
    return subject, phenotype


_TEMPLATE_CACHE: dict = {}


def _load_template(paths) -> Template:
    if paths is None:
        return builtin_template()
    if paths not in _TEMPLATE_CACHE:
        image_path, seg_path = paths
        labels, affine = read_volume(seg_path)
        intensity = read_volume(image_path)[0] if image_path else None
        if intensity is not None and intensity.shape != labels.shape:
            raise ValueError(f"{image_path}: shape {intensity.shape} differs from segmentation {seg_path} "
                             f"{labels.shape}")
        _TEMPLATE_CACHE[paths] = build_template(np.rint(labels).astype(np.uint8), affine, intensity)
    return _TEMPLATE_CACHE[paths]


def generate_cohort(
    output: str | os.PathLike,
    subjects: int = 160,
    seed: int = 0,
    preterm_fraction: float = 0.22,
    template_image: str | None = None,
    template_labels: str | None = None,
    workers: int | None = None,
    test_fraction: float = 0.1,
    folds: int = 10,
    only_test: bool = False,
    role: str | None = None,
) -> Path:
    """Write ``subjects`` synthetic subjects under ``output`` (images/, labels/, phenotype/), a
    ``participants.tsv`` and a MONAI datalist ``datalist.json`` with a stratified test split and folds.
    Returns the datalist path. Every subject is rendered and written on each call (the same seed gives the same
    data, bit for bit); callers that reuse a cohort check for its datalist first (``ensure_datalist``,
    ``scripts.data.cohorts.generate``).

    ``only_test``: write only the test split's volumes (the same subjects, bit for bit, as in the whole cohort; the
    split is drawn from every subject's phenotype, which is cheap) and a datalist holding only ``test``: enough to
    evaluate weights on the held-out split in seconds instead of generating the cohort (tests/test_model_zoo.py).

    ``role`` (``scripts/data/cohorts.py``): ``"evaluation"`` puts every subject in ``test`` (``training`` empty, no
    folds) and writes ``"role": "evaluation"`` into the datalist, which tuning commands refuse to read
    (``load_split(..., tuning=True)``); ``"tuning"`` writes ``"role": "tuning"`` beside the usual splits; None (the
    default) writes no role. The subjects are the same, bit for bit, whatever the role."""
    if subjects < 2:
        raise ValueError(f"subjects must be at least 2, got {subjects}")
    if role not in (None, "tuning", "evaluation"):
        raise ValueError(f"role must be None, 'tuning' or 'evaluation', got {role!r}")
    if role == "evaluation" and only_test:
        raise ValueError("role='evaluation' already puts every subject in the test split; leave only_test out")
    if template_labels is None and template_image is not None:
        raise ValueError("template_image needs template_labels (a drawem9 segmentation of the template)")
    for p in (template_image, template_labels):
        if p is not None and not Path(p).is_file():
            raise FileNotFoundError(f"template file not found: {p}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    template_paths = None if template_labels is None else (template_image, template_labels)
    indices = range(subjects)
    if only_test:
        drawn = [{"label": draw_phenotype(np.random.default_rng([seed, i]), preterm_fraction).label, "index": i}
                 for i in indices]
        indices = sorted(item["index"] for item in assign_splits(drawn, test_fraction, folds, seed)[1])
    jobs = [(i, seed, str(out), template_paths, preterm_fraction) for i in indices]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    logger.info("generating %d synthetic subjects into %s with %d workers", subjects, out, workers)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(progress(pool.map(_subject_job, jobs, chunksize=1), len(jobs), "synthetic cohort",
                                    "subject"))
    else:
        results = [_subject_job(job) for job in progress(jobs, len(jobs), "synthetic cohort", "subject")]

    rows = io.StringIO()
    writer = csv.writer(rows, delimiter="\t", lineterminator="\n")
    writer.writerow(["participant_id", "birth_age", "scan_age", "sex"])
    items = []
    for subject, ph in results:
        writer.writerow([subject, ph.birth_age, ph.scan_age, ph.sex])
        items.append({
            "image": f"images/{subject}.nii.gz",
            "label": ph.label,
            "tissue": f"labels/{subject}.nii.gz",
            "phenotype": f"phenotype/{subject}.nii.gz",
            "subject": subject,
            "birth_age": ph.birth_age,
            "scan_age": ph.scan_age,
            "sex": ph.sex,
        })
    atomic_write_text(rows.getvalue(), out / "participants.tsv")
    if only_test or role == "evaluation":
        training, test = [], items
    else:
        training, test = assign_splits(items, test_fraction=test_fraction, folds=folds, seed=seed)
    datalist = {
        "name": "synthetic neonatal T2w cohort",
        "description": "Generated by scripts.data.synthetic; labels: 0 term (birth >= 37 weeks), 1 preterm",
        "labels": {"0": "term", "1": "preterm"},
        "seed": seed,
        "num_folds": 0 if role == "evaluation" else folds,
        **({"role": role} if role else {}),
        "training": training,
        "test": test,
    }
    path = out / "datalist.json"
    atomic_write_text(json.dumps(datalist, indent=1), path)
    n_pre = sum(item["label"] for item in items)
    logger.info("synthetic cohort ready: %d subjects (%d preterm, %d term) -> %s", len(items), n_pre,
                len(items) - n_pre, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder to write the cohort into")
    parser.add_argument("--subjects", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preterm-fraction", type=float, default=0.22)
    parser.add_argument("--template-image", help="template T2w NIfTI (optional, e.g. the dHCP 40-week atlas)")
    parser.add_argument("--template-labels", help="drawem9 segmentation of the template (NIfTI)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--only-test", action="store_true", help="write only the test split (same subjects)")
    parser.add_argument("--role", choices=("tuning", "evaluation"), default=None,
                        help="evaluation: every subject in the test split and the datalist marked so that tuning "
                             "commands refuse it; tuning: the usual splits, marked tuning (default: no role); the "
                             "named cohorts: python -m scripts.data.cohorts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    path = generate_cohort(
        args.output, args.subjects, args.seed, args.preterm_fraction, args.template_image, args.template_labels,
        args.workers, args.test_fraction, args.folds, args.only_test, args.role,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
