"""Shared fixtures: a small synthetic cohort on disk and helpers to run the bundle through MONAI's CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# tiny settings so that the real configs run in seconds: the 128x96x96 volumes are centre-cropped; the run report
# (on by default for users) is off except in the tests of the report (tests/test_report.py: tiny_args(report=True))
TINY_OVERRIDES = {"spatial_shape": [64, 48, 48], "channels": [4, 8], "hidden": 8, "report": False}


def tiny_args(**changes) -> list[str]:
    """``TINY_OVERRIDES`` (with ``changes``) as command-line overrides: ``--key value`` pairs."""
    return [arg for key, value in {**TINY_OVERRIDES, **changes}.items()
            for arg in (f"--{key}", json.dumps(value, separators=(",", ":")))]


TINY = tiny_args()


# the MONAI Label and Deploy apps have their own environments (nox sessions label / deploy, see noxfile.py)
collect_ignore = [name for name, module in (("label", "monailabel"), ("deploy", "monai.deploy"))
                  if importlib.util.find_spec(module) is None]
# the MONAI model zoo's CI scripts and this bundle's zoo-style unittest: run as the zoo runs them, in subprocesses
# started outside the bundle (tests/test_model_zoo.py), never collected in this process
collect_ignore.append("model_zoo")


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """24 synthetic subjects (generated once per test session) with datalist, labels and phenotype masks."""
    from scripts.data.synthetic import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, subjects=24, seed=3, preterm_fraction=0.4, folds=4, test_fraction=0.25)
    return out


def stage_qc_reference(source: Path, folder: Path, template: bool = False) -> None:
    """Copy the QC reference beside the weights in ``source`` (the record of their normalisation, which inference
    checks) into ``folder``, with the registration template when ``template``."""
    from scripts.runtime.reference import MEAN_IMAGE, REFERENCE, REGION, TEMPLATE_IMAGE, TEMPLATE_MASK

    for name in (REFERENCE, MEAN_IMAGE, REGION, *((TEMPLATE_IMAGE, TEMPLATE_MASK) if template else ())):
        shutil.copy(Path(source) / name, Path(folder) / name)


def run_bundle(run_id: str, config: str, *overrides: str, check: bool = True, timeout: int = 600):
    """``python -m monai.bundle run <run_id> --config_file <config> <overrides>`` from the bundle root."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config, *overrides]
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cohort):
    """A tiny model trained through the real CLI on the session cohort: (ckpt_dir, work dir)."""
    work = tmp_path_factory.mktemp("trained")
    proc = run_bundle(
        "training", "configs/train.json", "--dataset_dir", str(cohort), "--ckpt_dir", str(work / "models"),
        "--output_dir", str(work / "train_out"), "--num_epochs", "2", *TINY,
    )
    (work / "training.log").write_text(proc.stdout + proc.stderr)  # a non-terminal run's log (tests/test_report.py)
    return work / "models", work


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m monai.bundle run <args>`` from the bundle root: 2 CPU processes
    (gloo), one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def ddp_training_args(cohort: Path, out: Path) -> list[str]:
    """``monai.bundle run`` arguments of the tests' DDP training: the multi-GPU config, 2 epochs, tiny network,
    models in ``out/models``."""
    return ["training", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']", "--dataset_dir",
            str(cohort), "--ckpt_dir", str(out / "models"), "--output_dir", str(out / "train"), "--num_epochs", "2",
            *TINY]


@pytest.fixture(scope="session")
def ddp_trained(tmp_path_factory, cohort) -> Path:
    """The tiny network trained with DDP through torchrun (``torchrun``, ``ddp_training_args``) on the session cohort:
    its models folder (tests/test_scale_out.py; tests/test_slurm.py launches the same training through SLURM)."""
    out = tmp_path_factory.mktemp("ddp_torchrun")
    proc = torchrun(*ddp_training_args(cohort, out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "models"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, trained) -> Path:
    """A bundle folder as MONAI Label and Deploy see one (configs/, scripts/, models/model.pt) holding the tiny
    trained model; configs and scripts are this repository's (symlinks)."""
    ckpt_dir, _ = trained
    bundle = tmp_path_factory.mktemp("bundle")
    for name in ("configs", "scripts"):
        (bundle / name).symlink_to(ROOT / name, target_is_directory=True)
    (bundle / "models").symlink_to(ckpt_dir, target_is_directory=True)
    return bundle


def app_preset() -> str:
    """The LRP preset of the MONAI Label and Deploy apps (``scripts.runtime.explain.APP_PRESET``)."""
    from scripts.runtime.explain import APP_PRESET

    return APP_PRESET


@pytest.fixture(scope="session")
def reference(tmp_path_factory, cohort, trained):
    """``run inference`` of the tiny model on the test split with the a2b1 preset and the apps' preset
    (``app_preset()``): (output dir, test items with absolute image paths)."""
    ckpt_dir, _ = trained
    out = tmp_path_factory.mktemp("reference")
    presets = list(dict.fromkeys(["a2b1", app_preset()]))
    run_bundle("inference", "configs/inference.json", "--dataset_dir", str(cohort), "--ckpt_dir", str(ckpt_dir),
               "--output_dir", str(out), "--lrp_presets", json.dumps(presets), *TINY)
    items = read_json(cohort / "datalist.json")["test"]
    return out, [{**item, "image": str(cohort / item["image"])} for item in items]


def read_json(path: Path):
    return json.loads(Path(path).read_text())
