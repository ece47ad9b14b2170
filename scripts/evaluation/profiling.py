"""Time and peak-memory measurement of one call (CPU: peak RSS above the level before the call, read from
/proc; CUDA: torch.cuda.max_memory_allocated)."""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["measure_call"]


def _status_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure_call(fn, device: torch.device | str = "cpu"):
    """Run ``fn()`` once; return (result, seconds, peak extra bytes or -1 where it cannot be measured)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM), Linux only
            base = _status_kb("VmRSS:") * 1024
        except OSError:
            base = None
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _status_kb("VmHWM:") * 1024 - base if base is not None else -1
    return result, time.perf_counter() - start, peak


def reexec_with_returning_malloc(module: str | None = None) -> None:
    """Restart this process once with glibc's mmap threshold fixed at 64 KiB, so that every large tensor is
    mapped and unmapped on its own and the peak RSS reflects the memory a call really needed (with the
    default dynamic threshold, freed blocks stay resident and later peaks read as zero)."""

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    argv = [sys.executable, "-m", module, *sys.argv[1:]] if module else [sys.executable, *sys.argv]
    os.execve(sys.executable, argv, env)
