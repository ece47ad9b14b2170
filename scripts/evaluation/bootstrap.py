"""Percentile-bootstrap intervals over subjects for the classification metrics, and paired differences between two
sets of predictions of the same subjects (``scripts.evaluation.cohort_metrics``).

The resamples are stratified by class: each draws, with replacement, as many preterm and as many term subjects as
the cohort holds, so every resample has both classes (ROC AUC, sensitivity and specificity are defined in each) and
the class balance of the cohort. One index matrix serves every metric and every set of predictions: a paired
difference is taken on the same resampled subjects for both (Efron & Tibshirani, An Introduction to the Bootstrap,
1993, ch. 13 for the percentile interval). Preterm (label 1) is the positive class; a subject is called preterm when
p(preterm) > 0.5 (the arg-max of the two classes, as ``clinical_metrics.classification_metrics``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

__all__ = ["METRICS", "accuracy", "interval", "non_inferior", "paired_difference", "roc_auc", "sensitivity",
           "specificity", "stratified_resamples"]

RESAMPLES = 2000
LEVEL = 0.95


def _called(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs, dtype=float) > 0.5


def accuracy(labels, probs) -> np.ndarray:
    """Share of subjects called right, over the last axis (a row per resample, or one cohort)."""
    return np.mean(_called(probs) == np.asarray(labels, dtype=bool), axis=-1)


def sensitivity(labels, probs) -> np.ndarray:
    """TPR: share of the preterm subjects called preterm (NaN without a preterm subject)."""
    y = np.asarray(labels, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(_called(probs) & y, axis=-1) / np.sum(y, axis=-1)


def specificity(labels, probs) -> np.ndarray:
    """TNR: share of the term subjects called term (NaN without a term subject)."""
    y = np.asarray(labels, dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(~_called(probs) & ~y, axis=-1) / np.sum(~y, axis=-1)


def roc_auc(labels, probs) -> np.ndarray:
    """ROC AUC over the last axis: the Mann-Whitney form, the probability that a preterm subject scores above a term
    one, ties counted half (average ranks); NaN when a class is missing."""
    y = np.asarray(labels, dtype=bool)
    ranks = rankdata(np.asarray(probs, dtype=float), method="average", axis=-1)
    positives, negatives = y.sum(axis=-1), (~y).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.sum(np.where(y, ranks, 0.0), axis=-1) - positives * (positives + 1) / 2) / (positives * negatives)


METRICS: dict[str, Callable] = {"accuracy": accuracy, "auc": roc_auc, "sensitivity": sensitivity,
                                "specificity": specificity}


def stratified_resamples(labels, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) subject indices: per row, the term subjects' indices then the preterm ones', each class drawn
    with replacement as often as it occurs in ``labels``; fixed ``seed``: the same labels give the same matrix."""
    labels = np.asarray(labels).astype(int)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"need a non-empty list of labels, got shape {labels.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    rng = np.random.default_rng(seed)
    parts = []
    for cls in (0, 1):
        members = np.flatnonzero(labels == cls)
        if len(members):
            parts.append(members[rng.integers(0, len(members), size=(resamples, len(members)))])
    return np.concatenate(parts, axis=1)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def interval(metric: str, labels, probs, indices: np.ndarray, level: float = LEVEL) -> dict:
    """{estimate, low, high} of ``metric`` (a key of ``METRICS``): the value on the cohort and the percentile
    interval over the resamples ``indices`` (``stratified_resamples``)."""
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=float)
    function = METRICS[metric]
    low, high = _percentiles(function(labels[indices], probs[indices]), level)
    return {"estimate": float(function(labels, probs)), "low": low, "high": high}


def paired_difference(metric: str, labels, probs, reference, indices: np.ndarray, level: float = LEVEL) -> dict:
    """{difference, low, high}: ``metric`` of ``probs`` minus that of ``reference`` (the same subjects) on the cohort,
    and the percentile interval of the difference over the resamples ``indices``, each taken on the same resampled
    subjects for both."""
    labels = np.asarray(labels)
    probs, reference = np.asarray(probs, dtype=float), np.asarray(reference, dtype=float)
    if probs.shape != reference.shape or probs.shape != labels.shape:
        raise ValueError(f"paired predictions need the same subjects: {labels.shape}, {probs.shape}, "
                         f"{reference.shape}")
    function = METRICS[metric]
    y = labels[indices]
    low, high = _percentiles(function(y, probs[indices]) - function(y, reference[indices]), level)
    return {"difference": float(function(labels, probs) - function(labels, reference)), "low": low, "high": high}


def non_inferior(low: float, margin: float) -> bool:
    """Non-inferiority of a paired difference at ``margin``: the interval's lower bound is at least ``-margin``."""
    return bool(low >= -margin)
