"""Device, backend and mesh choice in one process (plait/distributed.py); no process group is started.

Where CUDA is "present", torch.cuda is monkeypatched: any real CUDA call would fail, so a test that
passes also shows which calls were made.
"""

import pytest
import torch
import torch.distributed as dist

from plait import distributed
from plait.errors import ConfigError


@pytest.fixture
def gpus(monkeypatch):
    """`gpus(n)`: torch sees n CUDA devices; `set_device` calls are recorded in the returned list."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)

    def visible(n: int) -> list:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        return chosen

    return visible


@pytest.mark.parametrize("n_gpus,device,backend,kind", [
    (0, "auto", "auto", "cpu"), (0, "cpu", "gloo", "cpu"), (0, "auto", "gloo", "cpu"),
    (2, "auto", "auto", "cuda"), (2, "cuda", "nccl", "cuda"), (2, "auto", "nccl", "cuda"),
    (2, "cpu", "auto", "cpu"), (2, "cpu", "gloo", "cpu"),
])
def test_the_device_decides_the_backend(gpus, n_gpus, device, backend, kind):
    gpus(n_gpus)
    assert distributed.choose_device(device, backend) == kind
    assert distributed.backend_for(kind) == {"cuda": "nccl", "cpu": "gloo"}[kind]


def test_each_worker_takes_the_gpu_of_its_local_rank_never_a_shared_one(gpus, monkeypatch):
    chosen = gpus(4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert distributed.init(device="cuda") == torch.device("cuda", 3)
    assert chosen == [torch.device("cuda", 3)]
    monkeypatch.setenv("LOCAL_RANK", "4")  # LOCAL_RANK % 4 would have been cuda:0, shared with rank 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "5")
    with pytest.raises(ConfigError, match=r"^LOCAL_WORLD_SIZE = 5 processes on this node but 4 GPUs visible; "):
        distributed.device_for_rank("cuda")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    with pytest.raises(ConfigError, match=r"^LOCAL_RANK = 4 but 4 GPUs visible on this node; "):
        distributed.device_for_rank("cuda")


def test_init_in_one_process_returns_the_cpu_without_touching_cuda(gpus):
    chosen = gpus(2)
    assert distributed.init(device="cpu") == torch.device("cpu")
    assert distributed.init(device=torch.device("cpu"), backend="gloo") == torch.device("cpu")
    assert chosen == []
    with pytest.raises(ConfigError, match="^launch.backend = 'gloo' does not take CUDA tensors"):
        distributed.init(device=torch.device("cuda", 0), backend="gloo")
    with pytest.raises(ConfigError, match=r"^invalid device 'mps': must be one of auto, cpu, cuda$"):
        distributed.init(device="mps")


@pytest.fixture
def group(monkeypatch):
    """`group(backend)`: a process group of 4 with this backend, as make_mesh sees it; the mesh types it builds."""
    built = []
    monkeypatch.setattr(distributed, "init_device_mesh", lambda kind, shape, mesh_dim_names: built.append(kind))

    def make(backend: str) -> list:
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: 4)
        monkeypatch.setattr(dist, "get_backend", lambda: backend)
        return built

    return make


@pytest.mark.parametrize("backend,device_type,built", [
    ("gloo", None, "cpu"), ("gloo", "cpu", "cpu"), ("nccl", None, "cuda"), ("nccl", "cuda", "cuda"),
])
def test_the_mesh_is_on_the_device_the_backend_carries(group, backend, device_type, built):
    meshes = group(backend)
    distributed.make_mesh(dp=2, pp=2, device_type=device_type)
    assert meshes == [built]


@pytest.mark.parametrize("backend,device_type", [("gloo", "cuda"), ("nccl", "cpu")])
def test_a_mesh_the_backend_cannot_carry_is_refused(group, backend, device_type):
    group(backend)
    with pytest.raises(ConfigError) as e:
        distributed.make_mesh(dp=2, pp=2, device_type=device_type)
    assert str(e.value) == (f"device type {device_type!r} does not match the process group's backend {backend!r} "
                            f"(gloo carries CPU tensors, nccl CUDA ones); use the device plait.init returned")


def test_init_refuses_cuda_on_an_existing_gloo_group(gpus, group):
    gpus(1)
    group("gloo")
    with pytest.raises(ConfigError, match="^device type 'cuda' does not match the process group's backend 'gloo'"):
        distributed.init(device="auto")
