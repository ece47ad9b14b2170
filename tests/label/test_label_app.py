"""The MONAI Label app (scripts/label_app) with stock MONAI Label 0.8.5: in-process through BundleInferTask, and
through a real ``monailabel start_server`` on 127.0.0.1 answering HTTP infer requests. Runs in the Label
environment (``nox -s label``)."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
from conftest import ROOT, TINY_OVERRIDES

APP_DIR = ROOT / "scripts" / "label_app"
# compact JSON: the monailabel launcher (a shell script) splits arguments at spaces
CONF = {"bundle_overrides": json.dumps({**TINY_OVERRIDES, "device": "cpu"}, separators=(",", ":"))}


def _predictions(out: Path) -> dict[str, dict]:
    return {row["subject"]: row for row in csv.DictReader((out / "predictions.csv").open())}


def _scores(params: dict) -> dict[str, float]:
    return {p["label"]: p["score"] for p in params["prediction"]}


@pytest.fixture(scope="module")
def app(tiny_bundle, tmp_path_factory):
    from monailabel.interfaces.utils.app import app_instance

    studies = tmp_path_factory.mktemp("studies")
    return app_instance(str(APP_DIR), str(studies), {"bundle": str(tiny_bundle), **CONF})


def test_in_process_classification_and_relevance(app, reference):
    from monailabel.tasks.infer.bundle import BundleInferTask

    out, items = reference
    rows = _predictions(out)
    assert set(app.infer_tasks if hasattr(app, "infer_tasks") else app._infers) == {"classification", "relevance"}
    assert all(isinstance(task, BundleInferTask) for task in app._infers.values())
    assert app.info()["models"]["classification"]["type"] == "classification"
    for item in items[:3]:
        subject = Path(item["image"]).name.split(".")[0]
        result = app.infer({"model": "classification", "image": item["image"], "device": "cpu"})
        scores = _scores(result["params"])
        assert scores["term"] == pytest.approx(float(rows[subject]["prob_term"]), abs=1e-5)
        assert scores["preterm"] == pytest.approx(float(rows[subject]["prob_preterm"]), abs=1e-5)

        result = app.infer({"model": "relevance", "image": item["image"], "device": "cpu"})
        returned = nib.load(result["file"])
        handler = nib.load(out / subject / f"{subject}_relevance_a2b1.nii.gz")
        np.testing.assert_allclose(returned.get_fdata(), handler.get_fdata(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(returned.affine, handler.affine, atol=1e-4)
        assert returned.get_data_dtype() == np.float32
        assert result["params"]["preset"] == "a2b1"
        assert result["params"]["probabilities"]["preterm"] == pytest.approx(
            float(rows[subject]["prob_preterm"]), abs=1e-5)
        os.remove(result["file"])


def test_missing_weights_names_the_command(tmp_path):
    from monailabel.interfaces.utils.app import app_instance

    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    for name in ("configs", "scripts"):
        (bundle / name).symlink_to(ROOT / name, target_is_directory=True)
    (tmp_path / "studies").mkdir()
    with pytest.raises(FileNotFoundError, match="model.pt not found.*monai.bundle run training"):
        app_instance(str(APP_DIR), str(tmp_path / "studies"), {"bundle": str(bundle), **CONF})


class _RunsCode:
    """A pickle that runs a shell command when unpickled by a full (not weights-only) loader."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_load_weights_only(tmp_path, reference):
    import torch
    from monailabel.interfaces.utils.app import app_instance

    _, items = reference
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    for name in ("configs", "scripts"):
        (bundle / name).symlink_to(ROOT / name, target_is_directory=True)
    marker = tmp_path / "code_ran"
    torch.save({"weights": _RunsCode(marker)}, bundle / "models" / "model.pt")
    (tmp_path / "studies").mkdir()
    app = app_instance(str(APP_DIR), str(tmp_path / "studies"), {"bundle": str(bundle), **CONF})
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        app.infer({"model": "classification", "image": items[0]["image"], "device": "cpu"})
    assert not marker.exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_bundle, cohort, tmp_path_factory):
    studies = tmp_path_factory.mktemp("server_studies")
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


def _infer(url: str, task: str, path: Path, output: str, filename: str | None = None):
    with path.open("rb") as f:
        return requests.post(f"{url}/infer/{task}", params={"output": output},
                             files={"file": (filename or path.name, f)}, data={"params": json.dumps({"device": "cpu"})},
                             timeout=300)


def test_http_server_answers_both_tasks(server, reference, tmp_path):
    out, items = reference
    rows = _predictions(out)
    info = requests.get(f"{server}/info/", timeout=10).json()
    assert info["models"]["classification"]["type"] == "classification"
    assert info["models"]["relevance"]["type"] == "others"
    item = items[0]
    subject = Path(item["image"]).name.split(".")[0]

    response = _infer(server, "classification", Path(item["image"]), "json")
    assert response.status_code == 200, response.text
    scores = _scores(response.json())
    assert scores["preterm"] == pytest.approx(float(rows[subject]["prob_preterm"]), abs=1e-5)
    assert scores["term"] == pytest.approx(float(rows[subject]["prob_term"]), abs=1e-5)

    response = _infer(server, "relevance", Path(item["image"]), "image")
    assert response.status_code == 200, response.text
    returned = tmp_path / "relevance.nii.gz"
    returned.write_bytes(response.content)
    handler = nib.load(out / subject / f"{subject}_relevance_a2b1.nii.gz")
    np.testing.assert_allclose(nib.load(returned).get_fdata(), handler.get_fdata(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(nib.load(returned).affine, handler.affine, atol=1e-4)


def test_http_errors_keep_the_server_up(server, reference, tmp_path):
    _, items = reference
    good = Path(items[0]["image"])
    response = _infer(server, "segmentation", good, "json")
    assert response.status_code == 404
    assert "There is no model 'segmentation'" in response.json()["detail"]

    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(good.read_bytes()[:2000])  # truncated upload
    for path in (broken, tmp_path / "empty.nii.gz"):
        path.touch()
        response = _infer(server, "relevance", path, "image")
        assert response.status_code == 422, response.text
        assert "bad input image" in response.json()["detail"]
        assert "not a readable NIfTI" in response.json()["detail"]

    response = _infer(server, "classification", good, "json")  # still serving
    assert response.status_code == 200
    assert {p["label"] for p in response.json()["prediction"]} == {"term", "preterm"}
