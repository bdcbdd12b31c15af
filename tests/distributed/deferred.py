"""NCCL's completion rule, enforced on gloo: a result lands only when its own `Work` is waited on.

gloo finishes an operation before `wait()` returns and writes into the
caller's tensor as soon as the data is there, so code that reads a result
without waiting on it (or waits on the wrong thing) still works on CPU. On
NCCL the operation runs on its own CUDA stream: only `work.wait()`, or
`wait()` on the work's own future, orders it before what the caller does
next. A `then()` child of that future, whose value holds no tensor, orders
nothing.

`install()` wraps the asynchronous calls plait makes (`all_reduce`,
`broadcast`, the reduce-scatter and the all-gather with `async_op=True`, and the receives of
`batch_isend_irecv`)
so that gloo runs them into private buffers, and the caller's tensor gets the
result only when the returned work, or its `get_future()`, is waited on.
Everything else (blocking collectives, sends) is left as it is. The
multi-process test harness installs it in every worker, so a missing or
misplaced wait fails an exactness test here as it would corrupt a run on NCCL.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


class _Landing:
    """Copies private buffers into the caller's tensors, once."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.pairs = pairs
        self.landed = False
        self.lock = threading.Lock()

    def __call__(self) -> None:
        with self.lock:
            if not self.landed:
                for private, caller in self.pairs:
                    caller.copy_(private)
                self.landed = True


class DeferredFuture(torch.futures.Future):
    """A work's own future: waiting on it (or reading its value) lands the result."""

    def __init__(self, real: torch.futures.Future, land: _Landing, value):
        super().__init__()
        self._land = land
        real.then(lambda fut: self._complete(fut, value))

    def _complete(self, fut, value) -> None:
        try:
            fut.wait()
            self.set_result(value)
        except Exception as e:  # noqa: BLE001 - handed to whoever waits
            self.set_exception(e)

    def wait(self):
        value = super().wait()
        self._land()
        return value

    def value(self):
        value = super().value()
        self._land()
        return value


class DeferredWork:
    """Stands for a `dist.Work` whose result reaches the caller's tensors only at `wait()`."""

    def __init__(self, real, land: _Landing, value):
        self._real = real
        self._land = land
        self._value = value

    def wait(self, *args, **kwargs):
        ok = self._real.wait(*args, **kwargs)
        self._land()
        return ok

    def get_future(self) -> DeferredFuture:
        return DeferredFuture(self._real.get_future(), self._land, self._value)

    def is_completed(self) -> bool:
        return self._real.is_completed()

    def __getattr__(self, name):
        return getattr(self._real, name)


_REAL: dict[str, object] = {}


def _all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    if not async_op:
        return _REAL["all_reduce"](tensor, op=op, group=group)
    private = tensor.clone()
    work = _REAL["all_reduce"](private, op=op, group=group, async_op=True)
    return DeferredWork(work, _Landing([(private, tensor)]), [tensor])


def _broadcast(tensor, src=None, group=None, async_op=False, group_src=None):
    if not async_op:
        return _REAL["broadcast"](tensor, src=src, group=group, group_src=group_src)
    private = tensor.clone()
    work = _REAL["broadcast"](private, src=src, group=group, async_op=True, group_src=group_src)
    return DeferredWork(work, _Landing([(private, tensor)]), [tensor])


def _reduce_scatter(name):
    def wrapper(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if not async_op:
            return _REAL[name](output, input, op=op, group=group)
        private = torch.empty_like(output)
        work = _REAL[name](private, input, op=op, group=group, async_op=True)
        return DeferredWork(work, _Landing([(private, output)]), [output])
    return wrapper


def _all_gather(name):
    def wrapper(output, input, group=None, async_op=False):
        if not async_op:
            return _REAL[name](output, input, group=group)
        private = torch.empty_like(output)
        work = _REAL[name](private, input, group=group, async_op=True)
        return DeferredWork(work, _Landing([(private, output)]), [output])
    return wrapper


def _batch_isend_irecv(ops):
    swapped, privates = [], []
    for op in ops:
        if op.op is c10d.irecv:
            private = torch.empty_like(op.tensor)
            swapped.append(dist.P2POp(c10d.irecv, private, group=op.group, tag=op.tag, group_peer=op.group_peer))
            privates.append((private, op.tensor))
        else:
            swapped.append(op)
            privates.append(None)
    works = _REAL["batch_isend_irecv"](swapped)
    if len(works) != len(ops):  # one handle for the whole batch: it lands every receive
        pairs = [p for p in privates if p is not None]
        return [DeferredWork(works[0], _Landing(pairs), None)] * len(ops) if pairs else works
    return [work if pair is None else DeferredWork(work, _Landing([pair]), [pair[1]])
            for work, pair in zip(works, privates)]


def install() -> None:
    """Wrap this process's asynchronous torch.distributed calls (idempotent)."""
    if _REAL:
        return
    wrappers = {"all_reduce": _all_reduce, "broadcast": _broadcast, "batch_isend_irecv": _batch_isend_irecv,
                "reduce_scatter_tensor": _reduce_scatter("reduce_scatter_tensor"),
                "all_gather_into_tensor": _all_gather("all_gather_into_tensor")}
    if hasattr(dist, "reduce_scatter_single"):  # torch >= 2.13's names for them
        wrappers["reduce_scatter_single"] = _reduce_scatter("reduce_scatter_single")
    if hasattr(dist, "all_gather_single"):
        wrappers["all_gather_single"] = _all_gather("all_gather_single")
    for name, wrapper in wrappers.items():
        _REAL[name] = getattr(dist, name)
        setattr(dist, name, wrapper)
