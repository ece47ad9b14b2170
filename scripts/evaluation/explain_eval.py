"""Measure the explanations of a trained model on held-out synthetic subjects: faithfulness by region perturbation
in both orders (the area between the curves, ABPC), localisation against the generator's ground truth, and cost
-- the LRP presets against gradient-based maps and MONAI's explainers (GradCAM, OcclusionSensitivity, SmoothGrad).

    python -m scripts.evaluation.explain_eval --output docs/results            # default model, all test subjects
    python -m scripts.evaluation.explain_eval --reduced --output /tmp/x ...    # small settings (CI)

Every subject is explained for its own class: term subjects for the term logit, preterm subjects for the preterm
logit. Region perturbation: the brain's ``patch``^3 blocks are ranked by their summed relevance; in ``steps``
steps, ``fraction`` of them are replaced, most relevant first (MoRF) and, separately, least relevant first (LeRF),
by the same blocks of the volume blurred inside the brain (Gaussian, sigma = patch / 2 voxels, normalised by the
blurred brain mask: the replaced content keeps the local brain intensity, loses detail finer than the block and
never mixes in background), and the target logit is recorded after each step. ABPC = mean over the steps of
(LeRF - MoRF) of the target logit: large when the top-ranked blocks carry the evidence and the bottom-ranked ones
do not; 0 in expectation for a random ranking. Localisation (preterm subjects only; term subjects have no
phenotype), measured by ``scripts.runtime.localisation``: share of the positive relevance, share of the brain and
enrichment in CSF + ventricles, the ventricles and the phenotype mask, the share outside the brain, pointing game.

Writes ``explanations.csv`` (one row per subject and method), ``explanations.md`` (per method medians with
interquartile ranges, the localisation's with bootstrap intervals), ``perturbation_curves.png``, ``abpc.png`` and
``maps_panel.png`` into ``--output``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from scripts import BUNDLE_ROOT
from scripts.evaluation.cli import add_model_options, add_output_option, add_subject_options
from scripts.evaluation.explainers import GRADIENT_METHODS, LRP_METHODS, SLOW_METHODS, compute_map, forward_seconds
from scripts.evaluation.explanation_metrics import (
    abpc,
    aopc,
    blurred_within,
    brain_patches,
    median_quartiles,
    per_step,
    perturbation_curve,
    perturbation_orders,
    pointing_game,
)
from scripts.evaluation.figures import COLOUR_RULE_TEXT, explanation_panel
from scripts.evaluation.profiling import measure_call, reexec_with_returning_malloc
from scripts.evaluation.tables import fmt, fmt_ci, markdown_table, save_figure
from scripts.runtime.checks import check_shape, validate_items
from scripts.runtime.datalist import load_split
from scripts.runtime.errors import report_input_errors
from scripts.runtime.localisation import CSF_VENTRICLES, OUTSIDE_BRAIN, localisation, median_ci, tissue_regions
from scripts.runtime.outputs import atomic_write_text, write_csv

logger = logging.getLogger(__name__)
ROOT = BUNDLE_ROOT
OTHER_METHODS = GRADIENT_METHODS + SLOW_METHODS
METHODS = LRP_METHODS + OTHER_METHODS
CLASS_NAMES = {0: "term", 1: "preterm"}
REGIONS = (CSF_VENTRICLES, "ventricles", "phenotype")  # localisation of the preterm maps (scripts.runtime.localisation)
REGION_NAMES = {CSF_VENTRICLES: "CSF+ventricles", "ventricles": "ventricles", "phenotype": "phenotype"}


# -- loading (shared with scripts.evaluation.sanity) ----------------------------------------------------------------
def load_model(config_file: str, overrides: dict, ckpt: str | None):
    """(config parser, trained network in eval mode, datalist path) of ``config_file`` with ``overrides``."""
    parser = ConfigParser()
    parser.read_config(config_file)
    # a checkpoint given by path brings its own folder: the registration template and QC reference beside it
    # belong to those weights (preprocess=auto reads them), not the shipped models/
    folder = {"ckpt_dir": str(Path(ckpt).parent)} if ckpt else {}
    parser.update({"bundle_root": str(ROOT), **folder, **overrides})
    check_shape(parser.get_parsed_content("spatial_shape"), "spatial_shape")
    network = parser.get_parsed_content("network_def").eval()
    ckpt_path = ckpt or parser.get_parsed_content("ckpt_path")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    datalist = parser.get_parsed_content("datalist_file")
    return parser, network, datalist


def load_subjects(datalist: str, split: str, parser, need_maps: bool = True, fold: int = -1,
                  tuning: bool = True) -> list[dict]:
    """The labelled subjects of ``split`` (``fold``: the cross-validation fold of the ``validation`` split), checked:
    images readable and of the network's shape, and with ``need_maps`` the synthetic cohort's tissue and phenotype
    maps. ``tuning`` (default): the evaluation cohort is refused (``load_split``); only a report passes False."""
    spatial = check_shape(parser.get_parsed_content("spatial_shape"), "spatial_shape")
    items = load_split(datalist, split, fold, tuning=tuning)  # labels checked there
    if not items:
        raise ValueError(f"datalist {datalist}: split {split!r} has no subject to explain")
    validate_items(items, keys=("image",), spatial_shape=spatial, pixdim=parser.get_parsed_content("pixdim"))
    if need_maps:  # a term subject's phenotype map is empty: only the preterm ones are checked for content
        validate_items(items, keys=("tissue",))
        validate_items([it for it in items if int(it["label"]) == 1], keys=("phenotype",))
        for it in items:
            for key in ("tissue", "phenotype"):
                if key not in it:
                    raise ValueError(f"datalist {datalist}: subject {it['subject']} has no '{key}' map; the "
                                     "evaluation needs the synthetic cohort's tissue and phenotype maps")
    return items


def select_subjects(items: list[dict], count: int, first: int = 1) -> list[dict]:
    """Up to ``count`` subjects (0: all), preterm and term in turn (``first=0``: term first), each class in datalist
    order."""
    groups = [[it for it in items if int(it["label"]) == label] for label in (first, 1 - first)]
    chosen = []
    for i in range(max(len(g) for g in groups)):
        chosen += [g[i] for g in groups if i < len(g)]
    return chosen[:count] if count > 0 else chosen


def subject_transform(parser):
    """The image through the config's ``preprocessing``, the tissue and phenotype maps through its
    ``label_preprocessing`` (nearest neighbour): both declared in ``configs/inference.json``."""
    image = parser.get_parsed_content("preprocessing")
    labels = parser.get_parsed_content("label_preprocessing")
    return lambda item: {**image({"image": item["image"]}), **labels({k: item[k] for k in ("tissue", "phenotype")})}


# -- region perturbation (shared with scripts.evaluation.composite_search) -----------------------------------------
def score_function(network, target) -> Callable[[torch.Tensor], float]:
    """The score that region perturbation tracks: the logit of class ``target``, or for a pair ``(c, c')`` of
    classes the logit difference ``logit[c] - logit[c']`` (the score of a contrastive map)."""
    pos, neg = (int(target[0]), int(target[1])) if isinstance(target, (tuple, list)) else (int(target), None)

    def score(v: torch.Tensor) -> float:
        with torch.no_grad():
            logits = network(v)[0]
        return float(logits[pos] if neg is None else logits[pos] - logits[neg])

    return score


def perturbation_setup(x: torch.Tensor, brain: np.ndarray, patches, steps: int, fraction: float) -> dict:
    """{patch: (the brain's blocks of ``patch``^3 voxels, blocks replaced per step, replacement volume = ``x`` blurred
    inside the brain with sigma = patch / 2)} of one input."""
    perturb = {}
    for patch in patches:
        candidates = brain_patches(brain, patch)
        perturb[patch] = (candidates, per_step(len(candidates), steps, fraction), blurred_within(x, brain, patch / 2))
    return perturb


def region_perturbation(relevance: np.ndarray, score: Callable[[torch.Tensor], float], x: torch.Tensor,
                        perturb: dict, steps: int, intact: float) -> tuple[dict, dict]:
    """({abpc_<patch>, morf_<patch>, lerf_<patch>}, {patch: (MoRF curve, LeRF curve)}) of one map: the blocks of
    ``perturb`` (:func:`perturbation_setup`) replaced most relevant first and least relevant first, ``score``
    recorded after each step (``intact``: its value on ``x``)."""
    measures, curves = {}, {}
    for patch, (candidates, count, baseline) in perturb.items():
        morf_order, lerf_order = perturbation_orders(relevance, candidates, patch)
        morf = perturbation_curve(score, x, morf_order, patch, steps, count, baseline, intact)
        lerf = perturbation_curve(score, x, lerf_order, patch, steps, count, baseline, intact)
        curves[patch] = (morf, lerf)
        measures[f"abpc_{patch}"] = abpc(morf, lerf)
        measures[f"morf_{patch}"] = aopc(morf)  # mean drop, most relevant first
        measures[f"lerf_{patch}"] = aopc(lerf)  # mean drop, least relevant first
    return measures, curves


# -- localisation ---------------------------------------------------------------------------------------------------
LOCALISATION_COLUMNS = [*(f"{k}_{r}" for r in REGIONS for k in ("share", "brain_share", "enrichment", "pointing")),
                        OUTSIDE_BRAIN]


def localisation_columns(relevance: np.ndarray, tissue: np.ndarray, regions: dict[str, np.ndarray]) -> dict:
    """The localisation columns of one map: per region of ``REGIONS`` its share of the positive relevance, its share
    of the brain and the enrichment (``scripts.runtime.localisation``), and the pointing game (the most relevant
    voxel in the region, 1 voxel tolerance); the share of the positive relevance outside the brain."""
    measured = localisation(relevance, tissue, regions)
    row = {}
    for name in REGIONS:
        row.update({f"{k}_{name}": measured[name][k] for k in ("share", "brain_share", "enrichment")})
        row[f"pointing_{name}"] = pointing_game(relevance, regions[name], tolerance=1)
    row[OUTSIDE_BRAIN] = measured[OUTSIDE_BRAIN]["share"]
    return row


# -- the evaluation -------------------------------------------------------------------------------------------------
def evaluate(args) -> tuple[list[dict], dict, dict, dict]:
    torch.manual_seed(0)
    parser, network, datalist = load_model(args.config_file, args.override, args.ckpt)
    transform = subject_transform(parser)
    items = select_subjects(load_subjects(datalist, args.split, parser), args.subjects)
    methods = [m for m in METHODS if m in args.methods]
    settings = {"smoothgrad_samples": args.smoothgrad_samples, "occlusion_mask": args.occlusion_mask}
    rows, curves, panel = [], {}, {}
    start = time.perf_counter()
    for n, item in enumerate(items):
        data = transform({k: item[k] for k in ("image", "tissue", "phenotype")})
        x = data["image"].as_tensor()[None].float()
        label = int(item["label"])
        if n == 0:
            forward = forward_seconds(network, x)
        tissue = data["tissue"][0].numpy().round().astype(int)
        brain = tissue > 0
        every = tissue_regions(tissue, {"phenotype": data["phenotype"][0].numpy() > 0.5})
        regions = {name: every[name] for name in REGIONS}

        score = score_function(network, label)
        intact = score(x)
        perturb = perturbation_setup(x, brain, args.patches, args.steps, args.fraction)
        for method in methods:
            explain_one = functools.partial(compute_map, method, network, x, label, settings)
            (relevance, conservation), seconds, peak = measure_call(explain_one)
            row = {"subject": item["subject"], "label": CLASS_NAMES[label], "birth_age": item.get("birth_age", ""),
                   "method": method, "seconds": seconds, "peak_mb": peak / 2**20 if peak >= 0 else float("nan"),
                   "conservation_error": abs(1 - conservation) if conservation is not None else float("nan")}
            measures, pairs = region_perturbation(relevance, score, x, perturb, args.steps, intact)
            row.update(measures)
            for patch, (morf, lerf) in pairs.items():
                curves.setdefault((method, patch), []).append((morf - morf[0], lerf - lerf[0]))
            row.update(localisation_columns(relevance, tissue, regions) if label == 1 else
                       dict.fromkeys(LOCALISATION_COLUMNS, float("nan")))
            rows.append(row)
            if label == 1 and "_subject" not in panel:
                panel[method] = relevance
        if label == 1 and "_subject" not in panel:
            panel.update({"_image": x[0, 0].numpy(), "_phenotype": regions["phenotype"], "_brain": brain,
                          "_affine": np.asarray(data["image"].affine), "_subject": item["subject"]})
        logger.info("explained %s (%s, %d/%d), %.0f s so far", item["subject"], CLASS_NAMES[label], n + 1,
                    len(items), time.perf_counter() - start)
    timing = {"seconds": time.perf_counter() - start, "subjects": len(items), "forward": forward,
              "preterm": sum(int(it["label"]) == 1 for it in items)}
    return rows, curves, panel, timing


def _median_iqr(values, digits: int = 2) -> str:
    median, q1, q3 = median_quartiles(values)
    return "-" if median != median else f"{median:.{digits}f} [{q1:.{digits}f}, {q3:.{digits}f}]"


LOCALISATION = [*(f"enrichment_{r}" for r in REGIONS), OUTSIDE_BRAIN, f"pointing_{CSF_VENTRICLES}",
                "pointing_phenotype"]  # the columns of the summary's localisation table


def summarise(rows: list[dict], patches) -> list[dict]:
    """Per method: median [IQR] over subjects of ABPC, MoRF and LeRF drop per patch size; over the preterm subjects
    the median enrichment per region and the median outside-brain share, each with its bootstrap 95 % interval
    (``median_ci``; ``<key>_median`` the median alone), and the pointing game's hit rate; median seconds, peak MB
    and conservation error."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        row = {"method": method, "n": len(mine)}
        for patch in patches:
            for key in ("abpc", "morf", "lerf"):
                row[f"{key}_{patch}"] = _median_iqr(r[f"{key}_{patch}"] for r in mine)
                row[f"{key}_{patch}_median"] = median_quartiles(r[f"{key}_{patch}"] for r in mine)[0]
        for key in (*(f"enrichment_{r}" for r in REGIONS), OUTSIDE_BRAIN):
            median, low, high, _ = median_ci([r[key] for r in mine])
            row[key], row[f"{key}_median"] = fmt_ci(median, low, high, 3 if key == OUTSIDE_BRAIN else 2), median
        for name in REGIONS:
            values = [r[f"pointing_{name}"] for r in mine if r[f"pointing_{name}"] == r[f"pointing_{name}"]]
            row[f"pointing_{name}"] = float(np.mean(values)) if values else float("nan")
            row[f"brain_share_{name}"] = median_quartiles(r[f"brain_share_{name}"] for r in mine)[0]
        for key in ("seconds", "peak_mb", "conservation_error"):
            row[key] = median_quartiles(r[key] for r in mine)[0]
        out.append(row)
    return out


def write_outputs(rows, curves, panel, output: Path, settings: dict) -> list[dict]:
    """Tables and figures into ``output``; returns the explanation panel's rows (panel, colour limit, saturated
    share of its brain pixels)."""
    output.mkdir(parents=True, exist_ok=True)
    write_csv(rows, output / "explanations.csv")
    patches = settings["patches"]
    summary = summarise(rows, patches)
    n, preterm = settings["subjects"], settings["preterm"]
    steps = (f"{settings['steps']} steps of {100 * settings['fraction'] / settings['steps']:.0f} % of the brain's "
             f"blocks each (up to {100 * settings['fraction']:.0f} %)")
    faithfulness_columns = ["method"] + [f"{k}_{p}" for p in patches for k in ("abpc", "morf", "lerf")]
    brain_shares = "the regions' shares of the brain, medians: " + ", ".join(
        f"{REGION_NAMES[r]} {fmt(100 * summary[0][f'brain_share_{r}'], 1)} %" for r in REGIONS) if summary else ""
    faithfulness_headers = ["method"] + [h for p in patches for h in (f"ABPC {p}^3", f"MoRF drop {p}^3",
                                                                      f"LeRF drop {p}^3")]
    lines = [
        "# Explanation evaluation", "",
        f"Generated by `{settings['command']}` on {n} test subjects ({preterm} preterm, {n - preterm} term; "
        f"{settings['seconds'] / 60:.0f} min on this machine, "
        f"{settings['seconds'] / settings['forward']:.0f} times its forward pass of {settings['forward']:.2f} s). "
        "Every subject is explained for its own class: the term logit for term subjects, the preterm logit for "
        "preterm subjects.", "",
        "## Faithfulness: region perturbation in both orders", "",
        f"The brain's blocks of {' and '.join(f'{p}^3' for p in patches)} voxels are ranked by their summed "
        f"relevance and replaced in {steps}, most relevant first (MoRF) or least relevant first (LeRF), by the same "
        "block of the volume blurred inside the brain (Gaussian, sigma = half the block side, normalised by the "
        "blurred brain mask: the input stays a brain-like volume, no flat holes, no background mixed in). "
        "Score: the target-class logit. **ABPC** = mean over the steps of (LeRF - MoRF) logit: higher is more "
        "faithful, 0 is the expectation of a random ranking; MoRF / LeRF drop = mean drop of the logit from the "
        "intact input along each curve (AOPC). Median [interquartile range] over subjects.", "",
        markdown_table(summary, faithfulness_columns, faithfulness_headers),
        "![ABPC per subject](abpc.png)", "",
        "ABPC of every subject (dots) and its spread (box: median and quartiles) per method and block size; higher "
        "is better, 0 = random ranking.", "",
        "![perturbation curves](perturbation_curves.png)", "",
        "Change of the target logit from the intact input while blocks are replaced (median over subjects): most "
        "relevant first (solid) and least relevant first (dashed) per block size; the area between the two "
        "curves is the ABPC.", "",
        "## Localisation and cost", "",
        f"Preterm subjects only ({preterm}; the term subjects have no phenotype), preterm target, measured by "
        "`scripts/runtime/localisation.py`: enrichment = the region's share of the map's positive relevance "
        "(relevance outside the brain included) / the region's share of the brain (tissue label > 0): 1 = no "
        f"preference within the brain ({brain_shares}); outside brain = the share of the positive relevance "
        "outside the brain; median over subjects [percentile-bootstrap 95 % interval]. Pointing = the most "
        "relevant voxel lies in the region (1 voxel tolerance), share of the subjects. Every subject's shares are "
        "in `explanations.csv`. Seconds / peak MB: one map on the CPU (median over all subjects); conservation "
        "error = |1 - sum(R) / logit| (LRP only, median).", "",
        markdown_table(summary, ["method", *LOCALISATION, "seconds", "peak_mb", "conservation_error"],
                       ["method", *(f"enrichment {REGION_NAMES[r]}" for r in REGIONS), "outside brain",
                        "pointing CSF+ventricles", "pointing phenotype", "seconds", "peak MB", "conservation error"]),
        "![maps of every method](maps_panel.png)", "",
        f"One axial slice of {panel.get('_subject', 'the first preterm subject')} through the largest part of the "
        "phenotype (yellow outline) and each method's map of the preterm logit. Colour rule: each method has its "
        f"own {COLOUR_RULE_TEXT}, and its own colour bar (red: evidence for preterm, blue: against). GradCAM is "
        "the coarse grid of the last conv block (8x6x6 with the default network) upsampled to the input by MONAI; "
        "gradient and SmoothGrad are magnitudes (only red).", "",
        f"Settings: {settings['smoothgrad_samples']} SmoothGrad samples, occlusion blocks of "
        f"{settings['occlusion_mask']}^3 voxels (replaced by the image mean).",
    ]
    atomic_write_text("\n".join(lines) + "\n", output / "explanations.md")
    _figures(rows, curves, patches, settings, output)
    maps = {m: v for m, v in panel.items() if not m.startswith("_")}
    if not maps:
        return []
    return explanation_panel(panel["_image"], maps, output / "maps_panel.png", brain=panel.get("_brain"),
                             region=panel.get("_phenotype"), affine=panel.get("_affine"),
                             title=f"{panel.get('_subject', '')}: maps of the preterm logit, one colour scale per "
                                   "method (symmetric, 99.5th percentile of |value| over the brain)")


def _figures(rows, curves, patches, settings, output: Path) -> None:
    import matplotlib  # noqa: PLC0415 (the Agg backend is chosen before pyplot is imported)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    methods = list(dict.fromkeys(r["method"] for r in rows))
    # ABPC per subject: one panel per block size, methods down the y axis
    fig, axes = plt.subplots(1, len(patches), squeeze=False, sharey=True, layout="constrained",
                             figsize=(4.6 * len(patches) + 1.8, 0.42 * len(methods) + 1.4))
    rng = np.random.default_rng(0)
    y = np.arange(len(methods))
    for ax, patch in zip(axes[0], patches):
        data = [[r[f"abpc_{patch}"] for r in rows if r["method"] == m] for m in methods]
        ax.boxplot(data, positions=y, vert=False, widths=0.6, showfliers=False)
        for i, values in enumerate(data):
            colours = ["C3" if r["label"] == "preterm" else "C0" for r in rows if r["method"] == methods[i]]
            ax.scatter(values, i + rng.uniform(-0.15, 0.15, len(values)), s=10, c=colours, alpha=0.7, zorder=3)
        ax.axvline(0, color="0.5", lw=1)
        ax.set_title(f"blocks of {patch}^3 voxels", fontsize=10)
        ax.set_xlabel("ABPC (target logit, LeRF - MoRF)")
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_yticks(y, methods, fontsize=9)
    axes[0, 0].invert_yaxis()
    fig.suptitle("ABPC per subject (red: preterm, blue: term); higher = more faithful, 0 = random ranking",
                 fontsize=10)
    save_figure(fig, output / "abpc.png", dpi=100)
    plt.close(fig)

    # curves: one panel per method
    columns = 4
    n_rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(n_rows, columns, squeeze=False, sharex=True, sharey=True, layout="constrained",
                             figsize=(3.4 * columns, 2.5 * n_rows + 0.8))
    fractions = np.linspace(0, settings["fraction"], settings["steps"] + 1) * 100
    for k, method in enumerate(methods):
        ax = axes[k // columns, k % columns]
        for c, patch in enumerate(patches):
            pairs = curves.get((method, patch), [])
            if not pairs:
                continue
            morf = np.median([p[0] for p in pairs], axis=0)
            lerf = np.median([p[1] for p in pairs], axis=0)
            ax.fill_between(fractions, morf, lerf, color=f"C{c}", alpha=0.12, lw=0)
            ax.plot(fractions, morf, "-", color=f"C{c}", lw=1.6, label=f"{patch}^3 most relevant first")
            ax.plot(fractions, lerf, "--", color=f"C{c}", lw=1.6, label=f"{patch}^3 least relevant first")
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_title(method, fontsize=10)
        ax.grid(alpha=0.3)
        if k % columns == 0:
            ax.set_ylabel("target logit change")
        if k >= len(methods) - columns:
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xlabel("% of brain blocks replaced")
    for k in range(len(methods), n_rows * columns):
        axes[k // columns, k % columns].set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2 * len(patches), fontsize=9)
    fig.suptitle("Region perturbation (blocks replaced by the blurred brain): median over subjects", fontsize=10)
    save_figure(fig, output / "perturbation_curves.png", dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.evaluation.explain_eval`` (every option's help states its default)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.evaluation.explain_eval", description=__doc__.split("\n\n")[0])
    add_model_options(ap, weights="ckpt")
    add_subject_options(ap, "datalist split to explain", 0, "(default: %(default)s = all of the split)", METHODS,
                        "methods to compare")
    ap.add_argument("--patches", type=int, nargs="+", default=[8, 16],
                    help="block sides of region perturbation (default: 8 16)")
    ap.add_argument("--steps", type=int, default=5, help="perturbation steps per curve (default: %(default)s)")
    ap.add_argument("--fraction", type=float, default=0.25,
                    help="share of the brain's blocks replaced at the end (default: %(default)s)")
    ap.add_argument("--smoothgrad-samples", type=int, default=16,
                    help="noisy samples per SmoothGrad map (default: %(default)s)")
    ap.add_argument("--occlusion-mask", type=int, default=24,
                    help="occlusion block side (16: 3x the forward passes) (default: %(default)s)")
    ap.add_argument("--reduced", action="store_true",
                    help="small settings for CI: 2 steps, 2 SmoothGrad samples (default: off)")
    add_output_option(ap, ROOT / "docs" / "results", "explanations.md/.csv and the figures")
    return ap


@report_input_errors
def main(argv=None) -> int:
    if argv is None:
        reexec_with_returning_malloc("scripts.evaluation.explain_eval")
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.reduced:
        args.steps, args.smoothgrad_samples, args.occlusion_mask = 2, 2, 24
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if args.steps < 1 or not 0 < args.fraction <= 1 or any(p < 1 for p in args.patches):
        ap.error("--steps and --patches must be >= 1 and --fraction in (0, 1]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    rows, curves, panel, timing = evaluate(args)
    defaults = ap.parse_args([])
    changed = [f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if k in ("subjects", "patches", "steps", "fraction",
                                                        "smoothgrad_samples", "occlusion_mask")
               and v != getattr(defaults, k)]
    settings = {**vars(args), **timing,
                "command": " ".join(["python -m scripts.evaluation.explain_eval", *changed])}
    panels = write_outputs(rows, curves, panel, Path(args.output), settings)
    logger.info("maps_panel.png, share of saturated brain pixels (>= 0.98 L) per panel: %s",
                ", ".join(f"{p['panel']} {100 * p['saturated']:.1f} %" for p in panels))
    logger.info("explain_eval: %d subjects x %d methods in %.1f min = %.0f forward passes of %.3f s",
                timing["subjects"], len(args.methods), timing["seconds"] / 60, timing["seconds"] / timing["forward"],
                timing["forward"])
    print((Path(args.output) / "explanations.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
