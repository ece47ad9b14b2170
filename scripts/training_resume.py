"""Resumable training: a MONAI-style handler (attach/__call__) for the trainer.

After every epoch (and after that epoch's validation) it writes ``<ckpt_dir>/resume.pt`` atomically: network,
optimizer and LR-scheduler state, the trainer's epoch/iteration, and the best validation metric so far with its
epoch. With ``resume=True`` it restores all of that before the first epoch, so a killed run continues where
it stopped and ``model.pt`` is only replaced by a model better than the best one before the kill. Everything
is loaded with torch's weights-only loader. The random state of the data augmentation is not restored, so a
resumed run is not bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scripts.nifti_io import atomic_target_for, remove_stale_temporaries

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["ResumableTraining"]

logger = logging.getLogger(__name__)


class ResumableTraining:
    """Args:
        ckpt_dir: folder of ``resume.pt`` (and of the models).
        network / optimizer / lr_scheduler: the objects whose state is saved and restored.
        resume: restore from ``resume.pt`` when it exists (otherwise start afresh and overwrite it).
        evaluator: the validation evaluator, whose best metric and epoch are saved and restored.
        key_metric_saver: the validation ``CheckpointSaver`` of the best model; told the best metric so far.
        key_metric_filename: that saver's file name.
        filename: name of the resume checkpoint.
    """

    def __init__(self, ckpt_dir: str, network, optimizer, lr_scheduler=None, resume: bool = False, evaluator=None,
                 key_metric_saver=None, key_metric_filename: str = "model.pt", filename: str = "resume.pt") -> None:
        self.path = Path(ckpt_dir) / filename
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.resume = resume
        self.evaluator = evaluator
        self.key_metric_saver = key_metric_saver
        self.key_metric_filename = key_metric_filename
        self._finished_before = False

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        remove_stale_temporaries(self.path.parent, depth=0)
        if self.resume and self.path.is_file():
            self._restore(engine)
        elif self.resume:
            logger.info("resume=true but %s does not exist: training starts from epoch 1", self.path)
        engine.add_event_handler(Events.STARTED, self._stop_if_finished)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _objects(self) -> dict:
        objects = {"network": self.network, "optimizer": self.optimizer}
        if self.lr_scheduler is not None:
            objects["lr_scheduler"] = self.lr_scheduler
        return objects

    def __call__(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return  # rank 0 writes; every rank restores
        state = {name: obj.state_dict() for name, obj in self._objects().items()}
        state["trainer"] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration,
                            "max_epochs": engine.state.max_epochs, "epoch_length": engine.state.epoch_length}
        if self.evaluator is not None:
            state["best"] = {"metric": float(self.evaluator.state.best_metric),
                             "epoch": int(self.evaluator.state.best_metric_epoch)}
        with atomic_target_for(self.path) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)  # via a file object: the archive's inner name does not vary with tmp

    def _restore(self, engine: Engine) -> None:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"resume checkpoint {self.path} is not readable ({type(err).__name__}: {err}); "
                             "delete it or set resume=false") from err
        missing = [k for k in [*self._objects(), "trainer"] if k not in state]
        if missing:
            raise ValueError(f"resume checkpoint {self.path} lacks {missing}; delete it or set resume=false")
        for name, obj in self._objects().items():
            try:
                obj.load_state_dict(state[name])
            except (RuntimeError, ValueError, KeyError) as err:
                raise ValueError(f"resume checkpoint {self.path}: the saved '{name}' does not fit this config "
                                 f"({err}); delete it or set resume=false") from err
        trainer = state["trainer"]
        max_epochs = engine.state.max_epochs
        engine.state.epoch, engine.state.iteration = int(trainer["epoch"]), int(trainer["iteration"])
        engine.state.epoch_length = int(trainer["epoch_length"])
        self._finished_before = engine.state.epoch >= max_epochs
        best = state.get("best")
        if best is not None and self.evaluator is not None:
            self.evaluator.state.best_metric = best["metric"]
            self.evaluator.state.best_metric_epoch = best["epoch"]
            if self.key_metric_saver is not None and best["epoch"] > 0:
                self.key_metric_saver.load_state_dict({"_saved": [(best["metric"], self.key_metric_filename)]})
        logger.info("resumed from %s: epoch %d of %d done (best validation metric %s at epoch %s)", self.path,
                    engine.state.epoch, max_epochs, best and best["metric"], best and best["epoch"])

    def _stop_if_finished(self, engine: Engine) -> None:
        if self._finished_before:
            logger.info("training had already finished all %d epochs (%s): nothing to do; raise num_epochs to "
                        "train longer", engine.state.max_epochs, self.path)
            engine.terminate()
