"""MONAI Label on a DICOMweb server (issue 25, item 4): a real Orthanc with its DICOMweb plugin (Debian ``orthanc``,
``orthanc-dicomweb``) holds a native scan as a DICOM MR series; a real ``monailabel start_server`` serves the app
with ``--studies http://127.0.0.1:<port>/dicom-web``; 3D Slicer's plugin client (``slicer_client.py``) takes the
series with *Next Sample*, runs the evidence task on it and saves the result back, which MONAI Label stores in
Orthanc as a DICOM SEG (dcmqi's ``itkimage2segimage``).

Orthanc listens on every interface and has no bind-address setting, so this module runs in a network namespace of
its own (``unshare(CLONE_NEWNET)`` for the test thread, loopback only; Orthanc and the server inherit it; the thread
returns to the machine's namespace afterwards). Both daemons are stopped by pid, also when a test fails. Where
Orthanc, its DICOMweb plugin or the namespace are unavailable the module skips with one line
(``REQUIRE_SYSTEM_TESTS=1``, set by ``.ci/run``, makes that a failure)."""

from __future__ import annotations

import csv
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import slicer_plugin as plugin
from conftest import TINY, TINY_OVERRIDES, app_preset, run_bundle
from dicom_series import write_nifti_as_series
from native_fixtures import native_input
from slicer_client import MONAILabelClient

from scripts.runtime.evidence import EVIDENCE_LABELS

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "scripts" / "label_app"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
CLONE_NEWNET = 0x40000000
CONF = json.dumps({**TINY_OVERRIDES, "device": "cpu"}, separators=(",", ":"))


def _unavailable(reason: str):
    if os.environ.get("REQUIRE_SYSTEM_TESTS") == "1":
        pytest.fail(f"{reason} (REQUIRE_SYSTEM_TESTS=1)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: Path, what: str, tries: int = 240) -> None:
    for _ in range(tries):
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-5000:]}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{what} did not come up:\n{log.read_text()[-5000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def private_network():
    """This thread, and every process it starts, in a network namespace of its own with only loopback up."""
    orthanc = shutil.which("Orthanc", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    ip = shutil.which("ip", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if orthanc is None or not os.path.isfile(DICOMWEB_PLUGIN):
        _unavailable("Orthanc or its DICOMweb plugin is not installed (Debian: orthanc orthanc-dicomweb)")
    if ip is None:
        _unavailable("no 'ip' command (Debian: iproute2) to bring up loopback in a private network namespace")
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    if libc.unshare(CLONE_NEWNET) != 0:
        os.close(own)
        _unavailable(f"cannot make a private network namespace for Orthanc: {os.strerror(ctypes.get_errno())}")
    try:
        subprocess.run([ip, "link", "set", "lo", "up"], check=True)
        yield orthanc
    finally:
        back = libc.setns(own, CLONE_NEWNET)
        os.close(own)
        if back != 0:
            raise OSError(ctypes.get_errno(), "cannot return to the machine's network namespace")


@pytest.fixture(scope="module")
def orthanc(private_network, tmp_path_factory) -> str:
    """Orthanc with the DICOMweb plugin, storage in a temporary folder: its URL."""
    folder = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {"Name": "preterm-test", "StorageDirectory": str(folder / "storage"),
              "IndexDirectory": str(folder / "index"), "HttpPort": port, "DicomServerEnabled": False,
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [DICOMWEB_PLUGIN],
              "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = folder / "orthanc.log"
    with log.open("w") as f:
        proc = subprocess.Popen([private_network, str(folder / "orthanc.json")], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/system", proc, log, "Orthanc")
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def stored_series(orthanc, cohort, trained, tmp_path_factory) -> dict:
    """A test subject as a native scan (scalp, rotated, 0.9 mm), written as an axial MR series (one file per slice)
    and stored in Orthanc; ``run inference`` on the same scan as NIfTI gives the reference decision."""
    folder = tmp_path_factory.mktemp("dicomweb_series")
    item = json.loads((cohort / "datalist.json").read_text())["test"][0]
    scan, _ = native_input(cohort, item, folder, np.random.default_rng(5))
    info = write_nifti_as_series(scan, folder / "dicom")
    for path in sorted((folder / "dicom").glob("*.dcm")):
        requests.post(f"{orthanc}/instances", data=path.read_bytes(), timeout=30).raise_for_status()
    out = folder / "reference"
    run_bundle("inference", "configs/inference.json", "--dataset_dir", str(scan.parent), "--ckpt_dir",
               str(trained[0]), "--output_dir", str(out), "--lrp_presets", json.dumps([app_preset()]), *TINY)
    with (out / "predictions.csv").open() as f:
        row = next(r for r in csv.DictReader(f) if r["subject"] == item["subject"])
    return {**info, "nifti": scan, "row": row}


@pytest.fixture(scope="module")
def server(orthanc, stored_series, tiny_bundle, tmp_path_factory) -> str:
    """``monailabel start_server`` on Orthanc's DICOMweb root, started after the series is stored (MONAI Label
    caches the series list for MONAI_LABEL_DICOMWEB_CACHE_EXPIRY seconds); MONAI Label's own defaults otherwise:
    the app chooses the MR search filter and finds dcmqi beside this Python."""
    folder = tmp_path_factory.mktemp("dicomweb_server")
    port = _free_port()
    log = folder / "server.log"
    cmd = [str(Path(sys.executable).parent / "monailabel"), "start_server", "--app", str(APP_DIR),
           "--studies", f"{orthanc}/dicom-web", "--host", "127.0.0.1", "--port", str(port),
           "--conf", "bundle", str(tiny_bundle), "--conf", "bundle_overrides", CONF]
    env = {k: v for k, v in os.environ.items() if k != "MONAI_LABEL_DICOMWEB_SEARCH_FILTER"
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(MONAI_LABEL_TASKS_TRAIN="false", MONAILABEL_PYEXE=sys.executable,
               MONAI_LABEL_DICOMWEB_CACHE_PATH=str(folder / "cache"))
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/info/", proc, log, "monailabel start_server")
        yield url
    finally:
        _stop(proc)


def _ras(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A result file (NRRD, as the plugin's client saves it) as (array, RAS affine), read by ITK as Slicer reads it."""
    from monai.data import ITKReader  # noqa: PLC0415 (Label environment)

    reader = ITKReader()
    data, meta = reader.get_data(reader.read(path))
    return np.asarray(data), np.asarray(meta["affine"], dtype=np.float64)


def _on_grid(data: np.ndarray, affine: np.ndarray, grid_affine: np.ndarray, shape) -> np.ndarray:
    """The non-zero voxels of ``data`` (RAS ``affine``) put on another grid by their world position (a SEG may hold
    fewer frames than the series: dcmqi leaves out empty slices)."""
    ijk = np.argwhere(data > 0)
    moved = (np.linalg.inv(grid_affine) @ affine @ np.c_[ijk, np.ones(len(ijk))].T)[:3].T
    index = np.rint(moved).astype(int)
    assert np.abs(moved - index).max() < 1e-3, "the SEG's frames are not on the series' grid"
    assert ((index >= 0) & (index < shape)).all()
    out = np.zeros(shape, bool)
    out[tuple(index.T)] = True
    return out


def test_evidence_on_a_series_from_dicomweb_and_the_seg_stored_back(server, orthanc, stored_series, tmp_path):
    row = stored_series["row"]
    client = MONAILabelClient(server, tmpdir=str(tmp_path))
    info = client.info()
    strategy = plugin.strategy(info)
    sample = client.next_sample(strategy, plugin.strategy_params(info, strategy))
    assert sample["id"] == stored_series["series"]  # the MR series is listed (MONAI Label's own filter is CT)

    picked, sent = plugin.auto_run_model(info)
    assert picked == sent == "preterm_evidence"
    result, params = client.infer(sent, sample["id"], plugin.infer_params(info, sent))
    # the same decision as run inference on the scan as NIfTI; the probabilities differ only by the series'
    # uint16 pixels and the registration that follows from them
    assert params["target"] == int(row["prediction"])
    assert params["probabilities"]["preterm"] == pytest.approx(float(row["prob_preterm"]), abs=0.02)
    assert params["qc"]["pass"] is True and params["preset"] == app_preset()

    # the labelmap lies on the series' own grid (the geometry write_series declared), on the brain
    labels, affine = _ras(result)
    assert labels.shape == tuple(stored_series["shape"])
    np.testing.assert_allclose(affine, stored_series["affine"], atol=1e-3)
    names = plugin.result_segment_names(info, sent, params)
    assert names == list(EVIDENCE_LABELS) and labels.max() > 0

    # Submit Label, as the plugin sends it: segment names in order, the label file, tag final -> DICOM SEG
    label_info = [{"name": name, "idx": i + 1} for i, name in enumerate(names)]
    client.save_label(sample["id"], result, params={"label_info": label_info, "model": sent})
    segs = requests.get(f"{orthanc}/dicom-web/series", params={"Modality": "SEG"}, timeout=30).json()
    assert len(segs) == 1
    seg_study = segs[0]["0020000D"]["Value"][0]
    seg_series = segs[0]["0020000E"]["Value"][0]
    assert seg_study == stored_series["study"]
    instance = requests.get(f"{orthanc}/dicom-web/studies/{seg_study}/series/{seg_series}/metadata",
                            timeout=30).json()[0]
    seg = pydicom.Dataset.from_json(instance, bulk_data_uri_handler=lambda *_: b"")
    assert seg.FrameOfReferenceUID == stored_series["frame_of_reference"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == stored_series["series"]
    stored_names = [s.SegmentLabel for s in seg.SegmentSequence]
    present = sorted(int(v) for v in np.unique(labels) if v)
    assert present != list(range(1, len(present) + 1))  # a gap (empty segments first): MONAI Label alone misnames
    assert stored_names == [names[v - 1] for v in present]

    # dcmqi (what 3D Slicer's QuantitativeReporting loads a SEG with) gives back the labelmap, voxel for voxel
    seg_file = tmp_path / "seg.dcm"
    files = requests.get(f"{orthanc}/dicom-web/studies/{seg_study}/series/{seg_series}/instances", timeout=30).json()
    sop = files[0]["00080018"]["Value"][0]
    orthanc_id = requests.post(f"{orthanc}/tools/lookup", data=sop, timeout=30).json()[0]["ID"]
    seg_file.write_bytes(requests.get(f"{orthanc}/instances/{orthanc_id}/file", timeout=30).content)
    back = tmp_path / "back"
    back.mkdir()
    subprocess.run([str(Path(sys.executable).parent / "segimage2itkimage"), "--inputDICOM", str(seg_file),
                    "--outputDirectory", str(back), "--outputType", "nifti"], check=True, capture_output=True)
    meta = json.loads((back / "meta.json").read_text())
    rebuilt = np.zeros(labels.shape, np.uint8)
    for group, attributes in enumerate(meta["segmentAttributes"]):
        for attribute in attributes:
            segment = nib.load(back / f"{group + 1}.nii.gz")
            data = np.asarray(segment.dataobj)
            value = names.index(attribute["SegmentLabel"]) + 1
            rebuilt[_on_grid(data, segment.affine, affine, labels.shape)] = value
    np.testing.assert_array_equal(rebuilt, labels)
