"""Reliability: the bad-input battery over every entry point, the command-line error format, crash safety
(SIGKILL during inference and training, then resume) and safe checkpoint loading."""

import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT, TINY, stage_qc_reference

from scripts.evaluation.cross_validation import run_bundle_workflow
from scripts.runtime.errors import bundle_input_error

TINY_CFG = {"spatial_shape": [64, 48, 48], "channels": [4, 8], "hidden": 8}
IMAGE_CASES = {  # case -> expected reason in the message (the message also names the file)
    "missing": "not found",
    "zero_bytes": "not a readable NIfTI",
    "truncated": "not a readable NIfTI",
    "not_nifti": "not a readable NIfTI",
    "2d": "expected a 3D image",
    "4d": "expected a 3D image",
    "nan": "NaN or Inf",
    "inf": "NaN or Inf",
    "all_zero": "every voxel is zero",
    "wrong_size": "far from the network's field of view",
}
OTHER_CASES = {"label_2": "labels must be 0 (term) or 1 (preterm)",
               "label_text": "labels must be 0 (term) or 1 (preterm)",
               "datalist_not_json": "is not valid JSON",
               "datalist_without_image": "needs an 'image' key",
               "override_type": "config key"}
ENTRY_POINTS = ["training", "evaluation", "inference", "study", "explanations"]
OVERRIDES = {"training": ({"num_epochs": "two"}, "config key 'num_epochs' must be a positive integer"),
             "evaluation": ({"batch_size": 0}, "config key 'batch_size' must be a positive integer"),
             "inference": ({"resume": "maybe"}, "config key 'resume' must be true or false"),
             "study": ({"num_epochs": "two"}, "config key 'num_epochs' must be a positive integer"),
             "explanations": ({"spatial_shape": "big"}, "config key 'spatial_shape' must be a list of 3")}


def make_bad_image(case: str, folder: Path, good: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image = nib.load(good)
    data, affine = image.get_fdata().astype(np.float32), image.affine
    path = folder / f"bad_{case}.nii.gz"
    if case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "truncated":
        raw = good.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    elif case == "not_nifti":
        path.write_bytes(gzip.compress(b"subject,label\nsub-1,0\n"))
    elif case != "missing":
        if case == "2d":
            data = data[:, :, 40]
        elif case == "4d":
            data = np.stack([data, data], -1)
        elif case in ("nan", "inf"):
            data[60, 40, 40] = np.nan if case == "nan" else np.inf
        elif case == "all_zero":
            data = np.zeros_like(data)
        elif case == "wrong_size":
            data = data[::6, ::6, ::6]  # 22 x 16 x 16 voxels of 1 mm: a thumbnail, not a registered brain
        nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _datalist(cohort: Path) -> dict:
    data = json.loads((cohort / "datalist.json").read_text())
    for item in data["training"] + data["test"]:
        for key in ("image", "tissue", "phenotype"):
            item[key] = str(cohort / item[key])
    return data


def _victim(data: dict, entry: str) -> dict:
    """The item the bad input goes into: a training item outside fold 0 (training, study) or a preterm test
    item (evaluation, inference, explanations)."""
    if entry in ("training", "study"):
        return next(it for it in data["training"] if it["fold"] != 0)
    return next(it for it in data["test"] if it["label"] == 1)


def _case_datalist(case: str, entry: str, cohort: Path, tmp: Path) -> tuple[Path, str]:
    """(datalist path, text the error must contain) for one case."""
    data = _datalist(cohort)
    victim = _victim(data, entry)
    expected = str(tmp / "datalist.json")
    if case in IMAGE_CASES:
        victim["image"] = str(make_bad_image(case, tmp / "images", Path(victim["image"])))
        expected = victim["image"]
    elif case == "label_2":
        victim["label"] = 2
        expected = victim["image"]
    elif case == "label_text":
        victim["label"] = "preterm"
        expected = victim["image"]
    elif case == "datalist_without_image":
        del victim["image"]
    path = tmp / "datalist.json"
    path.write_text("{'training': [" if case == "datalist_not_json" else json.dumps(data))
    return path, expected


def _run(entry: str, datalist: Path, out: Path, ckpt_dir: Path, overrides: dict, capsys) -> str:
    """Run one entry point in-process on ``datalist``; return the error message it gave (fails if none)."""
    common = {"datalist": str(datalist), "dataset_dir": str(datalist.parent), **TINY_CFG, **overrides}
    if entry in ("study", "explanations"):
        if entry == "study":
            from scripts.evaluation.study import main

            argv = ["--datalist", str(datalist), "--work_dir", str(out / "work"), "--output", str(out / "results"),
                    "--override", json.dumps({**TINY_CFG, "num_epochs": 1, **overrides}),
                    "--grid", json.dumps({"learning_rate": [1e-3]})]
        else:
            from scripts.evaluation.explain_eval import main

            argv = ["--ckpt", str(ckpt_dir / "model.pt"), "--reduced", "--methods", "lrp_a2b1", "--output", str(out),
                    "--override", json.dumps({"datalist": str(datalist), **TINY_CFG, **overrides})]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, f"{entry} exited {code}: {err[-2000:]}"
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: "), err[-2000:]
        return last
    config, run_id = {"training": (["train.json"], "training"),
                      "evaluation": (["train.json", "evaluate.json"], "evaluating"),
                      "inference": (["inference.json"], "inference")}[entry]
    settings = {"ckpt_dir": str(ckpt_dir if entry != "training" else out / "models"), "output_dir": str(out),
                "num_epochs": 1, "lrp_presets": ["a2b1"]}
    with pytest.raises(Exception) as info:
        run_bundle_workflow(config, run_id, {**common, **settings, **overrides})
    cause = bundle_input_error(info.value)
    assert cause is not None, f"{entry}: not a clear input error: {info.value!r}"
    return str(cause)


def _no_outputs(out: Path) -> list[str]:
    """Files that a failed run left behind (TensorBoard's event files and the skip report aside)."""
    return [str(p) for p in out.rglob("*") if p.is_file() and "tensorboard" not in p.parts
            and p.name != "skipped.csv" and not p.name.startswith("bad_")]


@pytest.mark.parametrize("case", [*IMAGE_CASES, *OTHER_CASES])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_bad_input_battery(entry, case, tmp_path, cohort, trained, capsys):
    if case == "override_type":
        overrides, expected_text = OVERRIDES[entry]
        datalist, _ = _case_datalist("none", entry, cohort, tmp_path)
        reason = expected_text
        expected = expected_text
    else:
        overrides = {}
        datalist, expected = _case_datalist(case, entry, cohort, tmp_path)
        reason = {**IMAGE_CASES, **OTHER_CASES}[case]
    out = tmp_path / "out"
    message = _run(entry, datalist, out, trained[0], overrides, capsys)
    assert expected in message and reason in message, message
    assert _no_outputs(out) == []


def test_command_line_errors_are_one_clear_line(tmp_path, cohort, trained):
    datalist, bad = _case_datalist("truncated", "inference", cohort, tmp_path)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
           "--datalist", str(datalist), "--ckpt_dir", str(trained[0]), "--output_dir", str(tmp_path / "o"), *TINY]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-2] == f"error: {bad}: not a readable NIfTI image " \
        f"({proc.stderr.split('not a readable NIfTI image (')[1].split(chr(10))[0]}"
    assert "Traceback" not in proc.stderr
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PRETERM_TRACEBACK="1"))
    assert proc.returncode == 1 and "Traceback" in proc.stderr and bad in proc.stderr


def test_inference_skips_every_bad_case_and_processes_the_good(tmp_path, cohort, trained):
    folder = tmp_path / "mixed"
    good = cohort / "images" / "sub-0001.nii.gz"
    for case in IMAGE_CASES:
        if case != "missing":
            make_bad_image(case, folder, good)
    for name in ("sub-0001", "sub-0002"):
        (folder / f"{name}.nii.gz").symlink_to(cohort / "images" / f"{name}.nii.gz")
    out = tmp_path / "out"
    run_bundle_workflow(["inference.json"], "inference", {
        "dataset_dir": str(folder), "ckpt_dir": str(trained[0]), "output_dir": str(out), "skip_bad": True,
        "lrp_presets": ["a2b1"], **TINY_CFG})
    skipped = {r["subject"]: r["reason"] for r in csv.DictReader((out / "skipped.csv").open())}
    assert set(skipped) == {f"bad_{c}" for c in IMAGE_CASES if c != "missing"}
    for case, reason in IMAGE_CASES.items():
        if case != "missing":
            assert reason in skipped[f"bad_{case}"] and str(folder / f"bad_{case}.nii.gz") in skipped[f"bad_{case}"]
    assert sorted(r["subject"] for r in csv.DictReader((out / "predictions.csv").open())) == ["sub-0001", "sub-0002"]


def _complete(out: Path) -> None:
    """Every non-hidden file is complete and readable; returns nothing, fails otherwise."""
    for path in out.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.name.endswith(".nii.gz"):
            assert np.isfinite(nib.load(path).get_fdata()).all(), path  # reads to the end: gzip CRC checked
        elif path.suffix == ".csv":
            rows = list(csv.reader(path.open()))
            assert rows and all(len(r) == len(rows[0]) for r in rows), path
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)


def _kill_when(proc, condition, timeout=300):
    start = time.monotonic()
    while not condition():
        assert proc.poll() is None, f"finished before it could be killed:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() - start < timeout, "timed out waiting to kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_inference_killed_midway_leaves_complete_files_and_resumes(tmp_path, cohort):
    from scripts.runtime.network import PretermCNN

    torch.manual_seed(0)  # a full-size input with a narrow network: slow enough to be killed mid-run
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    torch.save(PretermCNN(channels=(4, 8), hidden=8).state_dict(), ckpt / "model.pt")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", "configs/inference.json",
           "--dataset_dir", str(cohort), "--split", "all", "--ckpt_dir", str(ckpt), "--output_dir", str(out),
           "--channels", "[4,8]", "--hidden", "8", "--normalisation", "zscore"]  # weights without a record: z-score
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def finished():
        path = out / "predictions.csv"
        return path.is_file() and len(path.read_text().splitlines()) >= 6  # header + 5 subjects

    _kill_when(proc, finished)
    assert proc.returncode == -signal.SIGKILL
    _complete(out)
    done = [r["subject"] for r in csv.DictReader((out / "predictions.csv").open())]
    assert 5 <= len(done) < 24
    stamps = {p: p.stat().st_mtime_ns for s in done for p in (out / s).iterdir()}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(done)} of 24 subjects already finished" in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished subjects were not redone
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 24 and len({r["subject"] for r in rows}) == 24
    assert len(list(csv.DictReader((out / "relevance.csv").open()))) == 24 * 4  # default: APP_PRESET, a1b0, a2b1, a3b2
    assert not [p for p in out.rglob(".*.tmp*")], "temporaries of the killed run remain"
    _complete(out)


def test_training_killed_midway_resumes_from_the_last_epoch(tmp_path, cohort):
    models, out = tmp_path / "models", tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--dataset_dir", str(cohort), "--ckpt_dir", str(models), "--output_dir", str(out), "--num_epochs", "6",
           *TINY]

    def two_epochs_saved():
        try:
            return torch.load(models / "resume.pt", weights_only=True)["trainer"]["epoch"] >= 2
        except (FileNotFoundError, RuntimeError, EOFError, KeyError):
            return False

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _kill_when(proc, two_epochs_saved)
    _complete(models)
    before = torch.load(models / "resume.pt", weights_only=True)
    killed_at = before["trainer"]["epoch"]
    assert 2 <= killed_at < 6
    assert not (models / "model.pt").exists()  # checkpoint: last -- written when training completes, not before
    proc = subprocess.run(cmd + ["--resume", "true"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert f"resumed from {models / 'resume.pt'}: epoch {killed_at} of 6 done" in log
    assert f"Engine run resuming from iteration {before['trainer']['iteration']}, epoch {killed_at} until 6" in log
    after = torch.load(models / "resume.pt", weights_only=True)
    per_epoch = before["trainer"]["epoch_length"]
    assert after["trainer"]["epoch"] == 6 and after["trainer"]["iteration"] == 6 * per_epoch
    # optimizer and LR schedule continued: Adam's step count and the scheduler's position are over all 6 epochs
    assert int(next(iter(after["optimizer"]["state"].values()))["step"]) == 6 * per_epoch
    assert after["lr_scheduler"]["last_epoch"] == 6 * per_epoch
    assert after["best"]["metric"] >= before["best"]["metric"]
    model = torch.load(models / "model.pt", weights_only=True)  # the last epoch's network
    assert model.keys() == after["network"].keys()
    assert all(torch.equal(model[k], after["network"][k]) for k in model)
    _complete(models)

    # run again with resume: everything is done, nothing is trained
    proc = subprocess.run(cmd + ["--resume", "true"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "training had already finished all 6 epochs" in proc.stdout + proc.stderr


def test_checkpoint_best_saves_at_validation_not_at_the_end(tmp_path, cohort):
    """``--checkpoint best``: model.pt comes from the validation saver, so it is there after the first validated
    epoch of a run that is then killed (with the default ``last`` it is not: the test above)."""
    models = tmp_path / "models"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "configs/train.json",
           "--dataset_dir", str(cohort), "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "out"),
           "--num_epochs", "6", "--checkpoint", "best", *TINY]

    def one_epoch_saved():
        try:
            return torch.load(models / "resume.pt", weights_only=True)["trainer"]["epoch"] >= 1
        except (FileNotFoundError, RuntimeError, EOFError, KeyError):
            return False

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _kill_when(proc, one_epoch_saved)
    _complete(models)
    assert torch.load(models / "resume.pt", weights_only=True)["trainer"]["epoch"] < 6
    assert (models / "model.pt").is_file()


def test_final_checkpoint_only_when_training_completes(tmp_path):
    """``checkpoint: last``'s saver (train.json) on a real Ignite engine: a run that raises keeps the model.pt it had
    (MONAI's own CheckpointSaver would save the interrupted network there); a run that completes replaces it."""
    from ignite.engine import Engine

    from scripts.runtime.handlers import AtomicCheckpointSaver

    network = torch.nn.Linear(2, 1)
    previous = {k: v + 1 for k, v in network.state_dict().items()}
    torch.save(previous, tmp_path / "model.pt")

    def step(engine, batch):
        with torch.no_grad():
            network.weight.add_(1.0)
        if engine.fail and engine.state.iteration == 2:
            raise RuntimeError("disk full")

    for fail in (True, False):
        engine = Engine(step)
        engine.fail = fail
        AtomicCheckpointSaver(str(tmp_path), {"model": network}, save_final=True,
                              final_filename="model.pt").attach(engine)
        if fail:
            with pytest.raises(RuntimeError, match="disk full"):
                engine.run([0, 1, 2], max_epochs=1)
            kept = torch.load(tmp_path / "model.pt", weights_only=True)
            assert all(torch.equal(kept[k], previous[k]) for k in previous)
        else:
            engine.run([0, 1, 2], max_epochs=1)
            saved = torch.load(tmp_path / "model.pt", weights_only=True)
            assert all(torch.equal(saved[k], v) for k, v in network.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


class _Payload:
    """Pickles to a call that creates a file: a weights-only loader must refuse to run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("case", ["unexpected_key", "wrong_shape", "code"])
def test_checkpoints_load_weights_only_and_strictly(case, tmp_path, cohort, trained):
    state = torch.load(trained[0] / "model.pt", weights_only=True)
    ckpt = tmp_path / "models"
    ckpt.mkdir()
    marker = tmp_path / "code_ran"
    if case == "unexpected_key":
        state["head.extra"] = torch.zeros(3)
        expected = ['Unexpected key(s) in state_dict: "head.extra"']
    elif case == "wrong_shape":
        name = next(k for k, v in state.items() if v.ndim == 5)
        state[name] = torch.zeros(3, *state[name].shape[1:])
        expected = [f"size mismatch for {name}", "torch.Size([3,"]
    else:
        state["payload"] = _Payload(marker)
        expected = ["Weights only load failed"]
    torch.save(state, ckpt / "model.pt")
    stage_qc_reference(trained[0], ckpt)  # the trained weights' record of their normalisation
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file",
                           "configs/inference.json", "--dataset_dir", str(cohort), "--ckpt_dir", str(ckpt),
                           "--output_dir", str(tmp_path / "out"), *TINY], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0
    for text in expected:
        assert text in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists()
    assert not (tmp_path / "out" / "predictions.csv").exists()
