"""End of a distributed run (``configs/multi_gpu_*.json``, torchrun or SLURM): every rank waits for the others,
destroys the process group and frees it while Python is still alive.

The last step matters with gloo (CPU). ``destroy_process_group`` shuts the group down, but DDP keeps a reference to
it, so its worker threads live on until the DDP wrapper is garbage-collected, and the bundle's parsed config and
Ignite's engines hold it in reference cycles that only the interpreter's final collection breaks. A worker thread
that destroys a finished barrier there needs the GIL of an interpreter being torn down, and the rank aborts with
"terminate called without an active exception" after a successful run (torch 2.13, about 1 run in 10 on an idle
2-core machine: the same abort the unmerged pytorch/pytorch#179291 describes for a group never destroyed). A
collection at exit (``atexit``, after ``monai.bundle run`` has returned and its workflow is unreachable) frees the
wrapper and the group, whose destructor joins its threads while Python still runs.
"""

from __future__ import annotations

import atexit
import gc

import torch.distributed as dist

__all__ = ["shutdown"]


def shutdown() -> None:
    """Barrier, ``destroy_process_group`` and a garbage collection at exit (see the module docstring); nothing
    when no process group was initialised."""
    if not dist.is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()
    atexit.register(gc.collect)
