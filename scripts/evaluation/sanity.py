"""Sanity checks of the explanation methods on a trained model: do the maps depend on the model and on the class?

    python -m scripts.evaluation.sanity --output docs/results            # default model, 6 test subjects
    python -m scripts.evaluation.sanity --reduced --output /tmp/x ...    # small settings (CI)

- **Cascading model-parameter randomisation** (Adebayo et al. 2018, "Sanity checks for saliency maps"): the
  conv/linear layers are re-initialised one more per step from the top (the output layer first) down to the first
  convolution, and each method's map of the randomised network is compared with its map of the trained one.
  A layer is the unit the LRP engine canonises: a convolution and the BatchNorm that follows it (folded into one
  layer by the engine) are randomised together -- the convolution gets PyTorch's default initialisation with a
  fixed seed per layer, the BatchNorm is reset to the identity (running mean 0, variance 1, scale 1, shift 0).
  Similarity per step: Spearman rank correlation of |map| and of the signed map over the brain (the input's
  non-zero voxels), and SSIM of |map| scaled by its 99.5th percentile over the brain (the figures' colour limit,
  clipped to [0, 1]; 7^3 uniform window, over the brain's bounding box).
  **Pass**: the median over subjects of the rank correlation of |map| after randomising every layer is below
  ``RANDOMISATION_THRESHOLD`` (0.5).
- **Class sensitivity** (Sixt et al. 2020, "When explanations lie"): maps of the same input for the term logit,
  the preterm logit and the logit difference (preterm - term); Spearman rank correlation of the signed maps
  between targets. **Pass**: the median over subjects of rho(term map, preterm map) is below ``CLASS_THRESHOLD``
  (0.9): the two classes' maps are not nearly the same map.

Targets: term subjects are explained for the term logit, preterm subjects for the preterm logit (randomisation).
Writes ``sanity.md`` (the verdicts and medians), ``sanity_summary.csv``, ``sanity_randomisation.csv`` and
``sanity_class.csv`` (one row per subject, method and step / target pair), ``sanity_randomisation.png`` and
``sanity_class.png`` into ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn

from scripts import BUNDLE_ROOT
from scripts.evaluation.cli import add_model_options, add_output_option, add_subject_options
from scripts.evaluation.explain_eval import load_model, load_subjects, select_subjects
from scripts.evaluation.explainers import GRADIENT_METHODS, LRP_METHODS, compute_maps, forward_seconds
from scripts.evaluation.explanation_metrics import magnitude_scaled, median_quartiles, rank_correlation, ssim
from scripts.evaluation.tables import markdown_table, save_figure
from scripts.runtime.errors import report_input_errors
from scripts.runtime.outputs import atomic_write_text, write_csv

logger = logging.getLogger(__name__)
ROOT = BUNDLE_ROOT
METHODS = LRP_METHODS + GRADIENT_METHODS  # not occlusion / SmoothGrad: tens of forward passes per map
RANDOMISATION_THRESHOLD = 0.5  # median rank correlation of |map| after randomising every layer must be below
CLASS_THRESHOLD = 0.9  # median rank correlation of the term and preterm maps must be below
CLASS_NAMES = {0: "term", 1: "preterm"}
CLASS_TARGETS = (0, 1, "difference")
CLASS_PAIRS = (("term", "preterm"), ("preterm", "difference"), ("term", "difference"))

# (model, x, targets) -> {target: {method: (D, H, W) map}}
Explainer = Callable[[nn.Module, torch.Tensor, Sequence], Mapping]


# -- randomisation --------------------------------------------------------------------------------------------------
def _leaves(network: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in network.named_modules() if next(m.children(), None) is None]


def randomisable_layers(network: nn.Module) -> list[str]:
    """Names of the conv/linear layers, top (output) first: the cascade's order."""
    return [name for name, m in reversed(_leaves(network)) if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


def layer_labels(network: nn.Module) -> dict[str, str]:
    """Readable names of the conv/linear layers: conv1..convN and fc1..fcM in execution order."""
    labels, counts = {}, {"conv": 0, "fc": 0}
    for name, m in _leaves(network):
        kind = "conv" if isinstance(m, nn.modules.conv._ConvNd) else "fc" if isinstance(m, nn.Linear) else None
        if kind:
            counts[kind] += 1
            labels[name] = f"{kind}{counts[kind]}"
    return labels


def randomised(network: nn.Module, count: int, seed: int = 0) -> nn.Module:
    """A copy of ``network`` (eval mode) whose top ``count`` conv/linear layers are re-initialised: PyTorch's default
    initialisation (``reset_parameters``) with seed ``seed + position`` (position 0 = the output layer), so that
    the cascade's steps share their randomised layers; a BatchNorm that directly follows a randomised layer (the
    LRP engine folds it into that layer) is reset to the identity. ``network`` is untouched."""
    model = copy.deepcopy(network).eval()
    leaves = _leaves(model)
    index = {name: i for i, (name, _) in enumerate(leaves)}
    for position, name in enumerate(randomisable_layers(model)[:count]):
        module = leaves[index[name]][1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + position)
            module.reset_parameters()
        following = leaves[index[name] + 1][1] if index[name] + 1 < len(leaves) else None
        if isinstance(following, nn.modules.batchnorm._BatchNorm):
            following.reset_parameters()  # also resets the running statistics
    return model


class _Ranked:
    """A map's ranks over the brain, computed once and compared with many maps."""

    def __init__(self, values: np.ndarray, mask: np.ndarray):
        self.values = np.asarray(values, dtype=np.float64)[mask]
        self.constant = np.ptp(self.values) == 0 if self.values.size else True
        self.ranks = None if self.constant else stats.rankdata(self.values)

    def correlation(self, other: np.ndarray) -> float:
        other = np.asarray(other, dtype=np.float64)
        if self.constant or other.size < 2 or np.ptp(other) == 0:
            return 0.0
        return float(np.corrcoef(self.ranks, stats.rankdata(other))[0, 1])


def _box(mask: np.ndarray, margin: int = 3) -> tuple[slice, ...]:
    where = np.argwhere(mask)
    if not len(where):
        return tuple(slice(None) for _ in mask.shape)
    low, high = where.min(0), where.max(0) + 1
    return tuple(slice(max(0, lo - margin), min(n, hi + margin)) for lo, hi, n in zip(low, high, mask.shape))


class _Reference:
    """One method's map of the trained network, prepared for comparisons."""

    def __init__(self, relevance: np.ndarray, brain: np.ndarray):
        self.brain, self.box = brain, _box(brain)
        self.signed = _Ranked(relevance, brain)
        self.magnitude = _Ranked(np.abs(relevance), brain)
        self.scaled = magnitude_scaled(relevance, brain)[self.box]

    def compare(self, relevance: np.ndarray) -> dict:
        inside = np.asarray(relevance, dtype=np.float64)[self.brain]
        return {"rank_abs": self.magnitude.correlation(np.abs(inside)), "rank_signed": self.signed.correlation(inside),
                "ssim_abs": ssim(self.scaled, magnitude_scaled(relevance, self.brain)[self.box])}


def randomisation_rows(network: nn.Module, x: torch.Tensor, target, brain: np.ndarray, explain: Explainer,
                       seed: int = 0, subject: str = "") -> list[dict]:
    """The cascade for one input: one row per method and step (step 0: the trained network, similarity 1 by
    definition; step k: the top k conv/linear layers randomised) with rank correlations and SSIM to the map of
    the trained network."""
    brain = np.asarray(brain, dtype=bool)
    layers = randomisable_layers(network)
    labels = layer_labels(network)
    original = explain(network, x, [target])[target]
    references = {method: _Reference(m, brain) for method, m in original.items()}
    rows = [{"subject": subject, "target": target, "method": method, "step": 0, "randomised": "none",
             "rank_abs": 1.0, "rank_signed": 1.0, "ssim_abs": 1.0} for method in original]
    for count in range(1, len(layers) + 1):
        maps = explain(randomised(network, count, seed), x, [target])[target]
        for method, reference in references.items():
            rows.append({"subject": subject, "target": target, "method": method, "step": count,
                         "randomised": labels[layers[count - 1]], **reference.compare(maps[method])})
    return rows


def class_rows(network: nn.Module, x: torch.Tensor, brain: np.ndarray, explain: Explainer,
               subject: str = "") -> list[dict]:
    """One row per method: rank correlations of the signed maps between the term, preterm and logit-difference
    targets."""
    brain = np.asarray(brain, dtype=bool)
    maps = explain(network, x, list(CLASS_TARGETS))
    named = {"term": maps[0], "preterm": maps[1], "difference": maps["difference"]}
    rows = []
    for method in maps[1]:
        row = {"subject": subject, "method": method}
        for a, b in CLASS_PAIRS:
            row[f"rho_{a}_{b}"] = rank_correlation(named[a][method], named[b][method], brain)
        rows.append(row)
    return rows


def randomisation_verdicts(rows: list[dict], threshold: float = RANDOMISATION_THRESHOLD) -> list[dict]:
    """Per method: median (IQR) over subjects of each similarity after randomising every layer, the first step
    whose median rank correlation of |map| is below ``threshold``, and pass/fail."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        last = max(r["step"] for r in mine)
        final = [r for r in mine if r["step"] == last]
        row = {"method": method, "subjects": len(final)}
        for key in ("rank_abs", "rank_signed", "ssim_abs"):
            row[key], row[f"{key}_q1"], row[f"{key}_q3"] = median_quartiles(r[key] for r in final)
        first = None
        for step in range(1, last + 1):
            at = [r for r in mine if r["step"] == step]
            if median_quartiles(r["rank_abs"] for r in at)[0] < threshold:
                first = at[0]["randomised"]
                break
        row["decorrelated_from"] = f"+{first}" if first else "never"
        row["verdict"] = "pass" if row["rank_abs"] < threshold else "FAIL"
        out.append(row)
    return out


def class_verdicts(rows: list[dict], threshold: float = CLASS_THRESHOLD) -> list[dict]:
    """Per method: median (IQR) over subjects of each target pair's rank correlation and pass/fail (median
    rho(term, preterm) below ``threshold``)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        row = {"method": method, "subjects": len(mine)}
        for a, b in CLASS_PAIRS:
            key = f"rho_{a}_{b}"
            row[key], row[f"{key}_q1"], row[f"{key}_q3"] = median_quartiles(r[key] for r in mine)
        row["verdict"] = "pass" if row["rho_term_preterm"] < threshold else "FAIL"
        out.append(row)
    return out


# -- the command ----------------------------------------------------------------------------------------------------
def _explainer(methods: Sequence[str], settings: dict | None = None) -> Explainer:
    def explain(model, x, targets):
        return compute_maps(methods, model, x, targets, settings)

    return explain


def evaluate(args) -> tuple[list[dict], list[dict], dict]:
    torch.manual_seed(0)
    parser, network, datalist = load_model(args.config_file, args.override, args.ckpt)
    items = select_subjects(load_subjects(datalist, args.split, parser, need_maps=False), args.subjects)
    transform = parser.get_parsed_content("preprocessing")
    explain = _explainer(args.methods)
    random_rows, class_rows_, timing = [], [], {"subjects": len(items), "seconds": 0.0}
    start = time.perf_counter()
    for n, item in enumerate(items):
        data = transform({"image": item["image"]})
        x = data["image"].as_tensor()[None].float()
        brain = x[0, 0].numpy() != 0
        label = int(item["label"])
        if n == 0:
            timing["forward"] = forward_seconds(network, x)
        if "randomisation" in args.checks:
            random_rows += randomisation_rows(network, x, label, brain, explain, args.seed, item["subject"])
        if "class" in args.checks:
            class_rows_ += class_rows(network, x, brain, explain, item["subject"])
        logger.info("sanity checks of %s (%s, %d/%d) done, %.0f s so far", item["subject"], CLASS_NAMES[label],
                    n + 1, len(items), time.perf_counter() - start)
    timing["seconds"] = time.perf_counter() - start
    timing["layers"] = [layer_labels(network)[name] for name in randomisable_layers(network)]
    return random_rows, class_rows_, timing


def _fmt_iqr(row, key, digits=2):
    value = row.get(key)
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f} [{row[f'{key}_q1']:.{digits}f}, {row[f'{key}_q3']:.{digits}f}]"


def write_outputs(random_rows, class_rows_, timing, output: Path, command: str) -> str:
    output.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Sanity checks of the explanation methods", "",
        f"Generated by `{command}` ({timing['subjects']} test subjects, preterm and term in turn; "
        f"{timing['seconds'] / 60:.1f} min on this machine, {timing['seconds'] / timing['forward']:.0f} times its "
        f"forward pass of {timing['forward']:.2f} s). Medians over subjects, [interquartile range]. Brain = the "
        "network input's non-zero voxels. Term subjects are explained for the term logit, preterm subjects for the "
        "preterm logit.", "",
    ]
    summary = []
    if random_rows:
        verdicts = randomisation_verdicts(random_rows)
        write_csv(random_rows, output / "sanity_randomisation.csv")
        order = " -> ".join(timing["layers"])
        lines += [
            "## Cascading model-parameter randomisation", "",
            f"Layers re-initialised from the top, one more per step: {order} (a convolution together with the "
            "BatchNorm that the LRP engine folds into it: PyTorch's default initialisation with a fixed seed per "
            "layer, the BatchNorm reset to the identity). Compared with the map of the trained network: Spearman "
            "rank correlation of |map| and of the signed map over the brain, SSIM of |map| scaled by its 99.5th "
            "percentile over the brain (clipped to [0, 1], 7^3 window). Values after randomising every layer; "
            f"**pass** = median rank correlation of |map| below {RANDOMISATION_THRESHOLD}; 'decorrelated from' = "
            "the first step whose median is below it.", "",
            markdown_table(
                [{**v, "rank_abs_s": _fmt_iqr(v, "rank_abs"), "rank_signed_s": _fmt_iqr(v, "rank_signed"),
                  "ssim_s": _fmt_iqr(v, "ssim_abs")} for v in verdicts],
                ["method", "rank_abs_s", "rank_signed_s", "ssim_s", "decorrelated_from", "verdict"],
                ["method", "rank corr. of abs map", "rank corr. of signed map", "SSIM of abs map",
                 "decorrelated from", "randomisation"]),
            "![randomisation](sanity_randomisation.png)", "",
            "Median over subjects (line) and interquartile range (band) of each similarity per cascade step; grey "
            f"line: the pass threshold {RANDOMISATION_THRESHOLD} for the rank correlation of |map|.", "",
        ]
        summary = [{"method": v["method"], "randomisation_rank_abs": v["rank_abs"],
                    "randomisation_rank_signed": v["rank_signed"], "randomisation_ssim_abs": v["ssim_abs"],
                    "decorrelated_from": v["decorrelated_from"], "randomisation": v["verdict"]} for v in verdicts]
        _randomisation_figure(random_rows, verdicts, timing["layers"], output / "sanity_randomisation.png")
    if class_rows_:
        verdicts = class_verdicts(class_rows_)
        write_csv(class_rows_, output / "sanity_class.csv")
        lines += [
            "## Class sensitivity", "",
            "Spearman rank correlation of the signed maps of the same input for the term logit, the preterm logit "
            f"and the logit difference (preterm - term). **Pass** = median rho(term, preterm) below "
            f"{CLASS_THRESHOLD}: the two classes' maps are not nearly the same map. A correlation near -1 is the "
            "expected answer of a two-class network whose two logits move in opposite directions (the gradient's "
            "own maps do that); near +1 means the map shows the same voxels as evidence for both classes.", "",
            markdown_table(
                [{**v, **{f"s_{a}_{b}": _fmt_iqr(v, f"rho_{a}_{b}") for a, b in CLASS_PAIRS}} for v in verdicts],
                ["method", "s_term_preterm", "s_preterm_difference", "s_term_difference", "verdict"],
                ["method", "rho(term, preterm)", "rho(preterm, difference)", "rho(term, difference)",
                 "class sensitivity"]),
            "![class sensitivity](sanity_class.png)", "",
            "Per method, the rank correlation of the term and the preterm map for each subject (dots) and their "
            f"spread (box: median and quartiles); diamonds: median rho(preterm, difference). Grey line: the pass "
            f"threshold {CLASS_THRESHOLD}.", "",
        ]
        by_method = {v["method"]: v for v in verdicts}
        if summary:
            for row in summary:
                v = by_method.get(row["method"], {})
                row.update({"rho_term_preterm": v.get("rho_term_preterm"), "class": v.get("verdict", "")})
        else:
            summary = [{"method": v["method"], "rho_term_preterm": v["rho_term_preterm"], "class": v["verdict"]}
                       for v in verdicts]
        _class_figure(class_rows_, output / "sanity_class.png")
    write_csv(summary, output / "sanity_summary.csv")
    text = "\n".join(lines)
    atomic_write_text(text, output / "sanity.md")
    return text


def _pyplot():
    import matplotlib  # noqa: PLC0415 (the Agg backend is chosen before pyplot is imported)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _randomisation_figure(rows, verdicts, layers, path: Path, columns: int = 4) -> None:
    plt = _pyplot()
    methods = [v["method"] for v in verdicts]
    verdict = {v["method"]: v for v in verdicts}
    steps = ["none"] + [f"+{name}" for name in layers]
    n_rows = -(-len(methods) // columns)
    fig, axes = plt.subplots(n_rows, columns, squeeze=False, sharex=True, sharey=True, layout="constrained",
                             figsize=(3.4 * columns, 2.7 * n_rows + 0.8))
    styles = {"rank_abs": ("rank corr. |map|", "-", "C0"), "rank_signed": ("rank corr. signed map", "--", "C1"),
              "ssim_abs": ("SSIM |map|", ":", "C2")}
    x = np.arange(len(steps))
    for k, method in enumerate(methods):
        ax = axes[k // columns, k % columns]
        for key, (label, style, colour) in styles.items():
            per_step = [[r[key] for r in rows if r["method"] == method and r["step"] == s] for s in range(len(steps))]
            q = np.array([np.percentile(v, [25, 50, 75]) if v else [np.nan] * 3 for v in per_step])
            ax.fill_between(x, q[:, 0], q[:, 2], color=colour, alpha=0.15, lw=0)
            ax.plot(x, q[:, 1], style, color=colour, lw=1.8, label=label)
        ax.axhline(RANDOMISATION_THRESHOLD, color="0.5", lw=1)
        ax.axhline(0, color="0.8", lw=0.8)
        v = verdict[method]
        ax.set_title(f"{method}: {v['verdict']} ({v['rank_abs']:.2f})", fontsize=10)
        ax.set_ylim(-1.05, 1.05)
        ax.grid(alpha=0.3)
        if k % columns == 0:
            ax.set_ylabel("similarity to the trained map")
    for k in range(len(methods), n_rows * columns):
        axes[k // columns, k % columns].set_visible(False)
    for k in range(max(0, len(methods) - columns), len(methods)):  # bottom panel of each column gets the labels
        ax = axes[k // columns, k % columns]
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xticks(x, steps, rotation=60, fontsize=8)
        ax.set_xlabel("layers randomised (cumulative, top first)", fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=9)
    fig.suptitle(f"Cascading randomisation: median and IQR over subjects; pass = median rank corr. of |map| "
                 f"after all layers < {RANDOMISATION_THRESHOLD} (grey line)", fontsize=10)
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def _class_figure(rows, path: Path) -> None:
    plt = _pyplot()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(methods) + 1.6), layout="constrained")
    data = [[r["rho_term_preterm"] for r in rows if r["method"] == m] for m in methods]
    y = np.arange(len(methods))
    ax.boxplot(data, positions=y, vert=False, widths=0.6, showfliers=False)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data):
        ax.scatter(values, i + rng.uniform(-0.15, 0.15, len(values)), s=12, color="C0", alpha=0.7, zorder=3)
    diff = [np.median([r["rho_preterm_difference"] for r in rows if r["method"] == m]) for m in methods]
    ax.scatter(diff, y, marker="D", s=28, color="C3", zorder=4, label="median rho(preterm, difference)")
    ax.axvline(CLASS_THRESHOLD, color="0.5", lw=1)
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_yticks(y, methods, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman rank correlation of the signed maps (term target vs preterm target)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8)
    ax.set_title(f"Class sensitivity: pass = median rho(term, preterm) < {CLASS_THRESHOLD} (grey line)", fontsize=10)
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.evaluation.sanity`` (every option's help states its default)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.evaluation.sanity", description=__doc__.split("\n\n")[0])
    add_model_options(ap, weights="ckpt")
    add_subject_options(ap, "datalist split to check on", 6, "(0: all) (default: %(default)s)", METHODS,
                        "methods to check")
    ap.add_argument("--checks", nargs="+", default=["randomisation", "class"], choices=["randomisation", "class"],
                    help="which checks to run (default: randomisation class)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the re-initialised layers (default: %(default)s)")
    ap.add_argument("--reduced", action="store_true", help="small settings for CI: 2 subjects (default: off)")
    add_output_option(ap, ROOT / "docs" / "results", "sanity.md, the CSVs and the figures")
    return ap


@report_input_errors
def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.reduced:
        args.subjects = min(args.subjects, 2) if args.subjects > 0 else 2
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    random_rows, class_rows_, timing = evaluate(args)
    command = "python -m scripts.evaluation.sanity" + (f" --subjects {args.subjects}" if args.subjects != 6 else "")
    print(write_outputs(random_rows, class_rows_, timing, Path(args.output), command))
    logger.info("sanity: %d subjects in %.1f min = %.0f forward passes of %.3f s", timing["subjects"],
                timing["seconds"] / 60, timing["seconds"] / timing["forward"], timing["forward"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
