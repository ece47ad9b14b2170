"""The explain-and-write step: one code path from a preprocessed batch to probabilities, relevance maps and
their files, shared by the bundle's ``LRPHandler`` (``run inference``, and so the study), the MONAI Label tasks
and the MONAI Deploy operator.

    explained = explain(network, images, presets=["a2b1"], target="pred")   # probabilities + maps + conservation
    write_explanation(output_dir, subject, image, explained, index=0, transform=preprocessing)  # NIfTIs on disk

Maps are written on the network-input grid (the input's affine) and, given the preprocessing ``transform``, also
resampled onto the original image's grid through MONAI's inverse transforms (``Invertd``, bilinear: sums are not
preserved there). File names come from ``scripts.runtime.outputs`` only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from scripts.lrp import LRP, Explanation, get_composite
from scripts.runtime.outputs import input_path, relevance_path, save_nifti

__all__ = ["APP_PRESET", "Explained", "affine_of", "check_presets", "explain", "labels_to_original_grid",
           "to_original_grid", "write_explanation"]

# The recommended LRP preset (docs/evaluation.md, recommendation): the one of the MONAI Label tasks and the MONAI
# Deploy app when their users do not pick one (Label: ``--conf lrp_preset``, Deploy: ``PRETERM_LRP_PRESET``), and
# the first of ``configs/inference.json``'s default ``lrp_presets`` (``run inference``; the run report pictures the
# first preset), which names it. The one place to change it; the apps' tests and tests/test_console.py follow it.
APP_PRESET = "epsilon_gamma_box"


@dataclass
class Explained:
    """What ``explain`` returns for a batch of B inputs."""

    logits: torch.Tensor  # (B, C) of the explained network
    probabilities: torch.Tensor  # (B, C)
    maps: dict[str, Explanation]  # preset -> relevance (B, 1, *spatial), target, start, conservation

    def summary(self, index: int, preset: str) -> dict:
        """Numbers of one subject's map: decision, probabilities, target, start relevance, sum, conservation."""
        prob = self.probabilities[index]
        result = self.maps[preset]
        return {"pred": int(prob.argmax()), "prob_term": float(prob[0]), "prob_preterm": float(prob[1]),
                "target": int(result.target[index]), "start_relevance": float(result.start[index]),
                "relevance_sum": float(result.relevance[index].sum()),
                "conservation": float(result.conservation[index])}

    def relevance(self, index: int, preset: str) -> torch.Tensor:
        """The (1, *spatial) float32 map of one subject on the network-input grid."""
        return self.maps[preset].relevance[index].detach().float().cpu()


def check_presets(presets: str | Sequence[str]) -> list[str]:
    """The preset names as a list; a bad name fails here, before anything runs."""
    presets = [presets] if isinstance(presets, str) else list(presets)
    if not presets:
        raise ValueError("config value 'lrp_presets' must name at least one LRP preset")
    for preset in presets:
        get_composite(preset)
    return presets


def explain(network: torch.nn.Module, images: torch.Tensor, presets: Sequence[str], target: str | int = "pred",
            probabilities: torch.Tensor | None = None) -> Explained:
    """Trace ``network`` once on the (B, 1, *spatial) ``images`` and compute every preset's relevance for
    ``target`` (``"pred"``, a class index or ``"difference"``). ``probabilities`` (e.g. the engine's softmax
    post-processing) are used when given, else the softmax of the traced logits. The network's train/eval mode is
    restored afterwards; a DistributedDataParallel/DataParallel wrapper is looked through."""
    network = getattr(network, "module", network)
    device = next(network.parameters()).device
    x = torch.as_tensor(images).as_subclass(torch.Tensor).to(device=device, dtype=torch.float32)
    was_training = network.training
    network.eval()
    try:
        trace = LRP(network).trace(x, cache=len(presets) > 1)
        maps = {preset: trace.relevance(preset, target) for preset in presets}
    finally:
        network.train(was_training)
    logits = trace.logits.detach().float().cpu()
    if probabilities is None:
        probabilities = torch.softmax(logits, dim=1)
    return Explained(logits, torch.as_tensor(probabilities).detach().float().cpu().reshape(len(x), -1), maps)


def affine_of(image) -> np.ndarray:
    """The 4x4 affine of a MetaTensor (identity for a plain tensor)."""
    affine = getattr(image, "affine", None)
    return np.eye(4) if affine is None else torch.as_tensor(affine).cpu().numpy()


def to_original_grid(relevance: torch.Tensor, image: MetaTensor, transform, image_key: str = "image") -> MetaTensor:
    """A (1, *spatial) map on ``image``'s network grid, resampled onto the grid the image had before
    ``transform`` (the preprocessing that produced ``image``, MONAI invertible transforms)."""
    data = {image_key: image,
            "relevance": MetaTensor(relevance, affine=image.affine, meta=dict(image.meta),
                                    applied_operations=list(image.applied_operations))}
    return Invertd(keys="relevance", transform=transform, orig_keys=image_key, nearest_interp=False)(data)["relevance"]


def labels_to_original_grid(labels: torch.Tensor, image: MetaTensor, transform, image_key: str = "image") -> MetaTensor:
    """``to_original_grid`` for a (1, *spatial) label map (e.g. level sets of a relevance map): nearest-neighbour
    resampling, so every voxel of the result holds one of the map's values."""
    data = {image_key: image,
            "labels": MetaTensor(labels, affine=image.affine, meta=dict(image.meta),
                                 applied_operations=list(image.applied_operations))}
    return Invertd(keys="labels", transform=transform, orig_keys=image_key, nearest_interp=True)(data)["labels"]


def write_explanation(output_dir: str | os.PathLike, subject: str, image: MetaTensor, explained: Explained,
                      index: int = 0, save_input: bool = False, transform=None) -> list[Path]:
    """Write subject ``index`` of ``explained``: every preset's map on the network grid of ``image`` (its
    (1, *spatial) network input), the map on the original grid when ``transform`` is given, and the network
    input with ``save_input``. Returns the paths written."""
    written = []
    for preset in explained.maps:
        relevance = explained.relevance(index, preset)
        written.append(save_nifti(relevance[0].numpy(), affine_of(image), relevance_path(output_dir, subject, preset)))
        if transform is not None:
            original = to_original_grid(relevance, image, transform)
            written.append(save_nifti(original[0].cpu().numpy(), affine_of(original),
                                      relevance_path(output_dir, subject, preset, original=True)))
    if save_input:
        written.append(save_nifti(torch.as_tensor(image)[0].cpu().numpy(), affine_of(image),
                                  input_path(output_dir, subject)))
    return written
