"""Test-split metrics of the study (preterm = positive class) with MONAI's metric functions, the per-subject table
and the seed paper's look at the misclassified babies' birth ages."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric, compute_roc_auc, get_confusion_matrix

__all__ = ["CLASS_NAMES", "classification_metrics", "misclassification_table", "subject_table"]

CLASS_NAMES = {0: "term", 1: "preterm"}


def classification_metrics(labels: Sequence[int], probs: Sequence[Sequence[float]]) -> dict:
    """Accuracy, TPR (preterm recall), TNR (term recall), balanced accuracy, ROC AUC and the confusion counts from
    integer labels and (N, 2) class probabilities; the prediction is the arg-max class."""

    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    p = torch.as_tensor(np.asarray(probs, dtype=np.float64))
    if y.ndim != 1 or p.shape != (len(y), 2):
        raise ValueError(f"need N labels and (N, 2) probabilities, got {tuple(y.shape)} and {tuple(p.shape)}")
    if len(y) == 0:
        raise ValueError("no subjects to score")
    bad = sorted(set(y.tolist()) - {0, 1})
    if bad:
        raise ValueError(f"labels must be 0 (term) or 1 (preterm), got {bad}")
    onehot = torch.nn.functional.one_hot(y, 2).float()
    pred = torch.nn.functional.one_hot(p.argmax(1), 2).float()
    # preterm as the positive class: the confusion matrix of channel 1 only
    cm = get_confusion_matrix(pred[:, 1:], onehot[:, 1:], include_background=True).sum(0)  # (1, 4): tp fp tn fn
    tp, fp, tn, fn = (int(v) for v in cm[0])

    def metric(name):
        return float(compute_confusion_matrix_metric(name, cm)[0])

    tpr, tnr = metric("sensitivity"), metric("specificity")
    both = len(set(y.tolist())) == 2
    return {
        "n": len(y), "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        "accuracy": metric("accuracy"), "tpr": tpr, "tnr": tnr, "balanced_accuracy": (tpr + tnr) / 2,
        "auc": float(compute_roc_auc(p[:, 1], y)) if both else float("nan"),
    }


def subject_table(items: Sequence[dict], probs: dict[str, Sequence[float]]) -> list[dict]:
    """One row per datalist item: subject, label, birth/scan age, preterm probability, prediction, correctness."""
    rows = []
    for item in items:
        subject = item["subject"]
        if subject not in probs:
            raise KeyError(f"no prediction for subject {subject}")
        p = np.asarray(probs[subject], dtype=float)
        pred = int(p.argmax())
        rows.append({
            "subject": subject, "label": int(item["label"]), "class": CLASS_NAMES[int(item["label"])],
            "birth_age": item.get("birth_age", ""), "scan_age": item.get("scan_age", ""),
            "prob_preterm": round(float(p[1]), 6), "prediction": pred, "correct": int(pred == int(item["label"])),
        })
    return rows


def misclassification_table(rows: Sequence[dict]) -> list[dict]:
    """Per class: how many babies were classified correctly, their birth ages, and the misclassified babies'
    birth ages (the seed paper's observation: errors sit near the 37-week boundary)."""
    out = []
    for label, name in CLASS_NAMES.items():
        mine = [r for r in rows if r["label"] == label]
        ages = {c: [float(r["birth_age"]) for r in mine if r["correct"] == c and r["birth_age"] not in ("", None)]
                for c in (0, 1)}
        out.append({
            "class": name, "n": len(mine), "correct": sum(r["correct"] for r in mine),
            "misclassified": sum(1 - r["correct"] for r in mine),
            "birth_age_correct_mean": float(np.mean(ages[1])) if ages[1] else float("nan"),
            "birth_age_correct_sd": float(np.std(ages[1], ddof=1)) if len(ages[1]) > 1 else float("nan"),
            "birth_age_correct_range": f"{min(ages[1]):.1f}-{max(ages[1]):.1f}" if ages[1] else "",
            "birth_age_misclassified": ", ".join(f"{a:.1f}" for a in sorted(ages[0])),
        })
    return out
