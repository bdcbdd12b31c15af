"""Fault injection, for the tests that prove plait survives lost workers.

    PLAIT_FAULT="after-step:3:rank=2"      # rank 2 SIGKILLs itself once step 3 is done
    PLAIT_FAULT="in-checkpoint:4:rank=1"   # rank 1 dies after writing its part of checkpoint 4,
                                           # before the manifest makes the checkpoint complete
    PLAIT_FAULT="hang-after-step:3:rank=2" # rank 2 stops (SIGSTOP): alive, silent, holding its sockets

Several faults separated by commas hit successive rounds of a job: the first
the first round, the next the round after the first restart, and so on
(TORCHELASTIC_RESTART_COUNT); a round past the list runs clean. So
"in-checkpoint:4:rank=1,after-step:5:rank=2" kills one worker in each of the
first two rounds. Without PLAIT_FAULT this does nothing.
"""

from __future__ import annotations

import os
import signal

import torch.distributed as dist


def maybe_die(point: str, step: int) -> None:
    """SIGKILL (or, for "hang-" points, SIGSTOP) this process if PLAIT_FAULT names this point, step and rank."""
    faults = [f for f in os.environ.get("PLAIT_FAULT", "").split(",") if f]
    round_ = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if round_ >= len(faults):
        return
    where, at, who = faults[round_].split(":")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if where.removeprefix("hang-") == point and int(at) == step and who == f"rank={rank}":
        os.kill(os.getpid(), signal.SIGSTOP if where.startswith("hang-") else signal.SIGKILL)
