"""The bundle as the MONAI model zoo's CI sees it, with the zoo's own scripts, unchanged (tests/model_zoo/ci, copied
from Project-MONAI/model-zoo, Apache-2.0; see tests/model_zoo/README.md), and as a user running it from another
folder. Every run here is a subprocess started outside the bundle, without the bundle on ``sys.path``.

- ``verify_bundle.py -m full``: files, version/changelog, metadata against the schema, ``verify_net_in_out``,
  ``ckpt_export`` of the shipped ``models/model.pt``
- ``get_bundle_requirements.py`` then a pip resolver dry run of its list with the pinned torch
- ``ci/unit_tests/runner.py -b preterm_lrp``: the zoo-style unit test (train, train+evaluate, inference through
  ``ConfigWorkflow`` with ``check_properties``)
- ``python -m monai.bundle run inference`` from another folder: works, and a bad input is still one line
- the shipped weights evaluated on the synthetic test split equal ``metadata.json`` ``eval_metrics`` and the card
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT, TINY, read_json

ZOO_CI = ROOT / "tests" / "model_zoo" / "ci"
SCHEMA = ROOT.parent / "shared" / "monai_meta_schema.json"  # the project's copy; users do not have it
NAME = "preterm_lrp"
METADATA = read_json(ROOT / "configs" / "metadata.json")


def outside_env(**extra) -> dict:
    """The environment of a process started outside the bundle: nothing of ours on ``PYTHONPATH``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PYTHONHASHSEED": "0", **extra}


def run(cmd, cwd, timeout=900, **extra_env) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=outside_env(**extra_env))
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def zoo_checkout(dest: Path) -> Path:
    """``dest/models/preterm_lrp``: the bundle as a model-zoo checkout holds it (tracked files that a bundle ships),
    and ``dest/models/model_info.json`` (no released version yet)."""
    bundle = dest / "models" / NAME
    ignore = shutil.ignore_patterns("__pycache__", "logs", "*.pyc")
    for name in ("configs", "scripts", "docs"):
        shutil.copytree(ROOT / name, bundle / name, ignore=ignore)
    shutil.copy2(ROOT / "LICENSE", bundle / "LICENSE")
    (bundle / "models").mkdir()
    shutil.copy2(ROOT / "models" / "model.pt", bundle / "models" / "model.pt")
    (dest / "models" / "model_info.json").write_text("{}")
    return bundle


def test_verify_bundle_full(tmp_path):
    if not SCHEMA.is_file():
        pytest.skip(f"no metadata schema at {SCHEMA} (the project's ../shared); verify_metadata would download it")
    bundle = zoo_checkout(tmp_path)
    (bundle / "eval").mkdir()
    shutil.copy2(SCHEMA, bundle / "eval" / "schema.json")  # where verify_bundle.py expects the downloaded schema
    proc = run([sys.executable, ZOO_CI / "verify_bundle.py", "-b", NAME, "-p", "models", "-m", "full"], tmp_path)
    for step in ("directory is verified correctly", "version and changelog are verified correctly",
                 "metadata format is verified correctly", "data shape is verified correctly",
                 "export weights into TorchScript module successfully"):
        assert step in proc.stdout, proc.stdout[-3000:]
    assert (bundle / "models" / "verify_model.ts").is_file()


def test_bundle_requirements_resolve_together(tmp_path):
    """The zoo's dependency step (run_premerge_cpu.sh: get_bundle_requirements.py, then pip install -r, with
    ALLOW_MONAI_RC=true) as a resolver dry run into a fresh venv."""
    zoo_checkout(tmp_path)
    proc = run([sys.executable, ZOO_CI / "get_bundle_requirements.py", "-b", NAME, "-p", "models"], tmp_path,
               ALLOW_MONAI_RC="true")
    requirements = tmp_path / proc.stdout.strip().splitlines()[-1]
    lines = requirements.read_text().split()
    assert f"torch=={METADATA['pytorch_version']}" in lines and f"numpy=={METADATA['numpy_version']}" in lines
    assert not {"monailabel", "monai-deploy-app-sdk", "antspyx"} & {line.split("==")[0] for line in lines}
    venv.create(tmp_path / "venv", with_pip=True)
    report = tmp_path / "report.json"
    run([tmp_path / "venv" / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q",
         "--dry-run", "--pre", "--report", report, "-r", requirements], tmp_path)
    resolved = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    assert resolved["torch"].split("+")[0] == METADATA["pytorch_version"]
    assert resolved["monai"] == METADATA["monai_version"]
    assert resolved["numpy"] == METADATA["numpy_version"]
    for name, version in METADATA["required_packages_version"].items():
        assert resolved[name.lower()] == version, name


def test_model_zoo_unit_test_runner(tmp_path, cohort):
    """tests/model_zoo/ci/unit_tests/test_preterm_lrp.py through the zoo's runner, from outside the bundle (reusing
    the session's small synthetic cohort instead of generating one)."""
    bundle = zoo_checkout(tmp_path)
    proc = run([sys.executable, ZOO_CI / "unit_tests" / "runner.py", "-b", NAME], tmp_path,
               PRETERM_ZOO_DATASET=str(cohort))
    assert "Ran 2 tests" in proc.stderr and "OK" in proc.stderr, proc.stderr[-3000:]
    assert (bundle / "eval" / "metrics.csv").is_file() and (bundle / "eval" / "predictions.csv").is_file()


def test_run_inference_from_another_folder(tmp_path, cohort, trained):
    ckpt_dir, _ = trained
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", ROOT / "configs/inference.json",
           "--bundle_root", ROOT, "--dataset_dir", cohort, "--ckpt_dir", ckpt_dir, "--output_dir", tmp_path / "out",
           "--lrp_presets", "['a2b1']", *TINY]
    run(cmd, elsewhere)
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    test_items = read_json(cohort / "datalist.json")["test"]
    assert sorted(r["subject"] for r in rows) == sorted(it["subject"] for it in test_items)

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "sub-x.nii.gz").write_bytes(b"not a nifti")
    cmd[cmd.index("--dataset_dir") + 1] = bad
    proc = subprocess.run([str(c) for c in cmd], cwd=elsewhere, capture_output=True, text=True, env=outside_env(),
                          timeout=600)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sub-x.nii.gz" in errors[0], proc.stderr[-2000:]


def documented_metrics() -> dict[str, float]:
    """The model card's held-out table (docs/README.md), by metric name."""
    card = (ROOT / "docs" / "README.md").read_text()
    names = {"accuracy": "accuracy", "ROC AUC": "auc", "TPR (sensitivity, preterm = positive)": "tpr",
             "TNR (specificity)": "tnr", "balanced accuracy": "balanced_accuracy"}
    table = dict(re.findall(r"^\| ([^|]+?) \| ([0-9.]+) \|$", card, flags=re.M))
    return {key: float(table[name]) for name, key in names.items()}


def test_shipped_weights_reproduce_the_documented_metrics(tmp_path):
    """``models/model.pt`` on the synthetic test split (the same 16 subjects as the whole default cohort, generated
    alone: seconds, not a retraining) gives ``metadata.json`` ``eval_metrics`` and the model card's table."""
    from scripts.data.synthetic import generate_cohort  # noqa: PLC0415 (the bundle's own generator)

    data = tmp_path / "synthetic"
    generate_cohort(data, only_test=True, workers=2)
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
           f"['{ROOT / 'configs/train.json'}','{ROOT / 'configs/evaluate.json'}']", "--bundle_root", ROOT,
           "--dataset_dir", data, "--ckpt_dir", ROOT / "models", "--output_dir", out]
    run(cmd, tmp_path)
    measured = {row[0]: float(row[1]) for row in csv.reader((out / "metrics.csv").open()) if row}
    eval_metrics = METADATA["eval_metrics"]
    card = documented_metrics()
    for key in ("accuracy", "auc", "tpr", "tnr", "balanced_accuracy"):
        assert round(measured[f"test_{key}"], 4) == eval_metrics[f"synthetic_test_{key}"], key
        assert round(measured[f"test_{key}"], 3) == round(card[key], 3), key


def test_shipped_export_is_the_shipped_weights_with_todays_configs():
    """models/model.ts (the Deploy app's model; the SDK reads its preprocessing from the config inside it) holds
    the weights of models/model.pt and the configs of this checkout: an export left behind by a config change
    ran the Deploy app with an old preprocessing (no native-scan registration)."""
    import torch

    extra = {"inference.json": "", "metadata.json": ""}
    scripted = torch.jit.load(str(ROOT / "models" / "model.ts"), map_location="cpu", _extra_files=extra)
    assert json.loads(extra["inference.json"]) == read_json(ROOT / "configs" / "inference.json"), (
        "models/model.ts carries another configs/inference.json: re-export it (docs/README.md, MONAI Bundle Commands)")
    metadata, ours = json.loads(extra["metadata.json"]), read_json(ROOT / "configs" / "metadata.json")
    ours.pop("optional_packages_version", None)  # ckpt_export leaves MONAI's deprecated key out of the export
    metadata.pop("optional_packages_version", None)
    assert metadata == ours
    weights = torch.load(ROOT / "models" / "model.pt", map_location="cpu", weights_only=True)
    exported = scripted.state_dict()
    assert set(exported) == set(weights)
    for name, value in weights.items():
        assert torch.equal(exported[name], value), name
