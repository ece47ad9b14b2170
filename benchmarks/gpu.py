"""Benchmark for a GPU machine: train.json's training with and without the ``fast`` path, and LRP maps per second,
measured side by side in one process.

    python benchmarks/gpu.py                                   # CUDA: default settings, 160 synthetic subjects
    python benchmarks/gpu.py --epochs 3 --subjects 60 --json gpu.json
    python benchmarks/gpu.py --device cpu --epochs 1 --tiny    # smoke test of the script itself (no GPU)

Training: the default training of ``configs/train.json`` (fold 0, validation every epoch, its handlers) for
``--epochs`` epochs with ``fast=false`` (CacheDataset in host memory, DataLoader, fp32) and then ``fast=true``
(cache on the device via ``ToDeviced``, ThreadDataLoader, AMP, cudnn.benchmark); epochs per minute from the
median epoch after the first (the first includes cuDNN autotuning and warm-up), the cache build time and the peak
GPU memory (``torch.cuda.max_memory_allocated``) of each, and their ratios. LRP: ``scripts.lrp`` (the bundle's
engine, preset ``--preset``) on the default network (``network_def`` of train.json, random weights, eval mode),
maps per second for batches of 1, 4 and 16 and the peak GPU memory of each.

Without a CUDA device the script stops with a message (exit status 2) unless ``--device cpu``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = {"spatial_shape": [64, 48, 48], "pixdim": [2.0, 2.0, 2.0], "channels": [4, 8], "hidden": 8}
BATCHES = (1, 4, 16)


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:.0f}"


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def overrides(args, work: Path, fast: bool) -> dict:
    out = work / ("fast" if fast else "normal")
    settings = {"bundle_root": str(ROOT), "dataset_dir": args.dataset_dir, "synthetic_subjects": args.subjects,
                "fold": 0, "num_epochs": args.epochs, "fast": fast, "progress_bar": False,
                "ckpt_dir": str(out / "models"), "output_dir": str(out), "device": f"$torch.device('{args.device}')"}
    return {**settings, **(TINY if args.tiny else {}), **args.override}


def train(args, work: Path, fast: bool) -> dict:
    """One training run of train.json; times per epoch (train + validation + the epoch's handlers)."""
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    device = torch.device(args.device)
    _reset_peak(device)
    workflow = ConfigWorkflow(config_file=str(ROOT / "configs" / "train.json"), workflow_type=None,
                              run_id="training", **overrides(args, work, fast))
    workflow.initialize()  # seeds, cuDNN settings
    start = time.perf_counter()
    trainer = workflow.parser.get_parsed_content("train#trainer")  # builds the caches (train and validation)
    cache_seconds = time.perf_counter() - start
    marks: list[float] = []

    def mark(_):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())

    trainer.add_event_handler(Events.EPOCH_STARTED, mark)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, mark)  # added last: after validation and checkpoints
    workflow.run()
    epochs = [b - a for a, b in zip(marks[0::2], marks[1::2])]
    steady = epochs[1:] or epochs
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    result = {"fast": fast, "amp": bool(trainer.amp), "cudnn_benchmark": torch.backends.cudnn.benchmark,
              "loader": type(trainer.data_loader).__name__, "cache_seconds": cache_seconds,
              "epoch_seconds": epochs, "epochs_per_minute": 60.0 / statistics.median(steady),
              "peak_bytes": _peak(device),
              "val_metrics": {k: float(v) for k, v in evaluator.state.metrics.items()}}
    workflow.finalize()
    del workflow, trainer, evaluator
    return result


def lrp(args) -> list[dict]:
    """Maps per second of the bundle's LRP engine for each batch size (trace + one preset's relevance)."""
    from monai.bundle import ConfigParser

    from scripts.lrp import LRP

    device = torch.device(args.device)
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(ROOT), **(TINY if args.tiny else {}), **args.override})
    network = parser.get_parsed_content("network_def").to(device).eval()
    shape = list(parser.get_parsed_content("spatial_shape"))
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, 1, *shape, generator=torch.Generator().manual_seed(batch)).to(device)

        def one(x=x):
            return LRP(network).trace(x).relevance(args.preset, "pred").relevance

        one()  # warm-up (kernels, autotuning)
        _reset_peak(device)
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            maps = one()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            assert maps.shape == x.shape
            del maps
        seconds = statistics.median(times)
        rows.append({"batch": batch, "seconds_per_batch": seconds, "maps_per_second": batch / seconds,
                     "peak_bytes": _peak(device)})
    return rows


def report(args, results: dict) -> str:
    normal, fast = results["training"]
    lines = [f"\nGPU benchmark on {results['device_name']} (torch {torch.__version__}, "
             f"{'tiny settings' if args.tiny else 'default settings'}, {args.subjects} synthetic subjects, "
             f"{args.epochs} epochs per path)\n",
             "| training (train.json, fold 0) | loader | AMP | cudnn.benchmark | cache build s | s per epoch "
             "(each) | epochs/min | peak GPU MiB | val AUC |", "|---|---|---|---|---|---|---|---|---|"]
    for label, r in (("fast=false", normal), ("fast=true", fast)):
        lines.append(f"| {label} | {r['loader']} | {r['amp']} | {r['cudnn_benchmark']} | {r['cache_seconds']:.1f} | "
                     f"{', '.join(f'{s:.2f}' for s in r['epoch_seconds'])} | {r['epochs_per_minute']:.2f} | "
                     f"{_mib(r['peak_bytes'])} | {r['val_metrics'].get('val_auc', float('nan')):.3f} |")
    lines.append(f"\nfast / normal: {fast['epochs_per_minute'] / normal['epochs_per_minute']:.2f}x epochs per "
                 "minute" + (f", {fast['peak_bytes'] / max(normal['peak_bytes'], 1):.2f}x peak GPU memory"
                             if normal["peak_bytes"] else "")
                 + " (cache build times: the first path also pays the cold reads of the files)")
    base = results["lrp"][0]["maps_per_second"]
    lines += [f"\n| LRP ({args.preset}, scripts.lrp, default network) batch | maps/s | ms per map | peak GPU MiB | "
              "maps/s vs batch 1 |", "|---|---|---|---|---|"]
    for r in results["lrp"]:
        lines.append(f"| {r['batch']} | {r['maps_per_second']:.2f} | {1000 / r['maps_per_second']:.1f} | "
                     f"{_mib(r['peak_bytes'])} | {r['maps_per_second'] / base:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per training path (>= 2 for a steady figure)")
    ap.add_argument("--subjects", type=int, default=None,
                    help="synthetic subjects when --dataset-dir has no datalist (default 160, --tiny 16)")
    ap.add_argument("--dataset-dir", default=None, help="cohort folder (default: a temporary synthetic cohort)")
    ap.add_argument("--preset", default="a2b1")
    ap.add_argument("--repeats", type=int, default=5, help="timed LRP calls per batch size")
    ap.add_argument("--tiny", action="store_true", help=f"tiny network and grid {json.dumps(TINY)}")
    from scripts.evaluation.cli import json_object  # noqa: PLC0415 (after the bundle is on sys.path)

    ap.add_argument("--override", type=json_object, default={},
                    help='more train.json overrides as a JSON object, e.g. \'{"num_epochs": 2}\' (default: {}, none)')
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    args.subjects = args.subjects or (16 if args.tiny else 160)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device is visible (torch.cuda.is_available() is False): this benchmark measures the "
              "GPU fast path; run it on a GPU machine, or run `python benchmarks/gpu.py --device cpu --epochs 1 "
              "--tiny` to check the script itself", file=sys.stderr)
        return 2
    import logging

    logging.basicConfig(level=logging.WARNING)
    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    args.dataset_dir = str(Path(args.dataset_dir or work / "cohort").resolve())
    start = time.perf_counter()
    if not (Path(args.dataset_dir) / "datalist.json").is_file():
        from scripts.data.synthetic import generate_cohort

        # the default cohort (10 folds, 10 % test) as train.json generates it; fewer folds for small cohorts
        small = {} if args.subjects >= 100 else {"folds": 4, "test_fraction": 0.25}
        generate_cohort(args.dataset_dir, subjects=args.subjects, seed=0, **small)
    print(f"cohort ready in {time.perf_counter() - start:.0f} s: {args.dataset_dir}", flush=True)
    device = torch.device(args.device)
    results = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
               or "cpu", "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    results["training"] = [train(args, work, fast=False), train(args, work, fast=True)]
    results["lrp"] = lrp(args)
    print(report(args, results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
