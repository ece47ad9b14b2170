"""Twin counterfactuals: where a preterm decision comes from (issue 38, stage 1).

Every preterm subject of a synthetic cohort has a term-equivalent twin: the same baby (misregistration, contrast,
bias field, noise: the subject's own random stream) rendered without the preterm effect
(``scripts.data.synthetic.Draw``). Subject and twin differ only within the blurred footprint of the phenotype, so the
gap between their logit margins (preterm minus term logit) is the phenotype's whole effect on the decision. This
command splits that gap, for each set of weights, through the deployed preprocessing (``configs/inference.json``):

- **global only**: the twin normalised with the subject's brain statistics (the brain-wide shift the phenotype causes,
  no phenotype voxel); **local only**: the subject normalised with the twin's statistics (the phenotype's own voxels,
  no brain-wide shift). Each as a share of the gap: (margin(hybrid) - margin(twin)) / gap;
- **removed by swapping** one component's footprint for the twin's (the subject rendered without that component's
  effect: ventricles, extra-axial CSF, folding): (margin(subject) - margin(swapped)) / gap; **added by pasting** it
  into the twin: (margin(twin + component) - margin(twin)) / gap;
- **relevance enrichment** of each LRP preset's map of the preterm logit on the subject
  (``scripts.runtime.localisation``: against the brain) in CSF + ventricles, the ventricles, the phenotype and each
  component's footprint, with the same preset on the same network with fully randomised weights as its baseline
  (bright tissue is enriched in any input-times-something map even without a network). Each map is signed by the
  logit it explains, so that its positive part is the relevance supporting that logit: the randomised network's
  preterm logit is negative (about -0.1), and its unsigned maps have almost no positive relevance to localise.

Medians over the preterm subjects with percentile-bootstrap 95 % intervals. Per-subject results are kept under
``--work`` and reused, so an interrupted run resumes. The evaluation cohort is read only with ``--report-evaluation``
(it reports, it never chooses).

    git show caa40c7:models/model.pt > eval/previous.pt   # the previous, plain-trained weights
    python -m scripts.evaluation.evidence --cohort tuning --output docs/results --weights shipped=models/model.pt \\
        --weights previous=eval/previous.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Compose

from scripts import BUNDLE_ROOT
from scripts.data.cohorts import COHORTS
from scripts.data.synthetic import COMPONENTS, Draw, only_components, without_components
from scripts.data.synthetic_anatomy import builtin_template
from scripts.evaluation.cli import add_output_option, json_object
from scripts.evaluation.robustness import Measurer
from scripts.evaluation.sanity import randomisable_layers, randomised
from scripts.lrp.composites import PRESETS
from scripts.runtime.explain import APP_PRESET, explain
from scripts.runtime.localisation import CSF_VENTRICLES, OUTSIDE_BRAIN, localisation, median_ci, paired_median_ci
from scripts.runtime.outputs import atomic_write_text, file_sha256, save_nifti, write_csv
from scripts.runtime.progress import progress
from scripts.runtime.reference import UNRECORDED

__all__ = ["MAP_REGIONS", "Twins", "build_parser", "gap_shares", "main", "normalise_with"]

logger = logging.getLogger(__name__)
INFERENCE_CONFIG = BUNDLE_ROOT / "configs" / "inference.json"
VARIANTS = ("subject", "twin", *(f"without_{c}" for c in COMPONENTS), *(f"only_{c}" for c in COMPONENTS))
MAP_REGIONS = (CSF_VENTRICLES, "ventricles", "phenotype", *(f"footprint_{c}" for c in COMPONENTS))
RESULT_VERSION = 2  # bump when a per-subject result's content changes: older ones are recomputed


def normalise_with(raw: torch.Tensor, reference: torch.Tensor, normaliser) -> torch.Tensor:
    """``raw`` (the preprocessed image before its last step, the intensity normalisation) normalised with the
    statistics of ``reference`` instead of its own. ``normaliser`` is that last step of the config's
    ``preprocessing`` (``Normalisedd``, ``scripts/runtime/normalisation.py``: ``statistics`` / ``apply``); another
    step is an error naming it."""
    if not (hasattr(normaliser, "statistics") and hasattr(normaliser, "apply")):
        raise TypeError(f"the preprocessing ends with {type(normaliser).__name__}, not a normaliser with statistics "
                        "and apply (scripts.runtime.normalisation.Normalisedd): no statistics to exchange")
    if not torch.as_tensor(reference).ne(0).any():
        raise ValueError("the reference image is empty (no non-zero voxel): no brain statistics to borrow")
    return normaliser.apply(raw.clone(), normaliser.statistics(reference))


def gap_shares(margins: dict[str, float]) -> dict[str, float]:
    """The shares of the subject-twin logit gap (module docstring) from the margins of the variants."""
    gap = margins["subject"] - margins["twin"]
    share = (lambda value: value / gap) if gap != 0 else (lambda value: float("nan"))
    out = {"gap": gap,
           "global_only": share(margins["global_only"] - margins["twin"]),
           "local_only": share(margins["local_only"] - margins["twin"])}
    for c in COMPONENTS:
        out[f"removed_{c}"] = share(margins["subject"] - margins[f"without_{c}"])
        out[f"added_{c}"] = share(margins[f"only_{c}"] - margins["twin"])
    return out


class Twins:
    """The deployed path of ``config`` (CPU) for each weights file of ``weights`` (``robustness.Measurer``: its
    network, and its preprocessing ending with the normalisation the weights record, so z-score and white-peak
    weights are compared each on its own input). Synthetic subjects are on the template grid: the steps before the
    normalisation do the same for all weights, and the first weights' are used."""

    def __init__(self, weights: dict[str, Path], config: str | Path = INFERENCE_CONFIG, overrides: dict | None = None):
        labels = ["tissue", "phenotype", *(f"footprint_{c}" for c in COMPONENTS)]
        overrides = {**(overrides or {}), "label_keys": labels}
        measurers = {name: Measurer(Path(path).parent, overrides, config, ckpt=path) for name, path in weights.items()}
        if not measurers:
            raise ValueError("Twins: no weights to measure")
        first = next(iter(measurers.values()))
        self.raw = Compose(first.preprocessing.transforms[:-1])
        self.labels = first.parser.get_parsed_content("label_preprocessing")
        self.networks = {name: m.network for name, m in measurers.items()}
        self.normalisers = {name: m.preprocessing.transforms[-1] for name, m in measurers.items()}
        self.normalisation = {name: m.normalisation for name, m in measurers.items()}
        self.template = builtin_template()

    def measure(self, draw: Draw, presets: list[str], work: Path, names: list[str] | None = None) -> dict[str, dict]:
        """Per weights name (``names``, default all): the margins, probabilities and gap shares of one preterm
        subject, and its maps' localisation (trained and randomised network) per preset."""
        ph = draw.phenotype
        phenotypes = {"subject": ph, "twin": ph.term_equivalent(),
                      **{f"without_{c}": without_components(ph, c) for c in COMPONENTS},
                      **{f"only_{c}": only_components(ph, c) for c in COMPONENTS}}
        raw, files = {}, {}
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            affine = self.template.affine
            for variant, phenotype in phenotypes.items():
                image, labels, pmask = draw.render(self.template, phenotype)
                path = save_nifti(image, affine, Path(tmp) / f"{variant}.nii.gz")
                raw[variant] = self.raw({"image": str(path)})["image"]
                if variant == "subject":
                    files["tissue"] = save_nifti(labels, affine, Path(tmp) / "tissue.nii.gz", dtype=np.uint8)
                    files["phenotype"] = save_nifti(pmask, affine, Path(tmp) / "phenotype.nii.gz", dtype=np.uint8)
                    subject_labels = labels
                elif variant.startswith("without_"):
                    c = variant.removeprefix("without_")
                    footprint = (labels != subject_labels).astype(np.uint8)
                    files[f"footprint_{c}"] = save_nifti(footprint, affine, Path(tmp) / f"footprint_{c}.nii.gz",
                                                         dtype=np.uint8)
            grids = self.labels({k: str(v) for k, v in files.items()})
        tissue = np.asarray(grids["tissue"])[0]
        regions = {name: np.asarray(grids[name])[0] > 0.5 for name in ("phenotype", *(f"footprint_{c}"
                                                                                     for c in COMPONENTS))}
        batches = {}  # per normalisation: the variants' network inputs
        results = {}
        for weights in names or list(self.networks):
            network, normaliser = self.networks[weights], self.normalisers[weights]
            if self.normalisation[weights] not in batches:
                inputs = {variant: normaliser({"image": raw[variant].clone()})["image"] for variant in raw}
                inputs["global_only"] = normalise_with(raw["twin"], raw["subject"], normaliser)
                inputs["local_only"] = normalise_with(raw["subject"], raw["twin"], normaliser)
                batches[self.normalisation[weights]] = (list(inputs), torch.stack(
                    [torch.as_tensor(inputs[v]).as_subclass(torch.Tensor).float() for v in inputs]))
            variants, batch = batches[self.normalisation[weights]]
            with torch.no_grad():
                logits = network(batch)
            margins = {v: float(logits[i, 1] - logits[i, 0]) for i, v in enumerate(variants)}
            probs = torch.softmax(logits, dim=1)[:, 1]
            row = {"subject": draw.subject, "weights": weights, "normalisation": self.normalisation[weights],
                   "birth_age": ph.birth_age,
                   **{f"p_{v}": float(probs[i]) for i, v in enumerate(variants)},
                   **{f"margin_{v}": margins[v] for v in variants}, **gap_shares(margins)}
            maps = []
            x = batch[:1]
            random_network = randomised(network, len(randomisable_layers(network)))
            for kind, net in (("trained", network), ("randomised", random_network)):
                explained = explain(net, x, presets, target=1)
                # the relevance that supports the explained score: its positive part for a positive preterm logit
                # (a trained network on a preterm subject), its negative part for a negative one (the randomised
                # network's preterm logit is about -0.1 on any input; unsigned, its maps have < 1 % positive mass)
                logit = float(explained.logits[0, 1])
                sign = 1.0 if logit >= 0 else -1.0
                for preset in presets:
                    measure = localisation(sign * explained.relevance(0, preset)[0].numpy(), tissue,
                                           {CSF_VENTRICLES: np.isin(np.rint(tissue), (1, 5)),
                                            "ventricles": np.rint(tissue) == 5, **regions})
                    maps.append({"subject": draw.subject, "weights": weights, "preset": preset, "network": kind,
                                 "preterm_logit": logit,
                                 **{f"enrichment_{r}": measure[r]["enrichment"] for r in MAP_REGIONS},
                                 **{f"share_{r}": measure[r]["share"] for r in MAP_REGIONS},
                                 "share_outside_brain": measure[OUTSIDE_BRAIN]["share"]})
            results[weights] = {"row": row, "maps": maps}
        return results


def _table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(row) + " |" for row in rows)])


def _fmt(summary, digits: int = 2) -> str:
    median, low, high, n = summary
    if not np.isfinite(median):
        return "n/a"
    return f"{median:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]" if np.isfinite(low) else f"{median:.{digits}f}"


def summary_markdown(rows: list[dict], maps: list[dict], info: dict) -> str:
    """docs/results/evidence.md: the gap shares and the maps' enrichment per weights, medians [95 % CI]."""
    weights = list(dict.fromkeys(r["weights"] for r in rows))
    method = {r["weights"]: r.get("normalisation", UNRECORDED) for r in rows}
    lines = ["# Twin counterfactuals: where the preterm decision comes from", "",
             f"Generated by `{info['command']}` on {info['cohort']}. Preterm subjects: {info['subjects']}. "
             "Weights (normalisation): " + "; ".join(f"{w} `{info['sha256'][w][:12]}` ({method[w]})" for w in weights)
             + ".", "",
             "Each preterm subject is compared with its term-equivalent twin (the same baby without the preterm "
             "effect; `scripts/data/synthetic.py`, `Draw`). Gap = logit margin (preterm minus term) of the subject "
             "minus the twin's. Medians over subjects with percentile-bootstrap 95 % intervals. What each share "
             "means: `python -m scripts.evaluation.evidence --help`.", "",
             "## Where the logit gap comes from", ""]
    keys = [("p_subject", "p(preterm) subject"), ("p_twin", "p(preterm) twin"),
            ("p_global_only", "p twin, subject's statistics"), ("p_local_only", "p subject, twin's statistics"),
            ("gap", "logit gap"), ("global_only", "share: global only"), ("local_only", "share: local only"),
            *((f"removed_{c}", f"share removed: swap {c}") for c in COMPONENTS),
            *((f"added_{c}", f"share added: paste {c}") for c in COMPONENTS)]
    table = [[label, *(_fmt(median_ci([r[k] for r in rows if r["weights"] == w])) for w in weights)]
             for k, label in keys]
    lines += [_table(["measure", *weights], table), ""]
    lines += ["## Relevance enrichment of the preterm maps (against the brain)", "",
              "Enrichment = share of the positive relevance in the region / the region's share of the brain "
              "(`scripts/runtime/localisation.py`); 1 = no preference. Random: the same preset on the network with "
              "every conv/linear layer re-initialised. Each map is signed by the preterm logit it explains (the "
              "randomised network's is negative: its map's negative part supports it). Difference: paired, trained "
              "minus random.", ""]
    presets = list(dict.fromkeys(m["preset"] for m in maps))
    for w in weights:
        table = []
        for preset in presets:
            mine = {kind: [m for m in maps if m["weights"] == w and m["preset"] == preset and m["network"] == kind]
                    for kind in ("trained", "randomised")}
            cells = [preset + (" (app)" if preset == APP_PRESET else "")]
            for region in (CSF_VENTRICLES, "ventricles", "phenotype"):
                key = f"enrichment_{region}"
                trained = [m[key] for m in mine["trained"]]
                random = [m[key] for m in mine["randomised"]]
                cells += [_fmt(median_ci(trained)), _fmt(median_ci(random)),
                          _fmt(paired_median_ci(trained, random))]
            cells += [_fmt(median_ci([m[f"enrichment_footprint_{c}"] for m in mine["trained"]]))
                      for c in COMPONENTS]
            cells.append(_fmt(median_ci([m["share_outside_brain"] for m in mine["trained"]]), 3))
            table.append(cells)
        header = ["preset"]
        for region in ("CSF+ventricles", "ventricles", "phenotype"):
            header += [region, "random", "difference"]
        header += [*(f"{c} footprint" for c in COMPONENTS), "share outside brain"]
        lines += [f"### {w}", "", _table(header, table), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m scripts.evaluation.evidence", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cohort", default="tuning", choices=sorted(COHORTS),
                    help="the named synthetic cohort whose preterm subjects are rendered with their twins "
                         "(scripts/data/cohorts.py; default: %(default)s)")
    ap.add_argument("--weights", action="append", default=None, metavar="NAME=PATH",
                    help="weights to measure, repeatable (default: shipped=models/model.pt)")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS),
                    help=f"LRP presets whose maps are localised (default: all: {' '.join(PRESETS)})")
    ap.add_argument("--subjects", type=int, default=0,
                    help="at most this many preterm subjects, in cohort order (default: 0, all)")
    ap.add_argument("--config_file", default=str(INFERENCE_CONFIG),
                    help="the inference config giving the network and preprocessing (default: configs/inference.json)")
    ap.add_argument("--override", type=json_object, default={}, help="config overrides as JSON (default: {}, none)")
    ap.add_argument("--work", default=str(BUNDLE_ROOT / "eval" / "evidence"),
                    help="folder of the per-subject results, reused by a rerun (default: eval/evidence in the bundle)")
    ap.add_argument("--report-evaluation", action="store_true",
                    help="allow the evaluation cohort (read only to report, never to choose; default: refused)")
    add_output_option(ap, BUNDLE_ROOT / "docs" / "results", "evidence.md and evidence.csv, evidence_maps.csv")
    return ap


def _weights(specs: list[str] | None) -> dict[str, Path]:
    out = {}
    for spec in specs or ["shipped=" + str(BUNDLE_ROOT / "models" / "model.pt")]:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--weights must be NAME=PATH, got {spec!r}")
        if not Path(path).is_file():
            raise SystemExit(f"--weights {name}: file not found: {path}")
        out[name] = Path(path)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cohort = COHORTS[args.cohort]
    if cohort.role == "evaluation" and not args.report_evaluation:
        raise SystemExit(f"--cohort {args.cohort} is the evaluation cohort: it is read only to report, never to "
                         "choose; pass --report-evaluation to report on it")
    for preset in args.presets:
        if preset not in PRESETS:
            raise SystemExit(f"--presets: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    weights = _weights(args.weights)
    output, work = Path(args.output), Path(args.work) / args.cohort
    work.mkdir(parents=True, exist_ok=True)
    draws = [d for d in (Draw.of(cohort.seed, i, cohort.preterm_fraction) for i in range(cohort.subjects))
             if d.phenotype.label == 1][: args.subjects or None]
    twins = Twins(weights, args.config_file, args.override)
    sha = {name: file_sha256(path) for name, path in weights.items()}
    rows, maps = [], []
    for draw in progress(draws, len(draws), "twins", "subject"):
        cached, missing = {}, []
        for name in weights:
            path = work / f"{name}_{sha[name][:12]}" / f"{draw.subject}.json"
            result = json.loads(path.read_text()) if path.is_file() else None
            if (result and result.get("version") == RESULT_VERSION and result.get("config") == args.override
                    and sorted(result.get("presets", [])) == sorted(args.presets)
                    and result["row"].get("normalisation", UNRECORDED) == twins.normalisation[name]):
                result["row"]["normalisation"] = twins.normalisation[name]  # results from before it was recorded
                cached[name] = result
            else:
                missing.append(name)
        if missing:
            for name, result in twins.measure(draw, args.presets, work, missing).items():
                result.update(version=RESULT_VERSION, config=args.override, presets=args.presets)
                path = work / f"{name}_{sha[name][:12]}" / f"{draw.subject}.json"
                atomic_write_text(json.dumps(result), path)
                cached[name] = result
        for name in weights:
            rows.append(cached[name]["row"])
            maps.extend(cached[name]["maps"])
        logger.info("%s: %s", draw.subject, "; ".join(
            f"{n}: gap {cached[n]['row']['gap']:.2f}, global {cached[n]['row']['global_only']:.2f}, local "
            f"{cached[n]['row']['local_only']:.2f}, ventricles {cached[n]['row']['removed_ventricles']:.2f}"
            for n in weights))
    suffix = "" if cohort.role != "evaluation" else "_evaluation"
    command = "python -m scripts.evaluation.evidence " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    info = {"command": command, "subjects": len(draws), "sha256": sha,
            "cohort": f"the {cohort.name} cohort (seed {cohort.seed}, {cohort.subjects} subjects, preterm fraction "
                      f"{cohort.preterm_fraction}, role {cohort.role})"}
    write_csv(rows, output / f"evidence{suffix}.csv")
    write_csv(maps, output / f"evidence{suffix}_maps.csv")
    atomic_write_text(summary_markdown(rows, maps, info).rstrip("\n") + "\n", output / f"evidence{suffix}.md")
    print(output / f"evidence{suffix}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
