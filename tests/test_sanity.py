"""Sanity checks of explanation methods (scripts/evaluation/sanity.py) on tiny networks whose answer is known, and
the command end to end at reduced size."""

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from scripts.evaluation.sanity import (
    RANDOMISATION_THRESHOLD,
    class_rows,
    class_verdicts,
    layer_labels,
    randomisable_layers,
    randomisation_rows,
    randomisation_verdicts,
    randomised,
)
from scripts.lrp import LRP


def _chain(seed=123):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.AvgPool3d(2), nn.Flatten(),
                        nn.Linear(4 * 4**3, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():  # a BatchNorm that is not the identity, as after training
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
    return net.eval()


def _input(seed=0, shape=(8, 8, 8)):
    torch.manual_seed(seed)
    return torch.rand(1, 1, *shape) + 0.1


def _gradient(model, x, target):
    xg = x.clone().requires_grad_(True)
    out = model(xg)
    score = out[0, 1] - out[0, 0] if target == "difference" else out[0, int(target)]
    (grad,) = torch.autograd.grad(score, xg)
    return grad[0, 0].numpy()


def _explainer(methods):
    """A tiny Explainer: {target: {method: map}} for the given method functions."""
    def explain(model, x, targets):
        return {t: {name: fn(model, x, t) for name, fn in methods.items()} for t in targets}

    return explain


def test_randomised_copy_resets_the_top_layers_and_leaves_the_network_alone():
    net = _chain()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert randomisable_layers(net) == ["7", "5", "0"]
    assert layer_labels(net) == {"0": "conv1", "5": "fc1", "7": "fc2"}
    one, two, three = (randomised(net, k, seed=0) for k in (1, 2, 3))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the original network changed"
    assert not torch.equal(one[7].weight, net[7].weight) and torch.equal(one[5].weight, net[5].weight)
    assert torch.equal(two[7].weight, one[7].weight)  # the cascade keeps the layers it already randomised
    assert not torch.equal(two[5].weight, net[5].weight) and torch.equal(two[0].weight, net[0].weight)
    # the convolution and the BatchNorm the LRP engine folds into it are one layer: BN reset to the identity
    assert torch.equal(two[1].running_mean, net[1].running_mean)
    assert torch.equal(three[1].running_mean, torch.zeros(4)) and torch.equal(three[1].running_var, torch.ones(4))
    assert torch.equal(three[1].weight.detach(), torch.ones(4)) and torch.equal(three[1].bias.detach(), torch.zeros(4))
    assert not three.training
    again = randomised(net, 3, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), three.state_dict().values()))


def test_replacing_the_top_layer_changes_the_maps_and_an_input_only_map_fails():
    net, x = _chain(), _input()
    brain = np.ones(x.shape[2:], dtype=bool)
    methods = {
        "input": lambda model, v, t: v[0, 0].numpy().copy(),  # ignores the model: must fail
        "gradient": lambda model, v, t: np.abs(_gradient(model, v, t)),
        "lrp_a2b1": lambda model, v, t: LRP(model)(v, "a2b1", target=t).relevance[0, 0].numpy(),
    }
    rows = randomisation_rows(net, x, 1, brain, _explainer(methods), seed=0, subject="s")
    assert [r["randomised"] for r in rows if r["method"] == "input"] == ["none", "fc2", "fc1", "conv1"]
    step1 = {r["method"]: r for r in rows if r["step"] == 1}
    assert step1["input"]["rank_abs"] == pytest.approx(1.0) and step1["input"]["ssim_abs"] == pytest.approx(1.0)
    for method in ("gradient", "lrp_a2b1"):  # a new output layer: a different map
        assert step1[method]["rank_signed"] < 0.99, method
    verdicts = {v["method"]: v for v in randomisation_verdicts(rows)}
    assert verdicts["input"]["verdict"] == "FAIL" and verdicts["input"]["decorrelated_from"] == "never"
    assert verdicts["input"]["rank_abs"] == pytest.approx(1.0)


def test_a_linear_model_gradient_decorrelates_and_passes():
    # f = W x: the gradient map is the target's weight row; re-initialised weights are independent of it
    torch.manual_seed(7)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16**3, 2)).eval()
    x = _input(shape=(16, 16, 16))
    brain = np.ones(x.shape[2:], dtype=bool)
    explain = _explainer({"gradient": lambda model, v, t: np.abs(_gradient(model, v, t)),
                          "input": lambda model, v, t: v[0, 0].numpy().copy()})
    rows = randomisation_rows(net, x, 0, brain, explain, seed=0)
    verdicts = {v["method"]: v for v in randomisation_verdicts(rows)}
    assert abs(verdicts["gradient"]["rank_abs"]) < 0.1 < RANDOMISATION_THRESHOLD  # independent: about 0 +- 0.02
    assert verdicts["gradient"]["verdict"] == "pass" and verdicts["gradient"]["decorrelated_from"] == "+fc1"
    assert verdicts["input"]["verdict"] == "FAIL"


@pytest.mark.parametrize("second_row, expected_rho, verdict", [("same", 1.0, "FAIL"), ("negated", -1.0, "pass"),
                                                               ("independent", None, "pass")])
def test_class_sensitivity_on_a_linear_model(second_row, expected_rho, verdict):
    # gradient x input of f = W x is x * W[target]: identical rows give identical maps for both classes
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8**3, 2, bias=False)).eval()
    with torch.no_grad():
        w0 = net[1].weight[0].clone()
        net[1].weight[1] = {"same": w0, "negated": -w0, "independent": net[1].weight[1]}[second_row]
    x = _input()
    explain = _explainer({"gradient_x_input": lambda model, v, t: _gradient(model, v, t) * v[0, 0].numpy()})
    rows = class_rows(net, x, np.ones(x.shape[2:], dtype=bool), explain, subject="s")
    (row,) = rows
    if expected_rho is not None:
        assert row["rho_term_preterm"] == pytest.approx(expected_rho)
    else:
        assert abs(row["rho_term_preterm"]) < 0.2
    if second_row == "negated":  # the difference map is twice the preterm map: the same ranking
        assert row["rho_preterm_difference"] == pytest.approx(1.0)
    assert class_verdicts(rows)[0]["verdict"] == verdict


def test_command_runs_end_to_end_at_reduced_size(tmp_path, cohort, trained):
    from scripts.evaluation.sanity import main

    out = tmp_path / "results"
    overrides = json.dumps({"dataset_dir": str(cohort), "spatial_shape": [64, 48, 48], "channels": [4, 8], "hidden": 8})
    methods = ["lrp_a2b1", "lrp_epsilon_gamma_box_nobias", "gradient", "gradcam"]
    assert main(["--reduced", "--split", "all", "--ckpt", str(trained[0] / "model.pt"), "--methods", *methods,
                 "--override", overrides, "--output", str(out)]) == 0
    random_rows = list(csv.DictReader((out / "sanity_randomisation.csv").open()))
    assert {r["method"] for r in random_rows} == set(methods)
    assert len(random_rows) == 2 * len(methods) * 5  # 2 subjects, the trained network + 4 randomised layers
    assert {r["randomised"] for r in random_rows} == {"none", "fc2", "fc1", "conv2", "conv1"}
    class_table = list(csv.DictReader((out / "sanity_class.csv").open()))
    assert len(class_table) == 2 * len(methods)
    assert all(-1 <= float(r["rho_term_preterm"]) <= 1 for r in class_table)
    summary = list(csv.DictReader((out / "sanity_summary.csv").open()))
    assert [r["method"] for r in summary] == methods
    assert all(r["randomisation"] in ("pass", "FAIL") and r["class"] in ("pass", "FAIL") for r in summary)
    text = (out / "sanity.md").read_text()
    assert "| lrp_a2b1 |" in text and "![randomisation](sanity_randomisation.png)" in text
    for png in ("sanity_randomisation.png", "sanity_class.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
