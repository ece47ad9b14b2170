"""Explanation metrics on constructed cases with known answers, and the evaluation command end to end."""

import csv
import json

import numpy as np
import pytest
import torch

from scripts.evaluation.explanation_metrics import (
    aopc,
    mass_accuracy,
    patch_scores,
    perturbation_curve,
    pointing_game,
    region_share,
)


def _region():
    region = np.zeros((16, 16, 16), dtype=bool)
    region[4:8, 4:12, 6:10] = True
    brain = np.zeros_like(region)
    brain[2:14, 2:14, 2:14] = True
    return region, brain


def test_mass_accuracy_of_the_region_itself_is_one_and_random_is_chance():
    region, brain = _region()
    assert mass_accuracy(region.astype(float), region) == 1.0
    no_positive_mass = mass_accuracy(-region.astype(float), region)
    assert no_positive_mass != no_positive_mass  # nan
    rng = np.random.default_rng(0)
    random_map = np.where(brain, rng.random(brain.shape), 0.0)
    chance = region_share(region, brain)
    assert chance == pytest.approx(region.sum() / brain.sum())
    assert abs(mass_accuracy(random_map, region) - chance) < 0.02


def test_pointing_game():
    region, _ = _region()
    heat = np.zeros(region.shape)
    heat[5, 5, 7] = 1.0
    assert pointing_game(heat, region) == 1.0
    heat[0, 0, 0] = 2.0
    assert pointing_game(heat, region) == 0.0
    heat[0, 0, 0] = 0.0
    heat[3, 5, 7] = 3.0  # one voxel outside the region
    assert pointing_game(heat, region) == 0.0 and pointing_game(heat, region, tolerance=1) == 1.0


def test_patch_scores_sum_blocks():
    r = torch.zeros(10, 8, 8)
    r[0:4, 0:4, 0:4] = 1.0
    r[9, 7, 7] = 5.0
    scores = patch_scores(r, 4)
    assert scores.shape == (3, 2, 2)
    assert scores[0, 0, 0] == 64 and scores[2, 1, 1] == 5 and scores.sum() == 69


def test_perfect_ranking_beats_random_on_a_toy_model():
    # the model's score is the sum of the voxels in one corner block: the ideal map points there
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 16, 16) + 0.5
    weight = torch.zeros(16, 16, 16)
    weight[:8, :8, :8] = 1.0

    def score(v):
        return float((v[0, 0] * weight).sum())

    perfect = torch.argsort(patch_scores(weight * x[0, 0], 4).flatten(), descending=True)
    curve = perturbation_curve(score, x, perfect, patch=4, steps=8)
    assert curve[0] == pytest.approx(score(x)) and curve[-1] == pytest.approx(0.0, abs=1e-4)
    rng = np.random.default_rng(1)
    random = [aopc(perturbation_curve(score, x, torch.as_tensor(rng.permutation(64)), 4, 8)) for _ in range(5)]
    assert aopc(curve) > 2 * np.mean(random)
    assert aopc(np.array([1.0, 1.0, 1.0])) == 0.0 and aopc(np.array([2.0, 1.0, 0.0])) == 1.5


def test_command_runs_end_to_end_at_reduced_size(tmp_path, cohort, trained, monkeypatch):
    from scripts.evaluation import explain_eval
    from scripts.evaluation.explain_eval import main

    panels = []  # the explanation panel's rows: panel, colour limit, saturated share of its brain pixels
    draw = explain_eval.explanation_panel
    monkeypatch.setattr(explain_eval, "explanation_panel", lambda *a, **k: panels.extend(draw(*a, **k)) or panels)
    out = tmp_path / "results"
    overrides = json.dumps({"dataset_dir": str(cohort), "spatial_shape": [64, 48, 48], "channels": [4, 8], "hidden": 8})
    assert main(["--reduced", "--split", "all", "--subjects", "2", "--ckpt", str(trained[0] / "model.pt"),
                 "--override", overrides, "--output", str(out)]) == 0
    rows = list(csv.DictReader((out / "explanations.csv").open()))
    methods = {r["method"] for r in rows}
    assert {"lrp_a1b0", "lrp_a2b1", "lrp_epsilon_a2b1", "lrp_zbox_a2b1", "gradient_x_input", "gradient",
            "smoothgrad", "gradcam", "occlusion"} == methods
    assert len(rows) == 2 * len(methods)
    for r in rows:
        assert 0 <= float(r["chance_csf"]) <= 1 and float(r["seconds"]) > 0
        if r["method"].startswith("lrp_"):
            assert float(r["conservation_error"]) >= 0
    table = (out / "explanations.md").read_text()
    assert "| lrp_a2b1 |" in table and "| gradcam |" in table
    for png in ("perturbation_curves.png", "maps_panel.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["panel"] for p in panels] == [m for m in explain_eval.LRP_METHODS + explain_eval.OTHER_METHODS]
    saturated = {p["panel"]: round(p["saturated"], 3) for p in panels if p["saturated"] > 0.5}
    assert not saturated, f"saturated panels of maps_panel.png (share of brain pixels >= 0.98 L): {saturated}"
    assert all(p["limit"] > 0 for p in panels)
    assert "Colour rule: each method has its own" in table and "![maps of every method](maps_panel.png)" in table


def test_unknown_method_is_rejected():
    from scripts.evaluation.explain_eval import main

    with pytest.raises(SystemExit):
        main(["--methods", "lrp_a2b1", "saliency_magic"])
