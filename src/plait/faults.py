"""Fault injection, for the tests that prove plait survives lost workers.

    PLAIT_FAULT="after-step:3:rank=2"      # rank 2 SIGKILLs itself once step 3 is done
    PLAIT_FAULT="in-checkpoint:4:rank=1"   # rank 1 dies after writing its part of checkpoint 4,
                                           # before the manifest makes the checkpoint complete (in
                                           # the background writer's thread, with --async-checkpoint,
                                           # while the training thread is in the steps after it)
    PLAIT_FAULT="hang-after-step:3:rank=2" # rank 2 stops (SIGSTOP): alive, silent, holding its sockets
    PLAIT_FAULT="term-after-step:3:rank=1" # rank 1 sends itself SIGTERM once step 3 is done (a stop
                                           # signal to one worker: plait/stop.py)
    PLAIT_FAULT="term-launcher-after-step:3:rank=0"  # rank 0 sends SIGTERM to its launcher (its parent)
    PLAIT_FAULT="term-launcher-in-prepare:0:rank=0"  # ... as it starts preparing the data
    PLAIT_FAULT="term-twice-after-step:2:rank=0"     # SIGTERM to itself, then again 2.5 s later

Several faults separated by commas hit successive rounds of a job: the first
the first round, the next the round after the first restart, and so on
(TORCHELASTIC_RESTART_COUNT); a round past the list runs clean. So
"in-checkpoint:4:rank=1,after-step:5:rank=2" kills one worker in each of the
first two rounds. Without PLAIT_FAULT this does nothing.
"""

from __future__ import annotations

import os
import signal
import time

import torch.distributed as dist


def maybe_die(point: str, step: int) -> None:
    """SIGKILL (or, for "hang-" points, SIGSTOP; for "term-" points, SIGTERM) this process, or its
    launcher ("term-launcher-"), if PLAIT_FAULT names this point, step and rank."""
    faults = [f for f in os.environ.get("PLAIT_FAULT", "").split(",") if f]
    round_ = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if round_ >= len(faults):
        return
    where, at, who = faults[round_].split(":")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if int(at) != step or who != f"rank={rank}":
        return
    for prefix, target, sig in (("hang-", os.getpid(), signal.SIGSTOP), ("term-launcher-", os.getppid(), signal.SIGTERM),
                                ("term-twice-", os.getpid(), signal.SIGTERM), ("term-", os.getpid(), signal.SIGTERM)):
        if where.startswith(prefix) and where.removeprefix(prefix) == point:
            os.kill(target, sig)
            if prefix == "term-twice-":
                time.sleep(2.5)  # past the window in which a second signal is the same stop (plait/stop.py)
                os.kill(target, sig)
            return
    if where == point:
        os.kill(os.getpid(), signal.SIGKILL)
