"""Process set-up: the process group from torchrun's environment, and the device mesh.

    plait.init()                       # reads RANK, WORLD_SIZE, MASTER_ADDR, ... as torchrun sets them
    mesh = plait.make_mesh(dp=2, pp=2) # a DeviceMesh with axes "pp" and "dp"

Ranks are laid out with `dp` innermost: rank = pp_rank * dp + dp_rank, so the
replicas of one stage are neighbours (on one node when they fit), and a
stage's gradient all-reduce stays local while activations cross nodes.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait.errors import ConfigError

DEFAULT_TIMEOUT_S = 120.0


def device_for_rank() -> torch.device:
    """This process's device: cuda:LOCAL_RANK when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def world_size() -> int:
    """Processes in the job: the process group's size, else WORLD_SIZE, else 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def init(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise torch.distributed from the environment torchrun (or srun) sets.

    A single process (no WORLD_SIZE, or WORLD_SIZE=1) needs no process group:
    then this does nothing. The backend follows the device (NCCL on CUDA,
    gloo on the CPU) unless given. `timeout_s` bounds every collective, so a
    lost peer turns into an error instead of an endless wait.
    """
    if dist.is_initialized() or world_size() == 1:
        return
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"WORLD_SIZE is set but {var} is not; start the workers with torchrun")
    device = device_for_rank()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)


def make_mesh(dp: int = 1, pp: int = 1) -> DeviceMesh | None:
    """The device mesh of a dp x pp layout, axes named "pp" and "dp".

    Checks that the layout fills the job exactly. In a single process with no
    process group (dp = pp = 1) there is nothing to mesh: returns None, which
    the Engine takes as "one process".
    """
    n = world_size()
    if dp * pp != n:
        raise ConfigError(f"dp({dp}) * pp({pp}) = {dp * pp} != world size {n}; "
                          f"choose --dp and --pp whose product is {n}, or start {dp * pp} processes", shared=True)
    if not dist.is_initialized():
        return None
    return init_device_mesh(device_for_rank().type, (pp, dp), mesh_dim_names=("pp", "dp"))
