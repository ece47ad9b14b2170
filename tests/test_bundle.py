"""The bundle through MONAI's own CLI and workflow API: properties, network I/O, metadata schema, and a tiny
train -> evaluate -> inference run on NIfTI files."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, read_json, run_bundle


def _workflow(workflow_type, config_file, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=config_file, workflow_type=workflow_type,
                        meta_file=str(ROOT / "configs" / "metadata.json"),
                        logging_file=str(ROOT / "configs" / "logging.conf"), **overrides)
    return wf


@pytest.mark.parametrize("kind,config", [("train", "configs/train.json"), ("infer", "configs/inference.json")])
def test_config_workflow_properties_complete(kind, config, tmp_path, cohort, trained):
    wf = _workflow(kind, str(ROOT / config), bundle_root=str(ROOT), output_dir=str(tmp_path), ckpt_dir=str(trained[0]),
                   dataset_dir=str(cohort))  # the session's cohort (the default would generate data/synthetic)
    wf.initialize()
    missing = wf.check_properties()
    assert not missing, missing


def test_metadata_validates_against_the_monai_schema():
    schema_path = ROOT.parent / "shared" / "monai_meta_schema.json"
    if not schema_path.is_file():
        pytest.skip("no copy of the MONAI metadata schema next to the repository (../shared)")
    import jsonschema

    meta = read_json(ROOT / "configs" / "metadata.json")
    jsonschema.validate(meta, read_json(schema_path))
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [128, 96, 96]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "term", "1": "preterm"}
    root_meta = ROOT / "metadata.json"
    assert root_meta.is_symlink() and not Path(root_meta.readlink()).is_absolute()
    assert root_meta.resolve() == (ROOT / "configs" / "metadata.json").resolve()


def test_verify_net_in_out_cli():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
         "configs/metadata.json", "--config_file", "configs/inference.json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_train_evaluate_infer_through_the_cli(tmp_path, cohort, trained):
    ckpt_dir, work = trained
    state = torch.load(ckpt_dir / "model.pt", weights_only=True)  # plain tensors only
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert (work / "train_out" / "tensorboard").is_dir()

    run_bundle("evaluating", "['configs/train.json','configs/evaluate.json']", "--dataset_dir", str(cohort),
               "--ckpt_dir", str(ckpt_dir), "--output_dir", str(tmp_path / "eval"), *TINY)
    metrics = dict(row for row in csv.reader((tmp_path / "eval" / "metrics.csv").open()) if row)
    assert {"test_auc", "test_accuracy", "test_balanced_accuracy", "test_tpr", "test_tnr"} <= set(metrics)
    assert 0.0 <= float(metrics["test_accuracy"]) <= 1.0

    out = tmp_path / "infer"
    run_bundle("inference", "configs/inference.json", "--dataset_dir", str(cohort), "--ckpt_dir", str(ckpt_dir),
               "--output_dir", str(out), "--lrp_presets", "['a2b1']", *TINY)
    test_items = read_json(cohort / "datalist.json")["test"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert sorted(r["subject"] for r in rows) == sorted(it["subject"] for it in test_items)
    for row in rows:
        probs = np.array([float(row["prob_term"]), float(row["prob_preterm"])])
        assert abs(probs.sum() - 1) < 1e-5 and int(row["prediction"]) == int(probs.argmax())
    # the evaluation's per-subject table agrees with the inference and carries the labels
    evaluated = {r["subject"]: r for r in csv.DictReader((tmp_path / "eval" / "test_predictions.csv").open())}
    labels = {it["subject"]: it["label"] for it in test_items}
    for row in rows:
        assert evaluated[row["subject"]]["prob_preterm"] == row["prob_preterm"]
        assert int(evaluated[row["subject"]]["label"]) == labels[row["subject"]]
    for item in test_items:
        subject = item["subject"]
        rel = nib.load(out / subject / f"{subject}_relevance_a2b1.nii.gz")
        inp = nib.load(out / subject / f"{subject}_input.nii.gz")
        assert rel.shape == inp.shape == (64, 48, 48) and np.allclose(rel.affine, inp.affine)
        assert np.isfinite(rel.get_fdata()).all() and np.abs(rel.get_fdata()).sum() > 0


def test_run_id_run_is_training_and_a_folder_of_images_infers(tmp_path, cohort, trained):
    ckpt_dir, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    for name in ("sub-0001", "sub-0002"):
        (images / f"{name}.nii.gz").symlink_to(cohort / "images" / f"{name}.nii.gz")
    run_bundle("run", "configs/inference.json", "--dataset_dir", str(images), "--ckpt_dir", str(ckpt_dir),
               "--output_dir", str(tmp_path / "out"), "--lrp_presets", "['a1b0']", *TINY)
    assert (tmp_path / "out" / "sub-0002" / "sub-0002_relevance_a1b0.nii.gz").is_file()
    assert len(list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))) == 2
    train = read_json(ROOT / "configs" / "train.json")
    assert train["run"] == "@training"


def test_missing_checkpoint_says_how_to_create_it(tmp_path, cohort):
    proc = run_bundle("inference", "configs/inference.json", "--dataset_dir", str(cohort), "--ckpt_dir",
                      str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "o"), *TINY, check=False)
    assert proc.returncode != 0
    assert "model.pt not found; create it with: python -m monai.bundle run training" in proc.stderr + proc.stdout


def test_seeded_training_and_inference_are_repeatable(tmp_path, cohort, trained):
    ckpt_dir, _ = trained
    run_bundle("training", "configs/train.json", "--dataset_dir", str(cohort), "--ckpt_dir", str(tmp_path / "models"),
               "--output_dir", str(tmp_path / "train_out"), "--num_epochs", "2", *TINY)
    first = torch.load(ckpt_dir / "model.pt", weights_only=True)
    second = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (ckpt_dir / "model.pt").read_bytes() == (tmp_path / "models" / "model.pt").read_bytes()  # same file
    maps = []
    for run in ("a", "b"):
        out = tmp_path / run
        run_bundle("inference", "configs/inference.json", "--dataset_dir", str(cohort), "--ckpt_dir", str(ckpt_dir),
                   "--output_dir", str(out), "--lrp_presets", "['a2b1']", *TINY)
        maps.append({p.name: nib.load(p).get_fdata() for p in sorted(out.rglob("*_relevance_a2b1.nii.gz"))})
    assert maps[0].keys() == maps[1].keys() and maps[0]
    assert all(np.array_equal(maps[0][k], maps[1][k]) for k in maps[0])
