"""Output transforms that turn MONAI's decollated engine output into the batched tensors Ignite metrics expect."""

from __future__ import annotations

import torch

__all__ = ["scores_and_labels"]


def scores_and_labels(output, pred_key: str = "pred", label_key: str = "label"):
    """(B, C) class scores and (B,) integer labels from a list of per-item dicts (labels may be one-hot)."""
    items = output if isinstance(output, list) else [output]
    scores = torch.stack([torch.as_tensor(o[pred_key]).reshape(-1).float() for o in items])
    labels = []
    for o in items:
        label = torch.as_tensor(o[label_key]).reshape(-1)
        labels.append(label.argmax() if label.numel() > 1 else label[0])
    return scores, torch.stack(labels).long()
