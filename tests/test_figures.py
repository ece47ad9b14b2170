"""Readable figures: the colour rule (symmetric limits at the 99.5th percentile of |value| over brain voxels), the
saturation check (a panel fails when more than half of its brain pixels reach 0.98 of the limit), and the study's
and the explanation evaluation's figures drawn as grids in which no panel is saturated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from scripts.evaluation.figures import explanation_panel, group_figure
from scripts.runtime.visual import is_saturated, overlay_mosaic, saturation, symmetric_limit


def _brain(shape=(64, 48, 48)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    return (grid ** 2).sum(axis=0) < 0.8


def test_colour_limit_is_the_995th_percentile_over_the_brain():
    values = np.zeros((10, 10, 10))
    brain = np.zeros_like(values, dtype=bool)
    brain[2:8, 2:8, 2:8] = True
    values[brain] = np.linspace(-2, 1, brain.sum())
    values[0, 0, 0] = 100.0  # outside the brain: ignored
    assert symmetric_limit(values, brain) == pytest.approx(np.percentile(np.abs(values[brain]), 99.5))
    sparse = np.zeros((10, 10, 10))
    sparse[5, 5, 5] = -3.0  # fewer than 0.5 % non-zero voxels: the maximum
    assert symmetric_limit(sparse) == 3.0 and symmetric_limit(np.zeros(4)) == 1.0


def test_saturation_rule():
    limit = 1.0
    panel = np.array([[0.99, 0.98, 0.5], [-0.99, 0.1, 2.0]])
    assert saturation(panel, limit) == pytest.approx(4 / 6)  # >= 0.98 x limit, either sign
    assert is_saturated(panel, limit)
    brain = np.array([[False, False, True], [False, True, True]])
    assert saturation(panel, limit, brain) == pytest.approx(1 / 3) and not is_saturated(panel, limit, brain)
    constant = np.full((8, 8), 0.7)  # a flat map is saturated whatever its level
    assert is_saturated(constant, symmetric_limit(constant))


def _coarse_gradcam(shape=(64, 48, 48)) -> np.ndarray:
    """A GradCAM-like map: a positive 8x6x6 grid upsampled trilinearly to the input (as MONAI's GradCAM does)."""
    coarse = torch.rand(1, 1, 8, 6, 6, generator=torch.Generator().manual_seed(0)) + 0.5
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def _occlusion(shape=(64, 48, 48), mask=16) -> np.ndarray:
    """An occlusion-like map: blocks of constant logit drop, positive with an offset."""
    rng = np.random.default_rng(1)
    blocks = rng.uniform(0.4, 1.0, size=[-(-n // mask) for n in shape])
    return np.kron(blocks, np.ones((mask,) * 3))[:shape[0], :shape[1], :shape[2]]


def test_explanation_panel_is_a_grid_without_saturated_panels(tmp_path):
    brain = _brain()
    rng = np.random.default_rng(0)
    image = np.where(brain, rng.normal(size=brain.shape), 0.0)
    lrp = np.where(brain, rng.laplace(scale=1e-4, size=brain.shape), 0.0)  # sparse, signed, heavy-tailed
    maps = {"lrp_a2b1": lrp, "gradient": np.abs(lrp) * 3, "gradcam": _coarse_gradcam() * brain,
            "occlusion": _occlusion(), "gradient_x_input": lrp * image, "smoothgrad": np.abs(lrp),
            "lrp_a1b0": np.clip(lrp, 0, None), "lrp_zbox_a2b1": lrp, "lrp_epsilon_a2b1": lrp}
    path = tmp_path / "maps_panel.png"
    stats = explanation_panel(image, maps, path, brain=brain, region=brain & (rng.random(brain.shape) > 0.9))
    assert [s["panel"] for s in stats] == list(maps)
    saturated = {s["panel"]: s["saturated"] for s in stats if s["saturated"] > 0.5}
    assert not saturated, saturated
    picture = imread(path)
    height, width = picture.shape[:2]
    assert width <= 2000 and height > width / 3  # a grid (2 rows of 5 panels), not a strip
    assert width / 5 >= 250  # each panel readable at the natural size


def test_the_old_max_scaling_rule_would_have_failed_occlusion():
    """What the panel used to do for a flat-ish map: the same test flags a constant map, so the check has teeth."""
    flat = np.full((48, 48), 0.8) + np.random.default_rng(0).normal(scale=1e-3, size=(48, 48))
    assert is_saturated(flat, symmetric_limit(flat))


def test_group_figure_is_readable_and_not_saturated(tmp_path):
    brain = _brain()
    rng = np.random.default_rng(2)
    means = {}
    for cls in ("preterm", "term"):
        means[cls] = {"input": np.where(brain, rng.normal(size=brain.shape), 0.0)}
        for preset, scale in (("a1b0", 1e-4), ("a2b1", 3e-4), ("a3b2", 1e-3)):
            means[cls][preset] = np.where(brain, rng.laplace(scale=scale, size=brain.shape), 0.0)
    path = tmp_path / "group.png"
    stats = group_figure(means, ["a1b0", "a2b1", "a3b2"], path, {"preterm": 3, "term": 5}, "test")
    assert len(stats) == 6 and all(s["saturated"] <= 0.5 for s in stats), stats
    assert imread(path).shape[1] >= 1500  # four columns of three orthogonal slices, each readable


def test_overlay_mosaic_has_symmetric_limits_and_several_slices_per_plane():
    brain = _brain((32, 24, 24))
    rng = np.random.default_rng(3)
    image = np.where(brain, rng.normal(size=brain.shape), 0.0)
    relevance = np.where(brain, rng.normal(scale=1e-3, size=brain.shape), 0.0)
    affine = np.array([[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # ALS, as the configs
    mosaic = overlay_mosaic(relevance, affine, image, slices=4)
    assert mosaic.limit == pytest.approx(symmetric_limit(relevance, brain))
    assert all(len(v) == 4 for v in mosaic.slices.values()) and mosaic.planes == ["axial", "coronal", "sagittal"]
    assert mosaic.saturation < 0.5
    assert mosaic.rgb.min() >= 0 and mosaic.rgb.max() <= 1
