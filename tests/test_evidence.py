"""Twin counterfactuals (issue 38): the generator renders each preterm subject's term-equivalent twin, the twins
differ from the subject only within the blurred phenotype footprint, and ``scripts.evaluation.evidence`` splits
the subject-twin logit gap into global and local shares and component swaps through the deployed preprocessing."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from scipy import ndimage

from scripts.data.synthetic import COMPONENTS, Draw, only_components, without_components
from scripts.data.synthetic_anatomy import builtin_template
from scripts.evaluation import evidence
from scripts.evaluation.evidence import gap_shares, normalise_with

ROOT = evidence.BUNDLE_ROOT
# the partial-volume blur of the generator (scipy gaussian_filter, sigma 0.6 voxel, truncate 4): its kernel reaches
# int(4 * 0.6 + 0.5) = 2 voxels along each axis, so a changed voxel changes the image within that cube around it
BLUR_REACH = int(4 * 0.6 + 0.5)


def _preterm_draw(seed=38, fraction=0.5) -> Draw:
    return next(d for d in (Draw.of(seed, i, fraction) for i in range(20)) if d.phenotype.label == 1)


def test_draw_renders_the_cohort_subject_bit_for_bit(cohort):
    datalist = json.loads((cohort / "datalist.json").read_text())
    item = next(it for it in datalist["training"] + datalist["test"] if it["label"] == 1)
    index = int(item["subject"].removeprefix("sub-")) - 1
    draw = Draw.of(datalist["seed"], index, 0.4)  # the conftest cohort: seed 3, preterm fraction 0.4
    image, labels, pmask = draw.render(builtin_template())
    assert draw.subject == item["subject"] and draw.phenotype.label == 1
    assert np.array_equal(image, np.asarray(nib.load(cohort / item["image"]).dataobj))
    assert np.array_equal(labels, np.asarray(nib.load(cohort / item["tissue"]).dataobj))
    assert np.array_equal(pmask, np.asarray(nib.load(cohort / item["phenotype"]).dataobj))


def test_twin_differs_only_within_the_blurred_phenotype_footprint():
    draw, template = _preterm_draw(), builtin_template()
    image, labels, pmask = draw.render(template)
    twin, twin_labels, twin_mask = draw.render(template, draw.phenotype.term_equivalent())
    assert pmask.sum() > 1000 and twin_mask.sum() == 0
    assert np.array_equal(labels != twin_labels, pmask > 0)  # tissue changes exactly where the mask says
    reach = ndimage.binary_dilation(pmask > 0, np.ones((3, 3, 3), bool), iterations=BLUR_REACH)
    changed = image != twin
    assert changed[pmask > 0].mean() > 0.5  # the phenotype shows in the image
    assert not changed[~reach].any()  # and nowhere beyond the blur's reach
    # CSF is brighter in T2w: the subject (more CSF) is brighter than its twin over the footprint
    assert image[pmask > 0].mean() > twin[pmask > 0].mean()


def test_components_split_the_phenotype():
    draw, template = _preterm_draw(), builtin_template()
    ph = draw.phenotype
    _, labels, _ = draw.render(template)
    _, twin_labels, _ = draw.render(template, ph.term_equivalent())
    assert without_components(ph, tuple(COMPONENTS)) == ph.term_equivalent()
    assert only_components(ph, tuple(COMPONENTS)) == ph
    assert only_components(ph, ()) == ph.term_equivalent()
    union = np.zeros(labels.shape, bool)
    for c in COMPONENTS:
        _, without, _ = draw.render(template, without_components(ph, c))
        footprint = without != labels
        assert footprint.sum() > 0, c  # each component changes some tissue of this subject
        # inside the whole phenotype's footprint, up to the components' interplay (the cortex the extra-axial CSF
        # widens into depends on how deep the folding reaches): a few percent of the extra-axial CSF's footprint
        assert footprint[labels == twin_labels].sum() <= 0.1 * footprint.sum(), c
        union |= footprint
    assert union.sum() >= 0.95 * (labels != twin_labels).sum()  # the three together make (almost) all of it
    with pytest.raises(ValueError, match="unknown phenotype component 'cortex'"):
        without_components(ph, "cortex")


def _deployed():
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT)})
    pre = parser.get_parsed_content("preprocessing")
    return pre


def test_normalise_with_own_statistics_is_the_deployed_normalisation(tmp_path):
    from monai.transforms import Compose

    from scripts.runtime.outputs import save_nifti

    pre = _deployed()
    draw, template = _preterm_draw(), builtin_template()
    image, _, _ = draw.render(template)
    twin, _, _ = draw.render(template, draw.phenotype.term_equivalent())
    paths = [save_nifti(a, template.affine, tmp_path / f"{n}.nii.gz") for n, a in (("s", image), ("t", twin))]
    raw = Compose(pre.transforms[:-1])
    raw_s, raw_t = (raw({"image": str(p)})["image"] for p in paths)
    deployed = pre({"image": str(paths[0])})["image"]
    own = normalise_with(raw_s, raw_s, pre.transforms[-1])
    # the same float32 arithmetic on the same values: equal up to float32 rounding of the statistics
    assert torch.allclose(torch.as_tensor(own), torch.as_tensor(deployed), atol=1e-5, rtol=1e-5)
    # borrowed statistics: the same voxels normalised differently, background untouched
    hybrid = torch.as_tensor(normalise_with(raw_t, raw_s, pre.transforms[-1]))
    assert torch.equal(hybrid == 0, torch.as_tensor(raw_t) == 0)
    inside = torch.as_tensor(raw_t) != 0
    # the subject's brain (more CSF) is brighter on average, so the twin's tissues sit lower on its scale
    assert hybrid[inside].mean() < torch.as_tensor(pre({"image": str(paths[1])})["image"])[inside].mean()
    with pytest.raises(ValueError, match="reference image is empty"):
        normalise_with(raw_t, torch.zeros_like(raw_t), pre.transforms[-1])


def test_gap_shares_on_known_margins():
    margins = {"subject": 4.0, "twin": -2.0, "global_only": 1.0, "local_only": 0.0,
               **{f"without_{c}": 4.0 for c in COMPONENTS}, **{f"only_{c}": -2.0 for c in COMPONENTS}}
    margins["without_ventricles"], margins["only_ventricles"] = 1.0, 0.4
    shares = gap_shares(margins)
    assert shares["gap"] == 6.0
    assert shares["global_only"] == pytest.approx(0.5) and shares["local_only"] == pytest.approx(2 / 6)
    assert shares["removed_ventricles"] == pytest.approx(0.5) and shares["added_ventricles"] == pytest.approx(0.4)
    assert shares["removed_folding"] == 0 and shares["added_extra_axial_csf"] == 0
    assert np.isnan(gap_shares({**margins, "twin": 4.0})["global_only"])  # no gap: no share


def test_evidence_command_on_one_subject_resumes(tmp_path, monkeypatch):
    out, work = tmp_path / "results", tmp_path / "work"
    args = ["--cohort", "tuning", "--subjects", "1", "--presets", "epsilon_gamma_box", "a2b1", "--output", str(out),
            "--work", str(work), "--weights", f"shipped={ROOT / 'models' / 'model.pt'}"]
    assert evidence.main(args) == 0
    rows = list(csv.DictReader((out / "evidence.csv").open()))
    maps = list(csv.DictReader((out / "evidence_maps.csv").open()))
    assert len(rows) == 1 and rows[0]["weights"] == "shipped"
    assert rows[0]["normalisation"] == "white_peak"  # what the shipped weights' QC reference records (since 0.9.0)
    row = {k: float(v) for k, v in rows[0].items() if k not in ("subject", "weights", "normalisation")}
    assert row["p_subject"] > row["p_twin"] and row["gap"] > 0  # the shipped weights see the phenotype
    assert row["gap"] == pytest.approx(row["margin_subject"] - row["margin_twin"], rel=1e-6)
    assert {(m["preset"], m["network"]) for m in maps} == {(p, k) for p in ("epsilon_gamma_box", "a2b1")
                                                           for k in ("trained", "randomised")}
    text = (out / "evidence.md").read_text()
    assert "python -m scripts.evaluation.evidence --cohort tuning" in text and "share: global only" in text

    def fail(*a, **k):
        raise AssertionError("a finished subject was measured again")

    monkeypatch.setattr(evidence.Twins, "measure", fail)
    assert evidence.main(args) == 0  # every subject comes from the work folder
    assert list(csv.DictReader((out / "evidence.csv").open())) == rows


def test_each_weights_get_the_normalisation_they_record(tmp_path):
    """Twins compares z-score and white-peak weights each on its own input: the normalisation recorded beside the
    weights (here the shipped white-peak weights, and the same weights with a reference saying zscore) is the last
    step of their input, as the deployed path (``robustness.Measurer``) builds it for them alone."""
    from scripts.evaluation.robustness import Measurer
    from scripts.runtime.outputs import save_nifti

    folder = tmp_path / "zscore"
    folder.mkdir()
    for name in ("model.pt", "qc_mean_image.nii.gz", "qc_brain_region.nii.gz"):
        shutil.copy(ROOT / "models" / name, folder / name)
    reference = json.loads((ROOT / "models" / "qc_reference.json").read_text())
    (folder / "qc_reference.json").write_text(json.dumps({**reference, "normalisation": "zscore"}))
    twins = evidence.Twins({"z": folder / "model.pt", "wp": ROOT / "models" / "model.pt"})
    assert twins.normalisation == {"z": "zscore", "wp": "white_peak"}
    draw = _preterm_draw()
    result = twins.measure(draw, ["epsilon_gamma_box"], tmp_path)
    assert result["z"]["row"]["normalisation"] == "zscore" and result["wp"]["row"]["normalisation"] == "white_peak"
    image, _, _ = draw.render(builtin_template())
    path = save_nifti(image, builtin_template().affine, tmp_path / "subject.nii.gz")
    for name, ckpt in (("z", folder / "model.pt"), ("wp", ROOT / "models" / "model.pt")):
        alone = Measurer(ckpt.parent, ckpt=ckpt)
        assert alone.normalisation == twins.normalisation[name]
        # one subject through the network alone vs in a batch of variants: float32 reductions in another order
        assert result[name]["row"]["p_subject"] == pytest.approx(alone.probability(alone.input(path)), abs=1e-5)
    assert abs(result["z"]["row"]["margin_subject"] - result["wp"]["row"]["margin_subject"]) > 0.1


def test_each_map_is_localised_by_the_relevance_that_supports_its_logit(tmp_path):
    """The randomised baseline: the preset's map of the preterm logit on the network with every conv/linear layer
    re-initialised. Where that logit is negative the map is signed by it, so that what is localised is the relevance
    supporting it, the bulk of the map, not a remnant of < 1 % (tested: the signed map's positive part is at least
    half its absolute relevance, for the trained and the randomised network); the enrichment in the table is that
    signed map's (recomputed here with scripts.runtime.localisation)."""
    from scripts.evaluation.sanity import randomisable_layers, randomised
    from scripts.runtime.explain import explain
    from scripts.runtime.localisation import CSF_VENTRICLES, localisation
    from scripts.runtime.outputs import save_nifti

    twins = evidence.Twins({"shipped": ROOT / "models" / "model.pt"})
    draw = _preterm_draw()
    result = twins.measure(draw, ["a2b1"], tmp_path)
    rows = {m["network"]: m for m in result["shipped"]["maps"]}
    image, labels, _ = draw.render(builtin_template())
    path = save_nifti(image, builtin_template().affine, tmp_path / "subject.nii.gz")
    tissue_path = save_nifti(labels, builtin_template().affine, tmp_path / "tissue.nii.gz", dtype=np.uint8)
    x = twins.normalisers["shipped"](twins.raw({"image": str(path)}))["image"].as_tensor()[None].float()
    tissue = np.asarray(twins.labels({"tissue": str(tissue_path)})["tissue"])[0]
    network = twins.networks["shipped"]
    for kind, net in (("trained", network), ("randomised", randomised(network, len(randomisable_layers(network))))):
        explained = explain(net, x, ["a2b1"], target=1)
        logit = float(explained.logits[0, 1])
        # the same input through the same network as in measure(): equal up to float32 rounding
        assert rows[kind]["preterm_logit"] == pytest.approx(logit, rel=1e-5, abs=1e-6)
        signed = np.sign(logit) * explained.relevance(0, "a2b1")[0].numpy()
        assert np.clip(signed, 0, None).sum() >= 0.5 * np.abs(signed).sum(), kind
        expected = localisation(signed, tissue, {CSF_VENTRICLES: np.isin(np.rint(tissue), (1, 5))})
        assert rows[kind][f"enrichment_{CSF_VENTRICLES}"] == pytest.approx(expected[CSF_VENTRICLES]["enrichment"],
                                                                           rel=1e-5)


def test_evidence_refuses_the_evaluation_cohort_without_the_report_flag(tmp_path):
    with pytest.raises(SystemExit, match="evaluation cohort"):
        evidence.main(["--cohort", "evaluation", "--output", str(tmp_path), "--work", str(tmp_path)])
