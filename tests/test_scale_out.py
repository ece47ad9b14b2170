"""TorchScript export through MONAI's ckpt_export, and torchrun (gloo on CPU, 2 processes): DDP training and
sharded inference in which every subject is written exactly once."""

import csv
import os
import subprocess
import sys

import nibabel as nib
import torch
from conftest import ROOT, TINY, read_json, tiny_args, torchrun


def test_torchscript_export_equals_eager(tmp_path, trained):
    ckpt_dir, _ = trained
    out = tmp_path / "model.ts"
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(out),
                           "--ckpt_file", str(ckpt_dir / "model.pt"), "--meta_file", "configs/metadata.json",
                           "--config_file", "configs/inference.json", *TINY], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from scripts.runtime.network import PretermCNN

    eager = PretermCNN(spatial_shape=(64, 48, 48), channels=(4, 8), hidden=8)
    eager.load_state_dict(torch.load(ckpt_dir / "model.pt", weights_only=True))
    scripted = torch.jit.load(str(out))
    x = torch.randn(3, 1, 64, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager.eval()(x), atol=1e-5)


def test_ddp_training_and_sharded_inference(tmp_path, cohort, ddp_trained):
    models = ddp_trained  # torchrun, 2 processes (conftest.py)
    state = torch.load(models / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # the unwrapped network, loadable without DDP
    assert torch.load(models / "resume.pt", weights_only=True)["trainer"]["epoch"] == 2
    assert not list(models.glob(".*"))

    out = tmp_path / "infer"
    proc = torchrun("inference", "--config_file", "['configs/inference.json','configs/multi_gpu_inference.json']",
                    "--dataset_dir", str(cohort), "--split", "all", "--ckpt_dir", str(models),
                    "--output_dir", str(out),
                    "--lrp_presets", "['a2b1']", *tiny_args(report=True))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = read_json(cohort / "datalist.json")
    subjects = sorted(it["subject"] for it in data["training"] + data["test"])
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert sorted(r["subject"] for r in rows) == subjects  # each subject exactly once, from both shards
    assert sorted(r["subject"] for r in csv.DictReader((out / "relevance.csv").open())) == subjects
    for s in subjects:
        assert nib.load(out / s / f"{s}_relevance_a2b1.nii.gz").shape == (64, 48, 48)
    assert not list(out.glob(".*")), "rank part files remain"
    # rank 0 writes the run report from the merged tables: every subject of both shards, each with its mosaic
    table = (out / "report" / "index.html").read_text().split('id="predictions"')[1]
    assert table.count("<tr") - 1 == len(subjects)  # a header row, then one row per subject
    for s in subjects:
        assert (out / "report" / s / f"{s}_mosaic_a2b1.png").is_file()
    log = proc.stdout + proc.stderr
    assert "Epoch[1] Complete" in log


FREED_AT_EXIT = """
import atexit, gc, sys
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from scripts.runtime.distributed import shutdown

def alive():  # registered first, so it runs after every handler registered later (atexit is last in, first out)
    ddp = [o for o in gc.get_objects() if isinstance(o, torch.nn.parallel.DistributedDataParallel)]
    print("DDP wrappers alive at exit:", len(ddp))

def main():
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=0, world_size=1)
    network = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    network(torch.ones(3, 4)).sum().backward()
    config = {{"network": network}}
    config["self"] = config  # a reference cycle, as the parsed bundle config and Ignite's engines hold the wrapper in
    shutdown()

atexit.register(alive)
main()
"""


def test_shutdown_frees_the_ddp_wrapper_and_its_process_group_while_python_runs(tmp_path):
    """scripts/runtime/distributed.py: the multi-GPU configs' finalize leaves no DDP wrapper (and so no gloo process
    group with live worker threads) to the interpreter's teardown, where a rank can abort after a finished run."""
    script = FREED_AT_EXIT.format(root=str(ROOT), store=str(tmp_path / "store"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDP wrappers alive at exit: 0" in proc.stdout, proc.stdout + proc.stderr[-3000:]
