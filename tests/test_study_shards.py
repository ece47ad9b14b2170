"""The study spread over processes: the shard rule, shards run concurrently (``--jobs 2`` and two independent
``--shard k/2`` processes) ending in the results of one unsharded run, a killed shard resuming, the final-stage
lock and its stale-lock removal, ``--merge``; and train.json's ``fast`` key on CPU (cache + ThreadDataLoader)."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from scripts.evaluation.cross_validation import cv_runs, expand_grid, parse_shard, run_bundle_workflow, shard_runs
from scripts.runtime.outputs import claim_lock, exclusive_lock, release_lock

TINY_STUDY = {"spatial_shape": [64, 48, 48], "pixdim": [2, 2, 2], "channels": [4, 8], "hidden": 8, "num_epochs": 1,
              "report": False}
GRID = {"learning_rate": [1e-3, 3e-4]}  # 2 settings x 2 folds = 4 runs: shard 1/2 owns both fold-0 runs
TABLES = ["study_cv_folds.csv", "study_cv.csv", "study_test_metrics.csv", "study_test_subjects.csv"]


def test_shard_assignment_covers_every_run_exactly_once():
    for grid in ({"learning_rate": [1e-3]}, GRID, {"learning_rate": [1e-3, 3e-4], "class_weight_factor": [1, 2]}):
        settings = expand_grid(grid)
        for folds in ([0, 1], [0, 1, 2], list(range(10))):
            runs = cv_runs(settings, folds)
            assert len(runs) == len(settings) * len(folds)
            for n in (1, 2, 3, 4, 7, 50):
                shards = [shard_runs(runs, k, n) for k in range(1, n + 1)]
                keys = sorted(json.dumps(run, sort_keys=True) for shard in shards for run in shard)
                assert keys == sorted(json.dumps(run, sort_keys=True) for run in runs)  # each once, none lost
                assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
                for i, run in enumerate(runs):  # the documented rule: run i (0-based) -> shard i % n + 1
                    assert run in shards[i % n]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("0/4", "5/4", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="1 <= k <= n"):
            parse_shard(bad)


def two_fold_datalist(cohort, path):
    """The cohort cut to 2 folds (its folds 0 and 1) and its test split, absolute image paths, written to ``path``."""
    def absolute(item):
        return {k: str(cohort / v) if k in ("image", "tissue", "phenotype") else v for k, v in item.items()}

    data = json.loads((cohort / "datalist.json").read_text())
    training = [absolute(it) for it in data["training"] if it["fold"] in (0, 1)]
    test = [absolute(it) for it in data["test"]]
    path.write_text(json.dumps({"training": training, "test": test}))
    return path


@pytest.fixture(scope="module")
def datalist(tmp_path_factory, cohort):
    """The session cohort cut to 2 folds and its test split (``two_fold_datalist``)."""
    return two_fold_datalist(cohort, tmp_path_factory.mktemp("shards") / "datalist.json")


def _cmd(datalist, work, *extra):
    return [sys.executable, "-m", "scripts.evaluation.study", "--datalist", str(datalist), "--work_dir",
            str(work / "w"), "--output", str(work / "out"), "--override", json.dumps(TINY_STUDY), "--grid",
            json.dumps(GRID), "--presets", "a2b1", *extra]


def _study(datalist, work, *extra, check=True):
    proc = subprocess.run(_cmd(datalist, work, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _tables(out):
    """The result tables without the run times (which differ between runs)."""
    return {name: [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader((out / name).open())]
            for name in TABLES}


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory, datalist):
    """One plain (unsharded) run with 1 torch thread: the reference tables."""
    work = tmp_path_factory.mktemp("unsharded")
    _study(datalist, work, "--threads", "1")
    return _tables(work / "out")


def test_jobs_2_equals_one_unsharded_run_and_trains_the_final_model_once(tmp_path, datalist, unsharded):
    proc = _study(datalist, tmp_path, "--jobs", "2", "--threads", "1")
    assert "all 2 shards finished" in proc.stdout
    assert _tables(tmp_path / "out") == unsharded
    logs = {k: (tmp_path / "w" / "logs" / f"shard-{k}-of-2.log").read_text() for k in (1, 2)}
    for k, log in logs.items():
        assert f"shard {k}/2: 2 of the 4 cross-validation runs" in log
    assert sum(log.count("training the final model on the whole training split") for log in logs.values()) == 1
    assert sum(log.count("running the final stage") for log in logs.values()) == 1
    assert len(list((tmp_path / "w" / "final" / "models").glob("model.pt"))) == 1
    assert not (tmp_path / "w" / "final.lock").exists()
    # the command line of the report is the one typed (--jobs 2), not a shard's
    report = (tmp_path / "out" / "study.md").read_text()
    assert "--shard" not in report and "--jobs 2 --threads 1`" in report


def test_concurrent_shards_a_killed_shard_resumes_and_a_stale_lock_is_removed(tmp_path, datalist, unsharded):
    work, out = tmp_path / "w", tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.Popen(_cmd(datalist, tmp_path, "--shard", "1/2", "--threads", "1"), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    two = subprocess.Popen(_cmd(datalist, tmp_path, "--shard", "2/2", "--threads", "1"), cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = work / "cv" / "learning_rate-0.001" / "fold0" / "result.json"  # shard 1's first run
    second = work / "cv" / "learning_rate-0.0003" / "fold0" / "result.json"  # ... and its second
    deadline = time.monotonic() + 300
    while not first.exists() and one.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    one.send_signal(signal.SIGKILL)  # shard 1 killed during its second run
    assert one.wait() == -signal.SIGKILL and first.exists() and not second.exists()
    log, _ = two.communicate(timeout=600)
    assert two.returncode == 0, log[-3000:]
    assert "runs of other shards are not finished yet (learning_rate-0.0003 fold 0)" in log
    assert not out.exists()  # the final stage is the last shard's

    merge = _study(datalist, tmp_path, "--merge", check=False)  # the final stage alone refuses, naming the run
    assert merge.returncode == 2 and "1 of 4 runs not finished (learning_rate-0.0003 fold 0)" in merge.stderr

    # shard 1 again: redoes only the killed run, then (the last to finish) starts the final stage: killed there
    one = subprocess.Popen(_cmd(datalist, tmp_path, "--shard", "1/2", "--threads", "1"), cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = work / "final.lock"
    while not (lock.exists() and lock.read_text()) and one.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    one.send_signal(signal.SIGKILL)
    log, _ = one.communicate()
    assert second.exists() and "fold 0 of learning_rate-0.001 already finished" in log
    holder = json.loads(lock.read_text())
    assert holder["pid"] == one.pid and holder["host"] == socket.gethostname()  # left by the killed shard

    proc = _study(datalist, tmp_path, "--shard", "1/2", "--threads", "1")  # its holder is gone: lock removed
    log = proc.stdout + proc.stderr
    assert f"removed the stale lock {lock} of pid {one.pid}" in log and "running the final stage" in log
    assert not lock.exists()
    assert _tables(out) == unsharded
    again = _study(datalist, tmp_path, "--shard", "2/2", "--threads", "1")  # a late shard: nothing left to do
    assert "the final stage was already run on them" in again.stdout + again.stderr


def test_final_stage_lock_is_exclusive_and_only_a_gone_holder_is_removed(tmp_path):
    lock = tmp_path / "final.lock"
    with exclusive_lock(lock) as (claimed, holder):
        assert claimed and holder["pid"] == os.getpid()
        assert json.loads(lock.read_text())["host"] == socket.gethostname()
        assert claim_lock(lock) == (False, holder)  # held by a live process (this one): refused
    assert not lock.exists()  # released

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for holder, removed in [({"pid": gone.pid, "host": socket.gethostname()}, True),  # crashed: removed
                                ({"pid": sleeper.pid, "host": socket.gethostname()}, False),  # alive: kept
                                ({"pid": gone.pid, "host": "another-node"}, False)]:  # not checkable: kept
            lock.write_text(json.dumps(holder))
            claimed, current = claim_lock(lock)
            assert claimed == removed
            if removed:
                assert json.loads(lock.read_text())["pid"] == os.getpid()
                release_lock(lock)
                assert not lock.exists()
            else:
                assert current == holder and json.loads(lock.read_text()) == holder
                release_lock(lock)  # not ours: left alone
                assert lock.exists()
                lock.unlink()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.fixture
def one_thread():
    """1 torch thread, as the study's shards (several threads on 2 busy cores are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fast_key_on_cpu_gives_the_normal_paths_metrics(tmp_path, datalist, one_thread):
    cuda = torch.cuda.is_available()
    results = {}
    for fast in ("false", "true"):  # as the CLI passes them
        out = tmp_path / fast
        workflow = run_bundle_workflow(["train.json"], "training", {
            "datalist": str(datalist), "ckpt_dir": str(out / "models"), "output_dir": str(out), "fast": fast,
            "device": "$torch.device('cpu')", "progress_bar": False, **TINY_STUDY, "num_epochs": 2})
        parser = workflow.parser
        loader = type(parser.get_parsed_content("train#dataloader")).__name__
        steps = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
        cached = [type(t).__name__ for t in parser.get_parsed_content("validate#dataset").transform.transforms]
        assert loader == ("ThreadDataLoader" if fast == "true" else "DataLoader")
        assert ("ToDeviced" in steps) == ("ToDeviced" in cached) == (fast == "true")
        if fast == "true":  # cached on the device: after the spatial steps, before the consistency view's copy
            assert steps.index("ToDeviced") == steps.index("EnsureTyped") + 1 == steps.index("CopyItemsd") - 1
            assert cached.index("ToDeviced") == cached.index("Normalisedd") + 1  # validation: after the normalisation
        on_gpu = fast == "true" and cuda  # AMP, cudnn.benchmark and cuDNN's non-deterministic kernels: CUDA only
        assert parser.get_parsed_content("train#trainer").amp is on_gpu
        assert torch.backends.cudnn.benchmark is on_gpu and torch.backends.cudnn.deterministic is not on_gpu
        evaluator = parser.get_parsed_content("validate#evaluator")
        results[fast] = ({k: float(v) for k, v in evaluator.state.metrics.items()},
                         torch.load(out / "models" / "model.pt", weights_only=True))
    (normal, normal_state), (fast, fast_state) = results["false"], results["true"]
    assert normal.keys() == fast.keys() and {"val_auc", "val_balanced_accuracy"} <= normal.keys()
    assert fast == pytest.approx(normal, abs=1e-6)
    for key, value in normal_state.items():
        assert torch.allclose(fast_state[key], value, atol=1e-6), key
