"""A build launched under `torchrun`: every process runs the torch stage (recovery trains
data-parallel), only rank 0 goes on to export, package and write. Without torchrun (no WORLD_SIZE
in the environment) this is one process, rank 0 of 1, and nothing here imports torch.distributed."""
from __future__ import annotations

import atexit
import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process writes (logs, reports, the package)."""
    return rank() == 0


def process_group(device):
    """torch.distributed, with the process group up (gloo for CPU tensors, NCCL for CUDA ones);
    started on first use, from torchrun's environment, and closed at exit."""
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if getattr(device, "type", "cpu") == "cuda" else "gloo"
        dist.init_process_group(backend)
        atexit.register(_close)
    return dist


def _close():
    """Every rank reaches the end before any tears its connections down: a rank closing while
    another's gloo threads still talk to it can abort ("terminate called without an active
    exception"). Bounded, so a rank that died does not hang the others."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except Exception:  # noqa: BLE001 - a peer already gone: close anyway
            pass
        dist.destroy_process_group()
