"""Stratified, seeded subject splits: a held-out test part and k folds inside the training part."""

from __future__ import annotations

import numpy as np

__all__ = ["assign_splits", "stratified_folds"]


def stratified_folds(labels, folds: int, seed: int) -> np.ndarray:
    """Fold index (0..folds-1) for every item, each class spread evenly over the folds."""
    labels = np.asarray(labels)
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=int)
    offset = 0
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        fold_of[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)  # continue round-robin so fold sizes stay balanced across classes
    return fold_of


def assign_splits(items: list[dict], test_fraction: float = 0.1, folds: int = 10, seed: int = 0):
    """Split ``items`` (dicts with an integer ``label``) into (training, test), stratified by label; every
    training item gets a ``fold`` in [0, folds)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.array([int(item["label"]) for item in items])
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(idx) * test_fraction))
        test_idx += idx[:n_test].tolist()
    test_set = set(test_idx)
    train_idx = [i for i in range(len(items)) if i not in test_set]
    fold_of = stratified_folds(labels[train_idx], folds, seed + 1)
    training = [dict(items[i], fold=int(f)) for i, f in zip(train_idx, fold_of)]
    test = [dict(items[i]) for i in sorted(test_idx)]
    return training, test
