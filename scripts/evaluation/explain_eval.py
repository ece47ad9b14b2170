"""Measure the explanations of a trained model on held-out synthetic subjects: localisation against the
generator's ground truth, faithfulness by region perturbation, and cost -- LRP presets against gradient-based
maps and MONAI's explainers (GradCAM, OcclusionSensitivity, SmoothGrad).

    python -m scripts.evaluation.explain_eval --output docs/results            # default model and cohort
    python -m scripts.evaluation.explain_eval --reduced --output /tmp/x ...    # small settings (CI)

Writes ``explanations.csv`` (one row per subject and method), ``explanations.md`` (means per method),
``perturbation_curves.png`` and ``maps_panel.png`` into ``--output``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.visualize import GradCAM, OcclusionSensitivity, SmoothGrad, VanillaGrad

from scripts import BUNDLE_ROOT
from scripts.evaluation.explanation_metrics import (
    aopc,
    mass_accuracy,
    patch_scores,
    perturbation_curve,
    pointing_game,
    region_share,
)
from scripts.evaluation.figures import COLOUR_RULE_TEXT, explanation_panel
from scripts.evaluation.profiling import measure_call, reexec_with_returning_malloc
from scripts.lrp import LRP
from scripts.runtime.checks import check_shape, validate_items
from scripts.runtime.datalist import load_split
from scripts.runtime.errors import report_input_errors
from scripts.runtime.outputs import atomic_target_for, atomic_write_text

logger = logging.getLogger(__name__)
ROOT = BUNDLE_ROOT
LRP_METHODS = ("lrp_a1b0", "lrp_a2b1", "lrp_epsilon_a2b1", "lrp_zbox_a2b1")
OTHER_METHODS = ("gradient_x_input", "gradient", "smoothgrad", "gradcam", "occlusion")
TARGET = 1  # preterm


def _load(config_file: str, overrides: dict, ckpt: str | None):
    parser = ConfigParser()
    parser.read_config(config_file)
    parser.update({"bundle_root": str(ROOT), **overrides})
    check_shape(parser.get_parsed_content("spatial_shape"), "spatial_shape")
    network = parser.get_parsed_content("network_def").eval()
    ckpt_path = ckpt or parser.get_parsed_content("ckpt_path")
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    datalist = parser.get_parsed_content("datalist_file")
    return parser, network, datalist


def _items(datalist: str, split: str, max_subjects: int, spatial_shape, pixdim):
    items = [it for it in load_split(datalist, split, -1) if it["label"] == 1]
    validate_items(items, keys=("image",), spatial_shape=spatial_shape, pixdim=pixdim)
    validate_items(items, keys=("tissue", "phenotype"))
    for it in items:
        for key in ("tissue", "phenotype"):
            if key not in it:
                raise ValueError(f"datalist {datalist}: subject {it['subject']} has no '{key}' map; the evaluation "
                                 "needs the synthetic cohort's tissue and phenotype maps")
    if not items:
        raise ValueError(f"datalist {datalist}: split {split!r} has no preterm subject to explain")
    return items[:max_subjects] if max_subjects > 0 else items


def _transform(parser):
    """The image through the config's ``preprocessing``, the tissue and phenotype maps through its
    ``label_preprocessing`` (nearest neighbour): both declared in ``configs/inference.json``."""
    image = parser.get_parsed_content("preprocessing")
    labels = parser.get_parsed_content("label_preprocessing")
    return lambda item: {**image({"image": item["image"]}), **labels({k: item[k] for k in ("tissue", "phenotype")})}


def _last_conv_block(network) -> str:
    """Name of the activation closing the last conv block (the first ReLU after the last Conv3d)."""
    modules = list(network.named_modules())
    last_conv = max((i for i, (_, m) in enumerate(modules) if isinstance(m, torch.nn.Conv3d)), default=None)
    relu = next((name for name, m in modules[(last_conv or 0) + 1:] if isinstance(m, torch.nn.ReLU)), None)
    if last_conv is None or relu is None:
        raise ValueError("GradCAM needs a Conv3d followed by a ReLU module")
    return relu


def compute_map(method: str, network, x: torch.Tensor, settings: dict):
    """(map as (D, H, W) numpy array, LRP conservation or None)."""
    if method.startswith("lrp_"):
        result = LRP(network)(x, method[4:], target=TARGET)
        return result.relevance[0, 0].numpy(), float(result.conservation[0])
    if method in ("gradient", "gradient_x_input"):
        grad = VanillaGrad(network)(x.clone(), index=TARGET)
        out = grad * x if method == "gradient_x_input" else grad.abs()
        return out[0, 0].detach().numpy(), None
    if method == "smoothgrad":
        sg = SmoothGrad(network, stdev_spread=0.15, n_samples=settings["smoothgrad_samples"], magnitude=True)
        return sg(x, index=TARGET)[0, 0].detach().numpy(), None
    if method == "gradcam":
        cam = GradCAM(nn_module=network, target_layers=_last_conv_block(network))
        return cam(x, class_idx=TARGET)[0, 0].detach().numpy(), None
    if method == "occlusion":
        # activate=False: MONAI's default softmax would turn the occluded outputs into probabilities, and the logit
        # minus a probability is a near-constant offset that hides the map's structure
        occ = OcclusionSensitivity(nn_module=network, mask_size=settings["occlusion_mask"], n_batch=4, overlap=0.0,
                                   mode="mean_img", activate=False)
        with torch.no_grad():
            logit = float(network(x)[0, TARGET])
        occ_map, _ = occ(x)
        return (logit - occ_map[0, TARGET]).detach().numpy(), None  # drop of the preterm logit when occluded
    raise ValueError(f"unknown method {method!r}")


def evaluate(args) -> list[dict]:
    torch.manual_seed(0)
    parser, network, datalist = _load(args.config_file, args.override, args.ckpt)
    spatial = check_shape(parser.get_parsed_content("spatial_shape"), "spatial_shape")
    pixdim = parser.get_parsed_content("pixdim")
    transform = _transform(parser)
    items = _items(datalist, args.split, args.subjects, spatial, pixdim)
    methods = [m for m in LRP_METHODS + OTHER_METHODS if m in args.methods]
    settings = {"smoothgrad_samples": args.smoothgrad_samples, "occlusion_mask": args.occlusion_mask}
    rng = np.random.default_rng(0)
    rows, curves, panel = [], {}, {}

    def score(x):
        with torch.no_grad():
            return float(network(x)[0, TARGET])

    for n, item in enumerate(items):
        data = transform({k: item[k] for k in ("image", "tissue", "phenotype")})
        x = data["image"].as_tensor()[None].float()
        tissue = data["tissue"][0].numpy().round().astype(int)
        brain = tissue > 0
        regions = {"csf": np.isin(tissue, (1, 5)), "phenotype": data["phenotype"][0].numpy() > 0.5}
        brain_patches = patch_scores(torch.as_tensor(brain.astype(np.float32)), args.patch).flatten() > 0
        candidates = torch.nonzero(brain_patches).flatten()
        random_curves = [
            perturbation_curve(score, x, candidates[torch.as_tensor(rng.permutation(len(candidates)))], args.patch,
                               args.steps, args.per_step)
            for _ in range(args.random_orders)
        ]
        curves.setdefault("random", []).append(np.mean(random_curves, axis=0))
        for method in methods:
            explain_one = functools.partial(compute_map, method, network, x, settings)
            (relevance, conservation), seconds, peak = measure_call(explain_one)
            order = torch.argsort(patch_scores(torch.as_tensor(relevance), args.patch).flatten(), descending=True)
            curve = perturbation_curve(score, x, order, args.patch, args.steps, args.per_step)
            curves.setdefault(method, []).append(curve)
            row = {"subject": item["subject"], "birth_age": item.get("birth_age", ""), "method": method,
                   "seconds": seconds, "peak_mb": peak / 2**20 if peak >= 0 else float("nan"),
                   "aopc": aopc(curve), "aopc_random": float(np.mean([aopc(c) for c in random_curves])),
                   "conservation_error": abs(1 - conservation) if conservation is not None else float("nan")}
            for name, region in regions.items():
                row[f"mass_{name}"] = mass_accuracy(relevance, region)
                row[f"chance_{name}"] = region_share(region, brain)
                row[f"pointing_{name}"] = pointing_game(relevance, region, tolerance=1)
            rows.append(row)
            if n == 0:
                panel[method] = relevance
        if n == 0:
            panel["_image"] = x[0, 0].numpy()
            panel["_phenotype"] = regions["phenotype"]
            panel["_brain"] = brain
            panel["_affine"] = np.asarray(data["image"].affine)
            panel["_subject"] = item["subject"]
        logger.info("explained %s (%d/%d)", item["subject"], n + 1, len(items))
    return rows, curves, panel


COLUMNS = ["method", "mass_csf", "chance_csf", "mass_phenotype", "chance_phenotype", "pointing_csf",
           "pointing_phenotype", "aopc", "aopc_random", "seconds", "peak_mb", "conservation_error"]


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        out.append({"method": method, **{c: float(np.nanmean([r[c] for r in mine]))
                                         if not all(np.isnan(r[c]) for r in mine)
                                         else float("nan") for c in COLUMNS[1:]}, "n": len(mine)})
    return out


def write_outputs(rows, curves, panel, output: Path, steps_fraction: str) -> list[dict]:
    """Tables and figures into ``output``; returns the explanation panel's rows (panel, colour limit, saturated
    share of its brain pixels)."""
    output.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), output / "explanations.csv")
    summary = summarise(rows)
    lines = [
        f"Explanation evaluation: target = preterm logit, {summary[0]['n']} preterm subjects; "
        f"mass = share of positive relevance inside the region (chance = the region's share of the brain); "
        f"pointing = most relevant voxel inside the region (1 voxel tolerance); AOPC = mean drop of the preterm "
        f"logit while {steps_fraction}, most relevant first vs random order; seconds / peak MB = one map on the "
        f"CPU; conservation error = |1 - sum(R)/logit| (LRP only).", "",
        "| method | mass CSF+ventricles | chance | mass phenotype | chance | pointing CSF | pointing phenotype | "
        "AOPC | AOPC random | seconds | peak MB | conservation error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append("| " + " | ".join([s["method"]] + [f"{s[c]:.3f}" if c not in ("seconds",) else f"{s[c]:.2f}"
                                                         for c in COLUMNS[1:]]).replace("nan", "-") + " |")
    lines += [
        "", "## Figures", "", "![perturbation curves](perturbation_curves.png)", "",
        "Mean preterm logit over the perturbation steps (most relevant patches first; dashed: random order).", "",
        "![maps of every method](maps_panel.png)", "",
        f"One axial slice of {panel.get('_subject', 'the first subject')} through the largest part of the phenotype "
        "(yellow outline) and each method's map of the preterm logit. Colour rule: each method has its own "
        f"{COLOUR_RULE_TEXT}, and its own colour bar (red: evidence for preterm, blue: against). GradCAM is the "
        "coarse grid of the last conv block (8x6x6 with the default network) upsampled to the input by MONAI; "
        "gradient and SmoothGrad are magnitudes (only red).",
    ]
    atomic_write_text("\n".join(lines) + "\n", output / "explanations.md")
    return _figures(curves, panel, output)


def _figures(curves, panel, output: Path) -> list[dict]:
    import matplotlib  # noqa: PLC0415 (the Agg backend is chosen before pyplot is imported)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, values in curves.items():
        mean = np.mean(values, axis=0)
        ax.plot(np.arange(len(mean)), mean, label=method, lw=2.5 if method == "random" else 1.5,
                ls="--" if method == "random" else "-", color="k" if method == "random" else None)
    ax.set_xlabel("perturbation step (patches replaced by the brain mean)")
    ax.set_ylabel("preterm logit")
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("Region perturbation, most relevant patches first")
    fig.tight_layout()
    with atomic_target_for(output / "perturbation_curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

    maps = {m: v for m, v in panel.items() if not m.startswith("_")}
    return explanation_panel(panel["_image"], maps, output / "maps_panel.png", brain=panel.get("_brain"),
                             region=panel.get("_phenotype"), affine=panel.get("_affine"),
                             title=f"{panel.get('_subject', '')}: maps of the preterm logit, one colour scale per "
                                   "method (symmetric, 99.5th percentile of |value| over the brain)")


@report_input_errors
def main(argv=None) -> int:
    if argv is None:
        reexec_with_returning_malloc("scripts.evaluation.explain_eval")
    ap = argparse.ArgumentParser(prog="python -m scripts.evaluation.explain_eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config_file", default=str(ROOT / "configs" / "inference.json"))
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the config's ckpt_path)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--subjects", type=int, default=0, help="at most this many preterm subjects (0: all)")
    ap.add_argument("--methods", nargs="+", default=list(LRP_METHODS + OTHER_METHODS))
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--per-step", type=int, default=10, help="patches replaced per step")
    ap.add_argument("--random-orders", type=int, default=3)
    ap.add_argument("--smoothgrad-samples", type=int, default=16)
    ap.add_argument("--occlusion-mask", type=int, default=16)
    ap.add_argument("--reduced", action="store_true", help="small settings for CI (fewer steps and samples)")
    ap.add_argument("--override", type=json.loads, default={}, help='config overrides as JSON, e.g. \'{"fold": 0}\'')
    ap.add_argument("--output", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args(argv)
    if args.reduced:
        args.steps, args.per_step, args.random_orders = 4, 4, 1
        args.smoothgrad_samples, args.occlusion_mask = 2, 24
    unknown = set(args.methods) - set(LRP_METHODS + OTHER_METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {LRP_METHODS + OTHER_METHODS}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    rows, curves, panel = evaluate(args)
    fraction = (f"{args.steps} steps x {args.per_step} patches of {args.patch}^3 voxels are replaced by 0 "
                "(the brain mean)")
    panels = write_outputs(rows, curves, panel, Path(args.output), fraction)
    logger.info("maps_panel.png, share of saturated brain pixels (>= 0.98 L) per panel: %s",
                ", ".join(f"{p['panel']} {100 * p['saturated']:.1f} %" for p in panels))
    print((Path(args.output) / "explanations.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
