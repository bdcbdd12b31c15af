"""Fault injection, for the tests that prove plait survives lost workers.

    PLAIT_FAULT="after-step:3:rank=2"      # rank 2 SIGKILLs itself once step 3 is done
    PLAIT_FAULT="in-checkpoint:4:rank=1"   # rank 1 dies after writing its part of checkpoint 4,
                                           # before the manifest makes the checkpoint complete
    PLAIT_FAULT="hang-after-step:3:rank=2" # rank 2 stops (SIGSTOP): alive, silent, holding its sockets

Only the first round of a job is hit (TORCHELASTIC_RESTART_COUNT is 0), so a
restarted job runs clean. Without PLAIT_FAULT this does nothing.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist


def maybe_die(point: str, step: int) -> None:
    """SIGKILL (or, for "hang-" points, SIGSTOP) this process if PLAIT_FAULT names this point, step and rank."""
    spec = os.environ.get("PLAIT_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    where, at, who = spec.split(":")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if where.removeprefix("hang-") == point and int(at) == step and who == f"rank={rank}":
        os.kill(os.getpid(), signal.SIGSTOP if where.startswith("hang-") else signal.SIGKILL)
