"""Watching a run: progress of training epochs and of long loops, and the relevance map of one validation subject
in TensorBoard (Ignite handlers in MONAI style: ``__init__`` configures, ``attach`` registers, ``__call__`` runs).

``TrainingProgress``      ignite's ``ProgressBar`` over each epoch's iterations when stderr is a terminal, and one
                          summary line per epoch (loss, training and validation metrics, best so far, LR, time)
``TensorBoardRelevance``  after each validation: the LRP map of one fixed validation subject over its input,
                          a few slices per plane, as a TensorBoard image

(``scripts.runtime.progress`` does the same for plain loops: the synthetic cohort, the preprocessing.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers.tensorboard_handlers import TensorBoardHandler

from scripts.runtime.explain import affine_of, explain
from scripts.runtime.outputs import source_file
from scripts.runtime.progress import wants_bar
from scripts.runtime.visual import overlay_mosaic

__all__ = ["TensorBoardRelevance", "TrainingProgress"]

logger = logging.getLogger(__name__)


def _loss(output) -> float | None:
    items = output if isinstance(output, list) else [output]
    values = [float(torch.as_tensor(o["loss"]).detach().float().mean()) for o in items
              if isinstance(o, Mapping) and "loss" in o]
    return values[0] if values else None


def _metrics(metrics: Mapping) -> str:
    parts = []
    for name, value in metrics.items():
        try:
            parts.append(f"{name} {float(value):.3f}")
        except (TypeError, ValueError):
            continue
    return ", ".join(parts)


class TrainingProgress:
    """Progress of training: ignite's ``ProgressBar`` over each epoch's iterations (running loss) when ``bar``
    (default ``"auto"``: when stderr is a terminal), and after each epoch, once its validation has run, one line::

        epoch 3/14: loss 0.512 | train_accuracy 0.810 | val_auc 0.930 (best 0.950 at epoch 2), ... | lr 3.2e-04 | 55.1 s

    Attach it after the ``ValidationHandler`` (the summary reads the validation that handler ran); rank 0 only.

    Args:
        bar: ``"auto"``, True or False.
        evaluator: the validation evaluator whose metrics and best metric go into the summary line.
    """

    def __init__(self, bar: bool | str | None = "auto", evaluator: Engine | None = None) -> None:
        self.bar = wants_bar(bar)
        self.evaluator = evaluator
        self._losses: list[float] = []
        self._start = 0.0
        self._pbar: ProgressBar | None = None

    def attach(self, engine: Engine) -> None:
        if self.bar:
            self._pbar = ProgressBar(persist=False, desc="train")
            self._pbar.attach(engine, output_transform=lambda output: {"loss": _loss(output) or 0.0})
            # close the bar after the epoch's last iteration, before the validation run at EPOCH_COMPLETED logs
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._close_bar)
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _close_bar(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        if self._pbar is not None and length and engine.state.iteration % length == 0:
            self._pbar._close(engine)  # ignite's own closing handler; it runs again at EPOCH_COMPLETED (no-op)

    def _epoch_started(self, engine: Engine) -> None:
        self._losses = []
        self._start = time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        loss = _loss(engine.state.output)
        if loss is not None:
            self._losses.append(loss)

    def summary(self, engine: Engine) -> str:
        """The summary line of the epoch that just completed."""
        parts = [f"epoch {engine.state.epoch}/{engine.state.max_epochs}: loss "
                 + (f"{np.mean(self._losses):.4f}" if self._losses else "-")]
        train = _metrics(engine.state.metrics)
        if train:
            parts.append(train)
        evaluator = self.evaluator
        if evaluator is not None and getattr(evaluator.state, "metrics", None) and \
                getattr(evaluator.state, "epoch", 0) == engine.state.epoch:
            validation = _metrics(evaluator.state.metrics)
            best_epoch = getattr(evaluator.state, "best_metric_epoch", -1)
            if best_epoch is not None and best_epoch > 0:
                validation += f" (best {float(evaluator.state.best_metric):.3f} at epoch {best_epoch})"
            parts.append(validation)
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None and optimizer.param_groups:
            parts.append(f"lr {optimizer.param_groups[0]['lr']:.2e}")
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        return " | ".join(parts)

    def __call__(self, engine: Engine) -> None:
        logger.info(self.summary(engine))


class TensorBoardRelevance(TensorBoardHandler):
    """After every validation run: the LRP relevance of one fixed subject (e.g. the first validation item) over
    its network input, ``slices`` slices per plane with symmetric colour limits (``scripts.runtime.visual``), as the
    TensorBoard image ``relevance/<subject>`` at the training epoch; and its colour limit as a scalar.

    Attach it to the validation evaluator (its handlers run on rank 0 only under torch.distributed).

    Args:
        item: the datalist item to explain (``image`` path, any other keys).
        transform: the deterministic preprocessing (``validate#preprocessing``).
        preset / target: the LRP preset and the explained class (``pred``, a class index, ``difference``).
        network: the model (default: the evaluator's).
        slices: slices per plane.
        summary_writer / log_dir: as MONAI's ``TensorBoardStatsHandler``.
    """

    def __init__(self, item: Mapping, transform, preset: str = "a2b1", target: str | int = "pred",
                 network: torch.nn.Module | None = None, slices: int = 3, summary_writer=None,
                 log_dir: str = "./runs", tag: str = "relevance") -> None:
        super().__init__(summary_writer=summary_writer, log_dir=log_dir)
        self.item = dict(item)
        self.transform = transform
        self.preset, self.target = preset, target
        self.network = network
        self.slices = int(slices)
        self.tag = tag
        self._image = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self._image is None:
            self._image = self.transform(dict(self.item))["image"]
        image = self._image
        network = self.network if self.network is not None else engine.network
        explained = explain(network, torch.as_tensor(image)[None], [self.preset], self.target)
        relevance = explained.relevance(0, self.preset)[0].numpy()
        mosaic = overlay_mosaic(relevance, affine_of(image), torch.as_tensor(image)[0].cpu().numpy(),
                                slices=self.slices)
        subject = source_file({"image": image})[0] if getattr(image, "meta", None) else "subject"
        step = engine.state.epoch
        self._writer.add_image(f"{self.tag}/{subject}", mosaic.as_uint8(), step, dataformats="HWC")
        self._writer.add_scalar(f"{self.tag}/{subject}/colour_limit", mosaic.limit, step)
        self._writer.flush()
