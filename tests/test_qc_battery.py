"""The corruption battery of input QC (scripts/evaluation/qc_battery.py, issue 39): each corruption does what it
says at a known strength, and the command writes its table on a tiny cohort, resumes, and refuses the evaluation
cohort."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import TINY_OVERRIDES

from scripts.evaluation import qc_battery
from scripts.evaluation.qc_battery import CORRUPTIONS, corrupt, summary
from scripts.runtime.reference import MEASURES

AFFINE = np.eye(4)


def _ellipsoid(shape=(48, 40, 36), radii=(18, 14, 12), value=100.0) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    centre = (np.asarray(shape) - 1) / 2.0
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
    return np.where(inside, value, 0.0).astype(np.float32)


def test_each_corruption_does_what_it_says_at_a_known_strength():
    data = _ellipsoid()
    brain = data > 0
    rng = np.random.default_rng(0)
    noisy, _ = corrupt("noise", 0.1, data, AFFINE, rng)
    # Rician magnitude at SNR 10: the spread inside a constant brain is the noise's sigma within its sampling error
    assert abs(noisy[brain].std() / 10.0 - 1) < 0.1 and np.all(noisy[~brain] == 0)
    field, _ = corrupt("bias", 0.4, np.ones_like(data), AFFINE, rng)  # exp(-a) and exp(+a) at opposite corners
    assert field.min() == pytest.approx(np.exp(-0.4), rel=1e-6) and field.max() == pytest.approx(np.exp(0.4), rel=1e-6)
    blurred, _ = corrupt("blur", 2.0, data, AFFINE, rng)
    assert np.all(blurred[~brain] == 0) and blurred[brain].min() < 0.6 * data[brain].min()  # the edge darkened
    # the N/2 ghost: the scan at 1 - g and a replica shifted by half the phase axis (the middle-sized axis) at g
    ghosted, _ = corrupt("ghost", 0.2, data, AFFINE, rng)
    centre = tuple(int(n // 2) for n in data.shape)
    assert ghosted[centre] == pytest.approx(0.8 * data[centre], rel=1e-4)
    single = np.zeros((48, 40, 36), dtype=np.float32)
    single[10:14, 4:8, 10:14] = 100.0
    single[20:30, 10:30, 10:26] = 50.0  # a brain to keep after the ghost's skull stripping: the replica lands on it
    k = np.fft.fftn(single)
    k[:, 1::2, :] *= 1 - 2 * 0.2
    expected = np.abs(np.fft.ifftn(k))
    assert expected[11, 25, 11] == pytest.approx(0.2 * 100, rel=1e-3)  # what the k-space operation gives
    ghost_only, _ = corrupt("ghost", 0.2, single, AFFINE, rng)
    np.testing.assert_allclose(ghost_only, np.where(single > 0, expected, 0), rtol=1e-4, atol=1e-3)
    zoomed, _ = corrupt("zoom", 0.8, data, AFFINE, rng)
    assert (zoomed > 0).sum() / brain.sum() == pytest.approx(0.8 ** 3, rel=0.05)  # within the surface's voxels
    cut, _ = corrupt("partial_fov", 0.3, data, AFFINE, rng)
    assert (cut > 0).any(axis=(1, 2)).sum() == pytest.approx(0.7 * brain.any(axis=(1, 2)).sum(), abs=1)
    moved, _ = corrupt("motion", 4.0, data, AFFINE, np.random.default_rng(1))
    assert np.all(moved[~brain] == 0) and np.abs(moved - data)[brain].max() > 5  # edges smeared by the motion
    assert np.all(np.abs(moved - data)[brain] < data.max())
    with pytest.raises(ValueError, match="unknown corruption 'wobble'"):
        corrupt("wobble", 1.0, data, AFFINE, rng)
    assert all(list(spec[1]) == sorted(spec[1], key=lambda s: abs(np.log(s)) if name == "zoom" else s)
               for name, spec in CORRUPTIONS.items())  # weakest first: --strengths N takes the N weakest


def test_summary_applies_the_goals_per_strength():
    def row(corruption, before, after, qc_pass):
        return {"corruption": corruption, "strength": "1", "prob_before": before, "prob_after": after,
                "abs_delta": abs(after - before), "qc_pass": qc_pass}
    rows = [row("a", 0.1, 0.4, "false"), row("a", 0.1, 0.3, "false"), row("a", 0.1, 0.15, "true"),  # moves, 67 %
            row("b", 0.1, 0.11, "true"), row("b", 0.1, 0.7, "true"), row("b", 0.9, 0.88, "true"),  # unflagged flip
            row("c", 0.45, 0.55, "true"), row("c", 0.9, 0.92, "true"), row("c", 0.2, 0.23, "true")]  # 0.45: no flip
    goals = {r["corruption"]: (r["goal"], r["flips"], r["unflagged_flips"], r["flagged"]) for r in summary(rows)}
    assert goals == {"a": ("NOT met", 0, 0, "67 %"), "b": ("NOT met", 1, 1, "0 %"), "c": ("met", 0, 0, "0 %")}


def test_the_battery_writes_its_table_resumes_and_refuses_the_evaluation_cohort(tmp_path, cohort, trained, capsys):
    ckpt_dir, _ = trained
    out = tmp_path / "battery"
    args = ["--datalist", str(cohort / "datalist.json"), "--split", "test", "--subjects", "2",
            "--corruptions", "noise", "zoom", "--strengths", "1", "--ckpt_dir", str(ckpt_dir),
            "--override", json.dumps(TINY_OVERRIDES), "--output", str(out), "--work_dir", str(tmp_path / "work")]
    assert qc_battery.main([*args, "--no-iqm"]) == 0
    rows = list(csv.DictReader((out / "battery.csv").open()))
    assert sorted((r["corruption"], r["strength"]) for r in rows) == sorted(
        [("none", "0"), ("noise", "0.02"), ("zoom", "1.1")] * 2)
    assert all(r[f"qc_{m}"] != "" for r in rows for m in MEASURES)  # every QC score, brain_volume included
    zoomed = [r for r in rows if r["corruption"] == "zoom"]
    assert all("brain_volume" in r["qc_failed"].split(";") and float(r["qc_brain_volume"]) > 1.25 for r in zoomed)
    clean = [r for r in rows if r["corruption"] == "none"]
    assert all(float(r["abs_delta"]) == 0 and r["qc_pass"] == "true" for r in clean), clean
    text = (out / "battery.md").read_text()
    assert "python -m scripts.evaluation.qc_battery --datalist" in text and "| zoom | 1.1 | 2 |" in text
    assert not list((tmp_path / "work" / "inputs").glob("*.nii.gz"))  # the corrupted scans are not kept
    assert sorted(p.name for p in out.iterdir()) == ["battery.csv", "battery.md"]

    # a rerun with one more corruption measures only what is missing (the rows already there stay as they were)
    before = (out / "battery.csv").read_text()
    assert qc_battery.main([*args[:7], "noise", "zoom", "ghost", *args[9:]]) == 0
    rows = list(csv.DictReader((out / "battery.csv").open()))
    ghost = [r for r in rows if r["corruption"] == "ghost"]
    assert len(ghost) == 2 and all(r["iqm_artefact"] != "" for r in ghost)  # measured now, with the IQMs
    old = {(r["subject"], r["corruption"]): r for r in csv.DictReader(iter(before.splitlines()))}
    assert all(old[(r["subject"], r["corruption"])] == r for r in rows if r["corruption"] in ("noise", "zoom"))

    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({**json.loads((cohort / "datalist.json").read_text()), "role": "evaluation"}))
    assert qc_battery.main(["--datalist", str(evaluation), "--output", str(tmp_path / "no"), "--no-iqm"]) == 2
    assert "evaluation" in capsys.readouterr().err and not (tmp_path / "no").exists()
