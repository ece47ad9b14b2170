"""The shape of the bundle as specifications: one explain-and-write core equal to ``run inference``, one home for
output paths, configs that read like the model zoo's (short expressions, shared transforms kept equal), and the
rank-0-only handlers where the multi-GPU config's slice expects them."""

from __future__ import annotations

import ast
import csv
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from conftest import ROOT, TINY_OVERRIDES, read_json
from monai.bundle import ConfigParser

from scripts.runtime.explain import explain, write_explanation
from scripts.runtime.outputs import expected_outputs, relevance_path

CONFIGS = sorted((ROOT / "configs").glob("*.json"))


def _parser(overrides: dict) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs" / "inference.json"))
    parser.update({"bundle_root": str(ROOT), **TINY_OVERRIDES, **overrides})
    return parser


def test_core_equals_run_inference(tmp_path, cohort, trained, reference):
    """The explain-and-write core, called directly on the config's preprocessing, writes the maps and gives the
    probabilities that ``run inference`` (the LRP handler in the evaluator) wrote for the same subjects."""
    ckpt_dir, _ = trained
    out_ref, items = reference
    rows = {r["subject"]: r for r in csv.DictReader((out_ref / "predictions.csv").open())}
    parser = _parser({"dataset_dir": str(cohort), "ckpt_dir": str(ckpt_dir), "device": "$torch.device('cpu')"})
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(ckpt_dir / "model.pt", weights_only=True))
    preprocessing = parser.get_parsed_content("preprocessing")
    for item in items[:2]:
        image = preprocessing({"image": item["image"]})["image"]
        explained = explain(network, image[None], ["a2b1"], "pred")
        subject = item["subject"]
        written = write_explanation(tmp_path, subject, image, explained, 0, save_input=True, transform=preprocessing)
        assert sorted(written) == sorted(expected_outputs(tmp_path, subject, ["a2b1"], True, True))
        np.testing.assert_allclose(explained.probabilities[0].numpy(),
                                   [float(rows[subject]["prob_term"]), float(rows[subject]["prob_preterm"])],
                                   rtol=1e-5, atol=1e-6)  # the table keeps 6 decimals
        ours = nib.load(relevance_path(tmp_path, subject, "a2b1"))
        theirs = nib.load(relevance_path(out_ref, subject, "a2b1"))
        np.testing.assert_allclose(ours.get_fdata(), theirs.get_fdata(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-6)
        original = nib.load(relevance_path(tmp_path, subject, "a2b1", original=True))
        source = nib.load(item["image"])
        assert original.shape == source.shape and np.allclose(original.affine, source.affine, atol=1e-5)


_NAMING = re.compile(r"_relevance_|_input\.nii|_orig\.nii|_probabilities\.json|\{subject\}_|\{s\}_")


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_output_names_are_built_only_by_the_path_contract():
    """No module but ``scripts/runtime/outputs.py`` spells a per-subject output name (docstrings aside). The data
    preparation (``scripts/data/``) names the files of a dataset, not of a run, and is left out."""
    offenders = []
    for path in sorted((ROOT / "scripts").rglob("*.py")):
        if path == ROOT / "scripts" / "runtime" / "outputs.py" or "data" in path.relative_to(ROOT).parts:
            continue
        docstrings = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef) and node.body:
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                    docstrings.add((first.value.lineno, first.value.value))
        for lineno, value in _string_constants(path):
            if (lineno, value) not in docstrings and _NAMING.search(value):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {value!r}")
        for node in ast.walk(tree):  # f-strings: their literal parts
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
                               for v in node.values)
                if _NAMING.search(text):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: f{text!r}")
    assert not offenders, "output names built outside scripts/runtime/outputs.py:\n" + "\n".join(offenders)


def _expressions(value, where=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _expressions(v, f"{where}#{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _expressions(v, f"{where}#{i}")
    elif isinstance(value, str) and value.startswith("$"):
        yield where, value


def test_config_expressions_are_short():
    long = [f"{path.name}{where}: {len(expr)} characters" for path in CONFIGS
            for where, expr in _expressions(read_json(path)) if len(expr) > 120]
    assert not long, long


GRID = "$@runtime.transforms.CentredGridd"
NORMALISED = "$@runtime.normalisation.Normalisedd"


def test_the_qc_reference_run_id_builds_the_training_handler():
    """train.json's run id ``qc_reference`` calls ``qc_reference_writer``, an equal copy of the training's
    QCReferenceWriter handler (not a reference to it: MONAI's ConfigWorkflow property check reads every handler as
    a dict); tests/test_qc.py checks that it rewrites what training wrote."""
    config = read_json(ROOT / "configs" / "train.json")
    writers = [h for h in config["train"]["handlers"] if h["_target_"].endswith("QCReferenceWriter")]
    assert writers == [config["qc_reference_writer"]] and config["qc_reference"] == ["$@qc_reference_writer()"]
    full = [h for h in read_json(ROOT / "configs" / "train_full.json")["train#handlers"]
            if h["_target_"].endswith("QCReferenceWriter")]
    assert full == [config["qc_reference_writer"]]


def test_shared_transforms_are_equal_copies():
    """train.json's deterministic transforms (``spatial_transforms`` + ``intensity_transforms``, split so that the
    training augmentation runs between them) and inference.json's preprocessing are the same steps (copies, not a
    ``%file#key`` macro, which resolves against the current folder and breaks runs from another folder)."""
    config = read_json(ROOT / "configs" / "train.json")
    assert config["deterministic_transforms"] == "$@spatial_transforms + @intensity_transforms"
    train = config["spatial_transforms"] + config["intensity_transforms"]
    inference = read_json(ROOT / "configs" / "inference.json")["preprocessing"]["transforms"]
    # inference alone registers native scans (``preprocess``, the template beside the weights); the training data
    # are registered by contract (scripts.data.preprocess)
    registration = next(t for t in inference if t["_target_"] == GRID)
    assert registration.pop("preprocess") == "$@runtime.transforms.check_preprocess(@preprocess)"
    assert registration.pop("template_dir") == "@ckpt_dir"
    # and inference alone checks the normalisation against the one recorded beside the weights (training writes it)
    assert inference[-1].pop("record_dir") == "@ckpt_dir" and train[-1].pop("record_dir") is None
    assert train == inference
    assert [t["_target_"] for t in inference] == ["LoadImaged", "EnsureChannelFirstd", "Orientationd", GRID,
                                                  "EnsureTyped", NORMALISED]
    assert inference[-1]["method"] == "@normalisation"
    assert next(t for t in inference if t["_target_"] == GRID)["mask_nonzero"] is True
    labels = read_json(ROOT / "configs" / "inference.json")["label_preprocessing"]["transforms"]
    spatial = [t for t in inference if t["_target_"] not in (NORMALISED, "EnsureTyped")]
    assert [t["_target_"] for t in labels] == [t["_target_"] for t in spatial]
    grid = next(t for t in labels if t["_target_"] == GRID)
    assert grid["mode"] == "nearest" and not grid.get("mask_nonzero", False)


def test_rank_zero_only_handlers_are_last():
    """multi_gpu_train.json drops the last three train handlers on ranks > 0 (the model zoo's idiom): they must be
    the logging ones (stats, TensorBoard, progress bar + epoch summary), in train.json and in train_full.json."""
    assert "[: -3 if torch.distributed.get_rank() > 0 else None]" in read_json(
        ROOT / "configs" / "multi_gpu_train.json")["train#trainer#train_handlers"]
    for handlers in (read_json(ROOT / "configs" / "train.json")["train"]["handlers"],
                     read_json(ROOT / "configs" / "train_full.json")["train#handlers"]):
        targets = [h["_target_"].split(".")[-1] for h in handlers]
        assert targets[-3:] == ["StatsHandler", "TensorBoardStatsHandler", "TrainingProgress"]
        assert "LrScheduleHandler" in targets[:-3] and "ResumableTraining" in targets[:-3]
