"""Search LRP composites for the most faithful one that passes both sanity checks and localises at least as well as
gradient x input and a2b1. Two ways to get subjects no model trained on: the cross-validation folds' own validation
subjects (each fold's model explains the subjects held out from its training), or one model on a whole tuning cohort
(``--model``: every subject of a datalist marked ``"role": "tuning"``, ``scripts/data/cohorts.py``). The test split
is never opened, the evaluation cohort is refused.

    python -m scripts.evaluation.composite_search --runs eval/study/cv/<setting> --plan   # the planned cost only
    python -m scripts.evaluation.composite_search --runs eval/study/cv/<setting> --output eval/composite_search
    python -m scripts.evaluation.composite_search --fold-model 0=f0/model.pt --fold-model 1=f1/model.pt ...
    python -m scripts.evaluation.composite_search --model models/model.pt \
        --datalist "$(python -m scripts.data.cohorts --cohort tuning)"                      # one model, whole cohort
    python -m scripts.evaluation.composite_search --model models/model.pt --score NAME \
        --datalist "$(python -m scripts.data.cohorts --cohort evaluation)" --split test    # score one candidate once
    python -m scripts.evaluation.composite_search --reduced ...                            # small settings (CI)

Candidates (``--grid``): one rule per layer group -- the first convolution (``box``: z^B with each volume's own
minimum and maximum as bounds; ``flat``; ``wsquare``; ``gamma<g>``), the other convolutions (``gamma<g>``,
``a<alpha>b<beta>``), the dense layers (``eps<e>``) -- and the target: ``class`` (the subject's own class logit) or
``diff`` (contrastive: its class logit minus the other class's logit). Names read
``first=box,mid=gamma0.25,top=eps1e-06,target=diff``; ``first=box,mid=gamma0.25,top=eps1e-06,target=class`` is the
preset ``epsilon_gamma_box``. Gradient x input with each of the two targets is the baseline; the preset ``a2b1``
(class target) is the localisation reference.

1. Screening: every candidate on the first ``--screen-subjects`` validation subjects of each fold (the two classes
   in turn, preterm first in every other fold, term first in the others), ABPC with blocks of 8^3 voxels -- region
   perturbation exactly as ``explain_eval`` (a contrastive map is scored on the logit difference, the class map on
   the class logit).
2. The ``--top`` candidates of the screening, the baselines and the reference: ABPC 8^3 and 16^3 on ``--subjects``
   subjects per fold, and the two sanity checks of ``sanity`` (cascading randomisation, class sensitivity: same
   functions, same thresholds) on the first ``--sanity-subjects`` of them.

Score: the gain over gradient x input with the same target, paired over subjects: median over subjects of (ABPC
candidate - ABPC baseline) / |median ABPC baseline|. The screening ranks by the 8^3 gain; the final ranking by the
smaller of the 8^3 and 16^3 gains (winning means both block sizes). Localisation: the preterm subjects' enrichment
of CSF + ventricles against the brain (``scripts.runtime.localisation``); a candidate passes when its paired median
difference to gradient x input with the same target and to ``a2b1`` is >= 0 for both ("-" where the subjects have no
tissue and phenotype maps: not measured, not required). The winner is the best-ranked candidate that passes both
sanity checks and the localisation criterion; if none does, there is no winner. Each subject is traced once by its
fold's model and every candidate costs one backward pass from that trace; the randomisation check traces each
randomised copy of the network anew. The planned cost (forward passes, hours at the measured forward time) is
printed before anything is explained; ``--plan`` stops there.

``--score NAME`` (with ``--model``) reports one candidate, chosen before, with no screening: the final stage's
measures for it, the baselines and the reference on ``--split`` of the datalist. It is how a winner is scored once on
the evaluation cohort or a held-out test split: a datalist that is not a tuning cohort is read only at split
``test``.

Writes ``search.csv`` (one row per candidate and subject), ``search.md`` (the ranking) and ``opened.txt`` (every
subject file the search read, one path per line) into ``--output``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from torch import nn

from scripts import BUNDLE_ROOT
from scripts.data.cohorts import describe
from scripts.evaluation.cli import add_model_options, add_output_option
from scripts.evaluation.explain_eval import (
    load_model,
    load_subjects,
    perturbation_setup,
    region_perturbation,
    score_function,
    select_subjects,
    subject_transform,
)
from scripts.evaluation.explainers import compute_map, forward_seconds
from scripts.evaluation.explanation_metrics import median_quartiles
from scripts.evaluation.sanity import (
    CLASS_THRESHOLD,
    RANDOMISATION_THRESHOLD,
    class_rows,
    class_verdicts,
    randomisable_layers,
    randomisation_rows,
    randomisation_verdicts,
)
from scripts.evaluation.tables import markdown_table
from scripts.lrp import LRP, AlphaBeta, Composite, Epsilon, Flat, Gamma, Rule, Trace, WSquare, ZBox
from scripts.lrp.composites import PRESETS
from scripts.runtime.datalist import load_split, read_datalist_json
from scripts.runtime.errors import report_input_errors
from scripts.runtime.localisation import (
    CSF_VENTRICLES,
    OUTSIDE_BRAIN,
    localisation,
    paired_median_ci,
    tissue_regions,
)
from scripts.runtime.outputs import atomic_write_text, write_csv

__all__ = ["GRIDS", "Candidate", "baselines", "candidate_from_name", "candidate_grid", "localisation_verdict",
           "make_candidate", "planned_cost", "references", "rule_from_name", "search", "select_winner"]

logger = logging.getLogger(__name__)
ROOT = BUNDLE_ROOT
PATCHES = (8, 16)  # screening on the first
TARGETS = ("class", "diff")
GRIDS = {
    "small": {"first": ("box", "flat"), "mid": ("gamma0.25", "a2b1"), "top": ("eps1e-06",)},
    "full": {"first": ("box", "flat", "wsquare", "gamma0.25"),
             "mid": ("gamma0.1", "gamma0.25", "gamma0.5", "gamma1", "a1b0", "a2b1", "a3b2"),
             "top": ("eps1e-06", "eps0.1", "eps1")},
}
BASELINE = "gradient_x_input"
REFERENCE_PRESET = "a2b1"  # the localisation reference (issue 38 stage 4): the winner must localise at least as well
REFERENCE = f"preset={REFERENCE_PRESET},target=class"  # its candidate name (class target, as the bundle's maps)
ONE_MODEL = -1  # the "fold" of every subject in the one-model mode (--model)
# cost model in forward passes (issue 27, idle machine: trace 1.13x, further presets from a trace 0.3-1.7x): a trace,
# one map from a trace (upper bound of the goal), one gradient x input map (forward + backward)
TRACE_FORWARDS, MAP_FORWARDS, GRADIENT_FORWARDS = 1.2, 2.0, 2.0
FILES = ("image", "tissue", "phenotype")
REGIONS = ("phenotype", CSF_VENTRICLES)  # localisation of the preterm subjects' maps (scripts.runtime.localisation)
LOCALISATION = [*(f"{k}_{r}" for r in REGIONS for k in ("share", "enrichment")), OUTSIDE_BRAIN]
COLUMNS = ["fold", "subject", "label", "candidate", "target", "screen", "final", "seconds", "conservation",
           *(f"{k}_{p}" for p in PATCHES for k in ("abpc", "morf", "lerf")), *LOCALISATION, "random_rank_abs",
           "rho_term_preterm"]


# -- candidates -----------------------------------------------------------------------------------------------------
_NUMBER = r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)"


def rule_from_name(name: str) -> Rule:
    """``box`` (z^B, per-volume bounds), ``flat``, ``wsquare``, ``gamma<g>``, ``a<alpha>b<beta>``, ``eps<e>``."""
    fixed = {"box": lambda: ZBox("auto", "auto"), "flat": Flat, "wsquare": WSquare}
    if name in fixed:
        return fixed[name]()
    for pattern, make in ((rf"gamma{_NUMBER}", Gamma), (rf"eps{_NUMBER}", Epsilon),
                          (rf"a{_NUMBER}b{_NUMBER}", AlphaBeta)):
        match = re.fullmatch(pattern, name)
        if match:
            return make(*(float(g) for g in match.groups()))
    raise ValueError(f"unknown rule name {name!r}: box, flat, wsquare, gamma<g>, a<alpha>b<beta>, eps<e>")


@dataclass(frozen=True)
class Candidate:
    """A composite (None: gradient x input) and its target mode, ``class`` or ``diff``."""

    name: str
    composite: Composite | None
    target: str
    reference: bool = False  # measured in the final stage for comparison, never a winner

    def target_for(self, target):
        """The engine's target for the map of class ``target`` (0 or 1) or of ``"difference"`` (preterm - term):
        a class index, or a (class, other class) pair for the logit difference."""
        if target == "difference":
            return 1, 0
        return int(target) if self.target == "class" else (int(target), 1 - int(target))

    def explain(self, network: nn.Module, x: torch.Tensor, trace: Trace | None, target) -> tuple[np.ndarray, float]:
        """(map, LRP conservation or NaN) of ``x`` for ``target`` (see :meth:`target_for`); LRP maps come from
        ``trace`` (a trace of ``network`` on ``x``)."""
        engine_target = self.target_for(target)
        if self.composite is not None:
            result = trace.relevance(self.composite, engine_target)
            return result.relevance[0, 0].numpy(), float(result.conservation[0])
        if isinstance(engine_target, tuple):  # gradient x input is linear in the score: -map(1 - 0) = map(0 - 1)
            sign = 1.0 if engine_target == (1, 0) else -1.0
            return sign * compute_map(BASELINE, network, x, "difference")[0], float("nan")
        return compute_map(BASELINE, network, x, engine_target)[0], float("nan")


def candidate_from_name(name: str) -> Candidate:
    """The candidate named ``first=<rule>,mid=<rule>,top=<rule>,target=<class|diff>`` (as ``search.md`` names it)."""
    parts = dict(part.partition("=")[::2] for part in name.split(","))
    if sorted(parts) != ["first", "mid", "target", "top"] or not all(parts.values()):
        raise ValueError(f"--score takes a candidate name such as first=box,mid=gamma0.25,top=eps1e-06,target=class "
                         f"(search.md's candidate column), got {name!r}")
    return make_candidate(parts["first"], parts["mid"], parts["top"], parts["target"])


def make_candidate(first: str, mid: str, top: str, target: str) -> Candidate:
    """The candidate with rule ``first`` on the first convolution, ``mid`` on the other convolutions and ``top`` on
    the dense layers (names as :func:`rule_from_name`)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    name = f"first={first},mid={mid},top={top},target={target}"
    rules = [("first", rule_from_name(first)), ("conv", rule_from_name(mid)), ("linear", rule_from_name(top))]
    return Candidate(name, Composite(rules, name), target)


def candidate_grid(grid: str) -> list[Candidate]:
    """Every candidate of ``GRIDS[grid]``, in a fixed order (ties of the ranking go to the earlier one)."""
    spec = GRIDS[grid]
    return [make_candidate(*combo) for combo in itertools.product(spec["first"], spec["mid"], spec["top"], TARGETS)]


def baselines() -> list[Candidate]:
    return [Candidate(f"{BASELINE},target={t}", None, t) for t in TARGETS]


def references() -> list[Candidate]:
    """The preset ``REFERENCE_PRESET`` with the class target (as the bundle's maps are made)."""
    return [Candidate(REFERENCE, PRESETS[REFERENCE_PRESET](), "class", True)]


# -- folds and subjects ---------------------------------------------------------------------------------------------
def fold_models(args) -> list[tuple[int, str, dict]]:
    """(fold, checkpoint, config overrides) per fold, ascending: ``--fold-model K=PATH`` with ``--override``, or
    the fold runs of ``--runs`` (``fold<K>/models/model.pt``; config from the run's ``result.json``, then
    ``--override``); for ``--model PATH`` one entry, fold ``ONE_MODEL``."""
    model = getattr(args, "model", None)
    if model:
        if not Path(model).is_file():
            raise FileNotFoundError(f"--model {model} not found")
        return [(ONE_MODEL, str(model), dict(args.override))]
    out = []
    if args.runs:
        known = set(ConfigParser.load_config_files(args.config_file))
        for run in sorted(Path(args.runs).glob("fold*")):
            ckpt, result = run / "models" / "model.pt", run / "result.json"
            if not ckpt.is_file():
                continue
            saved = json.loads(result.read_text()) if result.is_file() else {}
            overrides = {k: v for k, v in saved.get("overrides", {}).items()
                         if k in known and k not in ("ckpt_dir", "output_dir", "fold")}
            fold = int(saved.get("fold", run.name[len("fold"):]))
            out.append((fold, str(ckpt), {**overrides, **args.override}))
        if not out:
            raise FileNotFoundError(f"--runs {args.runs}: no fold<K>/models/model.pt inside (the layout of a "
                                    "setting's folder of the study's cross-validation, <work_dir>/cv/<setting>)")
    for spec in args.fold_model or []:
        fold, sep, path = spec.partition("=")
        if not sep or not fold.strip().isdigit() or not path:
            raise ValueError(f"--fold-model takes K=PATH (fold K's model), got {spec!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--fold-model {spec}: {path} not found")
        out.append((int(fold), path, dict(args.override)))
    folds = [f for f, _, _ in out]
    if len(set(folds)) != len(folds):
        raise ValueError(f"one model per fold: folds given {folds}")
    return sorted(out, key=lambda f: f[0])


def _files(item: dict) -> list[str]:
    return [item[k] for k in FILES if isinstance(item.get(k), str)]


def _test_files(datalist: str) -> set[str]:
    """The resolved files of the datalist's test split (from the datalist alone; nothing of them is opened)."""
    try:
        items = load_split(datalist, "test", -1, require_label=False, check_files=False, tuning=True)
    except ValueError:  # no test split
        return set()
    return {str(Path(p).resolve()) for it in items for p in _files(it)}


@dataclass
class Fold:
    fold: int
    network: nn.Module
    transform: Callable[[dict], dict]
    subjects: list[dict]  # the final stage's; the screening's and the sanity checks' are the first of them
    screen: int
    sanity: int
    datalist: str = ""
    cohort: str = ""  # what the datalist is, in words (scripts.data.cohorts.describe), for the report


@dataclass
class Subject:
    fold: int
    item: dict
    x: torch.Tensor
    label: int
    brain: np.ndarray  # region perturbation: tissue > 0 (as explain_eval), else the non-zero voxels
    sanity_brain: np.ndarray  # the sanity checks: the non-zero voxels (as sanity)
    tissue: np.ndarray | None  # drawem9 labels (localisation) of a preterm subject with tissue and phenotype maps
    phenotype: np.ndarray | None
    trace: Trace | None = None
    perturb: dict = field(default_factory=dict)
    intact: dict = field(default_factory=dict)


def _tuning_cohort(datalist: str, role: str | None) -> None:
    """The one-model mode reads a whole cohort: only a tuning cohort's (a datalist marked ``"role": "tuning"``, whose
    subjects no model of this bundle trained on); anything else is refused before an image is read."""
    path = Path(datalist)
    if role != "tuning":
        raise ValueError(f"datalist {path} is not a tuning cohort (its \"role\" is {role!r}, not 'tuning'): --model "
                         "explains every subject of the datalist, so it reads only a cohort that no model trained on "
                         "and no report reads; generate one with: python -m scripts.data.cohorts --cohort tuning")


def load_fold(fold: int, ckpt: str, overrides: dict, args, opened: dict, first: int = 1) -> Fold:
    """Fold ``fold``'s model and its validation subjects (class ``first`` and the other in turn), refusing any that
    the datalist's test split also lists; every file of the fold's validation split is checked, so recorded in
    ``opened``. Fold ``ONE_MODEL``: the model of ``--model`` and every subject of ``--split`` of a tuning cohort."""
    parser, network, datalist = load_model(args.config_file, overrides, ckpt)
    datalist = getattr(args, "datalist", None) or datalist
    data = read_datalist_json(Path(datalist)) if Path(datalist).is_file() else {}  # {}: a folder of images
    scoring = bool(getattr(args, "score", None))
    if fold == ONE_MODEL and scoring:  # a report: a tuning cohort, or a held-out test split (evaluation cohort too)
        if data.get("role") != "tuning" and args.split != "test":
            raise ValueError(f"--score on datalist {datalist} (not a tuning cohort) reads only its held-out split: "
                             f"use --split test, got --split {args.split}")
        split, listed = args.split, load_split(datalist, args.split, -1)
    elif fold == ONE_MODEL:
        _tuning_cohort(datalist, data.get("role"))
        split, listed = args.split, load_split(datalist, args.split, -1, tuning=True)
    else:
        split, listed = "validation", load_split(datalist, "validation", fold, tuning=True)  # before any image
        shared = sorted({str(Path(p).resolve()) for it in listed for p in _files(it)} & _test_files(datalist))
        if shared:
            raise ValueError(f"datalist {datalist}: fold {fold}'s validation split and the test split share files "
                             f"{shared}; the search never reads the test split")
    maps = all("tissue" in it and "phenotype" in it for it in listed)
    items = load_subjects(datalist, split, parser, need_maps=maps, fold=fold, tuning=not scoring)
    opened.update(dict.fromkeys(p for it in items for p in _files(it)))
    chosen = select_subjects(items, args.subjects, first)
    image = parser.get_parsed_content("preprocessing")
    transform = subject_transform(parser) if maps else (lambda item: image({"image": item["image"]}))
    return Fold(fold, network, transform, chosen, min(args.screen_subjects, len(chosen)),
                min(args.sanity_subjects, len(chosen)), str(datalist),
                describe(data) if data else "a folder of images")


def load_subject(fold: Fold, item: dict, opened: dict) -> Subject:
    """One subject through the fold's preprocessing (not yet traced)."""
    opened.update(dict.fromkeys(_files(item)))
    data = fold.transform({k: item[k] for k in FILES if k in item})
    x = data["image"].as_tensor()[None].float()
    nonzero = x[0, 0].numpy() != 0
    tissue = data["tissue"][0].numpy().round().astype(np.int16) if "tissue" in data else None
    brain = tissue > 0 if tissue is not None else nonzero
    label = int(item["label"])
    phenotype = data["phenotype"][0].numpy() > 0.5 if "phenotype" in data and label == 1 else None
    return Subject(fold.fold, item, x, label, brain, nonzero, tissue if phenotype is not None else None, phenotype)


# -- cost -----------------------------------------------------------------------------------------------------------
def planned_cost(candidates: int, top: int, screen: int, final: int, sanity: int, steps: int, layers: int,
                 n_baselines: int = len(TARGETS)) -> dict:
    """Forward-pass equivalents of the search: {part: forward passes}. ``screen`` subjects (all among the ``final``
    ones) see every candidate at 8^3, the ``final`` ones the ``top`` candidates at 8^3 and 16^3, the ``sanity`` ones
    the two checks (``layers`` randomised networks, each traced anew; 1 + 3 targets on the trained one)."""
    curve = 2 * steps  # MoRF and LeRF, the intact score comes from the trace
    lrp, grad = MAP_FORWARDS + curve, GRADIENT_FORWARDS + curve
    parts = {
        "traces": final * TRACE_FORWARDS,
        "screening": screen * (candidates * lrp + n_baselines * grad),
        "final": (top * (final * MAP_FORWARDS + (final - screen) * curve + final * curve)
                  + n_baselines * (final * GRADIENT_FORWARDS + (final - screen) * curve + final * curve)),
        "sanity": sanity * (layers * (TRACE_FORWARDS + top * MAP_FORWARDS + n_baselines * GRADIENT_FORWARDS)
                            + 4 * (top * MAP_FORWARDS + n_baselines * GRADIENT_FORWARDS)),
    }
    parts["total"] = sum(parts.values())
    return parts


def _plan_text(cost: dict, forward: float, counts: dict) -> str:
    hours = cost["total"] * forward / 3600
    return (f"planned cost: {counts['candidates']} candidates x {counts['screen']} screening subjects (ABPC 8^3), "
            f"top {counts['top']} + {len(TARGETS)} baselines + the {REFERENCE_PRESET} reference x {counts['final']} "
            "subjects (ABPC 8^3 and 16^3), "
            f"sanity checks on {counts['sanity']} subjects ({counts['layers']} randomised layers each): "
            + ", ".join(f"{k} {v:.0f}" for k, v in cost.items() if k != "total")
            + f" = {cost['total']:.0f} forward passes x {forward:.3f} s (measured) = {hours:.2f} h "
            f"(a map from a trace counted as {MAP_FORWARDS:g} forward passes, a trace {TRACE_FORWARDS:g})")


# -- the search -----------------------------------------------------------------------------------------------------
def _prepare(subject: Subject, network: nn.Module, patches, args) -> None:
    """Trace the subject once (if not yet) and set up region perturbation for ``patches`` (if not yet)."""
    if subject.trace is None:
        subject.trace = LRP(network).trace(subject.x)
        logits = subject.trace.logits[0]
        c = subject.label
        subject.intact = {"class": float(logits[c]), "diff": float(logits[c] - logits[1 - c])}
    missing = [p for p in patches if p not in subject.perturb]
    subject.perturb.update(perturbation_setup(subject.x, subject.brain, missing, args.steps, args.fraction))


def _measure(candidate: Candidate, subject: Subject, network: nn.Module, patches, args, row: dict) -> dict:
    """Region perturbation of the candidate's map of ``subject`` for ``patches`` into ``row``."""
    start = time.perf_counter()
    relevance, conservation = candidate.explain(network, subject.x, subject.trace, subject.label)
    row.setdefault("seconds", time.perf_counter() - start)
    row.setdefault("conservation", conservation)
    if OUTSIDE_BRAIN not in row:  # once per candidate and subject (the final stage reuses the screening's row)
        row.update(_localisation(relevance, subject))
    score = score_function(network, candidate.target_for(subject.label))
    measures, _ = region_perturbation(relevance, score, subject.x, {p: subject.perturb[p] for p in patches},
                                      args.steps, subject.intact[candidate.target])
    row.update(measures)
    return row


def _localisation(relevance: np.ndarray, subject: Subject) -> dict:
    """``LOCALISATION`` of a map: the share of the positive relevance and the enrichment against the brain in the
    phenotype and in CSF + ventricles, and the share outside the brain (``scripts.runtime.localisation``); NaN for a
    term subject (no phenotype) or one without tissue and phenotype maps."""
    if subject.tissue is None or subject.phenotype is None:
        return dict.fromkeys(LOCALISATION, float("nan"))
    regions = tissue_regions(subject.tissue, {"phenotype": subject.phenotype})
    measured = localisation(relevance, subject.tissue, {r: regions[r] for r in REGIONS})
    return {**{f"{k}_{r}": measured[r][k] for r in REGIONS for k in ("share", "enrichment")},
            OUTSIDE_BRAIN: measured[OUTSIDE_BRAIN]["share"]}


def _row(candidate: Candidate, subject: Subject) -> dict:
    return {"fold": subject.fold, "subject": subject.item["subject"], "label": subject.label,
            "candidate": candidate.name, "target": candidate.target, "screen": 0, "final": 0}


def _explainer(candidates: list[Candidate], network: nn.Module, trace: Trace):
    """The sanity checks' Explainer: {target: {candidate: map}}; the trained network's maps from ``trace``."""
    def explain(model, x, targets):
        current = trace if model is network else LRP(model).trace(x)
        return {t: {c.name: c.explain(model, x, current, t)[0] for c in candidates} for t in targets}

    return explain


def _abpc_pairs(rows: dict, name: str, baseline: str, patch: int, subjects) -> list[tuple[float, float]]:
    """(candidate, baseline) ABPC at ``patch``^3 on the ``subjects`` both were measured on."""
    key = f"abpc_{patch}"
    return [(rows[(name, s)][key], rows[(baseline, s)][key]) for s in subjects
            if key in rows.get((name, s), {}) and key in rows.get((baseline, s), {})]


def _gain(rows: dict, name: str, baseline: str, patch: int, subjects) -> float:
    """Median over ``subjects`` of (ABPC candidate - ABPC baseline) / |median ABPC baseline|, at ``patch``^3."""
    pairs = _abpc_pairs(rows, name, baseline, patch, subjects)
    if not pairs:
        return float("nan")
    scale = abs(median_quartiles([b for _, b in pairs])[0])
    return median_quartiles([c - b for c, b in pairs])[0] / max(scale, 1e-12)


def _gain_interval(rows: dict, name: str, baseline: str, patch: int, subjects) -> tuple[float, float]:
    """The paired 95 % bootstrap interval of ``_gain``: the interval of the median paired ABPC difference
    (``scripts.runtime.localisation.paired_median_ci``, subjects resampled) over the same |median ABPC baseline|."""
    pairs = _abpc_pairs(rows, name, baseline, patch, subjects)
    if not pairs:
        return float("nan"), float("nan")
    scale = max(abs(median_quartiles([b for _, b in pairs])[0]), 1e-12)
    _, low, high, _ = paired_median_ci([c for c, _ in pairs], [b for _, b in pairs])
    return low / scale, high / scale


def _nan_low(value: float) -> float:
    return -np.inf if value != value else value


def _eligible(s: dict) -> bool:
    """A final-stage LRP candidate (not a baseline or the reference) that passes both sanity checks and does not fail
    the localisation criterion (``-``, not measured, does not exclude)."""
    return bool(s.get("final") and not s.get("baseline") and s.get("randomisation") == "pass"
                and s.get("class") == "pass" and s.get("localisation", "-") != "FAIL")


def select_winner(summary: list[dict]) -> str | None:
    """The candidate with the highest ``score`` among the final stage's LRP candidates that pass both sanity checks
    (``randomisation`` and ``class`` both ``pass``) and the localisation criterion (``localisation`` not ``FAIL``);
    None when none does. Ties go to the earlier row."""
    eligible = [s for s in summary if _eligible(s)]
    return max(eligible, key=lambda s: _nan_low(s["score"]))["candidate"] if eligible else None


def search(args, folds_spec: list[tuple[int, str, dict]]) -> tuple[list[dict], list[dict], dict, list[str]]:
    """(rows, summary, timing, opened files) of the search; with ``args.plan`` only the planned cost."""
    torch.manual_seed(0)
    opened: dict[str, None] = {}
    # preterm first in every other fold, term first in the others: one subject per fold still sees both classes
    folds = [load_fold(fold, ckpt, overrides, args, opened, 1 - i % 2)
             for i, (fold, ckpt, overrides) in enumerate(folds_spec)]
    scoring = bool(getattr(args, "score", None))
    candidates = [candidate_from_name(args.score)] if scoring else candidate_grid(args.grid)
    base, refs = baselines(), references()
    first = load_subject(folds[0], folds[0].subjects[0], opened)
    forward = forward_seconds(folds[0].network, first.x)
    counts = {"candidates": len(candidates), "top": min(args.top, len(candidates)),
              "screen": sum(f.screen for f in folds), "final": sum(len(f.subjects) for f in folds),
              "sanity": sum(f.sanity for f in folds), "layers": len(randomisable_layers(folds[0].network))}
    # the reference costs what a top candidate costs (a map from the trace)
    cost = planned_cost(counts["candidates"], counts["top"] + len(refs), counts["screen"], counts["final"],
                        counts["sanity"], args.steps, counts["layers"])
    timing = {"forward": forward, "planned_forwards": cost["total"], "plan": _plan_text(cost, forward, counts),
              **counts, "folds": [f.fold for f in folds], "model": folds_spec[0][1], "split": args.split,
              "datalist": folds[0].datalist, "cohort": folds[0].cohort, "score": scoring}
    print(timing["plan"], flush=True)
    if args.plan:
        return [], [], timing, list(opened)
    start = time.perf_counter()
    cache = {(first.fold, first.item["subject"]): first}
    del first  # held by the cache only, released after its final stage
    rows: dict[tuple[str, tuple], dict] = {}
    screen_patch = PATCHES[:1]
    # 1. screening: every candidate, ABPC 8^3
    screened = []
    for fold in folds:
        for item in fold.subjects[:fold.screen]:
            key = (fold.fold, item["subject"])
            subject = cache.get(key) or load_subject(fold, item, opened)
            cache[key] = subject
            _prepare(subject, fold.network, screen_patch, args)
            for candidate in candidates + base:
                row = rows.setdefault((candidate.name, key), _row(candidate, subject))
                _measure(candidate, subject, fold.network, screen_patch, args, row)
                row["screen"] = 1
            subject.trace.clear_cache()  # the denominators; the trace itself is kept for the final stage
            screened.append(key)
            logger.info("screened %s (fold %d, %d candidates), %.0f s so far", item["subject"], fold.fold,
                        len(candidates), time.perf_counter() - start)
    screen_score = {c.name: _gain(rows, c.name, f"{BASELINE},target={c.target}", PATCHES[0], screened)
                    for c in candidates}
    order = sorted(range(len(candidates)), key=lambda i: -_nan_low(screen_score[candidates[i].name]))
    top = [candidates[i] for i in order[:args.top]]
    # 2. final: the top candidates, the baselines and the reference, ABPC 8^3 and 16^3, sanity checks
    random_rows, class_rows_, finals = [], [], []
    for fold in folds:
        for n, item in enumerate(fold.subjects):
            key = (fold.fold, item["subject"])
            subject = cache.pop(key, None) or load_subject(fold, item, opened)
            _prepare(subject, fold.network, PATCHES, args)
            for candidate in top + base + refs:
                row = rows.setdefault((candidate.name, key), _row(candidate, subject))
                _measure(candidate, subject, fold.network, [p for p in PATCHES if f"abpc_{p}" not in row], args, row)
                row["final"] = 1
            if n < fold.sanity:
                explain = _explainer(top + base + refs, fold.network, subject.trace)
                mine = randomisation_rows(fold.network, subject.x, subject.label, subject.sanity_brain, explain,
                                          args.seed, item["subject"])
                classes = class_rows(fold.network, subject.x, subject.sanity_brain, explain, item["subject"])
                last = max(r["step"] for r in mine)
                for r in mine:
                    if r["step"] == last:
                        rows[(r["method"], key)]["random_rank_abs"] = r["rank_abs"]
                for r in classes:
                    rows[(r["method"], key)]["rho_term_preterm"] = r["rho_term_preterm"]
                random_rows += mine
                class_rows_ += classes
            finals.append(key)
            del subject
            logger.info("final stage: %s (fold %d) done, %.0f s so far", item["subject"], fold.fold,
                        time.perf_counter() - start)
    verdicts = {"randomisation": {v["method"]: v for v in randomisation_verdicts(random_rows)} if random_rows else {},
                "class": {v["method"]: v for v in class_verdicts(class_rows_)} if class_rows_ else {}}
    summary = summarise(rows, candidates, top, base + refs, screen_score, screened, finals, verdicts)
    timing["seconds"] = time.perf_counter() - start
    timing["map_forwards"] = median_quartiles(r["seconds"] for r in rows.values()
                                              if r["candidate"] in {c.name for c in candidates})[0] / forward
    return list(rows.values()), summary, timing, list(opened)


def _paired_values(rows: dict, name: str, other: str, key: str, subjects) -> tuple[list[float], list[float]]:
    """``key`` of ``name`` and of ``other`` on the ``subjects`` both have a row for (NaN where not measured)."""
    both = [s for s in subjects if (name, s) in rows and (other, s) in rows]
    return ([rows[(name, s)].get(key, float("nan")) for s in both],
            [rows[(other, s)].get(key, float("nan")) for s in both])


def _paired_median(rows: dict, name: str, other: str, key: str, subjects) -> float:
    """Median over ``subjects`` of ``key`` of ``name`` minus ``other`` on the same subject (NaN pairs left out)."""
    mine, theirs = _paired_values(rows, name, other, key, subjects)
    pairs = [d for d in (a - b for a, b in zip(mine, theirs)) if d == d]
    return float(np.median(pairs)) if pairs else float("nan")


def _paired_interval(rows: dict, name: str, other: str, key: str, subjects) -> tuple[float, float]:
    """The paired 95 % bootstrap interval of ``_paired_median`` (``paired_median_ci``)."""
    _, low, high, _ = paired_median_ci(*_paired_values(rows, name, other, key, subjects))
    return low, high


def localisation_verdict(vs_gradient: float, vs_reference: float) -> str:
    """``pass`` when the paired median enrichment differences to gradient x input and to the reference are both >= 0,
    ``FAIL`` when either is below, ``-`` when not measured (no subject with tissue and phenotype maps)."""
    if vs_gradient != vs_gradient or vs_reference != vs_reference:
        return "-"
    return "pass" if vs_gradient >= 0 and vs_reference >= 0 else "FAIL"


def summarise(rows, candidates, top, base, screen_score, screened, finals, verdicts) -> list[dict]:
    """One row per candidate: the final stage's (ranked; the winner marked), the baselines and the reference, then
    the screened-out ones by screening score."""
    final_names = {c.name for c in top + base}
    rest = sorted((c for c in candidates if c.name not in final_names), key=lambda c: -_nan_low(screen_score[c.name]))
    out = []
    for candidate in top + base + rest:
        final = candidate.name in final_names
        subjects = finals if final else screened
        mine = [rows[(candidate.name, s)] for s in subjects if (candidate.name, s) in rows]
        baseline = f"{BASELINE},target={candidate.target}"
        row = {"candidate": candidate.name, "final": final,
               "baseline": candidate.composite is None or candidate.reference,
               "subjects": len(mine), "screen_gain": screen_score.get(candidate.name, float("nan"))}
        for patch in PATCHES:
            values = [r[f"abpc_{patch}"] for r in mine if f"abpc_{patch}" in r]
            median, q1, q3 = median_quartiles(values)
            row[f"abpc_{patch}"] = "-" if median != median else f"{median:.2f} [{q1:.2f}, {q3:.2f}]"
            row[f"gain_{patch}"] = (float("nan") if candidate.composite is None
                                    else _gain(rows, candidate.name, baseline, patch, subjects))
            row[f"gain_{patch}_ci"] = ((float("nan"), float("nan")) if candidate.composite is None or not final
                                       else _gain_interval(rows, candidate.name, baseline, patch, subjects))
        row["score"] = min(row[f"gain_{p}"] for p in PATCHES) if final else float("nan")
        for key in (f"enrichment_{r}" for r in REGIONS):  # the preterm subjects' (the others are NaN)
            row[key] = median_quartiles(r.get(key, float("nan")) for r in mine)[0]
        enrichment = f"enrichment_{CSF_VENTRICLES}"
        row["loc_vs_gradient"] = (_paired_median(rows, candidate.name, baseline, enrichment, subjects)
                                  if candidate.composite is not None else float("nan"))
        row["loc_vs_reference"] = (_paired_median(rows, candidate.name, REFERENCE, enrichment, subjects)
                                   if candidate.composite is not None and not candidate.reference else float("nan"))
        for key, other, measured in (("loc_vs_gradient", baseline, candidate.composite is not None),
                                     ("loc_vs_reference", REFERENCE,
                                      candidate.composite is not None and not candidate.reference)):
            row[f"{key}_ci"] = (_paired_interval(rows, candidate.name, other, enrichment, subjects)
                                if measured and final else (float("nan"), float("nan")))
        row["localisation"] = (localisation_verdict(row["loc_vs_gradient"], row["loc_vs_reference"])
                               if final and not row["baseline"] else "-")
        for check in ("randomisation", "class"):
            row[check] = verdicts[check].get(candidate.name, {}).get("verdict", "-") if final else "-"
        out.append(row)
    winner = select_winner(out)
    eligible = sorted((s for s in out if _eligible(s)), key=lambda s: -_nan_low(s["score"]))
    ranks = {s["candidate"]: k + 1 for k, s in enumerate(eligible)}
    for row in out:
        row["winner"] = "**winner**" if row["candidate"] == winner else ""
        sane = (row["randomisation"], row["class"]) == ("pass", "pass")
        excluded = "excluded: localisation" if sane else "excluded: sanity"
        row["rank"] = ranks.get(row["candidate"], excluded) if row["final"] and not row["baseline"] else "-"
    return sorted(out, key=lambda s: (not s["final"], s["baseline"], not isinstance(s["rank"], int),
                                      s["rank"] if isinstance(s["rank"], int) else 0))  # stable: the rest in order


def _pct(value) -> str:
    return "-" if value is None or value != value else f"{100 * value:+.0f} %"


def _pct_ci(value, interval) -> str:
    """``+5 % [-3, +12]``: a gain with its paired interval (no interval where it was not measured)."""
    low, high = interval
    if value is None or value != value or low != low:
        return _pct(value)
    return f"{_pct(value)} [{100 * low:+.0f}, {100 * high:+.0f}]"


def _diff_ci(value, interval) -> str:
    low, high = interval
    if value != value:
        return "-"
    return f"{value:+.2f}" + ("" if low != low else f" [{low:+.2f}, {high:+.2f}]")


def _shown(path: str) -> str:
    """``path`` as the tables show it: relative to the bundle folder when inside it (the config's default datalist
    is resolved to an absolute path), as given otherwise."""
    try:
        return str(Path(path).resolve().relative_to(ROOT.resolve()))
    except ValueError:
        return str(path)


def write_outputs(rows, summary, timing, opened, output: Path, command: str) -> str:
    output.mkdir(parents=True, exist_ok=True)
    timing = {**timing, "datalist": _shown(timing["datalist"])}
    atomic_write_text("".join(f"{_shown(p)}\n" for p in opened), output / "opened.txt")
    write_csv(rows, output / "search.csv", COLUMNS)
    winner = next((s for s in summary if s["winner"]), None)
    one_model, scoring = timing["folds"] == [ONE_MODEL], timing.get("score", False)
    named = timing["cohort"].split(" (")[0] if timing["cohort"].startswith("the ") else f"`{timing['datalist']}`"
    where = f"on {named}" if one_model else "on the validation folds"
    if scoring:
        scored = next(s for s in summary if not s["baseline"])
        both = all(scored[f"gain_{p}"] > 0 for p in PATCHES)
        surely = all(scored[f"gain_{p}_ci"][0] > 0 for p in PATCHES)
        verdict = (f"**Scored**: `{scored['candidate']}`, gain over gradient x input with the same target "
                   f"{_pct_ci(scored['gain_8'], scored['gain_8_ci'])} (8^3) and "
                   f"{_pct_ci(scored['gain_16'], scored['gain_16_ci'])} (16^3) [paired 95 % intervals] {where}, "
                   f"split {timing['split']}: "
                   + ("better on both block sizes, both intervals above 0" if surely
                      else "better on both block sizes by the median, **not** by the interval" if both
                      else "**not** better than gradient x input on both block sizes")
                   + f"; sanity checks {scored['randomisation']} / {scored['class']}, localisation "
                   f"{scored['localisation']} (CSF+V enrichment vs gradient x input "
                   f"{_diff_ci(scored['loc_vs_gradient'], scored['loc_vs_gradient_ci'])}, vs {REFERENCE_PRESET} "
                   f"{_diff_ci(scored['loc_vs_reference'], scored['loc_vs_reference_ci'])}).")
    elif winner is None:
        verdict = ("**No winner**: no candidate of the final stage passed both sanity checks and the localisation "
                   "criterion; keep the best sane LRP preset.")
    else:
        both = all(winner[f"gain_{p}"] > 0 for p in PATCHES)
        verdict = (f"**Winner**: `{winner['candidate']}`, gain over gradient x input with the same target "
                   f"{_pct_ci(winner['gain_8'], winner['gain_8_ci'])} (8^3) and "
                   f"{_pct_ci(winner['gain_16'], winner['gain_16_ci'])} (16^3) [paired 95 % intervals] {where}: "
                   + ("better on both block sizes." if both else "**not** better than gradient x input on both "
                      "block sizes."))
    table = [{**s, **{f"gain_{p}": _pct_ci(s[f"gain_{p}"], s[f"gain_{p}_ci"]) for p in PATCHES},
              "screen_gain": _pct(s["screen_gain"]),
              **{k: _diff_ci(s[k], s[f"{k}_ci"]) for k in ("loc_vs_gradient", "loc_vs_reference")}}
             for s in summary]
    if one_model:
        subjects = (f"one model (`{timing['model']}`) on split {timing['split']} of `{timing['datalist']}` "
                    f"({timing['cohort']})")
    else:
        subjects = (f"folds {', '.join(map(str, timing['folds']))}, each explained by its own model (trained without "
                    "it)")
    lines = [
        f"# LRP composite {'score' if scoring else 'search'} {where}", "",
        f"Generated by `{command}`: {subjects}; " + (
            f"one candidate chosen before, no screening, {timing['final']} subjects scored, {timing['sanity']} in "
            f"the sanity checks. Only split {timing['split']} of the datalist was read (`opened.txt` lists every "
            "subject file read); "
            if scoring else
            f"{timing['screen']} subjects screened, {timing['final']} in the final stage, {timing['sanity']} in the "
            "sanity checks. The test split was not opened (`opened.txt` lists every subject file read). "
            f"{timing['candidates']} candidates, top {timing['top']} to the final stage; ") +
        f"{timing['seconds'] / 60:.1f} min on this machine = {timing['seconds'] / timing['forward']:.0f} forward "
        f"passes of {timing['forward']:.3f} s (planned: {timing['planned_forwards']:.0f}); one map from a cached "
        f"trace took {timing['map_forwards']:.2f} forward passes (median).", "",
        verdict, "",
        markdown_table(table, ["rank", "candidate", "subjects", "abpc_8", "abpc_16", "gain_8", "gain_16",
                               "randomisation", "class", "enrichment_phenotype", "enrichment_csf_ventricles",
                               "loc_vs_gradient", "loc_vs_reference", "localisation", "screen_gain", "winner"],
                       ["rank", "candidate", "subjects", "ABPC 8^3", "ABPC 16^3", "gain 8^3", "gain 16^3",
                        "randomisation", "class sensitivity", "enrichment phenotype", "enrichment CSF+ventricles",
                        "CSF+V vs gradient x input", f"CSF+V vs {REFERENCE_PRESET}", "localisation",
                        "screening gain 8^3", "winner"]),
        "ABPC: median [interquartile range] over the subjects (final stage; screened-out candidates: the screening "
        "subjects, 8^3 only) of the area between the region-perturbation curves, on the class logit (target=class) "
        "or on the logit difference (target=diff). Gain: median over subjects of the paired difference to gradient "
        "x input with the same target, relative to that baseline's median ABPC, with its paired 95 % bootstrap "
        "interval in brackets (final stage); the rank (sane candidates only) "
        "is by the smaller of the two gains. Randomisation: pass = median rank correlation of |map| after "
        f"randomising every layer below {RANDOMISATION_THRESHOLD}; class sensitivity: pass = median rho(term map, "
        f"preterm map) below {CLASS_THRESHOLD} (`python -m scripts.evaluation.sanity`). Enrichment: median over the "
        "preterm subjects of the region's share of the map's positive relevance (relevance outside the brain "
        "included) divided by its share of the brain (1 = no preference within the brain; "
        "`scripts/runtime/localisation.py`); `search.csv` has every subject's shares and outside-brain share. "
        "CSF+V vs gradient x input / vs a2b1: paired median over the preterm subjects of the candidate's "
        "CSF+ventricles enrichment minus that of gradient x input with the same target / of the preset a2b1; "
        "bracketed: paired 95 % bootstrap interval; localisation: pass = both >= 0 (a FAIL excludes the "
        "candidate; - = not measured).", "",
        timing["plan"], "",
    ]
    text = "\n".join(lines)
    atomic_write_text(text, output / "search.md")
    return text


# -- the command ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.evaluation.composite_search`` (every option's help states its
    default)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.evaluation.composite_search",
                                 description=__doc__.split("\n\n")[0])
    add_model_options(ap, weights=None,
                      override_help="config overrides as JSON, e.g. '{\"dataset_dir\": \"data/synthetic\"}' (default: "
                                    "{}, none; with --runs: on top of each run's own)")
    models = ap.add_mutually_exclusive_group(required=True)
    models.add_argument("--runs", default=None,
                        help="a setting's folder of the study's cross-validation (<work_dir>/cv/<setting>, holding "
                             "fold<K>/models/model.pt and fold<K>/result.json); one of --runs, --fold-model and "
                             "--model is needed (default: none)")
    models.add_argument("--fold-model", action="append", default=None, metavar="K=PATH",
                        help="the model trained without fold K, repeated once per fold (default: none)")
    models.add_argument("--model", default=None, metavar="PATH",
                        help="one model explaining every subject of --split of a tuning cohort's datalist (--datalist; "
                             "a datalist marked \"role\": \"tuning\", python -m scripts.data.cohorts --cohort "
                             "tuning) (default: none)")
    ap.add_argument("--datalist", default=None,
                    help="the datalist to read (default: the config's, dataset_dir/datalist.json)")
    ap.add_argument("--score", default=None, metavar="NAME",
                    help="score this one candidate (a name from search.md's candidate column) with --model, without "
                         "screening; a datalist that is not a tuning cohort is read only at --split test (default: "
                         "none, search)")
    ap.add_argument("--split", default="all",
                    help="with --model: the datalist split whose subjects are explained (default: %(default)s; the "
                         "fold modes read each fold's validation split)")
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full",
                    help="candidate grid: small (8 candidates, tests) or full (168) (default: %(default)s)")
    ap.add_argument("--top", type=int, default=5,
                    help="candidates of the screening that go to the final stage (default: %(default)s)")
    ap.add_argument("--screen-subjects", type=int, default=2,
                    help="subjects per fold (per model) in the screening (default: %(default)s)")
    ap.add_argument("--subjects", type=int, default=0,
                    help="subjects per fold (per model) in the final stage, the two classes in turn (default: "
                         "%(default)s = all of the fold or split)")
    ap.add_argument("--sanity-subjects", type=int, default=2,
                    help="subjects per fold (per model) in the sanity checks (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=5, help="perturbation steps per curve (default: %(default)s)")
    ap.add_argument("--fraction", type=float, default=0.25,
                    help="share of the brain's blocks replaced at the end (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the re-initialised layers (default: %(default)s)")
    ap.add_argument("--plan", action="store_true", help="print the planned cost and stop (default: off)")
    ap.add_argument("--reduced", action="store_true",
                    help="small settings for CI: small grid, 2 steps, 1 subject per fold in every stage "
                         "(default: off)")
    add_output_option(ap, ROOT / "eval" / "composite_search", "search.md, search.csv and opened.txt")
    return ap


@report_input_errors
def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.reduced:
        args.grid, args.steps, args.screen_subjects, args.subjects, args.sanity_subjects = "small", 2, 1, 1, 1
    if min(args.top, args.screen_subjects, args.sanity_subjects, args.steps) < 1 or args.subjects < 0:
        ap.error("--top, --screen-subjects, --sanity-subjects and --steps must be >= 1, --subjects >= 0")
    if args.score:
        if not args.model:
            ap.error("--score scores one candidate with one model: give --model")
        try:
            candidate_from_name(args.score)
        except ValueError as err:
            ap.error(str(err))
        args.screen_subjects = 0  # no screening: the candidate was chosen before
    if not 0 < args.fraction <= 1:
        ap.error("--fraction must be in (0, 1]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    rows, summary, timing, opened = search(args, fold_models(args))
    if args.plan:
        return 0
    defaults = ap.parse_args(["--runs", "-"])
    changed = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
               if k in ("grid", "top", "screen_subjects", "subjects", "sanity_subjects", "steps", "fraction", "seed",
                        "model", "datalist", "split", "score") and not (args.score and k in ("grid", "screen_subjects"))
               and v != getattr(defaults, k)]
    print(write_outputs(rows, summary, timing, opened, Path(args.output),
                        " ".join(["python -m scripts.evaluation.composite_search", *changed])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
