"""Benchmark: time and size of the run report (``scripts.runtime.report.build_report``) for many subjects, on an
inference output folder written by hand with small volumes (the tests' 64x48x48 grid by default).

    python benchmarks/report_size.py --subjects 16 1000 [--shape 64 48 48]

Prints, per size: seconds to write the report, the size of the report folder, of index.html and of one subject's
page and mosaic.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_run(folder: Path, subjects: int, shape: tuple[int, int, int]) -> None:
    from scripts.runtime.outputs import input_path, relevance_path, write_csv

    rng = np.random.default_rng(0)
    affine = np.array([[0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])  # ALS, as the configs
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid ** 2).sum(axis=0) < 0.85
    rows, relevance_rows = [], []
    for i in range(subjects):
        name = f"sub-{i:04d}"
        image = np.where(brain, rng.normal(size=shape), 0).astype(np.float32)
        relevance = np.where(brain, rng.laplace(scale=1e-4, size=shape), 0).astype(np.float32)
        for data, path in ((image, input_path(folder, name)), (relevance, relevance_path(folder, name, "a2b1"))):
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), path)
        p = float(rng.uniform())
        rows.append({"subject": name, "image": f"/data/{name}.nii.gz", "prob_term": f"{1 - p:.6f}",
                     "prob_preterm": f"{p:.6f}", "prediction": int(p > 0.5), "label": int(rng.uniform() > 0.7),
                     "run_key": "benchmark"})
        relevance_rows.append({"subject": name, "preset": "a2b1", "pred": int(p > 0.5), "target": int(p > 0.5),
                               "conservation": "0.5", "relevance_sum": "0.1"})
    write_csv(rows, folder / "predictions.csv")
    write_csv(relevance_rows, folder / "relevance.csv")


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, nargs="+", default=[16, 1000])
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 48, 48])
    args = ap.parse_args()
    from scripts.runtime.outputs import report_image, report_index, report_page
    from scripts.runtime.report import build_report

    print("| subjects | write (s) | per subject (s) | report folder (MB) | index.html (kB) | one page (kB) | "
          "one mosaic (kB) |")
    print("|---|---|---|---|---|---|---|")
    for n in args.subjects:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            make_run(folder, n, tuple(args.shape))
            start = time.perf_counter()
            build_report(folder, presets=["a2b1"], target="pred")
            seconds = time.perf_counter() - start
            print(f"| {n} | {seconds:.1f} | {seconds / n:.3f} | {size(folder / 'report') / 1e6:.1f} | "
                  f"{report_index(folder).stat().st_size / 1e3:.0f} | "
                  f"{report_page(folder, 'sub-0000').stat().st_size / 1e3:.1f} | "
                  f"{report_image(folder, 'sub-0000', 'mosaic_a2b1').stat().st_size / 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
