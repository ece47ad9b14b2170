"""Consistency training (scripts/runtime/consistency.py, the default of configs/train.json): a real MONAI
trainer, data loader and post-processing on paired batches."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.handlers import from_engine
from monai.transforms import Activationsd, AsDiscreted, Compose, CopyItemsd, Lambdad

from scripts.runtime.consistency import ConsistencyLoss, ConsistencyTrainer, paired_batch


def test_paired_batch_stacks_the_views_and_repeats_the_rest():
    batch = {"image": torch.zeros(3, 1, 2, 2, 2), "view": torch.ones(3, 1, 2, 2, 2), "label": torch.tensor([0, 1, 1]),
             "subject": ["a", "b", "c"], "fold": 0}
    out = paired_batch(batch)
    assert "view" not in out and out["fold"] == 0
    assert torch.equal(out["image"], torch.cat([torch.zeros(3, 1, 2, 2, 2), torch.ones(3, 1, 2, 2, 2)]))
    assert out["label"].tolist() == [0, 1, 1, 0, 1, 1] and out["subject"] == ["a", "b", "c"] * 2
    with pytest.raises(ValueError, match="'view'"):
        paired_batch({"image": batch["image"], "label": batch["label"]})
    with pytest.raises(ValueError, match="shape"):
        paired_batch({**batch, "view": torch.ones(3, 1, 2, 2, 3)})


def test_consistency_loss_adds_the_squared_margin_difference():
    base = torch.nn.CrossEntropyLoss()
    pred = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    target = torch.tensor([1, 0, 1, 0])
    margins = pred[:, 1] - pred[:, 0]  # 1, -2 | 3, -1
    expected = base(pred, target) + 0.5 * ((margins[:2] - margins[2:]) ** 2).mean()
    assert torch.allclose(ConsistencyLoss(base, 0.5)(pred, target), expected)
    assert torch.allclose(ConsistencyLoss(base, 0.0)(pred, target), base(pred, target))
    with pytest.raises(ValueError, match="paired batch"):
        ConsistencyLoss(base)(pred[:3], target[:3])
    with pytest.raises(ValueError, match="weight"):
        ConsistencyLoss(base, -1.0)


def test_the_trainer_runs_monai_post_processing_and_metrics_on_both_views():
    torch.manual_seed(0)
    items = [{"image": torch.rand(1, 4, 4, 4), "label": i % 2} for i in range(4)]
    transform = Compose([CopyItemsd("image", names="view"), Lambdad("view", lambda x: x * 0.5)])
    loader = DataLoader(Dataset(items, transform), batch_size=2)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    seen = []
    trainer = ConsistencyTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=loader, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.0), loss_function=ConsistencyLoss(
            torch.nn.CrossEntropyLoss(), 1.0),
        postprocessing=Compose([Activationsd("pred", softmax=True), CopyItemsd("pred", names="pred_class"),
                                AsDiscreted("pred_class", argmax=True)]))

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        pred, image = from_engine(["pred_class", "image"])(engine.state.output)
        seen.append((len(pred), [float(x.mean()) for x in image]))

    trainer.run()
    assert [n for n, _ in seen] == [4, 4]  # two batches of two items, each item twice
    for _, means in seen:
        assert means[2:] == pytest.approx([m * 0.5 for m in means[:2]])  # the second half is the view


def test_the_default_training_is_the_recorded_consistency_experiment():
    """train.json adopted docs/experiments/consistency_acquired.json: the overlay changes nothing any more, and the
    default trainer and loss are the consistency ones."""
    from monai.bundle import ConfigParser  # noqa: PLC0415

    def parsed(*overlays):
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs" / "train.json"), *[str(ROOT / o) for o in overlays]])
        return parser

    default, overlaid = parsed(), parsed("docs/experiments/consistency_acquired.json")
    for key in ("train#random_transforms", "train#preprocessing#transforms", "train#trainer#_target_"):
        assert default.get(key) == overlaid.get(key), key
    trainer = default.get("train#trainer")
    assert trainer["_target_"] == "$@runtime.consistency.ConsistencyTrainer"
    assert trainer["loss_function"].startswith("$@runtime.consistency.ConsistencyLoss(@loss")
    steps = [step["_target_"] for step in default.get("train#random_transforms")]
    assert steps.index("CopyItemsd") < steps.index("$@runtime.transforms.RandAcquiredGridd")
    assert default.get("checkpoint") == "last"
