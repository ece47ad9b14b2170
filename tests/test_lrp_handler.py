"""LRPHandler inside a real MONAI SupervisedEvaluator on NIfTI files: maps equal the engine's, affines match."""

import csv

import nibabel as nib
import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.transforms import (
    Activationsd,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
)

from scripts.lrp import LRP
from scripts.runtime.datalist import load_split
from scripts.runtime.handlers import LRPHandler
from scripts.runtime.network import PretermCNN


def _engine(cohort, handler, network, transform):
    data = load_split(str(cohort / "datalist.json"), "test", -1)
    loader = DataLoader(Dataset(data, transform), batch_size=2)
    return SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=network,
                               postprocessing=Activationsd(keys="pred", softmax=True), val_handlers=[handler]), data


def test_handler_writes_maps_equal_to_the_engine(tmp_path, cohort):
    torch.manual_seed(0)
    network = PretermCNN(spatial_shape=(64, 48, 48), channels=(4, 8), hidden=8).eval()
    transform = Compose([
        LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="ALS"), NormalizeIntensityd(keys="image", nonzero=True),
        ResizeWithPadOrCropd(keys="image", spatial_size=(64, 48, 48)),
    ])
    handler = LRPHandler(str(tmp_path), presets=["a1b0", "a2b1"], save_original_space=True, transform=transform)
    engine, data = _engine(cohort, handler, network, transform)
    engine.run()
    rows = list(csv.DictReader((tmp_path / "relevance.csv").open()))
    assert len(rows) == 2 * len(data)
    for item in data:
        subject = item["subject"]
        folder = tmp_path / subject
        x_img = nib.load(folder / f"{subject}_input.nii.gz")
        expected_input = transform(dict(item))["image"]
        assert np.allclose(x_img.get_fdata(), expected_input[0].numpy(), atol=1e-6)
        assert np.allclose(x_img.affine, expected_input.affine.numpy())
        with torch.no_grad():
            reference = LRP(network).trace(expected_input[None].as_subclass(torch.Tensor)).relevance("a2b1")
        rel_img = nib.load(folder / f"{subject}_relevance_a2b1.nii.gz")
        assert rel_img.get_data_dtype() == np.float32
        assert np.allclose(rel_img.affine, x_img.affine)
        assert np.allclose(rel_img.get_fdata(), reference.relevance[0, 0].numpy(), atol=1e-7)
        orig = nib.load(folder / f"{subject}_relevance_a2b1_orig.nii.gz")
        source = nib.load(item["image"])
        assert orig.shape == source.shape and np.allclose(orig.affine, source.affine)
        row = next(r for r in rows if r["subject"] == subject and r["preset"] == "a2b1")
        assert int(row["target"]) == int(reference.target[0]) == int(row["pred"])
        assert abs(float(row["conservation"]) - float(reference.conservation[0])) < 1e-4
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic writes leave no temporary files


def test_handler_rejects_bad_settings():
    import pytest

    with pytest.raises(ValueError, match="unknown LRP composite"):
        LRPHandler("x", presets=["a2b2x"])
    with pytest.raises(ValueError, match="presets"):
        LRPHandler("x", presets=[])
    with pytest.raises(ValueError, match="transform"):
        LRPHandler("x", save_original_space=True)
