"""Benchmark: a native scan through ``run inference``'s own path, step by step, beside the same subject in template
space, in one process.

    .venv/bin/python benchmarks/native_scan.py [--subject sub-0002] [--seed 5] [--ckpt_dir models] [--repeats 3]

The subject of the built-in synthetic cohort (``data/synthetic``, generated there first if missing) is made into a
native-like scan (``scripts.data.native_like``: moved by a random affine drawn with ``--seed``, a 0.9 mm grid of
its own, a scalp-like shell) and read back through ``configs/inference.json``'s ``preprocessing`` (parsed by
``monai.bundle.ConfigParser``) with ``preprocess`` ``auto`` (registered to the template beside the weights) and
``off`` (used as it is), and the template-space original with ``auto`` (the registration check only). For each:
p(term), the input-QC verdict (failed measures), and the median time of the preprocessing (load, registration
check and registration, resampling), the forward pass and one relevance map of the recommended preset. These are
the numbers of (docs/data.md, native scans).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.data.native_like import random_affine, to_native  # noqa: E402
from scripts.data.synthetic import generate_cohort  # noqa: E402
from scripts.evaluation.robustness import Measurer  # noqa: E402
from scripts.lrp import LRP  # noqa: E402
from scripts.runtime.datalist import ensure_datalist  # noqa: E402
from scripts.runtime.explain import APP_PRESET  # noqa: E402
from scripts.runtime.qc import evaluate_input  # noqa: E402


def timed(fn, repeats: int):
    """(last result, median seconds) of ``repeats`` calls."""
    seconds, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - start)
    return out, statistics.median(seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subject", default="sub-0002", help="subject of data/synthetic (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=5, help="seed of the random move (default: %(default)s)")
    ap.add_argument("--ckpt_dir", default=str(ROOT / "models"),
                    help="weights, QC reference and template (default: the shipped models/)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per step, median (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    synthetic = str(ROOT / "data" / "synthetic")
    datalist = ensure_datalist(None, synthetic, synthetic_dir=synthetic, generator=generate_cohort)
    data = json.loads(Path(datalist).read_text())
    items = {it["subject"]: it for it in data["training"] + data["test"]}
    if args.subject not in items:
        raise SystemExit(f"--subject {args.subject} is not in {datalist}")
    item = items[args.subject]
    base = Path(datalist).parent
    measured = {"auto": Measurer(args.ckpt_dir, {"preprocess": "auto"}),
                "off": Measurer(args.ckpt_dir, {"preprocess": "off"})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = to_native(base / item["image"], base / item["tissue"], Path(tmp),
                          random_affine(np.random.default_rng(args.seed)), args.subject)
        cases = [("template space", base / item["image"], "auto"), ("native", files["image"], "auto"),
                 ("native", files["image"], "off")]
        for name, path, preprocess in cases:
            m = measured[preprocess]
            image, t_pre = timed(lambda m=m, path=path: m.input(path), args.repeats)
            x = torch.as_tensor(image).as_subclass(torch.Tensor)[None].float()
            with torch.no_grad():
                logits, t_fwd = timed(lambda m=m, x=x: m.network(x), args.repeats)
            _, t_lrp = timed(lambda m=m, x=x: LRP(m.network)(x, APP_PRESET, target="pred"), args.repeats)
            verdict = evaluate_input(m.qc, m.network, image)
            rows.append({"scan": name, "preprocess": preprocess,
                         "registered": bool(image.meta.get("registered_to_template", False)),
                         "p_term": float(torch.softmax(logits, 1)[0, 0]),
                         "qc": "passed" if verdict["pass"] else "failed: " + ", ".join(verdict["failed"]),
                         "preprocessing_s": t_pre, "forward_s": t_fwd, "relevance_s": t_lrp})
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = platform.processor() or platform.machine()
    print(f"# {args.subject} (seed {args.seed}), weights {args.ckpt_dir}; {machine}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {args.threads} threads, load {load:.2f}, median of {args.repeats}")
    print(f"| scan | preprocess | registered | p(term) | input QC | preprocessing s | forward s | {APP_PRESET} s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scan']} | {r['preprocess']} | {'yes' if r['registered'] else 'no'} | {r['p_term']:.3f} | "
              f"{r['qc']} | {r['preprocessing_s']:.1f} | {r['forward_s']:.2f} | {r['relevance_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
