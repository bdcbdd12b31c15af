"""Process set-up: the process group from torchrun's environment, and the device mesh.

    device = plait.init()              # reads RANK, WORLD_SIZE, MASTER_ADDR, ... as torchrun sets them
    mesh = plait.make_mesh(dp=2, pp=2, device_type=device.type)  # a DeviceMesh with axes "pp" and "dp"

The device decides the backend: cuda:LOCAL_RANK with NCCL, or the CPU with
gloo (see [Note: one device choice]).

Ranks are laid out with `dp` innermost: rank = pp_rank * dp + dp_rank, so the
replicas of one stage are neighbours (on one node when they fit), and a
stage's gradient all-reduce stays local while activations cross nodes.

Also the small per-process helpers the trainer uses around them: TF32 on
CUDA, batches to the device, and decisions taken on rank 0 for every rank.
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
DEVICES = ("auto", "cpu", "cuda")
_LISTENERS: list[socket.socket] = []  # keeps the store's listening socket open for the process's life


def choose_device(device: str = "auto", backend: str = "auto") -> str:
    """The kind of device a job runs on, "cuda" or "cpu", checked against this machine and the backend.

    [Note: one device choice] `device` (train.device, --device) decides both the
    tensors' device and the collectives' backend: cuda with NCCL, the CPU with
    gloo; "auto" is cuda when CUDA is visible. `backend` (launch.backend,
    --backend) is "auto" or a check: naming the other backend than the device's
    is refused, because gloo on CUDA tensors and NCCL without them either fail
    deep inside torch or silently copy every message through the host.
    Called by the launching parent before any worker starts, and again in each
    worker (init), where a torchrun user bypasses the parent.
    """
    if device not in DEVICES:
        raise ConfigError(f"invalid device {device!r}: must be one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise _node_error("train.device = 'cuda' but no CUDA device is visible; use --device cpu (gloo)")
    kind = device if device != "auto" else ("cuda" if cuda else "cpu")
    if backend == "nccl" and kind == "cpu":
        if device == "cpu":
            raise _node_error("launch.backend = 'nccl' needs CUDA tensors, but train.device = 'cpu'; "
                              "use --backend gloo (or auto), or --device cuda")
        raise _node_error("launch.backend = 'nccl' needs CUDA, but no CUDA device is visible; "
                          "use --backend gloo (or auto) to run on the CPU")
    if backend == "gloo" and kind == "cuda":
        if device == "cuda":
            raise _node_error("launch.backend = 'gloo' does not take CUDA tensors, but train.device = 'cuda'; "
                              "use --backend nccl (or auto), or --device cpu")
        raise _node_error("launch.backend = 'gloo' does not take CUDA tensors, but train.device = 'auto' picks "
                          "cuda on this machine; use --device cpu to run on gloo, or --backend auto (nccl)")
    return kind


def backend_for(device_type: str) -> str:
    """The collectives' backend for a device type: NCCL on cuda, gloo on the CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def check_local_gpus(processes: int, what: str, fix: str) -> None:
    """Refuse more processes on this node than visible GPUs: two ranks would share one GPU.

    `what` says where the count comes from (e.g. "dp(2) x pp(2) = 4"), `fix` what to change.
    """
    count = torch.cuda.device_count()
    if processes > count:
        raise _node_error(f"{what} processes on this node but {_gpus(count)} visible; {fix}")


def device_for_rank(device_type: str | None = None) -> torch.device:
    """This process's device: cuda:LOCAL_RANK for "cuda", else the CPU (None: cuda when CUDA is there).

    Never LOCAL_RANK modulo the GPU count, which would silently put two ranks
    on one GPU: a node with more local processes (LOCAL_WORLD_SIZE, as
    torchrun sets it) than GPUs, or a LOCAL_RANK past the last GPU, is refused.
    """
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type != "cuda":
        return torch.device("cpu")
    local_rank, count = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if "LOCAL_WORLD_SIZE" in os.environ:  # checked first: every local rank refuses alike, one line per node
        n = int(os.environ["LOCAL_WORLD_SIZE"])
        check_local_gpus(n, f"LOCAL_WORLD_SIZE = {n}",
                         f"start at most {count} per node (torchrun --nproc-per-node {count}), or use --device cpu")
    if local_rank >= count:  # without LOCAL_WORLD_SIZE (a hand-made environment), rank by rank
        raise ConfigError(f"LOCAL_RANK = {local_rank} but {_gpus(count)} visible on this node; start at most "
                          f"{count} processes per node, or use --device cpu")
    return torch.device("cuda", local_rank)


def _gpus(count: int) -> str:
    return f"{count} GPU{'' if count == 1 else 's'}"


def _node_error(message: str) -> ConfigError:
    """A refusal every process on this node makes alike: only local rank 0 prints it (one line per node)."""
    return ConfigError(message, shared=int(os.environ.get("LOCAL_RANK", 0)) != 0)


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


def init(device: str | torch.device = "auto", backend: str | None = None,
         timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Initialise torch.distributed from the environment torchrun (or srun) sets; this process's device.

    `device` is "auto", "cpu" or "cuda" (resolved and checked by
    `choose_device`, then cuda:LOCAL_RANK), or a torch.device already
    resolved. The backend follows it (NCCL on CUDA, gloo on the CPU); a
    `backend` given must agree (see [Note: one device choice]). Pass the
    returned device's type to `make_mesh`. A single process (no WORLD_SIZE,
    or WORLD_SIZE=1) needs no process group: then only the device is chosen.
    `timeout_s` bounds every collective, so a lost peer turns into an error
    instead of an endless wait.
    """
    if isinstance(device, str):
        device = device_for_rank(choose_device(device, backend or "auto"))
    else:
        choose_device(device.type, backend or "auto")  # only the agreement of device and backend
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():  # a group made elsewhere must still carry this device's tensors
        _check_group(device.type)
        return device
    if world_size() == 1:
        return device
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"WORLD_SIZE is set but {var} is not; start the workers with torchrun")
    backend = backend if backend not in (None, "auto") else backend_for(device.type)
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
    return device


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


def _check_group(device_type: str) -> None:
    """Refuse a device the existing process group's backend cannot carry (gloo: CPU, NCCL: CUDA)."""
    backend = dist.get_backend()
    if backend in ("gloo", "nccl") and backend != backend_for(device_type):
        raise ConfigError(f"device type {device_type!r} does not match the process group's backend {backend!r} "
                          f"(gloo carries CPU tensors, nccl CUDA ones); use the device plait.init returned")


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


def make_mesh(dp: int = 1, pp: int = 1, device_type: str | None = None) -> DeviceMesh | None:
    """The device mesh of a dp x pp layout, axes named "pp" and "dp".

    `device_type` is the type of the device `init` returned ("cuda" or
    "cpu"); left out, the one the process group's backend carries (cuda for
    NCCL, the CPU otherwise), so the mesh, the backend and the tensors agree.
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
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    _check_group(device_type)
    return init_device_mesh(device_type, (pp, dp), mesh_dim_names=("pp", "dp"))


def use_tf32(device: torch.device) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores.

    PyTorch leaves float32 matmuls in full precision by default: about 67
    TFLOP/s on an H100 SXM, against about 495 (dense) with TF32, whose 10-bit
    mantissa GPT training tolerates (nanoGPT turns it on too). The CPU is
    left as it is.
    """
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch of token ids on `device`; on the CPU, the batch itself.

    To a GPU it is copied from pinned memory with non_blocking=True, so the
    host goes on queueing the step instead of waiting for the copy (a
    blocking copy from pageable memory synchronises the stream). The copy is
    queued on the stream the step then runs on, so the step reads it in
    order; torch's pinned-memory allocator keeps the pinned buffer until the
    copy is done.
    """
    if device.type != "cuda":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)


def on_rank0(fn, *args):
    """Run `fn` on rank 0 only and hand its result, or its error, to every rank.

    Used for decisions that must agree everywhere (the run directory); an error
    on rank 0 is raised on all ranks instead of leaving the others waiting.
    """
    result, error = None, None
    if rank() == 0:
        try:
            result = fn(*args)
        except ConfigError as e:
            error = str(e)
    if dist.is_initialized():
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise ConfigError(error, shared=True)
    return result
