"""Benchmark: one DICOM study through the MONAI Deploy app end to end, as a hospital runs it (issue 25's goal:
under 30 s on 2 cores for a 0.8 mm scan). Runs in the Deploy environment:

    .nox/deploy/bin/python benchmarks/dicom_study.py [--subject sub-0002] [--spacing 0.8] [--repeats 3]

(``.nox/deploy`` is made by ``bash run.sh test``, or ``.venv/bin/nox -s deploy``.) A subject of the built-in
synthetic cohort (``data/synthetic``, generated first if missing) is made into a native-like scan at ``--spacing``
mm (``scripts.data.native_like``: moved off the template, scalp-like shell) and written as a DICOM MR series (one
file per slice, ``tests/dicom_series.py``). Timed, each the median of ``--repeats`` runs in fresh
processes: the app on the DICOM study (``python scripts/deploy_app -i <series> -o <out> -m models/model.ts``:
SDK loader and series selection, the volume, registration to the template beside model.ts, inference + LRP, NIfTI
+ JSON + DICOM SEG + SR writers), the app on the same scan as one NIfTI (no DICOM reading or writing), and the
app's start alone (an empty input folder: Python, Holoscan, the SDK and the model load) -- the differences are
the DICOM and the per-study costs. In-process, it also times the registration step alone (the bundle's
preprocessing with ``preprocess`` on vs off).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from dicom_series import write_nifti_as_series  # noqa: E402

from scripts.data.native_like import random_affine, to_native  # noqa: E402
from scripts.data.synthetic import generate_cohort  # noqa: E402
from scripts.runtime.datalist import ensure_datalist  # noqa: E402


def run_app(source: Path, out: Path, model: Path) -> tuple[float, subprocess.CompletedProcess]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "deploy_app"), "-i", str(source), "-o", str(out),
                           "-m", str(model)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    return time.perf_counter() - start, proc


def median_run(source: Path, out: Path, model: Path, repeats: int, must_succeed: bool = True) -> float:
    times = []
    for _ in range(repeats):
        seconds, proc = run_app(source, out, model)
        if must_succeed and proc.returncode != 0:
            raise SystemExit(f"the app failed on {source}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        times.append(seconds)
    return statistics.median(times)


def registration_seconds(scan: Path, model_dir: Path, repeats: int) -> tuple[float, float]:
    """Median seconds of inference.json's preprocessing with preprocess on and off, in this process."""
    from monai.bundle import ConfigParser  # noqa: PLC0415

    out = []
    for preprocess in ("on", "off"):
        parser = ConfigParser()
        parser.read_config(str(ROOT / "configs" / "inference.json"))
        parser.update({"bundle_root": str(ROOT), "ckpt_dir": str(model_dir), "preprocess": preprocess,
                       "device": "$torch.device('cpu')"})
        preprocessing = parser.get_parsed_content("preprocessing")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            preprocessing({"image": str(scan)})
            times.append(time.perf_counter() - start)
        out.append(statistics.median(times))
    return out[0], out[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subject", default="sub-0002", help="subject of data/synthetic (default: %(default)s)")
    ap.add_argument("--spacing", type=float, default=0.8, help="voxel size of the scan in mm (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=5, help="seed of the random move (default: %(default)s)")
    ap.add_argument("--model", default=str(ROOT / "models" / "model.ts"),
                    help="model.ts with the template beside it (default: the shipped models/model.ts)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement, median (default: %(default)s)")
    args = ap.parse_args(argv)
    model = Path(args.model)
    synthetic = str(ROOT / "data" / "synthetic")
    datalist = ensure_datalist(None, synthetic, synthetic_dir=synthetic, generator=generate_cohort)
    items = {it["subject"]: it for part in json.loads(Path(datalist).read_text()).values() if isinstance(part, list)
             for it in part}
    if args.subject not in items:
        raise SystemExit(f"--subject {args.subject} is not in {datalist}")
    item, base = items[args.subject], Path(datalist).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = to_native(base / item["image"], base / item["tissue"], tmp / "native",
                          random_affine(np.random.default_rng(args.seed)), args.subject, spacing=args.spacing)
        study = tmp / "dicom"
        shape = write_nifti_as_series(files["image"], study / "series")["shape"]
        nifti_in = tmp / "nifti"
        nifti_in.mkdir()
        shutil.copy(files["image"], nifti_in / f"{args.subject}.nii.gz")
        (tmp / "empty").mkdir()
        dicom_s = median_run(study, tmp / "out_dicom", model, args.repeats)
        result = json.loads(next((tmp / "out_dicom").rglob("*_probabilities.json")).read_text())
        nifti_s = median_run(nifti_in, tmp / "out_nifti", model, args.repeats)
        start_s = median_run(tmp / "empty", tmp / "out_empty", model, args.repeats, must_succeed=False)
        on_s, off_s = registration_seconds(files["image"], model.parent, args.repeats)
        outputs = sorted(p.name for p in (tmp / "out_dicom").rglob("*") if p.is_file())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {args.subject} as a {shape[0]}x{shape[1]}x{shape[2]} series at {args.spacing} mm "
          f"({shape[2]} files), {model}; {platform.machine()}, {os.cpu_count()} cores, load {load:.2f}, "
          f"median of {args.repeats}")
    print(f"# decision {result.get('prediction')}, p(term) {result['probabilities']['term']:.3f}; "
          f"outputs: {', '.join(outputs)}")
    print("| measurement | seconds |")
    print("|---|---|")
    print(f"| DICOM study end to end (app process) | {dicom_s:.1f} |")
    print(f"| same scan as NIfTI (app process) | {nifti_s:.1f} |")
    print(f"| app start, empty input | {start_s:.1f} |")
    print(f"| preprocessing with registration (in process) | {on_s:.1f} |")
    print(f"| preprocessing without registration (in process) | {off_s:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
