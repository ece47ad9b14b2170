"""Benchmark: the bundle's Ignite training (train.json's trainer, the consistency trainer, with its handlers,
postprocessing and metrics) against a plain hand-written PyTorch loop doing the same work (each scan and its view
acquired on another grid in one batch, the same loss) on the same model, optimizer, scheduler and cached tensors,
in one process, alternating the two so that machine noise hits both.

    python benchmarks/training_throughput.py [--subjects 16] [--epochs 1] [--rounds 6]

Prints volumes/s for both and their ratio (goal: bundle >= 0.95x plain).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(dataset_dir: str, subjects: int, epochs: int):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "train.json"))
    parser.update({
        "bundle_root": str(ROOT), "dataset_dir": dataset_dir, "generate_synthetic": True,
        "synthetic_subjects": subjects, "fold": -1,
        "num_epochs": epochs, "output_dir": str(Path(dataset_dir) / "out"),
        "ckpt_dir": str(Path(dataset_dir) / "models"),
    })
    # training throughput only: no per-epoch validation
    # (and no references to the validation evaluator, whose fold is empty with fold=-1); nor the handlers that run
    # once when training completes (the QC reference over the training split, the final model.pt): with one epoch
    # per round they would be timed as if every epoch paid them
    once = ("ValidationHandler", "$@runtime.qc.QCReferenceWriter")
    handlers = [h for h in parser["train"]["handlers"] if h["_target_"] not in once and "save_final" not in h]
    parser["train"]["handlers"] = [{k: v for k, v in h.items() if k not in ("evaluator", "key_metric_saver")}
                                   for h in handlers]
    return parser


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--dataset-dir", default=None, help="reuse a synthetic cohort folder (created if empty)")
    args = ap.parse_args(argv)
    import monai

    tmp = tempfile.TemporaryDirectory()
    dataset_dir = args.dataset_dir or str(Path(tmp.name) / "cohort")
    parser = build(dataset_dir, args.subjects, args.epochs)
    monai.utils.set_determinism(seed=0)
    trainer = parser.get_parsed_content("train#trainer")
    loader = parser.get_parsed_content("train#dataloader")
    network = parser.get_parsed_content("network")
    optimizer = parser.get_parsed_content("optimizer")
    scheduler = parser.get_parsed_content("lr_scheduler")
    loss_fn = trainer.loss_function  # train.json's ConsistencyLoss (class-weighted CE + margin consistency)
    device = parser.get_parsed_content("device")
    n_items = len(loader.dataset)
    for _ in loader:  # caching is done by CacheDataset at construction; one pass warms the loader
        pass

    def plain(epochs):
        network.train()
        for _ in range(epochs):
            for batch in loader:
                # plain tensors: what a hand-written loop would feed the network
                x = torch.cat([batch["image"].as_tensor(), batch["view"].as_tensor()]).to(device)
                y = torch.cat([batch["label"], batch["label"]]).to(device)
                optimizer.zero_grad(set_to_none=False)
                loss = loss_fn(network(x), y)
                loss.backward()
                optimizer.step()
                scheduler.step()

    def bundle(epochs):
        trainer.state.max_epochs = epochs  # a finished Ignite engine restarts from epoch 0 on run()
        trainer.run()

    results = {"bundle (Ignite trainer from train.json)": [], "plain PyTorch loop": []}
    bundle(1)  # warm-up both paths once
    plain(1)
    order = [("bundle (Ignite trainer from train.json)", bundle), ("plain PyTorch loop", plain)]
    for round_ in range(args.rounds):
        for label, fn in order if round_ % 2 == 0 else order[::-1]:  # ABBA: drifts in machine speed hit both
            start = time.perf_counter()
            fn(args.epochs)
            results[label].append(n_items * args.epochs / (time.perf_counter() - start))
    print(f"\nTraining throughput: {n_items} cached volumes of 1x128x96x96 (each with its view), "
          f"batch {loader.batch_size}, "
          f"{args.epochs} epochs x {args.rounds} rounds, {device}, {torch.get_num_threads()} threads\n")
    print("| loop | volumes/s, median of rounds | best round |")
    print("|---|---|---|")
    for label, values in results.items():
        print(f"| {label} | {statistics.median(values):.3f} | {max(values):.3f} |")
    a, b = results.values()
    print(f"\nbundle / plain: {statistics.median(a) / statistics.median(b):.3f}x (medians), "
          f"{max(a) / max(b):.3f}x (best rounds)")


if __name__ == "__main__":
    main()
