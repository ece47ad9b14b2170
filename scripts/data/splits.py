"""Stratified, seeded subject splits: a held-out test part and k folds inside the training part."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from scripts.runtime.outputs import atomic_write_text

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


def main(argv=None) -> int:
    """``python -m scripts.data.splits --datalist D``: (re)assign a stratified test split and folds to a datalist."""

    ap = argparse.ArgumentParser(prog="python -m scripts.data.splits", description=main.__doc__)
    ap.add_argument("--datalist", required=True, help="MONAI datalist JSON with labelled 'training' (and 'test') items")
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-test", action="store_true", help="keep the existing test split, only redo the folds")
    ap.add_argument("--output", default=None, help="write here instead of replacing --datalist")
    args = ap.parse_args(argv)
    path = Path(args.datalist)
    data = json.loads(path.read_text())
    training, test = list(data.get("training", [])), list(data.get("test", []))
    for item in training + test:
        if item.get("label") not in (0, 1) or isinstance(item.get("label"), bool):
            ap.error(f"{path}: item {item.get('image')} has label {item.get('label')!r}; labels must be 0 or 1")
    if args.keep_test:
        if not test:
            ap.error(f"{path}: --keep-test, but the datalist has no test items")
        fold_of = stratified_folds([int(it["label"]) for it in training], args.folds, args.seed + 1)
        training = [dict(it, fold=int(f)) for it, f in zip(training, fold_of)]
    else:
        items = [{k: v for k, v in it.items() if k != "fold"} for it in training + test]
        training, test = assign_splits(items, args.test_fraction, args.folds, args.seed)
    data.update(training=training, test=test)
    out = Path(args.output) if args.output else path
    atomic_write_text(json.dumps(data, indent=2), out)
    print(f"{out}: {len(training)} training items in {args.folds} folds, {len(test)} test items")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
