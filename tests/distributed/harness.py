"""The one way multi-process tests start their workers.

`spawn(fn, world_size, *args)` starts `world_size` fresh processes with the
environment torchrun would give them (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1 and a port found free at run time), one thread each;
each installs NCCL's completion rule on gloo (tests/distributed/deferred.py:
an async result lands only when its own Work is waited on), calls
`plait.init()` and then `fn(*args)`. It returns every rank's
result, in rank order, or raises with the failing rank's traceback. A run
that outlives `timeout` is killed and reported as a hang, never waited on.
`train_one_process` is the single-process run those workers are held to.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_module
import socket
import time
import traceback

import torch


def train_one_process(layers, batches, loss_fn, make_optimizer) -> tuple[dict, list[float]]:
    """The reference a parallel layout must reach: `layers` trained here on each whole batch in turn.

    Returns the final state_dict (keys of `nn.Sequential(*layers)`) and each step's loss.
    """
    model = torch.nn.Sequential(*layers)
    opt = make_optimizer(model.parameters())
    losses = []
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.state_dict(), losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, results, args, timeout_s, deferred_completion):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import torch.distributed as dist

    import plait
    from tests.distributed import deferred

    if deferred_completion:
        deferred.install()
    try:
        plait.init(timeout_s=timeout_s)
        value = fn(*args)
        buf = io.BytesIO()
        torch.save(value, buf)
        results.put((rank, buf.getvalue(), None))
    except BaseException:  # noqa: BLE001 - everything goes back to the test
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    """Fresh processes forked from a server that has imported torch and plait once.

    A spawned process spends seconds importing torch (and torch._dynamo, which
    the first optimizer pulls in); the fork server pays that once per session.
    It forks before any thread or process group exists, so each child starts
    as clean as a spawned one.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "plait", "plait.train",
                                "tests.distributed.deferred"])
    return ctx


def spawn(fn, world_size: int, *args, timeout: float = 240.0, collective_timeout_s: float = 60.0,
          deferred_completion: bool = True) -> list:
    """Run `fn(*args)` on `world_size` local processes in one gloo group; their results by rank.

    `deferred_completion=False` runs on plain gloo (only to show what the rule catches).
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, results, args, collective_timeout_s,
                                               deferred_completion), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            try:
                rank, payload, error = results.get(timeout=1.0)
            except queue_module.Empty:
                missing = sorted(set(range(world_size)) - set(got))
                dead = [r for r in missing if procs[r].exitcode is not None]
                if dead:
                    raise RuntimeError(f"ranks {dead} exited (code {procs[dead[0]].exitcode}) without a result") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f} s (a hang)") from None
                continue
            if error is not None:
                raise RuntimeError(f"rank {rank} failed:\n{error}")
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [torch.load(io.BytesIO(got[r]), weights_only=False) for r in range(world_size)]
