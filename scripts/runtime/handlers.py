"""The bundle's Ignite handlers (MONAI handler style: ``__init__`` configures, ``attach`` registers, ``__call__``
runs), all writing their files atomically:

``LRPHandler``             relevance maps per subject (through ``scripts.runtime.explain``) + ``relevance.csv``
``PredictionWriter``       ``predictions.csv`` rewritten after every batch (MONAI's ClassificationSaver writes once,
                           at the end and in place: a killed overnight run would have no table)
``AtomicCheckpointSaver``  MONAI's CheckpointSaver, files through a temporary name (its DiskSaver writes in place)
``AtomicMetricsSaver``     MONAI's MetricsSaver, the same way
``ResumableTraining``      ``resume.pt`` after every epoch and the restore of a killed training run
``RunSummary``             ``run inference``'s console lines (one per subject, then the counts) and its exit status

Under torch.distributed (``ignite.distributed`` gives rank and world size) each rank writes its own shard of the
tables and rank 0 the merged table and the checkpoints.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver, MetricsSaver

from scripts.runtime.explain import check_presets, explain, write_explanation
from scripts.runtime.outputs import (
    CrashSafeTable,
    atomic_target_for,
    read_rows,
    remove_stale_temporaries,
    report_index,
    source_file,
    subject_name,
)
from scripts.runtime.qc import COLUMNS as QC_COLUMNS
from scripts.runtime.qc import qc_row
from scripts.runtime.transforms import REGISTERED

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_PARTIAL", "AtomicCheckpointSaver", "AtomicMetricsSaver", "LRPHandler",
           "PredictionWriter", "ResumableTraining", "RunSummary", "run_if_pending", "subject_line"]

logger = logging.getLogger(__name__)
RELEVANCE_COLUMNS = ["subject", "preset", "pred", "prob_term", "prob_preterm", "target", "start_relevance",
                     "relevance_sum", "conservation", "run_key", *QC_COLUMNS]
PREDICTION_COLUMNS = ["subject", "image", "prob_term", "prob_preterm", "prediction", "label", "run_key",
                      *QC_COLUMNS]
CLASSES = ("term", "preterm")
# exit status of ``python -m monai.bundle run inference`` (docs/outputs.md, exit status):
# 0 every input has its prediction
# (this run's or an earlier one's with the same model and settings); 1 an error (the one-line ``error: ...`` of
# scripts.runtime.errors, or a traceback); 3 the run finished but some inputs have no prediction: refused by input
# QC (qc=refuse) or skipped as unreadable (skip_bad=true), or none predicted at all
EXIT_OK, EXIT_ERROR, EXIT_PARTIAL = 0, 1, 3


def run_if_pending(engine: Engine, data) -> None:
    """Run ``engine`` unless there is nothing left to do (every subject finished by an earlier run, or skipped)."""
    if len(data):
        engine.run()
    else:
        logger.info("nothing left to do: every usable subject is finished")


def _items(batch) -> list:
    return batch if isinstance(batch, list) else [batch]


def _qc(engine: Engine, subject: str) -> dict | None:
    """The input-QC verdict of ``subject`` (``QCHandler``), None without QC."""
    return getattr(engine.state, "qc", {}).get(subject)


class LRPHandler:
    """Write relevance maps for every subject an evaluator processes: per subject (file name without extensions)
    ``<subject>_relevance_<preset>.nii.gz`` on the network-input grid, optionally ``_input`` (the network input)
    and ``_relevance_<preset>_orig`` (the original image's grid), and one row per subject and preset in
    ``relevance.csv`` (rows of an earlier run with the same ``run_key`` are kept, so a resumed run completes it).

    Args:
        output_dir: folder for the per-subject folders and ``relevance.csv``.
        presets: LRP composites by name (``a1b0``, ``a2b1``, ``a3b2``, ``epsilon_a2b1``, ``zbox_a2b1``, ...).
        target: ``"pred"`` (predicted class), a class index, or ``"difference"`` (logit preterm - term).
        save_input: also write the preprocessed network input.
        save_original_space: also write each map on the original image's grid (inverse of ``transform``):
            ``True`` for every subject, ``"auto"`` for the native scans the preprocessing registered.
        transform: the preprocessing Compose (needed for ``save_original_space``).
        image_key / pred_key: keys of the network input and of the (softmax) prediction in the decollated batch.
        table_name: name of the per-subject table.
        network: the model to explain; defaults to ``engine.network``.
        run_key: identifies model and settings (``scripts.runtime.outputs.run_key``).
    """

    def __init__(self, output_dir: str, presets: Sequence[str] = ("a2b1",), target: str | int = "pred",
                 save_input: bool = True, save_original_space: bool | str = False, transform=None,
                 image_key: str = "image", pred_key: str = "pred", table_name: str = "relevance.csv",
                 network: torch.nn.Module | None = None, run_key: str = "") -> None:
        self.presets = check_presets(presets)
        if save_original_space and transform is None:
            raise ValueError("LRPHandler: save_original_space needs the preprocessing 'transform'")
        self.output_dir = Path(output_dir)
        self.target = target
        self.save_input = save_input
        self.save_original_space = save_original_space
        self.transform = transform if save_original_space else None
        self.image_key = image_key
        self.pred_key = pred_key
        self.network = network
        self.run_key = str(run_key)
        self.table = CrashSafeTable(self.output_dir / table_name, RELEVANCE_COLUMNS, key=("subject", "preset"))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.table.finish())

    def _start(self, engine: Engine) -> None:
        if self.run_key:
            self.table.load(keep=lambda row: row["run_key"] == self.run_key)

    def __call__(self, engine: Engine) -> None:
        kept = [(source_file(item, self.image_key)[0], item, out)
                for item, out in zip(_items(engine.state.batch), _items(engine.state.output))]
        kept = [k for k in kept if not (_qc(engine, k[0]) or {}).get("refused")]
        if not kept:
            return
        subjects, items, outputs = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
        images = torch.stack([torch.as_tensor(item[self.image_key]) for item in items])
        probabilities = None
        if all(isinstance(o, dict) and self.pred_key in o for o in outputs):
            probabilities = torch.stack([torch.as_tensor(o[self.pred_key]).detach().float().cpu().reshape(-1)
                                         for o in outputs])
        explained = explain(self.network if self.network is not None else engine.network, images, self.presets,
                            self.target, probabilities)
        for i, (subject, item) in enumerate(zip(subjects, items)):
            image = item[self.image_key]
            original = self.save_original_space is True or (
                self.save_original_space == "auto" and bool(getattr(image, "meta", {}).get(REGISTERED, False)))
            write_explanation(self.output_dir, subject, image, explained, i, self.save_input,
                              self.transform if original else None)
            for preset in self.presets:
                s = explained.summary(i, preset)
                self.table.add({
                    "subject": subject, "preset": preset, "pred": s["pred"], "prob_term": f"{s['prob_term']:.6f}",
                    "prob_preterm": f"{s['prob_preterm']:.6f}", "target": s["target"],
                    "start_relevance": f"{s['start_relevance']:.6g}", "relevance_sum": f"{s['relevance_sum']:.6g}",
                    "conservation": f"{s['conservation']:.6g}", "run_key": self.run_key,
                    **qc_row(_qc(engine, subject))})
        self.table.save()


class PredictionWriter:
    """``predictions.csv`` (subject, image, prob_term, prob_preterm, prediction 0 term / 1 preterm, label when the
    data has labels, run_key), rewritten atomically after every batch: attached after ``LRPHandler``, the table
    lists exactly the subjects whose outputs are complete, and a resumed run keeps the earlier rows.

    Args:
        output_dir: folder of the table.
        filename: table name (``predictions.csv``; the evaluation writes ``test_predictions.csv``).
        run_key: identifies model and settings; with ``resume`` the rows of an earlier run with this key are kept.
        resume: keep earlier rows with the same ``run_key``; otherwise the table starts empty.
        image_key / pred_key / label_key: keys in the decollated batch and output.
    """
    def __init__(self, output_dir: str, filename: str = "predictions.csv", run_key: str = "", resume: bool = True,
                 image_key: str = "image", pred_key: str = "pred", label_key: str = "label") -> None:
        self.table = CrashSafeTable(f"{output_dir}/{filename}", PREDICTION_COLUMNS, key=("subject",))
        self.run_key = str(run_key)
        self.resume = bool(resume)
        self.image_key, self.pred_key, self.label_key = image_key, pred_key, label_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.table.finish())

    def _start(self, engine: Engine) -> None:
        if self.resume and self.run_key:
            self.table.load(keep=lambda row: row["run_key"] == self.run_key)

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [engine.state.batch]
        outputs = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item, out in zip(batch, outputs):
            subject, image = source_file(item, self.image_key)
            verdict = _qc(engine, subject)
            if verdict and verdict.get("refused"):
                continue  # listed in skipped.csv by the QC handler
            prob = torch.as_tensor(out[self.pred_key]).detach().float().cpu().reshape(-1)
            label = item.get(self.label_key) if isinstance(item, dict) else None
            if label is not None:
                label = torch.as_tensor(label).reshape(-1)
                label = int(label.argmax()) if label.numel() > 1 else int(label[0])
            self.table.add({"subject": subject, "image": image, "prob_term": f"{float(prob[0]):.6f}",
                            "prob_preterm": f"{float(prob[1]):.6f}", "prediction": int(prob.argmax()),
                            "label": label, "run_key": self.run_key, **qc_row(verdict)})
        self.table.save()


class _AtomicSave(BaseSaveHandler):
    """Save handler for ignite's Checkpoint: torch.save to a temporary file, then rename. With a fixed file name
    (``model.pt``) the old file is only ever replaced, never removed first."""

    def __init__(self, dirname: str, filename: str | None) -> None:
        self.dirname = Path(dirname)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != 0:  # one writer under torch.distributed (ignite's DiskSaver default: rank 0)
            return
        self.dirname.mkdir(parents=True, exist_ok=True)
        with atomic_target_for(self.dirname / (self.filename or filename)) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)  # via a file object: the archive's inner name does not vary with tmp

    def remove(self, filename: str) -> None:
        if self.filename is None:
            (self.dirname / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` (same arguments) whose files are written atomically, by rank 0 only. With
    ``save_final`` (``checkpoint: last`` in train.json) the final model is written only when training completes: a
    run that fails keeps the ``model.pt`` it had, where MONAI would save the interrupted network as the final model."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs) -> None:
        super().__init__(save_dir, save_dict, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicSave(save_dir, getattr(checkpoint.save_handler, "filename", None))

    def exception_raised(self, engine: Engine, e: Exception) -> None:
        raise e


class AtomicMetricsSaver(MetricsSaver):
    """``monai.handlers.MetricsSaver`` (same arguments): the reports are written into a temporary folder next to
    ``save_dir`` and each is renamed into place."""

    def __call__(self, engine) -> None:
        final = Path(self.save_dir)
        final.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".metrics.{os.getpid()}.", suffix=".tmp", dir=final))
        self.save_dir = str(tmp)
        try:
            super().__call__(engine)
            for path in tmp.iterdir():
                os.replace(path, final / path.name)
        finally:
            self.save_dir = str(final)
            shutil.rmtree(tmp, ignore_errors=True)


class ResumableTraining:
    """Resumable training. After every epoch (and after that epoch's validation) it writes ``<ckpt_dir>/resume.pt``
    atomically: network, optimizer and LR-scheduler state, the trainer's epoch/iteration, and the best validation
    metric so far with its epoch. With ``resume=True`` it restores all of that before the first epoch, so a killed
    run continues where it stopped; ``model.pt`` is then written when training completes (``checkpoint: last``) or
    only replaced by a model better than the best one before the kill (``checkpoint: best``). Everything is loaded
    with torch's weights-only loader. The random state of the data augmentation is not restored, so a resumed run is
    not bit-identical to an uninterrupted one.

    Args:
        ckpt_dir: folder of ``resume.pt`` (and of the models).
        network / optimizer / lr_scheduler: the objects whose state is saved and restored.
        resume: restore from ``resume.pt`` when it exists (otherwise start afresh and overwrite it).
        evaluator: the validation evaluator, whose best metric and epoch are saved and restored.
        key_metric_saver: the validation ``CheckpointSaver`` of the best model (None when none is kept: train.json's
            ``checkpoint: last``); told the best metric so far.
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
        if idist.get_rank() != 0:
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


def subject_line(subject: str, row: dict | None = None, reason: str = "") -> str:
    """One console line about one subject: ``sub-0001: preterm (p = 0.873), QC passed`` from its predictions row
    (``prob_term``, ``prob_preterm``, ``prediction`` and the QC columns); without a row, why it has no
    prediction."""
    if row is None:
        return f"{subject}: no prediction, {reason or 'not processed'}"
    decision = int(row["prediction"])
    probability = float(row["prob_preterm"] if decision == 1 else row["prob_term"])
    if row.get("qc_pass") == "true":
        qc = "QC passed"
    elif row.get("qc_pass") == "false":
        qc = "QC flagged: " + ", ".join(m for m in str(row.get("qc_failed", "")).split(";") if m)
    else:
        qc = "QC off"
    return f"{subject}: {CLASSES[decision]} (p = {probability:.3f}), {qc}"


def _bundle_cli() -> bool:
    """Whether this process is ``python -m monai.bundle`` (not a script running a workflow in-process)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == "monai.bundle.__main__"


class RunSummary:
    """What ``run inference`` prints and the status it exits with.

    While the evaluator runs (attached after ``PredictionWriter``), one line per subject on stdout: the decision
    with its probability and the QC verdict with the failed measures (``subject_line``), or that QC refused it.
    ``finish`` (last step of the config's ``inference`` list, after the run report) adds a line for every input
    this run did not process (predicted by an earlier run with the same ``run_key``, or skipped by the input
    checks, with the reason from ``skipped.csv``) and then ``N predicted, F flagged, R refused/skipped -> <path>``
    (the run report's index, or ``predictions.csv`` with ``report`` off), counted over every input of the
    datalist split: a subject predicted by an earlier (resumed) run counts as predicted. ``exit_status`` (the config's
    ``finalize``) ends ``python -m monai.bundle run`` with ``EXIT_PARTIAL`` (3) when some input has no prediction;
    in-process workflows (``ConfigWorkflow``) are not ended: ``finish`` and ``exit_status`` return the status. Under
    torch.distributed every rank prints its own subjects' lines, rank 0 the rest, and every rank exits with rank
    0's status.

    Args:
        output_dir: the inference's output folder (``predictions.csv``, ``skipped.csv``, ``report/``).
        datalist / split: the run's inputs (``load_split`` of them).
        run_key: identifies model and settings: rows of ``predictions.csv`` with another key do not count.
        report: whether the run report is written (``report`` config key): the last line points to it.
        filename: the predictions table.
        image_key / pred_key: keys in the decollated batch and output.
    """

    def __init__(self, output_dir: str, datalist: str, split: str = "test", run_key: str = "", report: bool = True,
                 filename: str = "predictions.csv", image_key: str = "image", pred_key: str = "pred") -> None:
        self.output_dir = Path(output_dir)
        self.datalist, self.split = datalist, split
        self.run_key = str(run_key)
        self.report = bool(report)
        self.filename = filename
        self.image_key, self.pred_key = image_key, pred_key
        self.status: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for item, out in zip(_items(engine.state.batch), _items(engine.state.output)):
            subject, _ = source_file(item, self.image_key)
            verdict = _qc(engine, subject)
            if verdict and verdict.get("refused"):
                _say(f"{subject}: refused by QC ({', '.join(verdict['failed'])}), no prediction")
                continue
            prob = torch.as_tensor(out[self.pred_key]).detach().float().cpu().reshape(-1)
            _say(subject_line(subject, {"prob_term": float(prob[0]), "prob_preterm": float(prob[1]),
                                        "prediction": int(prob.argmax()), **qc_row(verdict)}))

    def finish(self, data: Sequence[Mapping]) -> int:
        """The lines of the subjects this run did not process (``data``: the items it had to do), the summary line,
        and the status (``EXIT_OK`` or ``EXIT_PARTIAL``), which it returns and keeps for ``exit_status``."""
        status = EXIT_OK
        if idist.get_rank() == 0:
            from scripts.runtime.datalist import load_split  # noqa: PLC0415 (datalist imports checks -> outputs)

            inputs = list(dict.fromkeys(subject_name(it["image"]) for it in load_split(
                self.datalist, self.split, -1, require_label=False, check_files=False)))
            rows = {r["subject"]: r for r in read_rows(self.output_dir / self.filename)
                    if not self.run_key or r.get("run_key") == self.run_key}
            skipped = {subject_name(r["image"]) if r.get("image") else r.get("subject", ""): r.get("reason", "")
                       for r in read_rows(self.output_dir / "skipped.csv")}
            processed = {subject_name(it["image"]) for it in data}
            for subject in inputs:
                if subject in processed:
                    continue  # its line came while the evaluator ran
                row = rows.get(subject)
                if row is not None:
                    _say(subject_line(subject, row) + " (earlier run)")
                else:
                    _say(subject_line(subject, reason=f"skipped: {skipped[subject]}" if subject in skipped else ""))
            predicted = [s for s in inputs if s in rows]
            flagged = sum(rows[s].get("qc_pass") == "false" for s in predicted)
            where = report_index(self.output_dir) if self.report else self.output_dir / self.filename
            _say(f"{len(predicted)} predicted, {flagged} flagged, {len(inputs) - len(predicted)} refused/skipped "
                 f"-> {where}")
            status = EXIT_OK if len(predicted) == len(inputs) else EXIT_PARTIAL
        if idist.get_world_size() > 1:
            status = int(idist.broadcast(status, src=0))
        self.status = status
        return status

    def exit_status(self) -> int:
        """End ``python -m monai.bundle run`` with the status of ``finish`` when it is not ``EXIT_OK`` (the
        config's last ``finalize`` step, so everything is written and a distributed run has left its process
        group); in-process workflows get the status back instead."""
        if self.status and _bundle_cli():
            sys.stdout.flush()
            raise SystemExit(self.status)
        return EXIT_OK if self.status is None else self.status


def _say(line: str) -> None:
    print(line, flush=True)
