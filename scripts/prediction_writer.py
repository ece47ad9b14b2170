"""Ignite handler writing the per-subject prediction table (``predictions.csv``) crash-safely.

MONAI's ClassificationSaver writes its CSV once, at the end of the run and in place; a killed overnight run
then has no table at all. This handler rewrites the table atomically after every batch (after the LRP maps of
that batch are on disk when it is attached after ``LRPHandler``), so the table always lists exactly the subjects
whose outputs are complete, and a resumed run (same ``run_key``) keeps the earlier rows and adds the rest.

Columns: subject, image, prob_term, prob_preterm, prediction (0 term / 1 preterm), label (when the data has
labels), run_key. Under torch.distributed each rank writes its own shard and rank 0 the merged table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from scripts.engine_outputs import CrashSafeTable, source_file

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["COLUMNS", "PredictionWriter"]

COLUMNS = ["subject", "image", "prob_term", "prob_preterm", "prediction", "label", "run_key"]


class PredictionWriter:
    """Args:
        output_dir: folder of the table.
        filename: table name (``predictions.csv``; the evaluation writes ``test_predictions.csv``).
        run_key: identifies model and settings (``scripts.resume.run_key``); with ``resume`` the rows of an
            earlier run with the same key are kept.
        resume: keep earlier rows with the same ``run_key``; otherwise the table starts empty.
        image_key / pred_key / label_key: keys in the decollated batch and output.
    """

    def __init__(self, output_dir: str, filename: str = "predictions.csv", run_key: str = "", resume: bool = True,
                 image_key: str = "image", pred_key: str = "pred", label_key: str = "label") -> None:
        self.table = CrashSafeTable(f"{output_dir}/{filename}", COLUMNS, key=("subject",))
        self.run_key = str(run_key)
        self.resume = bool(resume)
        self.image_key, self.pred_key, self.label_key = image_key, pred_key, label_key

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

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
            prob = torch.as_tensor(out[self.pred_key]).detach().float().cpu().reshape(-1)
            label = item.get(self.label_key) if isinstance(item, dict) else None
            if label is not None:
                label = torch.as_tensor(label).reshape(-1)
                label = int(label.argmax()) if label.numel() > 1 else int(label[0])
            self.table.add({"subject": subject, "image": image, "prob_term": f"{float(prob[0]):.6f}",
                            "prob_preterm": f"{float(prob[1]):.6f}", "prediction": int(prob.argmax()),
                            "label": label, "run_key": self.run_key})
        self.table.save()
