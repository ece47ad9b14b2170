#!/usr/bin/env bash
# GPU benchmark (fast path vs normal training, LRP maps/s, peak GPU memory); arguments go to benchmarks/gpu.py
cd "$(dirname "$0")/.." && exec "${PYTHON:-python}" benchmarks/gpu.py --json "${GPU_JSON:-eval/gpu_benchmark.json}" "$@"
