"""Explanation metrics on constructed cases with known answers, and the evaluation command end to end."""

import csv
import itertools
import json

import numpy as np
import pytest
import torch

from scripts.evaluation.explanation_metrics import (
    abpc,
    aopc,
    blurred_within,
    brain_patches,
    magnitude_scaled,
    patch_scores,
    per_step,
    perturbation_curve,
    perturbation_orders,
    pointing_game,
    rank_correlation,
    ssim,
)


def _region():
    region = np.zeros((16, 16, 16), dtype=bool)
    region[4:8, 4:12, 6:10] = True
    brain = np.zeros_like(region)
    brain[2:14, 2:14, 2:14] = True
    return region, brain


def test_localisation_columns_of_explain_eval_use_the_one_measure():
    from scripts.evaluation.explain_eval import localisation_columns

    tissue = np.zeros((16, 16, 16), int)
    tissue[2:14, 2:14, 2:14] = 3  # brain: 12^3 voxels of white matter
    tissue[4:8, 4:12, 6:10] = 1  # CSF: 128 voxels
    tissue[8:10, 4:12, 6:10] = 5  # ventricles: 64 voxels
    phenotype = np.zeros(tissue.shape, bool)
    phenotype[0:8, 4:12, 6:10] = True  # inside the brain: 192 voxels, the CSF among them; 64 outside the brain
    regions = {"csf_ventricles": np.isin(tissue, (1, 5)), "ventricles": tissue == 5, "phenotype": phenotype}
    relevance = np.where(tissue == 1, 1.0, 0.0)
    relevance[0, 5, 7] = 128.0  # as much outside the brain, on the phenotype mask's outside part
    row = localisation_columns(relevance, tissue, regions)
    assert row["share_csf_ventricles"] == pytest.approx(0.5) and row["outside_brain"] == pytest.approx(0.5)
    assert row["brain_share_csf_ventricles"] == pytest.approx(192 / 12**3)
    assert row["enrichment_csf_ventricles"] == pytest.approx(0.5 * 12**3 / 192)  # against the brain, not the grid
    assert row["share_ventricles"] == 0.0 and row["enrichment_ventricles"] == 0.0
    assert row["brain_share_phenotype"] == pytest.approx(192 / 12**3)  # its part inside the brain
    assert row["share_phenotype"] == pytest.approx(0.5)  # the relevance on its outside part is outside the brain
    assert row["pointing_csf_ventricles"] == 0.0 and row["pointing_phenotype"] == 1.0  # the peak: on the mask


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


def _linear_case():
    """A linear model on four 2x2x2 blocks along the first axis: block b contributes c[b] = (1, 4, 2, 3) to the
    score of the all-ones input, and replacing a block by 0 removes exactly its contribution."""
    contributions = torch.tensor([1.0, 4.0, 2.0, 3.0])
    weight = contributions.repeat_interleave(2)[:, None, None].expand(8, 2, 2) / 8

    def score(v):
        return float((v[0, 0] * weight).sum())

    return torch.ones(1, 1, 8, 2, 2), weight, score


def test_abpc_of_a_perfect_ranking_on_a_linear_model_has_its_exact_value():
    x, weight, score = _linear_case()
    candidates = brain_patches(np.ones((8, 2, 2), dtype=bool), 2)
    assert candidates.tolist() == [0, 1, 2, 3]

    def abpc_of(relevance):
        morf, lerf = perturbation_orders(relevance, candidates, 2)
        return abpc(perturbation_curve(score, x, morf, 2, 4, 1), perturbation_curve(score, x, lerf, 2, 4, 1))

    exact = (x[0, 0] * weight).numpy()  # gradient x input = each voxel's true contribution
    morf, lerf = perturbation_orders(exact, candidates, 2)
    assert morf.tolist() == [1, 3, 2, 0] and lerf.tolist() == [0, 2, 3, 1]
    # MoRF 10, 6, 3, 1, 0 and LeRF 10, 9, 7, 4, 0: ABPC = ((9-6) + (7-3) + (4-1) + 0) / 4 = 2.5
    assert perturbation_curve(score, x, morf, 2, 4, 1).tolist() == pytest.approx([10, 6, 3, 1, 0])
    assert perturbation_curve(score, x, lerf, 2, 4, 1).tolist() == pytest.approx([10, 9, 7, 4, 0])
    assert abpc_of(exact) == pytest.approx(2.5)
    assert abpc_of(-exact) == pytest.approx(-2.5)  # the reversed ranking
    assert abpc_of(np.ones_like(exact)) == 0.0  # no ranking at all: both orders are the same
    # the exact ranking is the best of all 24, and a random ranking gives 0 on average
    rankings = [np.repeat(np.asarray(order, dtype=float), 2)[:, None, None] * np.ones((8, 2, 2))
                for order in itertools.permutations(range(4))]
    values = [abpc_of(r) for r in rankings]
    assert max(values) == pytest.approx(2.5) and np.mean(values) == pytest.approx(0.0, abs=1e-12)
    assert per_step(4, 4, 1.0) == 1 and per_step(100, 5, 0.5) == 10 and per_step(3, 5, 0.5) == 1


def test_blurred_replacement_stays_inside_the_brain():
    torch.manual_seed(0)
    brain = np.zeros((16, 16, 16), dtype=bool)
    brain[3:13, 4:12, 2:14] = True
    image = torch.where(torch.as_tensor(brain), 2.0 + torch.rand(16, 16, 16), torch.zeros(()))[None, None]
    blurred = blurred_within(image, brain, 2.0)
    assert blurred.shape == image.shape and blurred.dtype == image.dtype
    assert torch.equal(blurred[0, 0][~torch.as_tensor(brain)], image[0, 0][~torch.as_tensor(brain)])  # background
    inside = blurred[0, 0][torch.as_tensor(brain)]
    assert inside.min() >= 2.0 and inside.max() <= 3.0  # local averages of brain voxels only, no background mixed in
    assert inside.std() < 0.5 * image[0, 0][torch.as_tensor(brain)].std()  # detail is gone
    constant = blurred_within(torch.where(torch.as_tensor(brain), 5.0, 0.0)[None, None], brain, 3.0)
    assert torch.allclose(constant[0, 0][torch.as_tensor(brain)], torch.tensor(5.0))


def test_rank_correlation_and_ssim():
    rng = np.random.default_rng(0)
    a = rng.random((12, 10, 9))
    assert rank_correlation(a, np.exp(3 * a)) == pytest.approx(1.0)  # ranks only
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, np.zeros_like(a)) == 0.0  # a constant map has no ranking
    mask = a > 0.5
    b = np.where(mask, a, rng.random(a.shape))
    assert rank_correlation(a, b, mask) == pytest.approx(1.0) and rank_correlation(a, b) < 1.0
    assert rank_correlation(np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1])  # ties take the average rank
    assert ssim(a, a) == pytest.approx(1.0) and ssim(a[0], a[0]) == pytest.approx(1.0)
    assert ssim(a, b) == pytest.approx(ssim(b, a))
    noise = rng.random(a.shape)
    assert ssim(a, 0.5 * a + 0.5 * noise) > ssim(a, noise) and abs(ssim(a, noise)) < 0.2
    # the hand-computed value on one 7^3 window: the whole array, population -> sample covariances
    x, y = rng.random((7, 7, 7)), rng.random((7, 7, 7))
    n = x.size
    vx, vy, cxy = x.var(ddof=1), y.var(ddof=1), np.cov(x.ravel(), y.ravel())[0, 1]
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * x.mean() * y.mean() + c1) * (2 * cxy + c2) / ((x.mean()**2 + y.mean()**2 + c1) * (vx + vy + c2))
    assert n == 343 and ssim(x, y) == pytest.approx(expected)
    scaled = magnitude_scaled(np.linspace(-2, 1, 1000).reshape(10, 10, 10))
    assert scaled.min() >= 0 and scaled.max() == 1.0


def test_command_runs_end_to_end_at_reduced_size(tmp_path, cohort, trained, monkeypatch):
    from scripts.evaluation import explain_eval
    from scripts.evaluation.explain_eval import main

    panels = []  # the explanation panel's rows: panel, colour limit, saturated share of its brain pixels
    draw = explain_eval.explanation_panel
    monkeypatch.setattr(explain_eval, "explanation_panel", lambda *a, **k: panels.extend(draw(*a, **k)) or panels)
    out = tmp_path / "results"
    overrides = json.dumps({"dataset_dir": str(cohort), "spatial_shape": [64, 48, 48], "channels": [4, 8], "hidden": 8})
    methods = ["lrp_a2b1", "lrp_epsilon_gamma_box", "gradient_x_input", "gradient", "gradcam", "smoothgrad",
               "occlusion"]
    assert main(["--reduced", "--split", "all", "--subjects", "2", "--ckpt", str(trained[0] / "model.pt"),
                 "--methods", *methods, "--override", overrides, "--output", str(out)]) == 0
    rows = list(csv.DictReader((out / "explanations.csv").open()))
    assert {r["method"] for r in rows} == set(methods)
    assert len(rows) == 2 * len(methods)
    assert {r["label"] for r in rows} == {"term", "preterm"}  # one subject of each class, its own target
    for r in rows:
        assert float(r["seconds"]) > 0
        for patch in (8, 16):
            assert float(r[f"abpc_{patch}"]) == pytest.approx(float(r[f"morf_{patch}"]) - float(r[f"lerf_{patch}"]))
        if r["label"] == "preterm":  # scripts.runtime.localisation, against the brain
            for region in ("csf_ventricles", "ventricles", "phenotype"):
                share, brain = float(r[f"share_{region}"]), float(r[f"brain_share_{region}"])
                assert 0 <= share <= 1 and 0 < brain < 1
                assert float(r[f"enrichment_{region}"]) == pytest.approx(share / brain)
            assert float(r["share_ventricles"]) <= float(r["share_csf_ventricles"])
            assert 0 <= float(r["outside_brain"]) <= 1 - float(r["share_csf_ventricles"]) + 1e-9
        else:  # no phenotype: no localisation
            assert r["enrichment_phenotype"] == "nan" and r["pointing_csf_ventricles"] == "nan"
        if r["method"].startswith("lrp_"):
            assert float(r["conservation_error"]) >= 0
    table = (out / "explanations.md").read_text()
    assert "| lrp_a2b1 |" in table and "| gradcam |" in table and "ABPC 8^3" in table and "ABPC 16^3" in table
    assert "--subjects 2 --steps 2" in table  # the command that made the table
    assert "| enrichment CSF+ventricles | enrichment ventricles | enrichment phenotype | outside brain |" in table
    for png in ("perturbation_curves.png", "abpc.png", "maps_panel.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p["panel"] for p in panels] == methods
    saturated = {p["panel"]: round(p["saturated"], 3) for p in panels if p["saturated"] > 0.5}
    assert not saturated, f"saturated panels of maps_panel.png (share of brain pixels >= 0.98 L): {saturated}"
    assert all(p["limit"] > 0 for p in panels)
    assert "Colour rule: each method has its own" in table and "![maps of every method](maps_panel.png)" in table


def test_unknown_method_is_rejected():
    from scripts.evaluation.explain_eval import main

    with pytest.raises(SystemExit):
        main(["--methods", "lrp_a2b1", "saliency_magic"])
