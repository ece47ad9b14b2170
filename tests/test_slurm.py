"""The study and DDP training submitted to a real single-node SLURM cluster (tests/slurm_cluster.py: slurmctld,
slurmd and munged started for the test session in a temporary folder, stopped by pid at the end).

- docs/slurm_study.sh as a job array of 3 shards, submitted with the documented command: the last task to finish
  runs the final stage, and the results equal a local ``--jobs 1`` run of the same study;
- an array task cancelled (scancel) during the cross-validation and resubmitted alone: it redoes only its
  unfinished run and runs the final stage; the task holding final.lock cancelled (the lock is released: SIGTERM)
  and killed (SIGKILL: a stale lock, removed by the next task); the same results;
- docs/slurm_train.sh: DDP training through ``srun --ntasks=2 --cpus-per-task=1`` on the one node (gloo), ranks
  from SLURM's task ids: the weights of torchrun's 2-process training.

Where SLURM is not installed the tests skip with one line saying so."""

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, ddp_training_args
from slurm_cluster import free_port, slurm_cluster
from test_study_shards import GRID, TINY_STUDY, _study, _tables, two_fold_datalist

SHARDS = 3  # 4 runs (2 settings x 2 folds): shard 1 owns runs 0 and 3, shards 2 and 3 one run each
STUDY_OPTIONS = ["--override", json.dumps(TINY_STUDY), "--grid", json.dumps(GRID), "--presets", "a2b1"]
FIRST = Path("cv", "learning_rate-0.001", "fold0", "result.json")  # shard 1's first run (run 0)
SECOND = Path("cv", "learning_rate-0.0003", "fold1", "result.json")  # ... and its second (run 3)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def study_datalist(slurm, tmp_path_factory, cohort):
    return two_fold_datalist(cohort, tmp_path_factory.mktemp("slurm_study") / "datalist.json")


@pytest.fixture(scope="module")
def local_jobs_1(slurm, study_datalist, tmp_path_factory):
    """The reference: the same study run locally with ``--jobs 1 --threads 1``."""
    work = tmp_path_factory.mktemp("local_jobs_1")
    _study(study_datalist, work, "--jobs", "1", "--threads", "1")
    return _tables(work / "out")


def _sbatch_study(slurm, datalist, tmp: Path, array: str, *flags: str):
    """(command, environment) of the documented submission: SHARDS=3 DATALIST=... WORK=... PYTHON=... sbatch
    --export=ALL --array=<array> --cpus-per-task=1 --mem=2G --time=00:30:00 docs/slurm_study.sh <study options>;
    logs in <tmp>/logs."""
    (tmp / "logs").mkdir(exist_ok=True)
    env = dict(slurm.env, SHARDS=str(SHARDS), DATALIST=str(datalist), WORK=str(tmp / "w"), OUTPUT=str(tmp / "out"),
               PYTHON=sys.executable)
    cmd = ["sbatch", "--export=ALL", f"--array={array}", "--cpus-per-task=1", "--mem=2G", "--time=00:30:00",
           "--parsable", f"--output={tmp / 'logs' / 'study-%A_%a.log'}", *flags, "docs/slurm_study.sh",
           *STUDY_OPTIONS]
    return cmd, env


def _submit(slurm, datalist, tmp: Path, array: str, *flags: str, timeout: float = 60):
    cmd, env = _sbatch_study(slurm, datalist, tmp, array, *flags)
    proc = slurm.run(*cmd, env=env, cwd=ROOT, timeout=timeout, check=False)
    return proc.stdout.strip().split(";")[0], proc


def _log(tmp: Path, job: str, task: int) -> str:
    return (tmp / "logs" / f"study-{job}_{task}.log").read_text(errors="replace")


def _wait_for(condition, what: str, slurm, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout} s\n{slurm.logs()}")
        time.sleep(0.05)


def _lock_holder(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # not there, or created and not written yet


def test_study_array_the_last_task_runs_the_final_stage(slurm, study_datalist, local_jobs_1, tmp_path):
    start = time.monotonic()
    job, proc = _submit(slurm, study_datalist, tmp_path, f"1-{SHARDS}", "--wait", timeout=900)
    seconds = time.monotonic() - start
    logs = {k: _log(tmp_path, job, k) for k in range(1, SHARDS + 1)}
    assert proc.returncode == 0, f"{proc.stderr}\n" + "\n".join(logs.values())[-6000:]
    assert [slurm.job_state(f"{job}_{k}") for k in range(1, SHARDS + 1)] == ["COMPLETED"] * SHARDS
    for k, log in logs.items():
        assert f"shard {k}/{SHARDS}: {2 if k == 1 else 1} of the 4 cross-validation runs" in log
    assert sum(log.count("running the final stage") for log in logs.values()) == 1
    assert _tables(tmp_path / "out") == local_jobs_1
    assert not (tmp_path / "w" / "final.lock").exists()
    print(f"SLURM array of {SHARDS} shards incl. the final stage: {seconds:.0f} s")


def test_cancelled_task_resumes_and_the_final_stage_survives_cancel_and_kill(slurm, study_datalist, local_jobs_1,
                                                                             tmp_path):
    work, out, lock = tmp_path / "w", tmp_path / "out", tmp_path / "w" / "final.lock"
    start = time.monotonic()
    cmd, env = _sbatch_study(slurm, study_datalist, tmp_path, f"1-{SHARDS}", "--wait")
    array = slurm.popen(cmd, env=env, cwd=ROOT)
    try:
        job = array.stdout.readline().strip().split(";")[0]  # --parsable: the job id, then --wait waits
        _wait_for(lambda: (work / FIRST).exists(), "shard 1's first finished run", slurm)
        slurm.run("scancel", f"{job}_1")  # shard 1 cancelled during its second run
        assert slurm.wait_until_ended(f"{job}_1") == "CANCELLED"
        assert (work / FIRST).exists() and not (work / SECOND).exists()  # a run is still unfinished
        # sbatch --wait returns once every task has ended; its exit status is not checked: the test cluster forgets
        # a finished task after 4 s (MinJobAge), so the status of a task cancelled long before the others is lost
        array.communicate(timeout=600)
    finally:
        if array.poll() is None:
            array.kill()
            array.wait()
    for k in (2, 3):
        assert slurm.job_state(f"{job}_{k}") == "COMPLETED"
        missing = re.search(r"runs of other shards are not finished yet \((.*?)\)", _log(tmp_path, job, k))
        assert missing and "learning_rate-0.0003 fold 1" in missing[1].split(", ")
    assert not out.exists() and not lock.exists()

    # shard 1 resubmitted alone: redoes its unfinished run, then (the last) claims the final stage: cancelled there
    again, proc = _submit(slurm, study_datalist, tmp_path, "1")
    assert proc.returncode == 0, proc.stderr
    _wait_for(lambda: _lock_holder(lock) is not None, "the final-stage lock", slurm)
    slurm.run("scancel", again)
    assert slurm.wait_until_ended(f"{again}_1") == "CANCELLED"
    log = _log(tmp_path, again, 1)
    assert "fold 0 of learning_rate-0.001 already finished" in log and (work / SECOND).exists()
    assert "running the final stage" in log and not (out / "study.md").exists()
    assert not lock.exists(), "SIGTERM: the cancelled task releases the lock"

    # again, now killed in the final stage without a chance to clean up (the OOM killer, a crash): a stale lock
    again, proc = _submit(slurm, study_datalist, tmp_path, "1")
    assert proc.returncode == 0, proc.stderr
    _wait_for(lambda: _lock_holder(lock) is not None, "the final-stage lock", slurm)
    holder = _lock_holder(lock)
    os.kill(holder["pid"], signal.SIGKILL)
    assert slurm.wait_until_ended(f"{again}_1") == "FAILED"
    assert _lock_holder(lock) == holder  # left behind

    # and once more: the holder is gone, the lock is removed, the final stage runs
    again, proc = _submit(slurm, study_datalist, tmp_path, "1", "--wait", timeout=900)
    log = _log(tmp_path, again, 1)
    assert proc.returncode == 0, proc.stderr + log[-6000:]
    assert f"removed the stale lock {lock} of pid {holder['pid']}" in log and "running the final stage" in log
    assert not lock.exists()
    assert _tables(out) == local_jobs_1
    print(f"cancel, resubmit, cancel and kill in the final stage, resubmit: {time.monotonic() - start:.0f} s")


def test_ddp_training_through_srun_equals_torchrun(slurm, cohort, ddp_trained, tmp_path):
    start = time.monotonic()
    out = tmp_path / "ddp"
    out.mkdir()
    env = dict(slurm.env, PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    proc = slurm.run("sbatch", "--export=ALL", "--wait", "--parsable", "--nodes=1", "--ntasks=2", "--cpus-per-task=1",
                     "--mem=2G", "--time=00:30:00", f"--output={out / 'ddp-%j.log'}", "docs/slurm_train.sh",
                     *ddp_training_args(cohort, out), env=env, cwd=ROOT, timeout=900, check=False)
    job = proc.stdout.strip().split(";")[0]
    log = (out / f"ddp-{job}.log").read_text(errors="replace")
    assert proc.returncode == 0, proc.stderr + log[-6000:]
    seconds = time.monotonic() - start
    assert slurm.job_state(job) == "COMPLETED" and "Epoch[2] Complete" in log

    reference = torch.load(ddp_trained / "model.pt", weights_only=True)  # torchrun --nproc_per_node=2 (conftest.py)
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.allclose(state[key], value, rtol=0, atol=1e-6), key
    print(f"DDP training through SLURM, 2 processes: {seconds:.0f} s; max |weight difference| to torchrun's "
          f"{max(float((state[k] - v).abs().max()) for k, v in reference.items()):.2e}")
