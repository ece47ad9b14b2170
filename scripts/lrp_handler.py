"""Ignite handler that writes LRP relevance maps next to the predictions (MONAI handler style: attach/__call__).

For every batch the evaluator has run, it traces the network once (``scripts.lrp``), computes relevance for
each configured preset and writes, per subject (file name without extensions):

    <output_dir>/<subject>/<subject>_relevance_<preset>.nii.gz   (float32, affine/grid of the network input)
    <output_dir>/<subject>/<subject>_input.nii.gz                (the preprocessed network input, optional)
    <output_dir>/<subject>/<subject>_relevance_<preset>_orig.nii.gz  (optional: resampled to the original image
                                                                    through MONAI's inverse transforms)

and one row per subject and preset into ``<output_dir>/relevance.csv`` (rewritten atomically after each batch;
rows of an earlier run with the same ``run_key`` are kept, so a resumed run completes the table). Under
torch.distributed every rank writes the subjects of its own shard; rank 0 writes the merged table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from scripts.engine_outputs import CrashSafeTable, source_file
from scripts.lrp import LRP, get_composite
from scripts.nifti_io import save_nifti

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["LRPHandler"]

logger = logging.getLogger(__name__)
COLUMNS = ["subject", "preset", "pred", "prob_term", "prob_preterm", "target", "start_relevance",
           "relevance_sum", "conservation", "run_key"]


class LRPHandler:
    """Write relevance maps for every subject an evaluator processes.

    Args:
        output_dir: folder for the per-subject folders and ``relevance.csv``.
        presets: LRP composites by name (``a1b0``, ``a2b1``, ``a3b2``, ``epsilon_a2b1``, ``zbox_a2b1``, ...).
        target: ``"pred"`` (predicted class), a class index, or ``"difference"`` (logit preterm - term).
        save_input: also write the preprocessed network input (``_input``).
        save_original_space: also write each map resampled to the original image through the inverse of
            ``transform`` (MONAI invertible transforms); bilinear resampling, so sums are not preserved there.
        transform: the preprocessing Compose (needed for ``save_original_space``).
        image_key / pred_key: keys of the network input and of the (softmax) prediction in the decollated batch.
        table_name: name of the per-subject table.
        network: the model to explain; defaults to ``engine.network``.
        run_key: identifies model and settings (``scripts.resume.run_key``); rows of an earlier run into the same
            ``output_dir`` with this key are kept in the table.
    """

    def __init__(
        self,
        output_dir: str,
        presets: Sequence[str] = ("a2b1",),
        target: str | int = "pred",
        save_input: bool = True,
        save_original_space: bool = False,
        transform=None,
        image_key: str = "image",
        pred_key: str = "pred",
        table_name: str = "relevance.csv",
        network: torch.nn.Module | None = None,
        run_key: str = "",
    ) -> None:
        if isinstance(presets, str):
            presets = [presets]
        if not presets:
            raise ValueError("LRPHandler: config value 'presets' must name at least one LRP preset")
        for preset in presets:
            get_composite(preset)  # fail at start-up on a bad preset name
        if save_original_space and transform is None:
            raise ValueError("LRPHandler: save_original_space needs the preprocessing 'transform'")
        self.output_dir = Path(output_dir)
        self.presets = list(presets)
        self.target = target
        self.save_input = save_input
        self.save_original_space = save_original_space
        self.transform = transform
        self.image_key = image_key
        self.pred_key = pred_key
        self.table_name = table_name
        self.network = network
        self.run_key = str(run_key)
        self.table = CrashSafeTable(self.output_dir / table_name, COLUMNS, key=("subject", "preset"))

    def attach(self, engine: Engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.table.finish())

    def _start(self, engine: Engine) -> None:
        if self.run_key:
            self.table.load(keep=lambda row: row["run_key"] == self.run_key)

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        output = engine.state.output
        items = batch if isinstance(batch, list) else [batch]
        images = torch.stack([torch.as_tensor(item[self.image_key]) for item in items])
        network = self.network if self.network is not None else engine.network
        network = getattr(network, "module", network)  # DistributedDataParallel / DataParallel wrapper
        device = next(network.parameters()).device
        network_was_training = network.training
        network.eval()
        try:
            trace = LRP(network).trace(images.to(device=device, dtype=torch.float32).as_subclass(torch.Tensor))
            probs = self._probabilities(output, trace.logits)
            for preset in self.presets:
                result = trace.relevance(preset, self.target)
                for i, item in enumerate(items):
                    self._write_subject(item, result, i, preset, probs[i])
            if self.save_input:
                for item in items:
                    subject = self._subject(item)
                    image = item[self.image_key]
                    save_nifti(torch.as_tensor(image)[0].cpu().numpy(), self._affine(image),
                               self.output_dir / subject / f"{subject}_input.nii.gz")
        finally:
            network.train(network_was_training)
        self.table.save()

    def _probabilities(self, output, logits):
        outputs = output if isinstance(output, list) else None
        if outputs and all(isinstance(o, dict) and self.pred_key in o for o in outputs):
            return torch.stack([torch.as_tensor(o[self.pred_key]).detach().float().cpu().reshape(-1) for o in outputs])
        return torch.softmax(logits.detach().float(), dim=1).cpu()

    def _subject(self, item) -> str:
        return source_file(item, self.image_key)[0]

    @staticmethod
    def _affine(image):
        affine = getattr(image, "affine", None)
        return torch.eye(4).numpy() if affine is None else torch.as_tensor(affine).cpu().numpy()

    def _write_subject(self, item, result, i, preset, prob) -> None:
        subject = self._subject(item)
        folder = self.output_dir / subject
        relevance = result.relevance[i].detach().float().cpu()
        image = item[self.image_key]
        save_nifti(relevance[0].numpy(), self._affine(image), folder / f"{subject}_relevance_{preset}.nii.gz")
        if self.save_original_space:
            self._write_original(item, relevance, folder / f"{subject}_relevance_{preset}_orig.nii.gz")
        self.table.add(dict(zip(COLUMNS, [
            subject, preset, int(prob.argmax()), f"{float(prob[0]):.6f}", f"{float(prob[1]):.6f}",
            int(result.target[i]), f"{float(result.start[i]):.6g}", f"{float(result.relevance[i].sum()):.6g}",
            f"{float(result.conservation[i]):.6g}", self.run_key,
        ])))

    def _write_original(self, item, relevance, path) -> None:
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        image = item[self.image_key]
        data = {self.image_key: image,
                "relevance": MetaTensor(relevance, affine=image.affine, meta=dict(image.meta),
                                        applied_operations=list(image.applied_operations))}
        inverted = Invertd(keys="relevance", transform=self.transform, orig_keys=self.image_key,
                           nearest_interp=False)(data)["relevance"]
        save_nifti(inverted[0].cpu().numpy(), self._affine(inverted), path)
