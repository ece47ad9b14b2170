"""The LRP composite search (scripts/evaluation/composite_search.py): candidates, the contrastive target's exactness,
the winner rule, and the command end to end on two tiny fold models -- validation subjects only, each traced once,
and a candidate that fails a sanity check never wins."""

import csv
import json
import shutil
import types

import numpy as np
import pytest
import torch
from conftest import stage_qc_reference
from torch import nn

from scripts.evaluation import composite_search
from scripts.evaluation.composite_search import (
    Candidate,
    baselines,
    candidate_grid,
    fold_models,
    localisation_verdict,
    make_candidate,
    rule_from_name,
    select_winner,
)
from scripts.lrp import LRP, AlphaBeta, Composite, Epsilon, Gamma, Rule, ZBox, propagation
from scripts.runtime.network import PretermCNN

TINY = {"spatial_shape": [64, 48, 48], "channels": [4, 8], "hidden": 8}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    net = PretermCNN(spatial_shape=(32, 24, 24), channels=(4, 8, 8), hidden=16).double()
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():  # BatchNorms that are not the identity, as after training
        if isinstance(m, nn.BatchNorm3d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return net.eval()


def test_grid_names_rules_and_the_existing_preset(net):
    small = candidate_grid("small")
    assert len(small) == 8 and len(candidate_grid("full")) == 168
    assert len({c.name for c in small}) == 8
    assert small[1].name == "first=box,mid=gamma0.25,top=eps1e-06,target=diff" and small[1].target == "diff"
    assert [b.name for b in baselines()] == ["gradient_x_input,target=class", "gradient_x_input,target=diff"]
    assert isinstance(rule_from_name("box"), ZBox) and rule_from_name("gamma0.5").gamma == 0.5
    assert rule_from_name("eps1e-06").epsilon == 1e-6 and isinstance(rule_from_name("eps1"), Epsilon)
    ab = rule_from_name("a3b2")
    assert isinstance(ab, AlphaBeta) and (ab.alpha, ab.beta) == (3.0, 2.0)
    with pytest.raises(ValueError, match="unknown rule name"):
        rule_from_name("gamma")
    with pytest.raises(ValueError, match="target"):
        make_candidate("box", "a2b1", "eps1", "pred")
    # the grid holds today's recommended preset, under a readable name
    torch.manual_seed(2)
    x = torch.randn(1, 1, 32, 24, 24, dtype=torch.float64)
    trace = LRP(net).trace(x)
    same = make_candidate("box", "gamma0.25", "eps1e-06", "class")
    assert torch.equal(trace.relevance(same.composite, 1).relevance,
                       trace.relevance("epsilon_gamma_box", 1).relevance)
    assert same.target_for(0) == 0 and small[1].target_for(0) == (0, 1) and small[1].target_for(1) == (1, 0)
    assert same.target_for("difference") == (1, 0)


@pytest.mark.parametrize("first, mid, top", [("box", "gamma0.25", "eps1e-06"), ("flat", "a2b1", "eps1e-06"),
                                             ("wsquare", "a1b0", "eps0.1"), ("gamma0.25", "gamma1", "eps1")])
def test_contrastive_map_is_the_difference_of_the_two_class_maps(net, first, mid, top):
    """Every rule of the grid is linear in the relevance it receives, and the epsilon rule of the output layer turns
    logit c (or c - c') into relevance x_i w_ci z / stab(z): the logit difference's map is the class map minus the
    other class's map up to the stabiliser (relative eps / |z|) -- and exactly so with the stabiliser rescaled
    away. Float64."""
    x = torch.randn(2, 1, 32, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    trace = LRP(net).trace(x)
    logits = trace.logits
    composite = make_candidate(first, mid, top, "diff").composite
    eps = composite.rules[2][1].epsilon

    def unit(z):  # the output layer's factor z / stab(z, eps) on a start z, as a (batch, 1, 1, 1, 1) tensor
        return (z / torch.where(z >= 0, z + eps, z - eps)).reshape(-1, 1, 1, 1, 1)

    for c in (0, 1):
        diff = trace.relevance(composite, (c, 1 - c))
        assert torch.allclose(diff.start, logits[:, c] - logits[:, 1 - c])
        expected = (trace.relevance(composite, c).relevance / unit(logits[:, c])
                    - trace.relevance(composite, 1 - c).relevance / unit(logits[:, 1 - c])) * unit(diff.start)
        scale = expected.abs().max()
        assert torch.allclose(diff.relevance, expected, rtol=0, atol=1e-10 * scale), (first, mid, top, c)
        # the two contrastive maps of a binary network are each other's negative, also from one trace (whose cached
        # denominators of the output layer belong to one pair of classes each)
        other = trace.relevance(composite, (1 - c, c)).relevance
        assert torch.allclose(other, LRP(net).trace(x).relevance(composite, (1 - c, c)).relevance, rtol=0, atol=0)
        assert torch.allclose(other, -diff.relevance, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("first, mid", [("box", "gamma0.25"), ("flat", "gamma0.5"), ("box", "a2b1"),
                                        ("wsquare", "a1b0")])
def test_contrastive_map_conserves_the_logit_difference_on_a_bias_free_network(first, mid):
    """Without biases (the folded BatchNorms' shifts included) no rule absorbs or adds relevance: the contrastive
    map sums to the logit difference (weights scaled up so that activations >> the stabilisers 1e-6)."""
    torch.manual_seed(5)
    net = PretermCNN(spatial_shape=(32, 24, 24), channels=(4, 8, 8), hidden=16).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv3d, nn.Linear)):
                m.bias.zero_()
                m.weight.mul_(4.0)
            elif isinstance(m, nn.BatchNorm3d):
                m.running_var.uniform_(0.5, 1.5)
    x = 10 * torch.randn(2, 1, 32, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    trace = LRP(net).trace(x)
    composite = make_candidate(first, mid, "eps1e-06", "diff").composite
    for c in (0, 1):
        result = trace.relevance(composite, (c, 1 - c))
        assert torch.allclose(result.conservation, torch.ones(2, dtype=torch.float64), atol=1e-5), result.conservation


def _row(name, score, randomisation="pass", klass="pass", final=True, baseline=False, localisation="pass"):
    return {"candidate": name, "score": score, "randomisation": randomisation, "class": klass, "final": final,
            "baseline": baseline, "localisation": localisation}


def test_the_winner_passes_both_sanity_checks_whatever_its_abpc():
    rows = [_row("best but class-insensitive", 9.0, klass="FAIL"), _row("best but model-blind", 8.0, "FAIL"),
            _row("sane", 0.5), _row("saner but worse", 0.2), _row("baseline", 99.0, baseline=True),
            _row("screened out", 50.0, final=False)]
    assert select_winner(rows) == "sane"
    assert select_winner([_row("a", 1.0, "FAIL"), _row("b", 2.0, klass="FAIL")]) is None
    assert select_winner([_row("nan", float("nan")), _row("low", -3.0)]) == "low"
    # the localisation criterion (issue 38 stage 4): a candidate that localises worse than gradient x input or a2b1
    # never wins; not measured ("-", no tissue and phenotype maps) does not exclude
    assert select_winner([_row("faithful but off the anatomy", 5.0, localisation="FAIL"), _row("local", 1.0)]) == \
        "local"
    assert select_winner([_row("unmeasured", 2.0, localisation="-"), _row("local", 1.0)]) == "unmeasured"
    assert select_winner([_row("off", 5.0, localisation="FAIL")]) is None


def test_localisation_verdict_needs_both_references():
    assert localisation_verdict(0.0, 0.3) == "pass" and localisation_verdict(0.4, 0.0) == "pass"
    assert localisation_verdict(-0.01, 0.5) == "FAIL" and localisation_verdict(0.5, -0.01) == "FAIL"
    assert localisation_verdict(float("nan"), 0.5) == "-" and localisation_verdict(0.5, float("nan")) == "-"


def test_the_gain_comes_with_its_paired_interval():
    """The gain is the median paired ABPC difference over |median baseline ABPC|; its interval is the paired
    bootstrap interval of that median over the same scale: equal differences give a point, varied ones an interval
    around the gain that excludes 0 only when every resample's median does."""
    subjects = [(-1, f"s{i}") for i in range(12)]
    base = {("b", s): {"abpc_8": 2.0 + 0.1 * i} for i, s in enumerate(subjects)}
    same = {**base, **{("c", s): {"abpc_8": 2.0 + 0.1 * i + 0.5} for i, s in enumerate(subjects)}}
    scale = float(np.median([2.0 + 0.1 * i for i in range(12)]))
    assert composite_search._gain(same, "c", "b", 8, subjects) == pytest.approx(0.5 / scale)
    assert composite_search._gain_interval(same, "c", "b", 8, subjects) == pytest.approx((0.5 / scale, 0.5 / scale))
    spread = {**base, **{("c", s): {"abpc_8": 2.0 + 0.1 * i + (-1) ** i * 0.3 + 0.05}
                         for i, s in enumerate(subjects)}}
    gain = composite_search._gain(spread, "c", "b", 8, subjects)
    low, high = composite_search._gain_interval(spread, "c", "b", 8, subjects)
    assert low < 0 < high and low <= gain <= high  # half the subjects worse: not a sure gain
    assert composite_search._pct_ci(gain, (low, high)).startswith(f"{100 * gain:+.0f} % [")


def test_fold_models_from_a_study_layout(tmp_path):
    run = tmp_path / "cv" / "learning_rate-0.001" / "fold3"
    (run / "models").mkdir(parents=True)
    torch.save({}, run / "models" / "model.pt")
    overrides = {"fold": 3, "ckpt_dir": str(run / "models"), "output_dir": str(run), "learning_rate": 0.001,
                 "dataset_dir": "/data/x", **TINY}
    (run / "result.json").write_text(json.dumps({"fold": 3, "overrides": overrides}))
    args = types.SimpleNamespace(runs=str(run.parent), fold_model=None, override={"hidden": 16},
                                 config_file=str(composite_search.ROOT / "configs" / "inference.json"))
    ((fold, ckpt, config),) = fold_models(args)
    assert fold == 3 and ckpt == str(run / "models" / "model.pt")
    assert config == {"dataset_dir": "/data/x", **TINY, "hidden": 16}  # training-only keys and folders dropped
    with pytest.raises(ValueError, match="one model per fold"):
        fold_models(types.SimpleNamespace(runs=None, fold_model=[f"1={ckpt}", f"1={ckpt}"], override={}))
    with pytest.raises(ValueError, match="K=PATH"):
        fold_models(types.SimpleNamespace(runs=None, fold_model=[ckpt], override={}))


class InputItself(Rule):
    """First-layer rule whose relevance is the input itself: the map ignores the model (both sanity checks fail)."""

    kind = "input_itself"

    def backward(self, op, x, relevance, stats, reuse=True):
        return x.clone()


def _without_test_split(cohort, dest):
    """A copy of the cohort (links) whose test-split files do not exist: reading any of them fails."""
    data = json.loads((cohort / "datalist.json").read_text())
    test = {it[k] for it in data["test"] for k in ("image", "tissue", "phenotype") if k in it}
    for path in cohort.rglob("*"):
        rel = path.relative_to(cohort).as_posix()
        if path.is_file() and rel != "datalist.json" and rel not in test:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).symlink_to(path)
    shutil.copy(cohort / "datalist.json", dest / "datalist.json")
    return data, {str(dest / p) for p in test}


def test_search_end_to_end_on_two_folds(tmp_path, cohort, trained, monkeypatch, capsys):
    data, test_files = _without_test_split(cohort, tmp_path / "cohort")
    # fold 0: the tiny model trained without fold 0; fold 1: a perturbed copy of it, standing in for fold 1's model
    state = torch.load(trained[0] / "model.pt", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    other = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=gen) if k.endswith("weight") else v
             for k, v in state.items()}
    (tmp_path / "fold1").mkdir()
    torch.save(other, tmp_path / "fold1" / "model.pt")
    stage_qc_reference(trained[0], tmp_path / "fold1")  # the record of its normalisation
    # a candidate whose map is the input itself, made the best of all on ABPC: it must still never win
    blind = Candidate("first=input,mid=gamma0.25,top=eps1e-06,target=class",
                      Composite([("first", InputItself()), ("conv", Gamma(0.25)), ("linear", Epsilon(1e-6))]),
                      "class")
    monkeypatch.setattr(composite_search, "candidate_grid", lambda grid: candidate_grid(grid) + [blind])
    measure = composite_search.region_perturbation

    def boosted(relevance, score, x, *args):
        measures, curves = measure(relevance, score, x, *args)
        if np.array_equal(relevance, x[0, 0].numpy()):
            measures = {k: v + 100.0 if k.startswith("abpc") else v for k, v in measures.items()}
        return measures, curves

    monkeypatch.setattr(composite_search, "region_perturbation", boosted)
    traced = []
    init = propagation.Trace.__init__

    def counting(self, model, x, *args, **kwargs):
        traced.append(model)
        init(self, model, x, *args, **kwargs)

    monkeypatch.setattr(propagation.Trace, "__init__", counting)

    out = tmp_path / "search"
    overrides = json.dumps({"dataset_dir": str(tmp_path / "cohort"), **TINY})
    assert composite_search.main(["--fold-model", f"0={trained[0] / 'model.pt'}", "--fold-model",
                                  f"1={tmp_path / 'fold1' / 'model.pt'}", "--reduced", "--top", "3", "--override",
                                  overrides, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "planned cost: 9 candidates x 2 screening subjects" in printed and " h (a map from a trace" in printed

    # only validation subjects of folds 0 and 1 were read, never the test split (whose files do not even exist)
    opened = (out / "opened.txt").read_text().split()
    validation = {str(tmp_path / "cohort" / it[k]) for it in data["training"] if it["fold"] in (0, 1)
                  for k in ("image", "tissue", "phenotype")}
    assert opened and set(opened) <= validation and not set(opened) & test_files

    rows = list(csv.DictReader((out / "search.csv").open()))
    subjects = {(r["fold"], r["subject"]) for r in rows}
    assert {f for f, _ in subjects} == {"0", "1"} and len(subjects) == 2  # one per fold (--reduced)
    assert {r["label"] for r in rows} == {"0", "1"}  # preterm first in fold 0, term first in fold 1
    folds = {it["subject"]: it["fold"] for it in data["training"]}
    assert all(folds[s] == int(f) for f, s in subjects)  # each fold's own validation subject
    # every candidate and baseline screened on both subjects; the a2b1 reference in the final stage only
    assert len(rows) == 2 * (9 + 2) + 2
    final = [r for r in rows if r["final"] == "1"]
    assert len(final) == 2 * (3 + 2 + 1) and all(r["abpc_16"] and r["random_rank_abs"] for r in final)
    assert {r["subject"] for r in rows if r["candidate"] == "preset=a2b1,target=class" and r["final"] == "1"} == {
        s for _, s in subjects}
    assert all(r["abpc_8"] and not r["abpc_16"] for r in rows if r["final"] == "0")
    for r in rows:  # localisation (scripts.runtime.localisation) of the preterm subject's maps; none for the term one
        if r["label"] == "1":
            assert 0 <= float(r["share_phenotype"]) <= 1 and 0 <= float(r["outside_brain"]) <= 1
            assert float(r["enrichment_csf_ventricles"]) >= 0 and float(r["share_csf_ventricles"]) >= 0
        else:
            assert r["enrichment_phenotype"] == r["enrichment_csf_ventricles"] == r["outside_brain"] == "nan"
    # one trace per subject by its fold's model; the randomisation check traces its 4 randomised copies anew
    assert len(traced) == 2 + 2 * 4

    table = (out / "search.md").read_text()
    line = next(ln for ln in table.splitlines() if blind.name in ln)
    cells = [c.strip() for c in line.split("|")]
    assert "excluded: sanity" in cells and "FAIL" in cells and "**winner**" not in line
    winner = [ln for ln in table.splitlines() if "**winner**" in ln and ln.startswith("|")]
    if winner:  # a candidate of the grid that passes both checks
        cells = [c.strip() for c in winner[0].split("|")]
        assert cells[1] == "1" and cells.count("pass") == 2
    else:
        assert "**No winner**" in table
    assert "| gradient_x_input,target=diff |" in table and "| gradient_x_input,target=class |" in table
    assert "| preset=a2b1,target=class |" in table
    assert "| enrichment phenotype | enrichment CSF+ventricles | CSF+V vs gradient x input | CSF+V vs a2b1 | " \
           "localisation |" in table
    # the localisation columns: the preterm subject's paired differences, recomputed from search.csv
    preterm = next(s for f, s in subjects if any(r["subject"] == s and r["label"] == "1" for r in rows))
    enrichment = {r["candidate"]: float(r["enrichment_csf_ventricles"]) for r in rows
                  if r["subject"] == preterm and r["final"] == "1"}
    checked = 0
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 14 and cells[2] in enrichment and cells[2].startswith("first="):
            checked += 1
            target = cells[2].rsplit("target=", 1)[1]
            vs_gradient = enrichment[cells[2]] - enrichment[f"gradient_x_input,target={target}"]
            vs_a2b1 = enrichment[cells[2]] - enrichment["preset=a2b1,target=class"]
            assert cells[12] == f"{vs_gradient:+.2f}" and cells[13] == f"{vs_a2b1:+.2f}", cells
            assert cells[14] == ("pass" if vs_gradient >= 0 and vs_a2b1 >= 0 else "FAIL"), cells
            if cells[14] == "FAIL" and "FAIL" not in cells[8:10]:
                assert cells[1] == "excluded: localisation"
    assert checked == 3  # the top 3 of the final stage


def _as_cohort(cohort, dest, role):
    """A copy of the session cohort (links) whose datalist is marked with ``role``."""
    for path in cohort.rglob("*"):
        rel = path.relative_to(cohort)
        if path.is_file() and rel.as_posix() != "datalist.json":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).symlink_to(path)
    data = json.loads((cohort / "datalist.json").read_text())
    (dest / "datalist.json").write_text(json.dumps({**data, "role": role}))
    return data


def test_one_model_on_a_whole_tuning_cohort(tmp_path, cohort, trained, capsys):
    """--model: one model explains subjects of the whole datalist (split all, test items included: a tuning
    cohort's test split is part of the tuning data), preterm first; every file it checked or read is listed."""
    data = _as_cohort(cohort, tmp_path / "tuning", "tuning")
    out = tmp_path / "search"
    assert composite_search.main(["--model", str(trained[0] / "model.pt"), "--datalist",
                                  str(tmp_path / "tuning" / "datalist.json"), "--grid", "small", "--top", "2",
                                  "--steps", "2", "--screen-subjects", "1", "--subjects", "3", "--sanity-subjects", "1",
                                  "--override", json.dumps(TINY), "--output", str(out)]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader((out / "search.csv").open()))
    items = {it["subject"]: it for it in data["training"] + data["test"]}
    chosen = [r["subject"] for r in rows if r["candidate"] == "gradient_x_input,target=class"]
    assert len(chosen) == 3 and {r["fold"] for r in rows} == {"-1"}
    assert [items[s]["label"] for s in chosen] == [1, 0, 1]  # preterm and term in turn, preterm first
    opened = set((out / "opened.txt").read_text().split())  # every file of the split is checked before the search
    assert opened == {str(tmp_path / "tuning" / it[k]) for it in items.values() for k in ("image", "tissue",
                                                                                     "phenotype")}
    table = (out / "search.md").read_text()
    assert table.startswith(f"# LRP composite search on `{tmp_path / 'tuning' / 'datalist.json'}`")
    assert f"one model (`{trained[0] / 'model.pt'}`) on split all of `{tmp_path / 'tuning' / 'datalist.json'}`" \
        in table
    assert "| preset=a2b1,target=class |" in table and "localisation" in table


@pytest.mark.parametrize("role", [None, "evaluation"])
def test_one_model_refuses_a_datalist_that_is_not_a_tuning_cohort(tmp_path, cohort, trained, capsys, role):
    """The default cohort (no role: its training subjects trained the model, its test split is held out) and the
    evaluation cohort are refused before any image is read."""
    datalist = cohort / "datalist.json"
    if role:
        _as_cohort(cohort, tmp_path / role, role)
        datalist = tmp_path / role / "datalist.json"
    out = tmp_path / "search"
    assert composite_search.main(["--model", str(trained[0] / "model.pt"), "--datalist", str(datalist),
                                  "--reduced", "--override", json.dumps(TINY), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"datalist {datalist} is not a tuning cohort (its \"role\" is {role!r}" in err
    assert "python -m scripts.data.cohorts --cohort tuning" in err and not out.exists()


def test_score_reports_one_candidate_on_a_held_out_split_only(tmp_path, cohort, trained, capsys):
    """--score: the candidate chosen before, the baselines and the a2b1 reference on the evaluation cohort's test
    split (a report: allowed there), no screening; any other split of a datalist that is not a tuning cohort is
    refused before an image is read."""
    data = _as_cohort(cohort, tmp_path / "evaluation", "evaluation")
    datalist = str(tmp_path / "evaluation" / "datalist.json")
    name = "first=box,mid=gamma0.25,top=eps1e-06,target=class"
    out = tmp_path / "score"
    common = ["--model", str(trained[0] / "model.pt"), "--datalist", datalist, "--score", name, "--steps", "2",
              "--subjects", "2", "--sanity-subjects", "1", "--override", json.dumps(TINY)]
    assert composite_search.main([*common, "--split", "all", "--output", str(out)]) == 2
    assert "reads only its held-out split: use --split test, got --split all" in capsys.readouterr().err
    assert not out.exists()
    assert composite_search.main([*common, "--split", "test", "--output", str(out)]) == 0
    capsys.readouterr()
    rows = list(csv.DictReader((out / "search.csv").open()))
    assert sorted({r["candidate"] for r in rows}) == sorted([name, "gradient_x_input,target=class",
                                                            "gradient_x_input,target=diff", "preset=a2b1,target=class"])
    assert all(r["screen"] == "0" and r["final"] == "1" and r["abpc_16"] for r in rows)
    test = {it["subject"]: it for it in data["test"]}
    assert {r["subject"] for r in rows} <= set(test) and len({r["subject"] for r in rows}) == 2
    opened = set((out / "opened.txt").read_text().split())
    assert opened == {str(tmp_path / "evaluation" / it[k]) for it in test.values() for k in ("image", "tissue",
                                                                                              "phenotype")}
    table = (out / "search.md").read_text()
    assert table.startswith(f"# LRP composite score on `{datalist}`") and f"**Scored**: `{name}`" in table
    assert "[paired 95 % intervals]" in table and "CSF+V enrichment vs gradient x input" in table
    assert "Only split test of the datalist was read" in table and "test split was not opened" not in table
    assert "**winner**" not in table or name in next(ln for ln in table.splitlines() if "**winner**" in ln)
    with pytest.raises(SystemExit):  # a name that is no candidate: argparse-style error before anything is read
        composite_search.main([*common, "--score", "box+gamma", "--split", "test", "--output", str(out / "x")])
    assert "--score takes a candidate name" in capsys.readouterr().err


def test_plan_only_explains_nothing(tmp_path, cohort, trained, monkeypatch, capsys):
    traced = []
    monkeypatch.setattr(propagation.Trace, "__init__", lambda *a, **k: traced.append(1))
    out = tmp_path / "search"
    overrides = json.dumps({"dataset_dir": str(cohort), **TINY})
    assert composite_search.main(["--fold-model", f"0={trained[0] / 'model.pt'}", "--grid", "small", "--plan",
                                  "--override", overrides, "--output", str(out)]) == 0
    assert "planned cost: 8 candidates" in capsys.readouterr().out
    assert not traced and not out.exists()


def test_a_validation_subject_that_the_test_split_also_lists_stops_the_search(tmp_path, cohort, trained, capsys):
    data, _ = _without_test_split(cohort, tmp_path / "cohort")
    leaked = next(it for it in data["training"] if it["fold"] == 0)
    (tmp_path / "cohort" / "datalist.json").write_text(json.dumps({**data, "test": data["test"] + [leaked]}))
    overrides = json.dumps({"dataset_dir": str(tmp_path / "cohort"), **TINY})
    assert composite_search.main(["--fold-model", f"0={trained[0] / 'model.pt'}", "--grid", "small", "--plan",
                                  "--override", overrides, "--output", str(tmp_path / "search")]) == 2
    err = capsys.readouterr().err
    assert "share files" in err and leaked["image"] in err


def test_every_option_has_help_with_its_default(capsys):
    import test_cli_help

    test_cli_help.test_every_option_has_help_with_its_default("scripts.evaluation.composite_search", capsys)
