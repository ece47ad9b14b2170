"""The explanation methods that the evaluation commands compare (``explain_eval``, ``sanity``), behind one call:

    relevance, conservation = compute_map("lrp_epsilon_gamma_box", network, x, target=1)
    relevance, _ = compute_map("gradcam", network, x, target="difference")

Methods: ``lrp_<preset>`` (this bundle's engine, ``scripts.lrp``), ``gradient`` (|d logit / d x|, MONAI's
VanillaGrad), ``gradient_x_input`` (the signed gradient times the input), ``gradcam`` (MONAI's GradCAM on the last
conv block), ``smoothgrad`` (MONAI's SmoothGrad, magnitude) and ``occlusion`` (MONAI's OcclusionSensitivity: the
drop of the target logit when a block is replaced by the image mean). Targets: a class index (0 term, 1 preterm)
or ``"difference"`` (logit preterm - logit term); MONAI's explainers reach the difference through
:class:`TargetLogits`, a third output of the network.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from monai.visualize import GradCAM, OcclusionSensitivity, SmoothGrad, VanillaGrad
from torch import nn

from scripts.lrp import LRP

__all__ = ["GRADIENT_METHODS", "LRP_METHODS", "LRP_PRESETS", "SLOW_METHODS", "TargetLogits", "compute_map",
           "compute_maps", "forward_seconds", "last_conv_block", "lrp_maps"]

# the seed paper's presets (the study's and inference's default), the earlier first-layer variants, zennit's named
# composites and two bias-free variants
LRP_PRESETS = ("a1b0", "a2b1", "a3b2", "epsilon_a2b1", "zbox_a2b1", "flat_a2b1", "epsilon_plus", "epsilon_plus_flat",
               "epsilon_gamma_box", "a2b1_nobias", "epsilon_gamma_box_nobias")
LRP_METHODS = tuple(f"lrp_{preset}" for preset in LRP_PRESETS)
GRADIENT_METHODS = ("gradient_x_input", "gradient", "gradcam")  # one forward + backward each
SLOW_METHODS = ("smoothgrad", "occlusion")  # many forward passes per map
DEFAULT_SETTINGS = {"smoothgrad_samples": 16, "occlusion_mask": 24}


class TargetLogits(nn.Module):
    """``network`` with a third output, logit[1] - logit[0] (index 2), for explainers that take a class index."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.net = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return torch.cat([logits, logits[:, 1:2] - logits[:, 0:1]], 1)


def forward_seconds(network: nn.Module, x: torch.Tensor, repeats: int = 3) -> float:
    """Median time of one forward pass of ``x``: the unit in which the evaluation commands report their run time,
    so that it carries over to another machine."""
    times = []
    with torch.no_grad():
        network(x)
        for _ in range(repeats):
            start = time.perf_counter()
            network(x)
            times.append(time.perf_counter() - start)
    return float(sorted(times)[len(times) // 2])


def _index(target) -> int:
    if isinstance(target, str):
        if target in ("difference", "diff"):
            return 2
        raise ValueError(f"target must be a class index or 'difference', got {target!r}")
    return int(target)


def last_conv_block(network: nn.Module) -> str:
    """Name of the activation closing the last conv block (the first ReLU after the last Conv3d)."""
    modules = list(network.named_modules())
    last_conv = max((i for i, (_, m) in enumerate(modules) if isinstance(m, nn.Conv3d)), default=None)
    relu = next((name for name, m in modules[(last_conv or 0) + 1:] if isinstance(m, nn.ReLU)), None)
    if last_conv is None or relu is None:
        raise ValueError("GradCAM needs a Conv3d followed by a ReLU module")
    return relu


def compute_map(method: str, network: nn.Module, x: torch.Tensor, target=1, settings: dict | None = None):
    """(map as a (D, H, W) numpy array, LRP conservation or None) of one (1, 1, D, H, W) input."""
    settings = {**DEFAULT_SETTINGS, **(settings or {})}
    if method.startswith("lrp_"):
        result = LRP(network)(x, method[4:], target=target)
        return result.relevance[0, 0].numpy(), float(result.conservation[0])
    wrapped = TargetLogits(network).eval()
    index = _index(target)
    if method in ("gradient", "gradient_x_input"):
        grad = VanillaGrad(wrapped)(x.clone(), index=index)
        out = grad * x if method == "gradient_x_input" else grad.abs()
        return out[0, 0].detach().numpy(), None
    if method == "smoothgrad":
        sg = SmoothGrad(wrapped, stdev_spread=0.15, n_samples=settings["smoothgrad_samples"], magnitude=True,
                        verbose=False)
        return sg(x, index=index)[0, 0].detach().numpy(), None
    if method == "gradcam":
        cam = GradCAM(nn_module=wrapped, target_layers=f"net.{last_conv_block(network)}")
        return cam(x, class_idx=index)[0, 0].detach().numpy(), None
    if method == "occlusion":
        # activate=False: MONAI's default softmax would turn the occluded outputs into probabilities, and the logit
        # minus a probability is a near-constant offset that hides the map's structure
        occ = OcclusionSensitivity(nn_module=wrapped, mask_size=settings["occlusion_mask"], n_batch=4, overlap=0.0,
                                   mode="mean_img", activate=False)
        with torch.no_grad():
            score = float(wrapped(x)[0, index])
        occ_map, _ = occ(x)
        return (score - occ_map[0, index]).detach().numpy(), None  # drop of the target score when occluded
    raise ValueError(f"unknown method {method!r}")


def lrp_maps(network: nn.Module, x: torch.Tensor, presets: Sequence[str], targets: Sequence) -> dict:
    """{(preset, target): (D, H, W) map} of one input for every preset and target, from one traced forward pass
    (the rule denominators are shared between presets and targets)."""
    trace = LRP(network).trace(x, cache=True)
    return {(preset, target): trace.relevance(preset, target).relevance[0, 0].numpy()
            for target in targets for preset in presets}


def compute_maps(methods: Sequence[str], network: nn.Module, x: torch.Tensor, targets: Sequence,
                 settings: dict | None = None) -> dict:
    """{target: {method: (D, H, W) map}} of one input: the LRP presets from one traced forward pass, gradient and
    gradient x input from one backward pass per target, the others through :func:`compute_map`."""
    presets = [m[4:] for m in methods if m.startswith("lrp_")]
    lrp = lrp_maps(network, x, presets, targets) if presets else {}
    out = {}
    for target in targets:
        maps = {f"lrp_{p}": lrp[(p, target)] for p in presets}
        if {"gradient", "gradient_x_input"} & set(methods):
            grad = VanillaGrad(TargetLogits(network).eval())(x.clone(), index=_index(target)).detach()
            maps["gradient"] = grad.abs()[0, 0].numpy()
            maps["gradient_x_input"] = (grad * x)[0, 0].numpy()
        for method in methods:
            if method not in maps:
                maps[method] = compute_map(method, network, x, target, settings)[0]
        out[target] = {method: maps[method] for method in methods}
    return out
