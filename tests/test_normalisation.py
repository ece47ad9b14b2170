"""The white-matter-peak normaliser (scripts/runtime/normalisation.py, issue 38): invariant to the intensity scale,
tissue-agnostic between a preterm subject and its term-equivalent twin (where the z-score is not), one clear error
for an empty brain or a constant image, and the white matter at 1 on a bias-field scan and a resampled scan.

``Normalisedd``, the normalisation of every config (config key ``normalisation``): ``zscore`` is MONAI's
``NormalizeIntensityd(nonzero=True)``, ``white_peak`` the normaliser above; weights record theirs in the QC reference
and inference refuses another one in one line (weights without a record are z-score weights)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_OVERRIDES
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity, NormalizeIntensityd
from scipy import ndimage

from scripts.data.synthetic import Draw
from scripts.data.synthetic_anatomy import builtin_template
from scripts.evaluation.cross_validation import run_bundle_workflow
from scripts.evaluation.robustness import perturb
from scripts.runtime.datalist import load_split
from scripts.runtime.errors import bundle_input_error
from scripts.runtime.normalisation import (
    BINS,
    NORMALISATIONS,
    Normalisedd,
    RandBrainStatisticsd,
    WhitePeakNormalised,
    white_matter_peak,
)
from scripts.runtime.reference import (
    REFERENCE,
    TEMPLATE_IMAGE,
    TEMPLATE_MASK,
    QCReference,
    Template,
    weights_normalisation,
)
from scripts.runtime.tissues import CGM, CSF, DGM, VENTRICLES, WM

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def twins():
    """The most premature of the first preterm subjects of seed 38 (the most CSF) and its twin, with labels."""
    template = builtin_template()
    draws = [d for d in (Draw.of(38, i, 0.5) for i in range(20)) if d.phenotype.label == 1]
    draw = min(draws, key=lambda d: d.phenotype.birth_age)
    image, labels, pmask = draw.render(template)
    twin, _, _ = draw.render(template, draw.phenotype.term_equivalent())
    return image, twin, labels, pmask


def _untouched(labels, pmask, tissue):
    """Voxels of ``tissue`` at least 3 voxels from any phenotype voxel (beyond the generator's blur)."""
    near = ndimage.binary_dilation(pmask > 0, np.ones((3, 3, 3), bool), iterations=3)
    return (labels == tissue) & ~near


def test_invariant_to_the_intensity_scale(twins):
    image = twins[0]
    norm = WhitePeakNormalised()
    out = torch.as_tensor(norm(torch.as_tensor(image)))
    for scale in (1e-3, 3.7, 4096.0):
        scaled = torch.as_tensor(norm(torch.as_tensor(image * np.float32(scale))))
        # float32 rounding of the scaled input and of the peak: a few eps of the output's magnitude
        assert torch.allclose(scaled, out, rtol=8 * EPS32, atol=8 * EPS32 * float(out.abs().max())), scale
    assert float(out[torch.as_tensor(image) == 0].abs().max()) == 0  # the background stays 0


def test_the_peak_is_the_white_matter(twins):
    image, _, labels, _ = twins
    peak = white_matter_peak(image)
    wm = float(np.median(image[labels == WM]))
    # within half a histogram bin of the white matter's median (bins span the brain's 0-99.5th percentile)
    assert abs(peak - wm) <= 0.5 * np.percentile(image[image > 0], 99.5) / BINS + 0.01 * wm
    assert peak < float(np.median(image[np.isin(labels, (CSF, VENTRICLES))]))  # not the (larger here) CSF


def test_untouched_tissue_keeps_its_value_between_subject_and_twin(twins):
    image, twin, labels, pmask = twins
    assert np.isin(labels, (CSF, VENTRICLES)).sum() > (labels == WM).sum() * 0.9  # a subject with much CSF
    peak = WhitePeakNormalised()
    zscore = NormalizeIntensity(nonzero=True)
    shifts = {"peak": [], "zscore": []}
    for name, norm in (("peak", peak), ("zscore", zscore)):
        a, b = (np.asarray(norm(torch.tensor(x))) for x in (image, twin))  # a copy: MONAI normalises in place
        sd = float(b[twin > 0].std())  # the twin's brain SD in this normaliser's units: moves in SD units
        for tissue in (WM, CGM, DGM):
            where = _untouched(labels, pmask, tissue)
            shifts[name].append((float(np.median(a[where])) - float(np.median(b[where]))) / sd)
    # the measurement: about +-0.01 SD for the white-matter peak against -0.2 SD or more for the z-score
    assert max(abs(s) for s in shifts["peak"]) <= 0.01, shifts
    assert min(shifts["zscore"]) < -0.1, shifts  # the same check fails the z-score on this subject


def test_empty_brain_and_constant_image_are_one_clear_error():
    norm = WhitePeakNormalised()
    with pytest.raises(ValueError, match="brain \\(non-zero\\) voxels, fewer than"):
        norm(torch.zeros(1, 16, 16, 16))
    with pytest.raises(ValueError, match="constant image has no white-matter peak"):
        norm(torch.where(torch.rand(1, 32, 32, 32) > 0.5, 7.0, 0.0))
    # in a config's preprocessing the error names the file the image was read from
    constant = MetaTensor(torch.where(torch.rand(1, 32, 32, 32) > 0.5, 7.0, 0.0), meta={"filename_or_obj": "x.nii"})
    with pytest.raises(ValueError, match="^x.nii: the brain's intensities do not vary"):
        Normalisedd("image", method="white_peak")({"image": constant})


def test_inference_divides_a_scan_without_a_peak_by_its_median_and_says_so(tmp_path, caplog):
    """With the weights' folder (inference, evaluation) a scan without a white-matter peak -- here 64 voxels, what
    registration made of a cube -- is divided by the median of its non-zero voxels, with one warning naming the
    file, so that QC judges it and the run goes on (tests/test_native.py runs it end to end)."""
    _record(tmp_path, normalisation="white_peak")
    small = torch.zeros(1, 16, 16, 16)
    small[0, 4:8, 4:8, 4:8] = torch.arange(1.0, 65.0).reshape(4, 4, 4)
    x = MetaTensor(small, meta={"filename_or_obj": "cube.nii"})
    with caplog.at_level("WARNING"):
        out = Normalisedd("image", method="white_peak", record_dir=tmp_path)({"image": x})["image"]
    median = float(small[small != 0].median())
    assert torch.equal(out.as_tensor(), torch.where(small != 0, small / median, torch.zeros_like(small)))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("cube.nii: the image has 64 brain (non-zero) voxels")
    with pytest.raises(ValueError, match="^cube.nii: the image has 64"):  # training: an error
        Normalisedd("image", method="white_peak")({"image": x})


def test_dictionary_version_keeps_meta_and_shares_the_statistics(twins):
    image, twin = twins[0], twins[1]
    x = MetaTensor(torch.as_tensor(image)[None], affine=torch.eye(4))
    d = Normalisedd("image", method="white_peak")({"image": x})
    assert isinstance(d["image"], MetaTensor) and torch.equal(d["image"].affine, x.affine)
    norm = Normalisedd("image", method="white_peak")
    hybrid = norm.apply(torch.as_tensor(twin)[None], norm.statistics(x))  # the twin on the subject's scale
    assert torch.allclose(hybrid, torch.as_tensor(twin)[None] / white_matter_peak(image), rtol=2 * EPS32)


@pytest.mark.parametrize("name", ["bias_field", "resampled_0.8mm", "resampled_0.8mm_rim", "resampled_0.8x0.8x2mm"])
def test_the_peak_holds_on_a_bias_field_and_resampled_scans(twins, name):
    """The robustness command's perturbations (a +-10 % bias ramp; 0.8 mm, 0.8 mm with the dim rim a user's
    resampling leaves, 0.8x0.8x2 mm slices): the peak, so the white matter's normalised value, stays within 3 %."""
    image = twins[0]
    array, _ = perturb(name, image, builtin_template().affine, np.random.default_rng(0))
    assert abs(white_matter_peak(array) / white_matter_peak(image) - 1) < 0.03


def _scan(image) -> MetaTensor:
    """A synthetic scan as the preprocessing hands it to the normalisation: (1, D, H, W) float32 with its affine."""
    return MetaTensor(torch.as_tensor(np.asarray(image, dtype=np.float32))[None], affine=torch.eye(4))


def test_zscore_is_monais_nonzero_normalisation(twins):
    """``zscore`` gives today's numbers: MONAI's ``NormalizeIntensityd(nonzero=True)`` (the non-zero voxels' mean and
    population SD), within float32 rounding, the background exactly 0; neither writes into the input."""
    x = _scan(twins[0])
    before = x.clone()
    ours = Normalisedd("image")({"image": x})["image"]
    assert torch.equal(x, before)  # MONAI's NormalizeIntensity writes into its input: ours works on a copy
    monai = NormalizeIntensityd("image", nonzero=True)({"image": x.clone()})["image"]
    assert isinstance(ours, MetaTensor) and ours.dtype == torch.float32 and torch.equal(ours.affine, x.affine)
    # (x - mean) / std in float32: a few eps of the output's magnitude, whatever order the library sums in
    assert torch.allclose(ours, monai, rtol=4 * EPS32, atol=4 * EPS32 * float(monai.abs().max()))
    brain = x != 0
    assert float(ours[~brain].abs().max()) == 0
    assert abs(float(ours[brain].mean())) < 1e-4 and abs(float(ours[brain].std(unbiased=False)) - 1) < 1e-4


def test_white_peak_is_the_white_peak_normaliser(twins):
    x = _scan(twins[0])
    ours = Normalisedd("image", method="white_peak")({"image": x})["image"]
    assert torch.equal(ours, WhitePeakNormalised()(x)) and torch.equal(x, _scan(twins[0]))


@pytest.mark.parametrize("method", NORMALISATIONS)
def test_statistics_and_apply_round_trip(twins, method):
    """``apply(image, statistics(image))`` is the transform; ``apply`` with another image's statistics normalises on
    that image's scale (what the twin counterfactuals of scripts/evaluation/evidence.py do)."""
    subject, twin = _scan(twins[0]), _scan(twins[1])
    norm = Normalisedd(["image", "twin"], method=method)
    out = norm({"image": subject, "twin": twin})
    assert torch.equal(norm.apply(subject, norm.statistics(subject)), out["image"])
    assert torch.equal(norm.apply(twin, norm.statistics(twin)), out["twin"])  # each key its own statistics
    stats = norm.statistics(subject)
    hybrid = norm.apply(twin, stats)
    if method == "zscore":
        inside = subject[subject != 0].double()
        assert stats["mean"] == pytest.approx(float(inside.mean()), rel=1e-5)
        assert stats["std"] == pytest.approx(float(inside.std(unbiased=False)), rel=1e-5)
        expected = torch.where(twin != 0, (twin - stats["mean"]) / stats["std"], torch.zeros_like(twin))
    else:
        assert stats == {"peak": white_matter_peak(twins[0])}
        expected = torch.where(twin != 0, twin / stats["peak"], torch.zeros_like(twin))
    assert torch.allclose(hybrid, expected, rtol=4 * EPS32, atol=4 * EPS32 * float(expected.abs().max()))
    assert torch.equal(twin, _scan(twins[1]))  # never in place


def test_augmented_statistics_are_a_zscore_with_statistics_that_are_off(twins):
    """``RandBrainStatisticsd`` after the z-score is the z-score with the mean moved by ``a`` SDs and the SD times
    ``b``, each key with its own (a, b) within the ranges; the background stays 0; seeded, it repeats."""
    x = _scan(twins[0])
    z = Normalisedd("image")({"image": x})["image"]
    aug = RandBrainStatisticsd(["image", "view"], shift=0.5, scale=(0.8, 1.3)).set_random_state(0)
    out = aug({"image": z, "view": z.clone()})
    inside = x[x != 0].double()
    mean, sd = float(inside.mean()), float(inside.std(unbiased=False))
    for key in ("image", "view"):
        a, b = aug.draws[key]
        assert -0.5 <= a <= 0.5 and 0.8 <= b <= 1.3
        expected = NormalizeIntensity(subtrahend=mean + a * sd, divisor=sd * b, nonzero=True)(x.clone())
        assert isinstance(out[key], MetaTensor) and torch.equal(out[key].affine, x.affine)
        assert torch.allclose(out[key], expected, rtol=8 * EPS32, atol=8 * EPS32 * float(expected.abs().max()))
        assert float(out[key][x == 0].abs().max()) == 0
    assert aug.draws["image"] != aug.draws["view"]  # independent draws: the two views disagree on the statistics
    assert not torch.equal(out["image"], out["view"])
    again = RandBrainStatisticsd(["image", "view"]).set_random_state(0)
    assert torch.equal(again({"image": z, "view": z.clone()})["view"], out["view"])
    assert torch.equal(z, Normalisedd("image")({"image": x})["image"])  # the input untouched
    with pytest.raises(ValueError, match="scale"):
        RandBrainStatisticsd("image", scale=(1.3, 0.8))
    with pytest.raises(ValueError, match="shift"):
        RandBrainStatisticsd("image", shift=-1)


def _record(folder, **fields):
    """A QC reference JSON in ``folder`` (only what the normalisation check reads)."""
    (folder / REFERENCE).write_text(json.dumps({"fingerprint": "0" * 16, **fields}))
    return folder / REFERENCE


def test_a_recorded_normalisation_must_match(tmp_path):
    path = _record(tmp_path, normalisation="zscore")
    with pytest.raises(ValueError) as info:
        Normalisedd("image", method="white_peak", record_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "records normalisation 'zscore'" in message and "config key 'normalisation' is 'white_peak'" in message
    assert "--normalisation zscore" in message
    assert Normalisedd("image", method="zscore", record_dir=tmp_path).method == "zscore"
    _record(tmp_path, normalisation="white_peak")
    assert Normalisedd("image", method="white_peak", record_dir=tmp_path).method == "white_peak"
    with pytest.raises(ValueError, match="records normalisation 'white_peak'.*--normalisation white_peak"):
        Normalisedd("image", method="zscore", record_dir=tmp_path)
    assert Normalisedd("image", method="white_peak", record_dir=None).method == "white_peak"  # training: no check


def test_weights_without_a_record_are_zscore_weights(tmp_path):
    """A QC reference without the field (weights before metadata 0.9.0) or none at all (a user's own weights): only
    the z-score runs on them."""
    assert Normalisedd("image", record_dir=tmp_path).method == "zscore"
    with pytest.raises(ValueError) as info:
        Normalisedd("image", method="white_peak", record_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message and f"{tmp_path / REFERENCE} not found" in message and "z-score" in message
    assert "--normalisation zscore" in message
    assert weights_normalisation(tmp_path) == "zscore"  # the evaluation tools' rule (robustness.Measurer) too
    _record(tmp_path)  # a reference from before the field
    assert Normalisedd("image", record_dir=tmp_path).method == "zscore" == weights_normalisation(tmp_path)
    with pytest.raises(ValueError, match="records normalisation 'zscore'"):
        Normalisedd("image", method="white_peak", record_dir=tmp_path)
    _record(tmp_path, normalisation="white_peak")
    assert weights_normalisation(tmp_path) == "white_peak"


def test_a_bad_method_names_the_key_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match="config key 'normalisation' must be one of 'zscore', 'white_peak', got "
                                         "'minmax'"):
        Normalisedd("image", method="minmax", record_dir=tmp_path)


@pytest.mark.parametrize(("configs", "key"), [(["inference.json"], "preprocessing"),
                                             (["train.json", "evaluate.json"], "validate#preprocessing")])
def test_inference_refuses_the_shipped_weights_with_the_other_normalisation(configs, key):
    """configs/inference.json (and the evaluation, train.json + evaluate.json) with ``normalisation`` zscore on the
    shipped models/ (whose QC reference records white_peak, since 0.9.0) fails where the preprocessing is built,
    with the one clear line the command prints."""
    record = ROOT / "models" / REFERENCE
    assert json.loads(record.read_text())["normalisation"] == "white_peak"
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / name) for name in configs])
    parser.update({"bundle_root": str(ROOT), "device": "$torch.device('cpu')"})
    assert "Normalisedd" in [type(t).__name__ for t in parser.get_parsed_content(key).transforms]
    parser.update({"normalisation": "zscore"})
    parser.parse(reset=True)
    with pytest.raises(Exception) as info:
        parser.get_parsed_content(key)
    cause = bundle_input_error(info.value)
    assert cause is not None, f"not a clear input error: {info.value!r}"
    assert str(cause) == (f"{record} records normalisation 'white_peak' for the weights beside it, but config key "
                          "'normalisation' is 'zscore': set it to the weights' own, 'white_peak' (run with "
                          "--normalisation white_peak), or point ckpt_dir at weights trained with 'zscore'")


def _inference_preprocessing(ckpt_dir, method):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), **TINY_OVERRIDES, "ckpt_dir": str(ckpt_dir), "normalisation": method,
                   "device": "$torch.device('cpu')"})
    return parser.get_parsed_content("preprocessing")


def test_training_records_its_normalisation_and_inference_holds_to_it(tmp_path, cohort):
    """train.json with ``normalisation`` white_peak: the noise is in white-peak units, the QC reference beside the
    weights records the normalisation, the registration template is the mean white-peak input (not lifted by the
    z-score's 4) and tells a registered scan whatever its intensity scale; inference.json then runs white_peak on
    these weights and refuses the z-score."""
    models = tmp_path / "models"
    workflow = run_bundle_workflow(["train.json"], "training", {
        **TINY_OVERRIDES, "dataset_dir": str(cohort), "ckpt_dir": str(models), "output_dir": str(tmp_path / "out"),
        "num_epochs": 1, "normalisation": "white_peak", "device": "$torch.device('cpu')", "progress_bar": False})
    noise = workflow.parser.get_parsed_content("train#random_transforms")[-1]
    assert type(noise).__name__ == "RandGaussianNoised" and noise.rand_gaussian_noise.std == pytest.approx(0.015)
    content = json.loads((models / REFERENCE).read_text())
    assert content["normalisation"] == "white_peak" and QCReference.load(models).normalisation == "white_peak"
    template = np.asarray(nib.load(models / TEMPLATE_IMAGE).dataobj)
    inside = np.asarray(nib.load(models / TEMPLATE_MASK).dataobj) > 0
    assert 0.5 < float(np.median(template[inside])) < 2.0  # white matter at about 1 (a z-score template: about 4)

    with pytest.raises(Exception) as info:
        _inference_preprocessing(models, "zscore")
    assert "records normalisation 'white_peak'" in str(bundle_input_error(info.value))
    preprocessing = _inference_preprocessing(models, "white_peak")
    item = load_split(str(cohort / "datalist.json"), "test", -1)[0]
    image = preprocessing({"image": item["image"]})["image"]
    assert 0.8 < float(torch.median(image[image != 0])) < 1.6  # the brain on its white-matter peak's scale
    raw = np.asarray(image[0])  # registered already: the white-peak template scores it so at any intensity scale
    ok, scores = Template(models).registered(raw)
    assert ok and Template(models).registered(raw * 37.0)[1] == pytest.approx(scores, rel=1e-5)
