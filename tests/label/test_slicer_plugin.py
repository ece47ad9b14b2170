"""The app driven the way 3D Slicer's MONAI Label plugin drives it: a real ``monailabel start_server`` on 127.0.0.1,
the plugin's own client (``slicer_client.py``, vendored) and its selector, Next Sample and segment rules
(``slicer_plugin.py``, mirrored from the plugin's code at a pinned commit). Runs in the Label environment
(``nox -s label``).

Fixtures: a studies folder, re-gridded copies of a scan (0.8 mm, another orientation, oblique; NIfTI and NRRD),
``run inference`` with ``save_original_space=true`` on them, and the server."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import slicer_plugin as plugin
from band_edges import assert_same_bands_up_to_edges
from conftest import ROOT, TINY, TINY_OVERRIDES, app_preset, run_bundle
from slicer_client import MONAILabelClient, MONAILabelClientException, MONAILabelUtils

from scripts.runtime.evidence import CLASS_NAMES, EVIDENCE_LABELS

APP_DIR = ROOT / "scripts" / "label_app"
# compact JSON: the monailabel launcher (a shell script) splits arguments at spaces
CONF = {"bundle_overrides": json.dumps({**TINY_OVERRIDES, "device": "cpu"}, separators=(",", ":"))}
STUDY_COUNT = 2  # scans of the test split in the server's studies folder
REGRID = "regrid"  # subject name of the re-gridded scan


def subject_of(path) -> str:
    return Path(path).name.split(".")[0]


@pytest.fixture(scope="module")
def studies(tmp_path_factory, reference) -> Path:
    """The server's studies folder: the first test-split scans (``run inference`` has their predictions)."""
    _, items = reference
    folder = tmp_path_factory.mktemp("studies")
    for item in items[:STUDY_COUNT]:
        shutil.copy(item["image"], folder / Path(item["image"]).name)
    return folder


@pytest.fixture(scope="module")
def regridded(tmp_path_factory, reference) -> dict[str, Path]:
    """A test scan resampled to 0.8 mm in PIR orientation, then tilted by 10 degrees and shifted (its affine
    only): ``{"nifti": <regrid.nii.gz>, "nrrd": <regrid.nrrd>}`` (the NRRD written by ITK from the NIfTI)."""
    import itk
    import nibabel as nib
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation, Spacing

    _, items = reference
    image = Compose([LoadImage(reader="NibabelReader", image_only=True), EnsureChannelFirst(),
                     Orientation(axcodes="PIR"), Spacing(pixdim=(0.8, 0.8, 0.8), mode="bilinear")])(items[0]["image"])
    angle = np.deg2rad(10.0)
    tilt = np.eye(4)
    tilt[:3, :3] = [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    tilt[:3, 3] = [3.0, -2.0, 5.0]
    affine = tilt @ np.asarray(image.affine, dtype=np.float64)
    folder = tmp_path_factory.mktemp("regridded")
    nifti, nrrd = folder / f"{REGRID}.nii.gz", folder / "nrrd" / f"{REGRID}.nrrd"
    nib.save(nib.Nifti1Image(np.asarray(image[0], dtype=np.float32), affine), nifti)
    nrrd.parent.mkdir()
    itk.imwrite(itk.imread(str(nifti)), str(nrrd))
    return {"nifti": nifti, "nrrd": nrrd}


@pytest.fixture(scope="module")
def orig_reference(tmp_path_factory, trained, studies, regridded) -> Path:
    """``run inference`` (the apps' preset ``app_preset()``, ``save_original_space=true``) on the studies' scans and
    the re-gridded NIfTI: its output folder (``predictions.csv``,
    ``<subject>/<subject>_relevance_<preset>_orig.nii.gz``)."""
    ckpt_dir, _ = trained
    inputs = tmp_path_factory.mktemp("orig_inputs")
    for path in [*studies.glob("*.nii.gz"), regridded["nifti"]]:
        (inputs / path.name).symlink_to(path)
    out = tmp_path_factory.mktemp("orig_reference")
    run_bundle("inference", "configs/inference.json", "--dataset_dir", str(inputs), "--ckpt_dir", str(ckpt_dir),
               "--output_dir", str(out), "--lrp_presets", json.dumps([app_preset()]), "--save_original_space", "true",
               *TINY)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_bundle, studies, tmp_path_factory):
    """``monailabel start_server`` serving the tiny bundle on the studies folder: its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("server_log") / "server.log"
    cmd = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(APP_DIR),
           "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port),
           "--conf", "bundle", str(tiny_bundle), "--conf", "bundle_overrides", CONF["bundle_overrides"]]
    # the monailabel launcher runs "$MONAILABEL_PYEXE -m monailabel.main" (default: python from PATH)
    env = dict(os.environ, MONAI_LABEL_TASKS_TRAIN="false", MONAI_LABEL_DATASTORE_AUTO_RELOAD="false",
               MONAILABEL_PYEXE=sys.executable)
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise AssertionError(f"monailabel start_server exited ({proc.returncode}):\n{log.read_text()[-5000:]}")
            try:
                if requests.get(f"{url}/info/", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"server did not come up:\n{log.read_text()[-5000:]}")
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _read(path) -> tuple[np.ndarray, np.ndarray]:
    """A result or input volume as (array, RAS affine): nibabel for NIfTI, ITK for NRRD (Slicer reads results with
    SimpleITK, i.e. ITK)."""
    if str(path).endswith(".nrrd"):
        from monai.data import ITKReader

        reader = ITKReader()
        data, meta = reader.get_data(reader.read(str(path)))
        return np.asarray(data), np.asarray(meta["affine"])
    import nibabel as nib

    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), image.affine


def _predictions(out: Path) -> dict[str, dict]:
    return {row["subject"]: row for row in csv.DictReader((out / "predictions.csv").open())}


def _assert_probabilities(params: dict, row: dict) -> None:
    assert params["probabilities"]["term"] == pytest.approx(float(row["prob_term"]), abs=1e-5)
    assert params["probabilities"]["preterm"] == pytest.approx(float(row["prob_preterm"]), abs=1e-5)


def _assert_same_grid(result: Path, image: Path) -> None:
    data, affine = _read(result)
    expected, expected_affine = _read(image)
    assert data.shape == expected.shape
    np.testing.assert_allclose(affine, expected_affine, atol=1e-4)


def _assert_shows_decision(data: np.ndarray, names: list[str], params: dict, decision: str) -> None:
    """The non-empty segments are the predicted class's bands (the strongest one at least) and counter-evidence."""
    filled = {names[v - 1] for v in np.unique(data) if v > 0}
    other = next(name for name in CLASS_NAMES.values() if name != decision)
    assert f"{decision} evidence 0-25 %" in filled
    assert not any(name.startswith(f"{other} evidence") for name in filled)
    assert filled <= set(EVIDENCE_LABELS)
    assert params["decision"] == decision
    assert set(params["filled"]) == filled


def test_info_puts_the_evidence_task_in_auto_segmentation(server):
    info = MONAILabelClient(server).info()
    assert plugin.selectors(info) == {"Auto Segmentation": ["preterm_evidence"], "SmartEdit": [], "Scribbles": []}
    assert info["models"]["classification"]["type"] == "classification"
    assert info["models"]["relevance"]["type"] == "others"
    # static segment names, label values 1..N in order, the same for the app and the evidence task
    assert info["labels"] == info["models"]["preterm_evidence"]["labels"] == EVIDENCE_LABELS
    assert list(info["labels"].values()) == list(range(1, len(EVIDENCE_LABELS) + 1))


def test_next_sample_runs_the_evidence_task(server, reference, studies, tmp_path):
    out, _ = reference
    rows = _predictions(out)
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    info = client.info()
    strategy = plugin.strategy(info)
    sample = client.next_sample(strategy, plugin.strategy_params(info, strategy))
    assert sample.get("id") and Path(sample["path"]).parent == studies
    segments = plugin.next_sample_segments(info)
    assert segments == list(EVIDENCE_LABELS)

    picked, sent = plugin.auto_run_model(info)
    assert picked == sent == "preterm_evidence"  # a model that exists: no 404
    result, params = client.infer(sent, sample["id"], plugin.infer_params(info, sent))
    assert result.endswith(".nrrd")
    _assert_same_grid(result, sample["path"])
    data, _ = _read(result)
    assert data.dtype == np.uint8
    names = plugin.result_segment_names(info, sent, params)
    assert names == segments  # the result fills the segments Next Sample created, and no others
    row = rows[subject_of(sample["path"])]
    _assert_shows_decision(data, names, params, CLASS_NAMES[int(row["prediction"])])
    _assert_probabilities(params, row)
    assert params["preset"] == app_preset() and params["target"] == int(row["prediction"])
    assert np.isfinite(params["conservation"])


def test_plugin_client_takes_every_reply(server, studies, orig_reference, tmp_path):
    # the plugin's client saves the reply's file whatever the task: a JSON-only reply would raise here
    with pytest.raises(TypeError, match="not iterable"):
        MONAILabelUtils.save_result(None, str(tmp_path))

    rows = _predictions(orig_reference)
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    info = client.info()
    image = sorted(studies.glob("*.nii.gz"))[0]
    subject = subject_of(image)
    replies = {}
    for model in info["models"]:
        result, params = client.infer(model, subject, plugin.infer_params(info, model))
        assert Path(result).is_file() and isinstance(params, dict), model
        replies[model] = result, params

    result, params = replies["classification"]
    assert result.endswith(".json")
    assert json.loads(Path(result).read_text())["prediction"] == params["prediction"]
    scores = {p["label"]: p["score"] for p in params["prediction"]}
    _assert_probabilities({"probabilities": scores}, rows[subject])

    result, params = replies["relevance"]  # float32 on the scan's grid although the plugin asks for uint8
    data, _ = _read(result)
    assert data.dtype == np.float32 and params["result_dtype"] == "float32"
    _assert_same_grid(result, image)
    handler, _ = _read(orig_reference / subject / f"{subject}_relevance_{app_preset()}_orig.nii.gz")
    np.testing.assert_allclose(data, handler, rtol=1e-5, atol=1e-7)
    _assert_probabilities(params, rows[subject])

    result, params = replies["preterm_evidence"]
    data, _ = _read(result)
    assert data.dtype == np.uint8
    _assert_same_grid(result, image)
    _assert_shows_decision(data, plugin.result_segment_names(info, "preterm_evidence", params), params,
                           CLASS_NAMES[int(rows[subject]["prediction"])])


def test_regridded_scan_as_nifti_and_nrrd(server, regridded, orig_reference, tmp_path):
    """A 0.8 mm, PIR, tilted copy of a scan, uploaded as Slicer uploads a volume it loaded (NIfTI, and NRRD with
    Slicer's file extension setting on .nrrd): results lie on its own grid and match ``run inference``."""
    row = _predictions(orig_reference)[REGRID]
    handler, _ = _read(orig_reference / REGRID / f"{REGRID}_relevance_{app_preset()}_orig.nii.gz")
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    info = client.info()
    maps = {}
    for kind, path in regridded.items():
        image_id = f"{REGRID}_{kind}"
        assert client.upload_image(str(path), image_id)["image"] == image_id
        for model in ("preterm_evidence", "relevance"):
            result, params = client.infer(model, image_id, plugin.infer_params(info, model))
            assert result.endswith(".nrrd")
            _assert_same_grid(result, path)
            _assert_probabilities(params, row)
            maps[kind, model] = _read(result)[0], params
        np.testing.assert_allclose(maps[kind, "relevance"][0], handler, rtol=1e-5, atol=1e-7)
        labels, params = maps[kind, "preterm_evidence"]
        _assert_shows_decision(labels, list(EVIDENCE_LABELS), params, CLASS_NAMES[int(row["prediction"])])
    _assert_same_bands_up_to_edges(maps["nifti", "preterm_evidence"][0], maps["nrrd", "preterm_evidence"][0])


def _assert_same_bands_up_to_edges(a: np.ndarray, b: np.ndarray, max_fraction: float = 1e-4):
    """The evidence labelmaps of one scan read by two readers (NIfTI, NRRD) are equal but at band edges.

    Why a tolerance: the two readers give the same voxels but float32 affines that differ in the last bits, so the
    network inputs (and the relevance maps, checked above to rtol 1e-5) differ by rounding, and a voxel whose share
    of the ranked relevance lies within ~1e-5 of a level can fall on either side of that band edge (band_edges.py).
    Only a few voxels may differ (seen on one machine: 5 of 2,304,000)."""
    assert_same_bands_up_to_edges(a, b, max_fraction)


def _curl(url: str, task: str, path: Path, output: str | None, params: dict | None = None,
          filename: str | None = None):
    """What the curl lines of (docs/label.md, serving the bundle) send: the file in the request, ``output`` as a
    query parameter."""
    with path.open("rb") as f:
        return requests.post(f"{url}/infer/{task}", params={"output": output} if output else None,
                             files={"file": (filename or path.name, f)},
                             data={"params": json.dumps({"device": "cpu", **(params or {})})}, timeout=300)


def test_curl_requests_keep_working(server, reference, orig_reference, tmp_path):
    out, items = reference
    item = Path(items[0]["image"])
    subject = subject_of(item)
    response = _curl(server, "classification", item, "json")
    assert response.status_code == 200, response.text
    scores = {p["label"]: p["score"] for p in response.json()["prediction"]}
    _assert_probabilities({"probabilities": scores}, _predictions(out)[subject])

    for params, handler in (({}, orig_reference / subject / f"{subject}_relevance_{app_preset()}_orig.nii.gz"),
                            ({"grid": "network"}, out / subject / f"{subject}_relevance_{app_preset()}.nii.gz")):
        response = _curl(server, "relevance", item, "image", params)
        assert response.status_code == 200, response.text
        returned = tmp_path / "relevance.nii.gz"  # the input's extension
        returned.write_bytes(response.content)
        expected, expected_affine = _read(handler)
        data, affine = _read(returned)
        np.testing.assert_allclose(data, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(affine, expected_affine, atol=1e-4)


def test_uploads_that_are_not_scans_are_refused(server, reference, tmp_path):
    _, items = reference
    good = Path(items[0]["image"])
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good.read_bytes()[:2000])  # truncated
    (tmp_path / "empty.nrrd").touch()
    (tmp_path / "notes.txt").write_text("not an image")
    import nibabel as nib

    small = tmp_path / "small.nii.gz"  # readable, but nowhere near the template's field of view
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.uniform(1, 2, (20, 20, 20)).astype(np.float32), np.eye(4)), small)
    flat = tmp_path / "flat.nii.gz"  # the template's field of view, but one value everywhere: not a scan
    nib.save(nib.Nifti1Image(np.ones((128, 96, 96), np.float32), np.eye(4)), flat)
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    cases = {"broken": (broken, "not a readable NIfTI image"),
             "empty": (tmp_path / "empty.nrrd", "not a readable NRRD"),
             "notes": (tmp_path / "notes.txt", "only these are accepted"),
             "small": (small, "field of view"),
             "flat": (flat, "a constant image, not a scan")}
    for image_id, (path, reason) in cases.items():
        with pytest.raises(MONAILabelClientException) as caught:
            client.upload_image(str(path), image_id)
        assert "Status: 422" in caught.value.msg and "upload refused" in caught.value.msg, caught.value.msg
        assert reason in caught.value.msg and f"{image_id}{path.name[path.name.find('.'):]}" in caught.value.msg
    assert not set(cases) & set(client.datastore()["objects"])


def test_http_errors_keep_the_server_up(server, reference, tmp_path):
    _, items = reference
    good = Path(items[0]["image"])
    response = _curl(server, "segmentation", good, "json")
    assert response.status_code == 404
    assert "There is no model 'segmentation'" in response.json()["detail"]
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    with pytest.raises(MONAILabelClientException, match="Status: 404"):
        client.infer("", subject_of(good), {})  # what the plugin sent when no selector held the model

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good.read_bytes()[:2000])  # truncated upload
    for path in (broken, tmp_path / "empty.nii.gz"):
        path.touch()
        response = _curl(server, "relevance", path, "image")
        assert response.status_code == 422, response.text
        assert "bad input image" in response.json()["detail"]
        assert "not a readable NIfTI" in response.json()["detail"]

    for task, params, reason in (("preterm_evidence", {"result_extension": ".png"}, "result_extension must be one of"),
                                 ("preterm_evidence", {"result_dtype": "float32"}, "must be an integer type"),
                                 ("relevance", {"grid": "voxel"}, "grid must be one of")):
        response = _curl(server, task, good, "image", params)
        assert response.status_code == 422, response.text
        assert reason in response.json()["detail"]

    response = _curl(server, "classification", good, "json")  # still serving
    assert response.status_code == 200
    assert {p["label"] for p in response.json()["prediction"]} == {"term", "preterm"}
