"""The seed paper's study in one command: 10-fold cross-validation of a small hyper-parameter grid inside the
training split, training of the best setting on the whole training split, one evaluation on the held-out test
split, the misclassified babies' birth ages, group-averaged LRP maps per class (Figure 2) and where the positive
relevance lies per tissue (``scripts.runtime.localisation``: enrichment against the brain); ``study.md`` and
``study.html`` (the same with its figures, and every test subject linked to its page of the test inference's run
report, copied into ``test_report/`` of the output folder so that the folder is complete on its own).

    python -m scripts.evaluation.study                                  # built-in synthetic cohort, full settings
    python -m scripts.evaluation.study --reduced --jobs 2 --output docs/results  # 2 mm, smaller network, 2 shards
    python -m scripts.evaluation.study --datalist /data/dhcp/datalist.json --work_dir /scratch/study --output results/

Every stage is one of the bundle's own workflows (``configs/train.json``, ``train_full.json``,
``inference.json``) run in-process with config overrides. Finished cross-validation folds and the final
model are kept under ``--work_dir`` and are not redone on a rerun with the same settings.

Spread over processes, GPUs or machines (all sharing ``--work_dir``)::

    python -m scripts.evaluation.study --jobs 4 ...          # 4 local shard processes (threads / GPU each)
    python -m scripts.evaluation.study --shard 2/4 ...       # shard 2 of 4 only (e.g. a SLURM array task)
    python -m scripts.evaluation.study --merge ...           # the final stage only, once every run is done

The i-th (0-based) (setting, fold) run in the fixed order of ``cross_validation.cv_runs`` (grid order of the
settings, then ascending folds) belongs to shard ``i % n + 1``. The shard that finds every run finished runs the
final stage (select the setting, train the final model, test inference, reports), claimed with the lock
``<work_dir>/final.lock`` (exclusive create, holding pid and host); the others leave it to it.
"""

from __future__ import annotations

import argparse
import csv
import functools
import html
import json
import logging
import logging.config
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import torch
from monai.bundle import ConfigParser

from scripts.evaluation.cli import add_model_options
from scripts.evaluation.clinical_metrics import (
    CLASS_NAMES,
    classification_metrics,
    misclassification_table,
    subject_table,
)
from scripts.evaluation.cross_validation import (
    ROOT,
    collect_cv,
    cv_runs,
    expand_grid,
    parse_shard,
    run_bundle_workflow,
    run_cv,
    same_run,
    select_best,
    setting_label,
    shard_runs,
    summarise_cv,
)
from scripts.evaluation.figures import group_figure
from scripts.evaluation.group_relevance import ANATOMY_COLUMNS, mean_volume, tissue_shares_table
from scripts.evaluation.tables import fmt_ci, markdown_table, markdown_to_html
from scripts.runtime.checks import validate_items
from scripts.runtime.datalist import check_study_datalist, load_split
from scripts.runtime.errors import report_input_errors
from scripts.runtime.localisation import CSF_VENTRICLES, OUTSIDE_BRAIN, localisation, tissue_regions
from scripts.runtime.outputs import (
    atomic_write_text,
    exclusive_lock,
    input_path,
    relevance_path,
    report_index,
    report_page,
    save_nifti,
    subject_name,
    write_csv,
)
from scripts.runtime.report import copy_report, html_page, html_table

logger = logging.getLogger("scripts.evaluation.study")

DEFAULT_GRID = {"learning_rate": [1e-3, 3e-4], "class_weight_factor": [1.0, 2.0]}
REDUCED_GRID = {"learning_rate": [1e-3, 3e-4]}
REDUCED = {"pixdim": [2.0, 2.0, 2.0], "spatial_shape": [64, 48, 48], "channels": [8, 16, 32, 64], "hidden": 32,
           "num_epochs": 8}
PRESETS = ["a1b0", "a2b1", "a3b2"]
FINAL_LOCK = "final.lock"  # in --work_dir: held by the process that runs the final stage
FINAL_DONE = "final/done.json"  # in --work_dir: what the last final stage was run on
STUDY_REPORT = "test_report"  # in --output: the copy of the test inference's run report that study.html links to
SHARDING_OPTIONS = {"--shard": 1, "--jobs": 1, "--threads": 1, "--merge": 0}  # option -> number of values
COMMAND_ENV = "PRETERM_STUDY_COMMAND"  # set by --jobs N for its shards: the command line study.md names


def _parser(config: str, overrides: dict):

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / config))
    parser.update({"bundle_root": str(ROOT), **overrides})
    return parser


def _read_predictions(path: Path) -> dict[str, list[float]]:
    """The inference's ``predictions.csv`` -> {subject: [prob_term, prob_preterm]}."""
    with open(path, newline="") as f:
        return {row["subject"]: [float(row["prob_term"]), float(row["prob_preterm"])] for row in csv.DictReader(f)}


def _final_model(best: dict, common: dict, run_dir: Path) -> Path:
    setting = {k: v for k, v in best.items() if k in best["_keys"]}
    overrides = {**common, **setting, "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir)}
    result_file, ckpt = run_dir / "result.json", run_dir / "models" / "model.pt"
    done = json.loads(result_file.read_text()) if result_file.is_file() else {}
    if same_run(done.get("overrides"), overrides) and ckpt.is_file():
        logger.info("final model already trained with %s: %s", setting_label(setting), ckpt)
        return ckpt
    logger.info("training the final model on the whole training split with %s", setting_label(setting))
    run_bundle_workflow(["train.json", "train_full.json"], "training", overrides)
    atomic_write_text(json.dumps({"setting": setting, "overrides": overrides}, indent=2), result_file)
    return ckpt


def group_analysis(rows: list[dict], items: list[dict], maps_dir: Path, presets: list[str], group_dir: Path,
                   parser) -> tuple[dict, dict, list[dict]]:
    """Mean input and relevance maps of the correctly classified subjects of each class (NIfTIs in
    ``group_dir``), and the anatomy table (``tissue_shares_table``) when every item has a ``tissue`` label map: each
    correctly classified subject's map measured by ``scripts.runtime.localisation`` (each drawem9 tissue, CSF +
    ventricles, and the phenotype where every item has a ``phenotype`` map and the subject's is not empty)."""

    by_subject = {subject_name(it["image"]): it for it in items}
    with_tissue = all("tissue" in it for it in items)
    with_phenotype = with_tissue and all("phenotype" in it for it in items)
    transform = parser.get_parsed_content("label_preprocessing") if with_tissue else None
    means, counts, shares = {}, {}, {}
    for label in (1, 0):
        name = CLASS_NAMES[label]
        subjects = [r["subject"] for r in rows if r["label"] == label and r["correct"]]
        counts[name] = len(subjects)
        if not subjects:
            logger.warning("no correctly classified %s subject: no group maps for this class", name)
            continue
        means[name] = {}
        for what in ["input", *presets]:
            suffix = "input" if what == "input" else f"relevance_{what}"
            path = input_path if what == "input" else functools.partial(relevance_path, preset=what)
            mean, affine = mean_volume([path(maps_dir, s) for s in subjects])
            means[name][what] = mean
            save_nifti(mean, affine, group_dir / f"{name}_mean_{suffix}.nii.gz")
        if with_tissue:
            for s in subjects:
                keys = ("tissue", "phenotype") if with_phenotype else ("tissue",)
                labels = transform({k: by_subject[s][k] for k in keys})
                tissue = labels["tissue"][0].numpy()
                phenotype = labels["phenotype"][0].numpy() > 0.5 if with_phenotype else None
                regions = tissue_regions(tissue, {"phenotype": phenotype if phenotype is not None and phenotype.any()
                                                  else None})
                for preset in presets:
                    relevance, _ = mean_volume([relevance_path(maps_dir, s, preset)])
                    shares.setdefault((name, preset), []).append(localisation(relevance, tissue, regions))
    return means, counts, tissue_shares_table(shares) if shares else []


def _markdown(summary, best, metrics, mis, anatomy, info, timings, args, common) -> str:
    lines = [
        "# Study results", "",
        f"Command: {_command(args)}", "",
        f"Datalist: {_display_path(info['datalist'])} — training split term/preterm {info['training']}, "
        f"{len(info['folds'])} folds; test split term/preterm {info['test']}.",
        "Config overrides for every stage: "
        f"`{json.dumps({k: v for k, v in common.items() if k not in ('datalist', 'dataset_dir')})}`.",
        "", "## Cross-validation (validation metrics after the last epoch, mean ± sd over folds)", "",
    ]
    table = [{"setting": r["setting"], "folds": r["folds"],
              **{m: f"{r[m + '_mean']:.3f} ± {r[m + '_sd']:.3f}" for m in
                 ("val_balanced_accuracy", "val_auc", "val_accuracy")},
              "chosen": "yes" if r["setting"] == best["setting"] else ""} for r in summary]
    lines.append(markdown_table(table, ["setting", "folds", "val_balanced_accuracy", "val_auc", "val_accuracy",
                                        "chosen"],
                                ["setting", "folds", "balanced accuracy", "ROC AUC", "accuracy", "chosen"]))
    lines += ["## Held-out test split (preterm = positive)", "",
              markdown_table([metrics],
                             ["n", "accuracy", "tpr", "tnr", "balanced_accuracy", "auc", "tp", "fn", "tn", "fp"],
                             ["n", "accuracy", "TPR", "TNR", "balanced accuracy", "ROC AUC", "TP", "FN", "TN", "FP"]),
              "## Birth ages (weeks) of correctly classified and misclassified babies", "",
              markdown_table(mis, ["class", "n", "correct", "misclassified", "birth_age_correct_mean",
                                   "birth_age_correct_sd", "birth_age_correct_range", "birth_age_misclassified"],
                             ["class", "n", "correct", "misclassified", "mean (correct)", "sd (correct)",
                              "range (correct)", "misclassified babies"], digits=2)]
    if anatomy:
        lines += ["## Where the positive relevance lies (correctly classified test subjects)", "",
                  "Per subject (`scripts/runtime/localisation.py`): share = the region's part of the map's positive "
                  "relevance (relevance outside the brain included); share of the brain = the region's part of the "
                  "brain's voxels (tissue label > 0); enrichment = share / share of the brain (1 = no preference "
                  "within the brain). Median over subjects with its percentile-bootstrap 95 % interval. "
                  f"{CSF_VENTRICLES}: CSF and ventricles together; phenotype: the generator's phenotype mask (preterm "
                  f"subjects of the synthetic cohort); {OUTSIDE_BRAIN}: the share of the positive relevance outside "
                  "the brain. Subjects: those whose map has positive relevance (alpha1-beta0 keeps the sign of the "
                  "explained logit: where the predicted class's logit is negative, its whole map is negative and has "
                  "no shares).", ""]
        shown = [{**r, "enrichment_ci": fmt_ci(r["enrichment"], r["enrichment_low"], r["enrichment_high"]),
                  "share_ci": fmt_ci(r["share"], r["share_low"], r["share_high"], 3)}
                 for r in anatomy if r["region"] in ("csf", "ventricles", CSF_VENTRICLES, "phenotype", OUTSIDE_BRAIN)]
        lines.append(markdown_table(
            shown, ["class", "preset", "region", "subjects", "enrichment_ci", "share_ci", "brain_share"],
            ["class", "preset", "region", "subjects", "enrichment (95 % CI)", "share (95 % CI)", "share of the brain"]))
        lines += ["Every drawem9 tissue: `study_anatomy.csv`.", ""]
    lines += ["## Figure", "", "![group maps](study_group_relevance.png)", "",
              "Rows: correctly classified preterm and term test subjects; columns: the average network input, then "
              "the average LRP relevance for each alpha-beta setting (red: evidence for the predicted class, blue: "
              "against); orthogonal slices through the grid centre. Colour rule: one diverging scale per relevance "
              "column, shared by both rows, symmetric ±L with L = the 99.5th percentile of |relevance| over the "
              "brain voxels of both average maps.", "",
              "## Run time of this invocation (seconds on this machine)", "",
              "Stages finished by an earlier invocation with the same settings are reused and take about 0 s; "
              "the sum of the fold runs includes the earlier invocations.", "",
              markdown_table([{"stage": k, "seconds": round(v, 1)} for k, v in timings.items()], ["stage", "seconds"],
                             digits=1)]
    return "\n".join(lines)


def _html(markdown: str, rows: list[dict], output: Path) -> str:
    """study.md as HTML with its figures, and the test subjects, each linked to its page of the run report of the
    test inference (its copy in ``<output>/test_report/``; relative links)."""
    body = [markdown_to_html(markdown), "<h2>Test subjects</h2>"]
    if report_index(output, STUDY_REPORT).is_file():
        link = quote(report_index(".", STUDY_REPORT).as_posix())
        body.append(f'<p>Each subject links to its page of the <a href="{link}">run report</a> of the test inference '
                    "(relevance mosaics of every subject, decision and probability).</p>")
    table = []
    for r in rows:
        name = html.escape(r["subject"])
        if report_page(output, r["subject"], STUDY_REPORT).is_file():
            name = f'<a href="{quote(report_page(".", r["subject"], STUDY_REPORT).as_posix())}">{name}</a>'
        table.append([name, r["class"], f"{r['birth_age']}", f"{r['scan_age']}", f"{r['prob_preterm']:.3f}",
                      CLASS_NAMES[r["prediction"]], "yes" if r["correct"] else "<b>no</b>"])
    body.append(html_table(["subject", "class", "birth age", "scan age", "p(preterm)", "prediction", "correct"],
                           table, ["" if r["correct"] else "misclassified" for r in rows],
                           numeric=[False, False, True, True, True, False, False]))
    return html_page("Study results", "\n".join(body))


def _command(args) -> str:
    """The study's command line for ``study.md``: the one the user typed (for the shards of ``--jobs N``, the
    ``--jobs N`` command, passed down in ``COMMAND_ENV``); for a shard or ``--merge`` started by hand, the command
    without its sharding options, marked as sharded."""
    typed = os.environ.get(COMMAND_ENV)
    if typed:
        return f"`{typed}`"
    command = shlex.join(["python", "-m", "scripts.evaluation.study", *_without_sharding(args.argv)])
    return f"`{command}`" + (" (cross-validation run in shards)" if _sharded(args) else "")


def _display_path(path) -> str:
    """``path`` relative to the bundle folder when it lies inside it (reports name no machine-specific folder),
    else as it is."""
    try:
        return Path(path).resolve().relative_to(ROOT.resolve()).as_posix()
    except ValueError:
        return str(path)


def _without_sharding(argv: list[str]) -> list[str]:
    """The command line without the options that only say how the runs are spread over processes."""
    out, skip = [], 0
    for arg in argv:
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name in SHARDING_OPTIONS:
            skip = SHARDING_OPTIONS[name] if "=" not in arg else 0
            continue
        out.append(arg)
    return out


def _sharded(args) -> bool:
    return args.shard is not None or args.merge


def prepare(args) -> tuple[dict, dict, list[dict]]:
    """(config overrides of every stage with absolute data paths, datalist info, grid settings); generates the
    synthetic cohort when the datalist is missing and checks every image."""
    common = dict(args.override)
    if args.reduced:
        common = {**REDUCED, **common}
    if args.dataset_dir:
        common["dataset_dir"] = str(Path(args.dataset_dir).resolve())
    if args.datalist:
        common["datalist"] = str(Path(args.datalist).resolve())
    parser = _parser("train.json", common)
    datalist = parser.get_parsed_content("datalist_file")
    # absolute paths in every stage's overrides: a rerun with the same data finds its finished folds
    common["dataset_dir"] = str(Path(parser.get_parsed_content("dataset_dir")).resolve())
    common["datalist"] = str(Path(datalist).resolve())
    info = {"datalist": common["datalist"], **check_study_datalist(common["datalist"])}
    validate_items(load_split(common["datalist"], "all", -1, tuning=True),
                   spatial_shape=parser.get_parsed_content("spatial_shape"),
                   pixdim=parser.get_parsed_content("pixdim"))  # every image, before hours of training
    logger.info("datalist %s: training term/preterm %s in folds %s, test term/preterm %s", info["datalist"],
                info["training"], info["folds"], info["test"])
    return common, info, expand_grid(args.grid or (REDUCED_GRID if args.reduced else DEFAULT_GRID))


def run_study(args) -> dict | None:
    """The study, or the part of it this invocation owns (``args.shard``, ``args.merge``). Returns the results
    when this invocation ran the final stage, else None (another shard runs it or will)."""
    output, work = Path(args.output).resolve(), Path(args.work_dir).resolve()
    timings = {}
    start = time.perf_counter()
    common, info, settings = prepare(args)
    timings["datalist (generation when missing)"] = time.perf_counter() - start

    runs = cv_runs(settings, info["folds"])
    start = time.perf_counter()
    if not args.merge:
        mine = runs if args.shard is None else shard_runs(runs, *args.shard)
        if args.shard is not None:
            logger.info("shard %d/%d: %d of the %d cross-validation runs", *args.shard, len(mine), len(runs))
        run_cv(settings, info["folds"], common, work / "cv", runs=mine,
               desc="cross-validation" if args.shard is None else "cross-validation shard {}/{}".format(*args.shard))
    timings["cross-validation (this run)"] = time.perf_counter() - start
    cv_rows, missing = collect_cv(settings, info["folds"], common, work / "cv")
    if missing:
        if args.shard is None:
            raise ValueError(f"the cross-validation in {work / 'cv'} is incomplete: {len(missing)} of {len(runs)} "
                             f"runs not finished ({', '.join(missing)}); run the shards that own them (or the study "
                             "without --merge) first")
        logger.info("shard %d/%d finished its runs; %d runs of other shards are not finished yet (%s): the last "
                    "shard to finish runs the final stage", *args.shard, len(missing), ", ".join(missing))
        return None
    timings["cross-validation (sum of fold runs, incl. earlier runs)"] = float(sum(r["seconds"] for r in cv_rows))

    lock = work / FINAL_LOCK
    with exclusive_lock(lock) as (claimed, holder):
        if not claimed:
            where = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "a process that is starting"
            if args.shard is not None:
                logger.info("every run is finished; the final stage is being run by %s (lock %s)", where, lock)
                return None
            raise ValueError(f"the final stage of the study in {work} is being run by {where} (lock {lock}); wait "
                             "for it to end, or delete the lock if that process is gone (a lock of a process on "
                             "this host that no longer runs is removed automatically)")
        fingerprint = json.dumps({"cv": cv_rows, "common": common, "presets": list(args.presets),
                                  "output": str(output)}, sort_keys=True)
        done = work / FINAL_DONE
        if args.shard is not None and done.is_file() and json.loads(done.read_text()).get("inputs") == fingerprint:
            logger.info("every run is finished and the final stage was already run on them (%s)", done)
            return None
        logger.info("every cross-validation run is finished: running the final stage (lock %s)", lock)
        result = final_stage(args, common, info, settings, cv_rows, timings)
        atomic_write_text(json.dumps({"inputs": fingerprint}), done)
    return result


def final_stage(args, common: dict, info: dict, settings: list[dict], cv_rows: list[dict], timings: dict) -> dict:
    """Select the setting, train the final model (reused when done), test inference with LRP, group maps and
    the reports."""
    output, work = Path(args.output).resolve(), Path(args.work_dir).resolve()
    summary = summarise_cv(cv_rows, settings)
    best = dict(select_best(summary), _keys=list(settings[0]))
    logger.info("best setting: %s", best["setting"])

    start = time.perf_counter()
    ckpt = _final_model(best, common, work / "final")
    timings["final training"] = time.perf_counter() - start

    start = time.perf_counter()
    maps_dir = work / "final" / "test"
    run_bundle_workflow(["inference.json"], "inference", {
        **common, "ckpt_dir": str(ckpt.parent), "output_dir": str(maps_dir), "split": "test",
        "lrp_presets": list(args.presets), "lrp_target": "pred", "save_input": True})
    timings["test inference + LRP"] = time.perf_counter() - start

    start = time.perf_counter()
    items = load_split(common["datalist"], "test", -1, tuning=True)
    probs = _read_predictions(maps_dir / "predictions.csv")
    rows = subject_table([dict(it, subject=subject_name(it["image"])) for it in items], probs)
    metrics = classification_metrics([r["label"] for r in rows], [probs[r["subject"]] for r in rows])
    mis = misclassification_table(rows)
    means, counts, anatomy = group_analysis(rows, items, maps_dir, list(args.presets), work / "group",
                                            _parser("inference.json", common))
    output.mkdir(parents=True, exist_ok=True)
    write_csv(cv_rows, output / "study_cv_folds.csv")
    write_csv(summary, output / "study_cv.csv")
    write_csv([metrics], output / "study_test_metrics.csv")
    write_csv(rows, output / "study_test_subjects.csv")
    write_csv(mis, output / "study_misclassified.csv")
    if anatomy:
        write_csv(anatomy, output / "study_anatomy.csv", ANATOMY_COLUMNS)
    if means:
        title = "Correctly classified test subjects; mean LRP relevance (target: predicted class)"
        group_figure(means, list(args.presets), output / "study_group_relevance.png", counts, title)
    timings["report"] = time.perf_counter() - start
    markdown = _markdown(summary, best, metrics, mis, anatomy, info, timings, args, common)
    atomic_write_text(markdown, output / "study.md")
    if report_index(maps_dir).is_file():  # the report can be switched off (override {"report": false})
        copy_report(maps_dir, output / STUDY_REPORT)
    else:
        shutil.rmtree(output / STUDY_REPORT, ignore_errors=True)  # no stale copy of an earlier report
    atomic_write_text(_html(markdown, rows, output), output / "study.html")
    logger.info("study written to %s (work files in %s)", output, work)
    return {"metrics": metrics, "best": best, "anatomy": anatomy, "summary": summary, "rows": rows}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _visible_gpus() -> list[str]:
    """The GPU ids a child process may be given: ``CUDA_VISIBLE_DEVICES`` when set, else every CUDA device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
    return [str(i) for i in range(torch.cuda.device_count())]


def run_jobs(args) -> int:
    """``--jobs N``: shards 1..N as local processes, each with ``args.threads`` torch threads and (where GPUs exist)
    its own ``CUDA_VISIBLE_DEVICES`` (GPUs dealt round-robin); waits for all, reports failures by shard."""
    n = args.jobs
    prepare(args)  # the datalist (synthetic cohort generated once) before N processes read it
    gpus = _visible_gpus()
    logs = Path(args.work_dir).resolve() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "scripts.evaluation.study", *_without_sharding(args.argv)]
    pythonpath = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    procs = []
    try:
        for k in range(1, n + 1):
            env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS=str(args.threads),
                       MKL_NUM_THREADS=str(args.threads),
                       **{COMMAND_ENV: shlex.join(["python", "-m", "scripts.evaluation.study", *args.argv])})
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[(k - 1) % len(gpus)]
            log = logs / f"shard-{k}-of-{n}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen([*base, "--shard", f"{k}/{n}", "--threads", str(args.threads)], stdout=f,
                                        stderr=subprocess.STDOUT, env=env)
            procs.append((k, proc, log))
            print(f"shard {k}/{n}: pid {proc.pid}, {args.threads} threads"
                  + (f", GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus else "") + f", log {log}", flush=True)
        codes = {k: proc.wait() for k, proc, _ in procs}
    except BaseException:
        for _, proc, _ in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in procs:
            proc.wait()
        raise
    failed = [(k, log) for k, _, log in procs if codes[k] != 0]
    for k, log in failed:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        print(f"shard {k}/{n} failed with exit status {codes[k]} (log {log}):\n{tail}", file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {n} shards failed ({', '.join(str(k) for k, _ in failed)}); rerun the "
              "same command: finished runs are reused", file=sys.stderr)
        return 1
    print(f"all {n} shards finished; study written to {Path(args.output).resolve()}")
    return 0


EPILOG = ("Outputs by default: the tables, figures, study.md, study.html and test_report/ go to eval/study/results/, "
          "the models, maps, fold results and shard logs to eval/study/ (both in the bundle folder; --output and "
          "--work_dir move them). Time on a CPU: the full settings (1 mm grid, the default network, 14 epochs, "
          "4 settings x 10 folds = 40 training runs of about 14 min each) take roughly 9-10 hours on 2 CPU cores; "
          "--reduced --jobs 2 takes about 16 min there (docs/results/study.md). Where CUDA is available the "
          "configs train on the GPU (their device); otherwise use fewer settings (--grid) or more machines "
          "(--shard) for the full settings.")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.evaluation.study`` (every option's help states its default)."""
    ap = argparse.ArgumentParser(prog="python -m scripts.evaluation.study", description=__doc__.split("\n\n")[0],
                                 epilog=EPILOG, allow_abbrev=False)
    ap.add_argument("--dataset_dir", default=None, help="folder holding datalist.json (default: the configs' "
                    "synthetic cohort, data/synthetic in the bundle folder, generated when missing)")
    ap.add_argument("--datalist", default=None, help="MONAI datalist JSON with labels, folds and a test split "
                    "(default: datalist.json in --dataset_dir)")
    ap.add_argument("--work_dir", default=str(ROOT / "eval" / "study"),
                    help="models, maps, fold results and shard logs, reused on a rerun (default: eval/study in the "
                         "bundle folder)")
    ap.add_argument("--output", default=str(ROOT / "eval" / "study" / "results"),
                    help="study.md, study.html, test_report/, tables and figures (default: eval/study/results in "
                         "the bundle folder)")
    ap.add_argument("--grid", type=json.loads, default=None,
                    help=f"hyper-parameter grid as JSON (default: {json.dumps(DEFAULT_GRID)}; with --reduced "
                         f"{json.dumps(REDUCED_GRID)})")
    ap.add_argument("--presets", nargs="+", default=PRESETS,
                    help=f"LRP alpha-beta settings of the group maps (default: {' '.join(PRESETS)})")
    add_model_options(ap, weights=None, config_file=False,
                      override_help='config overrides for every stage as JSON, e.g. \'{"num_epochs": 20}\' (default: '
                                    "{}, none)")
    ap.add_argument("--reduced", action="store_true",
                    help=f"2 mm grid, smaller network, grid {json.dumps(REDUCED_GRID)}: {json.dumps(REDUCED)} "
                         "(default: off, the full settings)")
    spread = ap.add_argument_group("spreading the runs over processes, GPUs or machines (one shared --work_dir)")
    spread.add_argument("--shard", default=None, metavar="K/N",
                        help="run only shard K of N (1 <= K <= N): the i-th (setting, fold) run, i = 0, 1, ... in "
                             "grid then fold order, belongs to shard i %% N + 1; the shard that finds every run "
                             "finished runs the final stage (default: no sharding, every run)")
    spread.add_argument("--merge", action="store_true",
                        help="only the final stage (setting, final model, test, reports); fails naming the runs "
                             "still missing (default: off)")
    spread.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="run shards 1..N as N local processes (each its own threads and GPU) and wait for them "
                             "(default: one process)")
    spread.add_argument("--threads", type=int, default=None,
                        help="torch threads of this process (with --jobs: of each shard) (default: torch's own "
                             "choice; with --jobs, cores // N)")
    return ap


@report_input_errors
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    args.argv = argv
    logging.config.fileConfig(ROOT / "configs" / "logging.conf", disable_existing_loggers=False)  # as the bundle
    if args.grid is not None:
        expand_grid(args.grid)
    if args.shard is not None:
        try:
            args.shard = parse_shard(args.shard)
        except ValueError as err:
            ap.error(str(err))
    if sum([args.shard is not None, args.jobs is not None, args.merge]) > 1:
        ap.error("--shard, --jobs and --merge exclude each other")
    if (args.jobs is not None and args.jobs < 1) or (args.threads is not None and args.threads < 1):
        ap.error("--jobs and --threads must be positive integers")
    if args.jobs is not None:
        args.threads = args.threads or max(1, _cores() // args.jobs)
        return run_jobs(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = run_study(args)
    if result is None:
        print("shard {}/{}: its runs are finished; the final stage is another shard's (see the log)".format(
            *args.shard))
        return 0
    m = result["metrics"]
    print(f"test: accuracy {m['accuracy']:.3f}, TPR {m['tpr']:.3f}, TNR {m['tnr']:.3f}, "
          f"balanced accuracy {m['balanced_accuracy']:.3f}, AUC {m['auc']:.3f} (n={m['n']})")
    return 0


if __name__ == "__main__":
    # SIGTERM (scancel, a SLURM time limit or preemption, a --jobs parent stopping its shards) ends the study
    # through Python: the final-stage lock is released, --jobs stops its shards; a run it interrupts is redone
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    sys.exit(main())
