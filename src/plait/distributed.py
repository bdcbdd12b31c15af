"""Process set-up: the process group from torchrun's environment, and the device mesh.

    plait.init()                       # reads RANK, WORLD_SIZE, MASTER_ADDR, ... as torchrun sets them
    mesh = plait.make_mesh(dp=2, pp=2) # a DeviceMesh with axes "pp" and "dp"

Ranks are laid out with `dp` innermost: rank = pp_rank * dp + dp_rank, so the
replicas of one stage are neighbours (on one node when they fit), and a
stage's gradient all-reduce stays local while activations cross nodes.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from plait import watchdog
from plait.errors import ConfigError

DEFAULT_TIMEOUT_S = 120.0
_LISTENERS: list[socket.socket] = []  # keeps the store's listening socket open for the process's life


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
    if backend == "nccl":
        _configure_nccl()
    # plait's own watchdog names a silent peer at `timeout_s`; the process group's timeout (after
    # which gloo raises and NCCL's watchdog aborts the process, naming no one) comes later.
    timeout = timedelta(seconds=timeout_s + watchdog.GRACE_S)
    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend, store=_make_store(rank_, world, timeout), rank=rank_, world_size=world,
                            timeout=timeout, **kwargs)
    watchdog.start(timeout_s)


def _configure_nccl() -> None:
    """NCCL's failure handling, set on purpose (a user's own setting wins).

    - TORCH_NCCL_ASYNC_ERROR_HANDLING=3: a collective that fails or passes the
      process group's timeout tears the process down (without the communicator
      clean-up that can itself hang), instead of leaving it wedged. plait's
      watchdog speaks GRACE_S before that, naming the silent peer.
    - The flight recorder keeps the last 2000 collectives of each rank and dumps
      them on a timeout (TORCH_FR_DUMP_TEMP_FILE, /tmp/nccl_trace_rank_<rank> by
      default), for `python -m torch.distributed.flight_recorder.fr_trace`.
    """
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")


def _make_store(rank_: int, world: int, timeout: timedelta) -> dist.Store:
    """The TCPStore the process group meets in, listening on MASTER_ADDR only.

    Left to itself a TCPStore server listens on every interface; rank 0 binds
    the listening socket to the address it was given and hands it over.
    Under a launcher that shares its own rendezvous store with the workers
    (torchrun's default), every rank is a client of that store instead, and
    keys are prefixed by the restart round: a restarted worker must not read
    its dead peer's address from the round before (see the team's notes on
    torchrun restarts).
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(addr, port, world, False, timeout=timeout)
        return dist.PrefixStore(f"plait-round-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if rank_ == 0:
        listener = socket.create_server((addr, port))
        _LISTENERS.append(listener)
        return dist.TCPStore(addr, port, world, True, timeout=timeout, master_listen_fd=listener.fileno(),
                             wait_for_workers=False)
    return dist.TCPStore(addr, port, world, False, timeout=timeout)


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
