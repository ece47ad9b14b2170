"""k-fold cross-validation of a small hyper-parameter grid with the bundle's own training config.

Every (setting, fold) run is the real ``training`` workflow of ``configs/train.json`` run in-process with
``fold=k`` and the setting's values as config overrides. Its validation metrics after the last epoch go to
``<work_dir>/<setting>/fold<k>/result.json`` (written atomically once the run has finished), so a rerun skips
finished folds and redoes only the one a crash interrupted.

Sharding: the runs are enumerated in one fixed order (``cv_runs``: grid order of the settings, then ascending
folds) and the i-th run (0-based) belongs to shard ``i % n + 1`` of ``n`` (``shard_runs``; shards are numbered
1..n, like a SLURM array ``--array=1-n``). Shards share the work dir: each trains its own runs, and any of them
(or a plain rerun) sees every finished run through its ``result.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from monai.bundle import ConfigWorkflow
from tqdm import tqdm

from scripts import BUNDLE_ROOT
from scripts.runtime.outputs import atomic_write_text

__all__ = ["METRICS", "collect_cv", "cv_runs", "expand_grid", "parse_shard", "run_bundle_workflow", "run_cv",
           "run_label", "same_run", "select_best", "setting_label", "shard_runs", "summarise_cv"]

logger = logging.getLogger(__name__)
ROOT = BUNDLE_ROOT
METRICS = ("val_balanced_accuracy", "val_auc", "val_accuracy")


def expand_grid(grid: dict[str, Sequence]) -> list[dict]:
    """``{"learning_rate": [1e-3, 3e-4], "num_epochs": [14]}`` -> one dict per combination (keys sorted)."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"grid must be a non-empty JSON object of config key -> list of values, got {grid!r}")
    keys = sorted(grid)
    for key in keys:
        if not isinstance(grid[key], (list, tuple)) or not grid[key]:
            raise ValueError(f"grid key '{key}' must map to a non-empty list of values, got {grid[key]!r}")
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def setting_label(setting: dict) -> str:
    """Readable, file-system safe name of a setting: ``class_weight_factor-2_learning_rate-0.001``."""
    return "_".join(f"{k}-{v}" for k, v in sorted(setting.items())).replace("/", "-").replace(" ", "") or "default"


def same_run(saved: dict | None, overrides: dict) -> bool:
    """Whether a finished run's overrides equal ``overrides``, apart from where it wrote (its own folder)."""
    if saved is None:
        return False
    def key(d):
        return {k: v for k, v in json.loads(json.dumps(d)).items() if k not in ("ckpt_dir", "output_dir")}

    return key(saved) == key(overrides)


def run_bundle_workflow(config_files: Sequence[str], run_id: str, overrides: dict):
    """Run a bundle workflow in-process (as ``python -m monai.bundle run``) and return it, parsed objects intact."""

    files = [str(ROOT / "configs" / f) if not Path(f).is_absolute() else f for f in config_files]
    workflow = ConfigWorkflow(config_file=files, run_id=run_id, workflow_type=None,
                              **{"bundle_root": str(ROOT), **overrides})
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return workflow


def _train_fold(overrides: dict) -> dict:
    workflow = run_bundle_workflow(["train.json"], "training", overrides)
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    metrics = {k: float(v) for k, v in evaluator.state.metrics.items()}
    missing = [m for m in METRICS if m not in metrics]
    if missing:
        raise RuntimeError(f"validation produced no {missing} (metrics: {sorted(metrics)})")
    return {"metrics": metrics, "best_val_auc": float(evaluator.state.best_metric),
            "best_epoch": int(evaluator.state.best_metric_epoch)}


def cv_runs(settings: list[dict], folds: Sequence[int]) -> list[tuple[dict, int]]:
    """Every (setting, fold) run in the fixed order that sharding and the tables use."""
    return [(setting, int(fold)) for setting in settings for fold in folds]


def parse_shard(text: str) -> tuple[int, int]:
    """``"k/n"`` -> (k, n) with 1 <= k <= n."""
    try:
        k, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must be k/n with integers 1 <= k <= n (e.g. 1/4), got {text!r}") from None
    if not 1 <= k <= n:
        raise ValueError(f"--shard must be k/n with integers 1 <= k <= n (e.g. 1/4), got {text!r}")
    return k, n


def shard_runs(runs: Sequence, shard: int, shards: int) -> list:
    """The runs of shard ``shard`` (1-based) of ``shards``: the i-th run (0-based) goes to shard ``i % shards + 1``."""
    if not 1 <= shard <= shards:
        raise ValueError(f"shard {shard} of {shards}: shards are numbered 1..{shards}")
    return [run for i, run in enumerate(runs) if i % shards == shard - 1]


def run_label(setting: dict, fold: int) -> str:
    return f"{setting_label(setting)} fold {fold}"


def _run_dir_and_overrides(setting: dict, fold: int, common: dict, work_dir: Path) -> tuple[Path, dict]:
    run_dir = Path(work_dir) / setting_label(setting) / f"fold{fold}"
    return run_dir, {**common, **setting, "fold": int(fold), "ckpt_dir": str(run_dir / "models"),
                     "output_dir": str(run_dir)}


def _finished(run_dir: Path, overrides: dict) -> dict | None:
    """The result of the run in ``run_dir`` if it finished with these overrides, else None."""
    result_file = run_dir / "result.json"
    result = json.loads(result_file.read_text()) if result_file.is_file() else None
    return result if result is not None and same_run(result.get("overrides"), overrides) else None


def _row(setting: dict, fold: int, result: dict) -> dict:
    return {"setting": setting_label(setting), "fold": int(fold), "seconds": result["seconds"],
            **{m: result["metrics"][m] for m in METRICS}, "best_val_auc": result["best_val_auc"],
            "best_epoch": result["best_epoch"]}


def run_cv(settings: list[dict], folds: Sequence[int], common: dict, work_dir: Path,
           train_fold: Callable[[dict], dict] = _train_fold, runs: Sequence[tuple[dict, int]] | None = None,
           desc: str = "cross-validation") -> list[dict]:
    """Train every setting on every fold (or only ``runs``, e.g. one shard's), skipping finished ones, and return
    one row per run."""

    rows = []
    bar = tqdm(cv_runs(settings, folds) if runs is None else list(runs), desc=desc, unit="run")
    for setting, fold in bar:
        run_dir, overrides = _run_dir_and_overrides(setting, fold, common, work_dir)
        result_file = run_dir / "result.json"
        result = _finished(run_dir, overrides)
        if result is None:
            bar.set_postfix_str(run_label(setting, fold))
            start = time.perf_counter()
            result = {"setting": setting, "fold": int(fold), "overrides": overrides, **train_fold(overrides),
                      "seconds": round(time.perf_counter() - start, 1)}
            atomic_write_text(json.dumps(result, indent=2), result_file)
        else:
            logger.info("fold %d of %s already finished (%s): skipped", fold, setting_label(setting), result_file)
        logger.info("%s fold %d: %s", setting_label(setting), fold,
                    ", ".join(f"{m}={result['metrics'][m]:.3f}" for m in METRICS))
        rows.append(_row(setting, fold, result))
    return rows


def collect_cv(settings: list[dict], folds: Sequence[int], common: dict,
               work_dir: Path) -> tuple[list[dict], list[str]]:
    """(rows of the finished runs, labels of the missing ones), both in ``cv_runs`` order; trains nothing."""
    rows, missing = [], []
    for setting, fold in cv_runs(settings, folds):
        result = _finished(*_run_dir_and_overrides(setting, fold, common, work_dir))
        if result is None:
            missing.append(run_label(setting, fold))
        else:
            rows.append(_row(setting, fold, result))
    return rows, missing


def summarise_cv(rows: list[dict], settings: list[dict]) -> list[dict]:
    """Mean and sample sd over folds of each validation metric, one row per setting (in grid order)."""
    out = []
    for setting in settings:
        label = setting_label(setting)
        mine = [r for r in rows if r["setting"] == label]
        row = {"setting": label, **setting, "folds": len(mine)}
        for m in METRICS:
            values = np.array([r[m] for r in mine], dtype=float)
            row[f"{m}_mean"] = float(np.nanmean(values)) if len(values) else float("nan")
            row[f"{m}_sd"] = float(np.nanstd(values, ddof=1)) if len(values) > 1 else float("nan")
        out.append(row)
    return out


def select_best(summary: list[dict]) -> dict:
    """Highest mean validation balanced accuracy; ties go to the higher mean AUC, then to the earlier setting."""
    def key(row):
        return tuple(-np.nan_to_num(row[f"{m}_mean"], nan=-1.0) for m in ("val_balanced_accuracy", "val_auc"))

    return min(summary, key=key)
