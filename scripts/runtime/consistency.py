"""Consistency training: each training scan is seen twice in a step, as it is and as another view of it (e.g. the
scan acquired on another grid, ``RandAcquiredGridd``), and the loss asks for the same decision on both -- the idea of
AugMix's consistency term (Hendrycks et al., ICLR 2020), here on the logit margin that fixes p(preterm).

``ConsistencyTrainer`` MONAI's ``SupervisedTrainer`` on paired batches: the batch's ``image`` and its ``view_key``
                    stacked along the batch (first the N images, then their N views), every other entry twice, so
                    that MONAI's own iteration, post-processing and metrics run unchanged on 2N items (the training
                    accuracy counts both views).
``ConsistencyLoss`` the base loss (class-weighted cross-entropy) on both halves plus ``weight`` x the mean squared
                    difference of the two halves' logit margins (logit 1 - logit 0).

The default training of configs/train.json since 2026-12-06 (the experiment it came from:
docs/experiments/consistency_acquired.json, measured in
(docs/experiments/README.md, 2026-12-06: consistency training adopted)); the validation and inference paths
are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from monai.engines import SupervisedTrainer
from monai.utils import CommonKeys

__all__ = ["ConsistencyLoss", "ConsistencyTrainer", "paired_batch"]


def paired_batch(batch: Mapping, view_key: str = "view", image_key: str = CommonKeys.IMAGE) -> dict:
    """The collated ``batch`` of N items as 2N: ``image_key`` followed by ``view_key`` (which is dropped), every other
    tensor or list with N entries repeated."""
    if not isinstance(batch, Mapping) or view_key not in batch or image_key not in batch:
        raise ValueError(f"ConsistencyTrainer: the training batch needs '{image_key}' and '{view_key}' (add the view "
                         "to the training transforms, e.g. CopyItemsd + RandAcquiredGridd)")
    image, view = batch[image_key], batch[view_key]
    if tuple(view.shape) != tuple(image.shape):
        raise ValueError(f"ConsistencyTrainer: '{view_key}' has shape {tuple(view.shape)}, '{image_key}' "
                         f"{tuple(image.shape)}")
    n = image.shape[0]
    out = {}
    for key, value in batch.items():
        if key == view_key:
            continue
        if key == image_key:
            out[key] = torch.cat([image, view.to(image.device)])  # `fast`: ToDeviced moved only the image
        elif isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
            out[key] = torch.cat([value, value])
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[key] = type(value)(list(value) + list(value))
        else:
            out[key] = value
    return out


class ConsistencyTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose every iteration sees each training item and its ``view_key`` (``paired_batch``)."""

    def __init__(self, *args, view_key: str = "view", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.view_key = view_key

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        engine.state.batch = paired_batch(batchdata, self.view_key)  # what the post-processing reads, item by item
        return super()._iteration(engine, engine.state.batch)


class ConsistencyLoss(torch.nn.Module):
    """``base(pred, target) + weight * mean((margin(first half) - margin(second half))^2)`` for a batch made by
    ``paired_batch``; margin = logit 1 - logit 0 (two-class logits)."""

    def __init__(self, base: torch.nn.Module, weight: float = 1.0) -> None:
        super().__init__()
        if float(weight) < 0:
            raise ValueError(f"ConsistencyLoss: weight must be >= 0, got {weight!r}")
        self.base = base
        self.weight = float(weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = pred.shape[0] // 2
        if pred.ndim != 2 or pred.shape[1] != 2 or pred.shape[0] != 2 * n:
            raise ValueError(f"ConsistencyLoss: expects two-class logits of a paired batch, got {tuple(pred.shape)}")
        margin = pred[:, 1] - pred[:, 0]
        return self.base(pred, target) + self.weight * torch.mean((margin[:n] - margin[n:]) ** 2)
